"""The batch-wise balance loss's count reduction (``model.balance: batch_aux``, report 4.5.3):
every DeepSeekMoE sums its expert counts and token count over the data-parallel ranks of its
pipeline stage before computing ``f_i``, so ``f_i`` covers the whole micro-batch round of the
data-parallel ranks (``plugins.model.balance.batch_balance_loss``). The model's math stays free
of distributed code: this installs the sum as each block's ``reduce_counts``."""

from __future__ import annotations

import functools

import torch.distributed as dist
from torch import nn

from ..model.balance import BALANCE
from ..model.moe import DeepSeekMoE


def install_count_reduction(model: nn.Module, group: dist.ProcessGroup | None) -> int:
    """Give every DeepSeekMoE of ``model`` whose mode uses the batch-wise loss a ``reduce_counts``
    over ``group`` (the stage's data-parallel ranks, which include its expert-parallel ones;
    None: the world). Every rank of ``group`` then runs its training forwards' reductions in the
    same order. Returns the number of blocks given one."""
    reduce = functools.partial(dist.all_reduce, group=group)  # a sum, in place
    blocks = [m for m in model.modules() if isinstance(m, DeepSeekMoE) and BALANCE[m.balance].loss == "batch"]
    for moe in blocks:
        moe.reduce_counts = reduce
    return len(blocks)
