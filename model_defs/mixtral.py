"""Mixtral: the Mistral block (grouped-query attention, optional sliding window) with a sparse mixture of SwiGLU
experts as every layer's MLP, `top_k` of `num_experts` per token (model_defs/moe.py).

Weights are named after llama.cpp's GGUF tensors: the router `ffn_gate_inp`, the experts stacked as
`ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps` [experts, out, in]. HF checkpoints store one tensor per expert
(`block_sparse_moe.experts.E.w1/w3/w2`); `map_hf_name` names each `...exps.weight` with its expert index, and
the compiler stacks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from artifacts.errors import MlccError
from model_defs import llama
from model_defs.common import SwiGLU
from model_defs.llama import LlamaConfig, LlamaModel
from model_defs.moe import Router, sparse_moe
from tir_kernels.experts import ExpertLinear


@dataclass
class MixtralConfig(LlamaConfig):
    num_experts: int = 8
    top_k: int = 2


def config_from_hf(cfg: dict[str, Any]) -> MixtralConfig:
    base = LlamaConfig.from_hf(cfg)
    config = MixtralConfig(**vars(base))
    config.sliding_window = cfg.get("sliding_window") or None
    config.num_experts = int(cfg["num_local_experts"])
    config.top_k = int(cfg.get("num_experts_per_tok", 2))
    _check_experts(config)
    return config


def config_from_gguf(meta: dict[str, Any], has_output: bool) -> MixtralConfig:
    """A llama.cpp Mixtral file: architecture `llama` with `expert_count` experts, `expert_used_count` per token."""
    config = MixtralConfig(**vars(llama.config_from_gguf(meta, has_output)))
    config.num_experts = int(meta.get("expert_count", 0))
    config.top_k = int(meta.get("expert_used_count", 2))
    _check_experts(config)
    return config


def _check_experts(config: MixtralConfig) -> None:
    if not 1 <= config.top_k <= config.num_experts:
        raise MlccError(f"a mixture of {config.num_experts} experts cannot route {config.top_k} per token")


class Block(llama.Block):
    """The Llama decoder layer with the mixture of experts in place of its MLP."""

    def __init__(self, cfg: MixtralConfig):
        self.cfg = cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = nn.RMSNorm(h, -1, cfg.rms_eps, bias=False)
        self.attn_q = nn.Linear(h, cfg.num_heads * hd, bias=False)
        self.attn_k = nn.Linear(h, cfg.num_kv_heads * hd, bias=False)
        self.attn_v = nn.Linear(h, cfg.num_kv_heads * hd, bias=False)
        self.attn_output = nn.Linear(cfg.num_heads * hd, h, bias=False)
        self.ffn_norm = nn.RMSNorm(h, -1, cfg.rms_eps, bias=False)
        self.ffn_gate_inp = Router(h, cfg.num_experts)
        self.ffn_gate_exps = ExpertLinear(cfg.num_experts, h, cfg.intermediate_size)
        self.ffn_up_exps = ExpertLinear(cfg.num_experts, h, cfg.intermediate_size)
        self.ffn_down_exps = ExpertLinear(cfg.num_experts, cfg.intermediate_size, h)
        self.ffn_act = SwiGLU()

    def mlp(self, x: Tensor) -> Tensor:
        experts = (self.ffn_gate_inp, self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps)
        return sparse_moe(x, *experts, self.ffn_act, self.cfg.top_k)


class MixtralModel(LlamaModel):
    def __init__(self, cfg: MixtralConfig):
        super().__init__(cfg)
        self.blk = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])


HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
EXPERT_ROLES = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def map_hf_name(name: str) -> str | None:
    """GGUF name for an HF tensor name; an expert's tensor as `blk.L.ffn_*_exps.weight[E]` (stacked by the
    compiler); None for tensors to skip; KeyError for unknown names."""
    expert = HF_EXPERT.fullmatch(name)
    if expert:
        layer, index, role = expert.groups()
        return f"blk.{layer}.{EXPERT_ROLES[role]}.weight[{index}]"
    router = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", name)
    if router:
        return f"blk.{router.group(1)}.ffn_gate_inp.weight"
    return llama.map_hf_name(name)


Model = MixtralModel
