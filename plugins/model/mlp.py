"""SwiGLU feed-forward: the dense FFN of the first layers and DeepSeekMoE's shared experts. With
``recompute`` (``train.memory.swiglu_recompute``) its output is recomputed in backward from the
kept SwiGLU input (``plugins.model.swiglu_recompute``), through ``gemm`` (FP8 under the FP8
policy) and ``store``."""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .gemm import Gemm
from .offload import HostOffload
from .swiglu_recompute import recomputed_swiglu


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.recompute = False
        self.gemm: Gemm = Gemm()
        self.store: Gemm = Gemm()
        self.offload: HostOffload | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            flat = x.reshape(-1, x.shape[-1])
            with self.offload.hooks() if self.offload is not None else contextlib.nullcontext():
                out = recomputed_swiglu(flat, (self.gate_proj.weight, self.up_proj.weight), self.down_proj.weight,
                                        self.gemm, self.store)
            return out.view(*x.shape[:-1], out.shape[-1])
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
