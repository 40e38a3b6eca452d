"""Forward+backward throughput of our DeepSeekV3 vs transformers' DeepseekV3ForCausalLM on the
same config and the same weights (exported with ``save_hf_checkpoint``). Prints a table, writes JSON.

    python benchmarks/model_vs_hf.py --config configs/tiny.yaml --batch 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import warnings
from pathlib import Path

import torch
from common import time_interleaved, write_result  # benchmarks/ is the script directory, first on sys.path

from plugins.interop.hf import save_hf_checkpoint
from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field, e.g. --set n_routed_experts=64")
    parser.add_argument("--output", default="benchmarks/results/model_vs_hf.json")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = ModelConfig.from_yaml(args.config, [f"model.{item}" for item in args.set])
    overrides = dict(item.split("=", 1) for item in args.set)
    # Same work on both sides: transformers has no MTP module, so time ours without it.
    config.num_nextn_predict_layers = 0
    ours = DeepSeekV3(config).train()
    theirs = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_hf_checkpoint(ours, Path(tmp) / "hf")
        for experts in ("grouped_mm", "eager"):
            model = AutoModelForCausalLM.from_pretrained(
                Path(tmp) / "hf", attn_implementation="sdpa", experts_implementation=experts
            ).train()
            assert model.config._experts_implementation == experts
            theirs[f"transformers ({experts} experts)"] = model

    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
    labels = torch.roll(ids, -1, 1)
    tokens = ids.numel()

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(ids, labels=labels).loss.backward()

    def theirs_step(model):
        model.zero_grad(set_to_none=True)
        # transformers shifts labels itself: give it the inputs as labels.
        model(ids, labels=ids).loss.backward()

    with torch.no_grad():
        reference = ours(ids).logits
        diff = max((reference - m(ids).logits).abs().max().item() for m in theirs.values())
    steps = {"ours (DeepSeekV3)": ours_step}
    steps.update({name: (lambda m=m: theirs_step(m)) for name, m in theirs.items()})
    rows = {}
    for name, times in time_interleaved(steps, args.warmup, args.steps).items():
        rows[name] = {"median_s": statistics.median(times), "tokens_per_s": tokens / statistics.median(times)}
    base = rows["ours (DeepSeekV3)"]["tokens_per_s"]
    for row in rows.values():
        row["ours_speedup"] = base / row["tokens_per_s"]

    print(f"forward+backward, {args.config} {' '.join(args.set)} (MTP off), batch {args.batch} x {args.seq_len} tokens, "
          f"{torch.get_num_threads()} threads, max |logit diff| {diff:.2e}")
    print(f"{'implementation':<36}{'median step (s)':>16}{'tokens/s':>12}{'ours is':>10}")
    for name, row in rows.items():
        print(f"{name:<36}{row['median_s']:>16.4f}{row['tokens_per_s']:>12.0f}{row['ours_speedup']:>9.2f}x")
    result = {
        "config": args.config, "overrides": overrides, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "max_logit_diff": diff, "results": rows,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
