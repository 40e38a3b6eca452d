"""Activation recomputation (report 3.2.3) on the tiny recipe's model: per ``train.recompute`` mode,
the activation bytes autograd keeps for backward (per block and per micro-batch step, measured
with ``saved_tensors_hooks``: ``launch.training.memory.SavedActivations``) and the forward+backward time of
one micro-batch (median of interleaved repeats), both as ratios to ``none``. Prints a table,
writes JSON.

    python benchmarks/recompute.py [--micro-batch 4 --seq-len 128 --rounds 20]

Limits: fp32 on CPU. The tiny model's per-head tensors are small next to its hidden size (4 heads
x 48 against 128; DeepSeek-V3: 128 heads x 192 against 7168), so the share selective saves here
understates the report's model, and CPU step times weigh recomputed GEMMs differently from a GPU.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import time_interleaved, write_result  # benchmarks/ is the script directory, first on sys.path

from launch.training.memory import SavedActivations
from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.recompute import MODES, set_recompute

ROOT = Path(__file__).resolve().parents[1]


def measure(model: DeepSeekV3, ids: torch.Tensor) -> dict[str, int]:
    """Saved bytes of one forward: per block (main blocks by index, the MTP blocks as mtp.D) and in all."""
    blocks = {**{key: layer for key, layer in model.layers.items()}, **{f"mtp.{d}": m.block for d, m in enumerate(model.mtp)}}
    with SavedActivations(model) as saved:
        handles = []
        for name, block in blocks.items():
            handles.append(block.register_forward_pre_hook(lambda module, args, name=name: setattr(saved, "label", name)))
            handles.append(block.register_forward_hook(lambda *args: setattr(saved, "label", None)))
        out = model(ids, labels=ids.roll(-1, 1))
        for handle in handles:
            handle.remove()
    result = {"step": saved.bytes(), **{f"block {name}": saved.bytes(name) for name in blocks}}
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/recompute.json")
    args = parser.parse_args()
    config = ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml")
    ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    models = {}
    for mode in MODES:
        torch.manual_seed(0)
        models[mode] = DeepSeekV3(config)
        set_recompute(models[mode], mode)
    saved = {mode: measure(model, ids) for mode, model in models.items()}

    def step(model):
        def run():
            model(ids, labels=ids.roll(-1, 1)).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    times = time_interleaved({mode: step(model) for mode, model in models.items()}, args.warmup, args.rounds)
    rows = {}
    for mode in MODES:
        seconds = statistics.median(times[mode])
        rows[mode] = {"saved_bytes": saved[mode], "step_s": seconds,
                      "saved_vs_none": saved[mode]["step"] / saved["none"]["step"],
                      "block_saved_vs_none": {k: v / saved["none"][k] for k, v in saved[mode].items() if k != "step"},
                      "time_vs_none": seconds / statistics.median(times["none"])}
    blocks = [k for k in saved["none"] if k != "step"]
    print(f"tiny model, micro-batch {args.micro_batch} x {args.seq_len} tokens, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved forward+backward")
    print(f"{'mode':<10}{'saved/step MB':>14}{'vs none':>9}" + "".join(f"{b + ' MB':>16}" for b in blocks)
          + f"{'step ms':>10}{'vs none':>9}")
    for mode, row in rows.items():
        print(f"{mode:<10}{row['saved_bytes']['step'] / 2**20:>14.2f}{row['saved_vs_none']:>9.2f}"
              + "".join(f"{row['saved_bytes'][b] / 2**20:>16.3f}" for b in blocks)
              + f"{row['step_s'] * 1000:>10.1f}{row['time_vs_none']:>9.2f}")
    write_result(args.out, {"args": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
