"""A forward-only pass along the pipeline (validation, report 4.5): one micro-batch goes through
every stage in order, each on the rank that holds it (the schedule's placement of its first
micro-batch, so every block runs once), hidden states sent point-to-point on the same channels
the training schedule uses. No autograd state is kept."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .dualpipe import Layout
from .pipeline_stages import PipelineShard


@torch.no_grad()
def pipeline_logits(shard: PipelineShard, layout: Layout, rank: int, peers: list[int],
                    channels: dict[tuple[str, int], dist.ProcessGroup | None],
                    input_ids: torch.Tensor) -> torch.Tensor | None:
    """The main model's logits [B, T, V] of ``input_ids`` [B, T] on the rank that holds the last
    stage (MTP modules skipped), ``None`` on the other pipeline ranks. Every pipeline rank of the
    replica calls it with the same ids."""
    model = shard.model
    rope = model.rope(input_ids.shape[1], input_ids.device)
    dtype = next(model.parameters()).dtype
    h = None
    for stage in range(layout.stages):
        owner, chunk = layout.place(stage, 0)
        if owner != rank:
            continue
        if stage == 0:
            h = model.embed_tokens(input_ids)
        else:
            sender, sender_chunk = layout.place(stage - 1, 0)
            if sender != rank:
                h = torch.empty((*input_ids.shape, shard.config.hidden_size), dtype=dtype, device=input_ids.device)
                dist.recv(h, src=peers[sender], group=channels[("act", sender_chunk)])
        h = model.trunk(h, rope, [str(i) for i in shard.spans[stage]])
        if stage == layout.stages - 1:
            return model.outputs(h, input_ids, rope, with_mtp=False).logits
        receiver, _ = layout.place(stage + 1, 0)
        if receiver != rank:
            dist.send(h.contiguous(), dst=peers[receiver], group=channels[("act", chunk)])
    return None
