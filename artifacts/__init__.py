"""The mlcc artifact format: a folder with a compiled library, weight shards, tokenizer files and a manifest.

Both the compiler (writer) and the runtime (reader) use this package; it depends on neither.
"""

from artifacts.errors import MlccError
from artifacts.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, load_manifest, verify_files

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "MlccError", "load_manifest", "verify_files"]
