"""Export a pre-training checkpoint to a HF DeepseekV3 directory (router biases included as
``e_score_correction_bias``, MTP at layer ``num_hidden_layers``), streamed: tensors are read from
the sharded checkpoint one parameter (or a bounded batch of routed experts) at a time
(``launch.checkpointing.export``) and written shard by shard, so the host never holds the model.

    python -m launch.convert RUN_DIR|CHECKPOINT_DIR OUT_DIR [--tag stepNNNNNNNN] [--ema] [--fp8]

``--ema`` exports the run's host-memory EMA of the weights (``train.ema``) in place of the weights.
``--fp8`` writes DeepSeek's FP8 release format (``plugins.interop.fp8_release``): the linears of
attention, FFNs and experts quantised from the FP32 master weights per 128x128 block, the rest BF16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from launch.checkpointing.checkpointer import CheckpointError, holds_ema
from launch.checkpointing.export import checkpoint_tensors
from launch.checkpointing.model_source import find_checkpoint
from plugins.atomic import check_output_dir
from plugins.errors import run_cli
from plugins.interop.hf import write_hf_directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory or one of its checkpoint directories")
    parser.add_argument("output", type=Path, help="new directory for the HF checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    parser.add_argument("--ema", action="store_true", help="export the EMA of the weights (train.ema)")
    parser.add_argument("--fp8", action="store_true",
                        help="DeepSeek's FP8 release format (E4M3 linears with 128x128 block scales, the rest BF16)")
    args = parser.parse_args(argv)

    def body() -> int:
        check_output_dir(args.output, overwrite=False, option="HF output directory")
        source = find_checkpoint(args.run_dir, args.tag)
        if args.ema and not holds_ema(source.directory):
            raise CheckpointError(f"{source.directory}: holds no EMA (--ema needs a run with train.ema)")
        weights = "ema" if args.ema else "model"
        write_hf_directory(source.config, torch.float32, checkpoint_tensors(source, weights), args.output, fp8=args.fp8)
        form = "HF DeepseekV3, FP8 release format" if args.fp8 else "HF DeepseekV3"
        print(f"wrote {args.output}/ ({form}, from {source.directory}{', EMA weights' if args.ema else ''})")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
