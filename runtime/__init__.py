"""The mlcc runtime: loads an artifact with TVM's runtime only (no compiler, model_defs or quant_schemes)."""

from runtime.engine import Engine, Result
from runtime.sampler import SamplingParams

__all__ = ["Engine", "Result", "SamplingParams"]
