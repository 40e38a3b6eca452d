"""Export a pre-training checkpoint to a HF DeepseekV3 directory (router biases included as
``e_score_correction_bias``, MTP at layer ``num_hidden_layers``).

    python -m launch.convert RUN_DIR OUT_DIR [--tag stepNNNNNNNN]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from plugins.errors import ConfigError, run_cli
from plugins.interop.hf import save_hf_checkpoint
from plugins.model.balance import reset_expert_loads
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.rope import RotaryEmbedding

from .checkpoint import Checkpointer, expert_parameter_names, is_checkpoint, read_dense, read_experts
from .config import load_run_config


def load_checkpoint_model(run_dir: Path, tag: str | None = None) -> tuple[DeepSeekV3, str]:
    """The model of a run's checkpoint (default: the latest complete one), built from its config.yaml,
    with every routed expert whatever expert-parallel size wrote it."""
    run = load_run_config(run_dir / "config.yaml")
    tag = tag or Checkpointer(run_dir, rank=0).latest_tag()
    if tag is None:
        raise ConfigError(f"{run_dir}: no complete checkpoint (checkpoints/latest is missing)")
    directory = run_dir / "checkpoints" / tag
    if not is_checkpoint(directory):
        raise ConfigError(f"{directory}: no dense.pt or dense_ppNNN.pt (not a checkpoint)")
    with torch.device("meta"):
        model = DeepSeekV3(run.model)
    saved = read_dense(directory)
    names = expert_parameter_names(model)
    experts = read_experts(directory, names, 0, run.model.n_routed_experts) if names else {}
    state = {name: value["value"] for name, value in {**saved["params"], **experts}.items()}
    # Transformer-Engine linears (--fp8 te) add FP8 metadata next to the same weights.
    state.update({key: value for key, value in saved["buffers"].items() if not key.endswith("._extra_state")})
    model.load_state_dict(state, assign=True)
    model.rotary = RotaryEmbedding(run.model)  # its frequencies are derived, not stored
    reset_expert_loads(model.moe_layers())  # nor are the load counters
    return model, tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("output", type=Path, help="new directory for the HF checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    args = parser.parse_args(argv)

    def body() -> int:
        model, tag = load_checkpoint_model(args.run_dir, args.tag)
        save_hf_checkpoint(model, args.output)
        print(f"wrote {args.output}/ (HF DeepseekV3, from {args.run_dir}/checkpoints/{tag})")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
