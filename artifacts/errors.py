"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class MlccError(Exception):
    """A user-facing failure: bad input, a corrupt file, an unsupported option."""
