"""The mlcc runtime: loads an artifact with TVM's runtime only (no compiler, model_defs or quant_schemes)."""

from runtime.engine import Delta, Engine, Request, Result
from runtime.sampler import SamplingParams, TokenLogprob
from runtime.serving import RequestHandle, ServingEngine

__all__ = ["Delta", "Engine", "Request", "RequestHandle", "Result", "SamplingParams", "ServingEngine", "TokenLogprob"]
