"""Export a pre-training checkpoint to a HF DeepseekV3 directory (router biases included as
``e_score_correction_bias``, MTP at layer ``num_hidden_layers``), streamed: tensors are read from
the sharded checkpoint one parameter (or a bounded batch of routed experts) at a time and written
shard by shard, so the host never holds the model.

    python -m launch.convert RUN_DIR|CHECKPOINT_DIR OUT_DIR [--tag stepNNNNNNNN] [--ema]

``--ema`` exports the run's host-memory EMA of the weights (``train.ema``) in place of the weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from plugins.atomic import check_output_dir
from plugins.errors import run_cli
from plugins.interop.hf import hf_tensors, write_hf_directory
from plugins.model.deepseek_v3 import DeepSeekV3

from . import dcp_pieces
from .checkpoint import CheckpointError, expert_banks, holds_ema
from .dcp_pieces import Piece, PieceError
from .model_source import CheckpointSource, find_checkpoint

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory or one of its checkpoint directories")
    parser.add_argument("output", type=Path, help="new directory for the HF checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    parser.add_argument("--ema", action="store_true", help="export the EMA of the weights (train.ema)")
    args = parser.parse_args(argv)

    def body() -> int:
        check_output_dir(args.output, overwrite=False, option="HF output directory")
        source = find_checkpoint(args.run_dir, args.tag)
        if args.ema and not holds_ema(source.directory):
            raise CheckpointError(f"{source.directory}: holds no EMA (--ema needs a run with train.ema)")
        weights = "ema" if args.ema else "model"
        write_hf_directory(source.config, torch.float32, checkpoint_tensors(source, weights), args.output)
        print(f"wrote {args.output}/ (HF DeepseekV3, from {source.directory}{', EMA weights' if args.ema else ''})")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
