"""A checkpoint's weights as HF DeepseekV3 tensors, streamed (``python -m launch.convert``): read from
the sharded checkpoint one parameter (or a bounded batch of routed experts) at a time, so a
writer can emit them shard by shard and the host never holds the model. Router biases become
``e_score_correction_bias``; MTP lands at layer ``num_hidden_layers``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from plugins.interop.hf import hf_tensors
from plugins.model.deepseek_v3 import DeepSeekV3

from . import dcp_pieces
from .checkpointer import CheckpointError, expert_banks
from .dcp_pieces import Piece, PieceError
from .model_source import CheckpointSource

READ_BYTES = 2**30  # the routed experts of one bank read together: at most this many bytes


def _read(directory: Path, key: str, out: torch.Tensor, offset: int = 0, global_numel: int | None = None) -> None:
    try:
        if key.startswith("buffers/"):
            dcp_pieces.load(directory, [], {key: out})
        else:
            dcp_pieces.load(directory, [Piece(key, global_numel or out.numel(), offset, out.view(-1))])
    except PieceError as error:
        raise CheckpointError(f"{directory}: {error}") from None


def checkpoint_tensors(source: CheckpointSource, weights: str = "model") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs of a checkpoint, read piece by piece (a meta model gives names and
    shapes); ``weights="ema"`` reads the EMA of the weights."""
    config = source.config
    with torch.device("meta"):
        model = DeepSeekV3(config)
    banks, params = expert_banks(model), dict(model.named_parameters())
    for name, meta in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # the embedding's tensor (named once in the checkpoint)
        key = f"{weights}/{name}" if name in params else f"buffers/{name}"
        if name not in banks:
            value = torch.empty(meta.shape, dtype=meta.dtype)
            _read(source.directory, key, value)
            aliases = [name, "lm_head.weight"] if config.tie_word_embeddings and name == "embed_tokens.weight" else [name]
            for alias in aliases:
                yield from hf_tensors(alias, value, config)
            continue
        per_expert = meta[0].numel()
        batch = max(1, READ_BYTES // (4 * per_expert))
        for first in range(0, meta.shape[0], batch):
            part = torch.empty((min(batch, meta.shape[0] - first), *meta.shape[1:]))
            _read(source.directory, key, part, first * per_expert, meta.numel())
            yield from hf_tensors(name, part, config, first_expert=first)
