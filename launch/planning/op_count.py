"""How many ops (kernels) this project's model runs per block: the count the step-time model
multiplies by the hardware's fixed cost per op (launch, dispatch, Python), which dominates small
shapes (the tiny recipe on a CPU, small experts on a GPU).

Counted, not guessed: the model (``plugins.model.deepseek_v3``) at the config's structure but toy
widths runs one forward and backward on the CPU under a dispatch mode that counts every ATen op
that is not a view; forward hooks attribute each op to a dense block, a MoE block or the rest (the
embedding, final norm, head, losses and MTP, which sit on the last stage). Op counts do not depend
on widths (the experts run as one grouped GEMM), so the toy model's counts are the real one's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3


@dataclass(frozen=True)
class OpCount:
    forward: int
    backward: int


@dataclass(frozen=True)
class ModelOps:
    """Ops per micro-batch of one dense block, one MoE block and the rest (``head``)."""

    dense: OpCount
    moe: OpCount
    head: OpCount


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.where = "head"
        self.counts = {"dense": 0, "moe": 0, "head": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[self.where] += 1
        return func(*args, **(kwargs or {}))


def toy_config(config: ModelConfig) -> ModelConfig:
    """The config's structure (one dense block if it has any, one MoE block, MTP, routing) at toy widths."""
    dense = min(config.first_k_dense_replace, 1)
    return dataclasses.replace(
        config, vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        num_attention_heads=2, q_lora_rank=16 if config.q_lora_rank else config.q_lora_rank, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_hidden_layers=dense + 1,
        first_k_dense_replace=dense)


def count_ops(config: ModelConfig) -> ModelOps:
    """Ops per micro-batch of each block kind (forward, and backward in the same proportions as
    the whole model's backward to its forward: autograd runs the backward outside module hooks)."""
    return _count(json.dumps(config.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _count(key: str) -> ModelOps:
    toy = toy_config(ModelConfig.from_dict(json.loads(key)))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DeepSeekV3(toy)
        ids = torch.randint(0, toy.vocab_size, (1, 16))
    counter = _Counter()

    def enter(kind):
        def hook(module, args):
            counter.where = kind
        return hook

    def leave(module, args, output):
        counter.where = "head"

    for key, layer in model.layers.items():
        layer.register_forward_pre_hook(enter("moe" if toy.is_moe_layer(int(key)) else "dense"))
        layer.register_forward_hook(leave)
    with counter:
        loss = model(ids, labels=ids).loss
    forward = dict(counter.counts)
    counter.counts = {k: 0 for k in forward}
    with counter:
        loss.backward()
    ratio = sum(counter.counts.values()) / sum(forward.values())
    per = {k: OpCount(v, round(v * ratio)) for k, v in forward.items()}
    return ModelOps(dense=per["dense"] if toy.first_k_dense_replace else OpCount(0, 0), moe=per["moe"],
                    head=per["head"])
