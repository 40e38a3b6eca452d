"""Peak memory of the largest rank over construction, 3 training steps and one checkpoint save, on a
"scale probe" (the tiny recipe with 64 routed experts, hidden 256, moe_intermediate_size 512, 6
blocks: the routed experts dominate), per layout, for this code and for the obvious alternative —
the code before rank-local construction and sharded checkpoints (every rank built the whole model;
every save gathered every parameter's FP32 value and moments on every rank), a git revision run
from a worktree on the same data. Also the checkpoint bytes each rank wrote, and the construction
peak of one rank of the 15.7B ablation model at (pp 2, ep 4) of 8 ranks, built alone.

    python benchmarks/checkpoint_memory.py [--baseline REV] [--out benchmarks/results/checkpoint_memory.json]

Peaks are each launch's largest process over the whole run, read from every process of the
launch's tree while it runs (``common.run_with_peak``: VmHWM and RSS every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import run_with_peak, write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ["--set", "model.n_routed_experts=64", "--set", "model.hidden_size=256",
         "--set", "model.moe_intermediate_size=512", "--set", "model.num_hidden_layers=6",
         "--set", "train.micro_batch_size=1", "--set", "train.wandb_mode=disabled",
         "--set", "data.dataset=runs/cache/tiny/packed", "--set", "data.tokenizer=runs/cache/tiny/tokenizer"]
LAYOUTS = {"1 rank": (1, []), "dp 4": (4, []), "ep 4": (4, ["--ep", "4"]), "pp 2 x ep 2": (4, ["--pp", "2", "--ep", "2"])}


def run_layout(code: Path, ranks: int, layout: list[str], run_dir: Path, port: int) -> dict:
    command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port),
               "launch/pretrain.py", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),  # the revision's own recipe
               "--steps", "3", "--save-interval", "3", *PROBE, *layout]
    env = {**os.environ, "PYTHONPATH": str(code)}  # the revision's own packages, ahead of the editable install
    result, peak_mb = run_with_peak(command, cwd=code, timeout=1800, env=env)
    if result.returncode:
        raise SystemExit(f"{code}: {' '.join(layout) or '1 rank'} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    built = re.search(r"peak memory after construction (\d+) MB", result.stdout)
    save = re.search(r"saved checkpoint \S+ (?:in [\d.]+ s )?\(memory added while at it: (\d+) MB", result.stdout)
    step = run_dir / "checkpoints" / "step00000003"
    files = sorted(p for p in step.rglob("*") if p.is_file() and not p.name.startswith("rng_"))
    return {"peak_mb": peak_mb,
            "construction_peak_mb": int(built[1]) if built else None,
            "save_added_mb": int(save[1]) if save else None,
            "checkpoint_files": {p.name: p.stat().st_size for p in files},
            "largest_checkpoint_file_mb": max(p.stat().st_size for p in files) / 2**20}


def construction_15b() -> dict:
    """One rank of the 15.7B ablation model at (pp 2 DualPipe, ep 4), materialised in bf16 alone."""
    code = ("import resource, torch; from plugins.model.config import ModelConfig; "
            "from plugins.model.init import materialize; from plugins.parallel.rank_share import rank_model; "
            "c = ModelConfig.from_yaml('configs/ablation_16b.yaml'); m = rank_model(c, 2, 4, 'dualpipe', 0, 0); "
            "materialize(m, 'cpu', c.initializer_range, 0, 0, torch.bfloat16); "
            "print(sum(p.numel() for p in m.parameters()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    params, peak_kb = (int(x) for x in out.split()[-2:])
    return {"rank_parameters": params, "rank_bf16_mb": params * 2 / 2**20, "peak_mb": peak_kb / 1024,
            "whole_model_fp32_mb": 15_706_484_224 * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="8e3f4fb", help="the revision before sharded checkpoints")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/checkpoint_memory.json"))
    parser.add_argument("--baseline-from", default=None, metavar="JSON",
                        help="take the baseline's numbers from an earlier result instead of running it again")
    args = parser.parse_args()
    earlier = json.loads(Path(args.baseline_from).read_text())["layouts"] if args.baseline_from else None
    results = {"layouts": {}, "baseline": args.baseline}
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        (baseline / "runs").symlink_to(ROOT / "runs")
        try:
            for i, (name, (ranks, layout)) in enumerate(LAYOUTS.items()):
                ours = run_layout(ROOT, ranks, layout, Path(tmp) / f"ours{i}", 29400 + 2 * i)
                before = earlier[name]["before"] if earlier else \
                    run_layout(baseline, ranks, layout, Path(tmp) / f"base{i}", 29401 + 2 * i)
                results["layouts"][name] = {"ours": ours, "before": before, "ratio": ours["peak_mb"] / before["peak_mb"]}
                print(f"{name:12s} peak {ours['peak_mb']:7.0f} MB (before {before['peak_mb']:7.0f} MB, "
                      f"{ours['peak_mb'] / before['peak_mb']:.2f}x); largest checkpoint file "
                      f"{ours['largest_checkpoint_file_mb']:.1f} MB (before {before['largest_checkpoint_file_mb']:.1f})",
                      flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)
    results["ablation_16b_rank_construction"] = construction_15b()
    single = results["layouts"]["1 rank"]["ours"]["peak_mb"]
    rows = ["| layout | peak, this code | peak, before | ratio | construction peak | added by the save | "
            "largest checkpoint file (this / before) |", "|---|---|---|---|---|---|---|"]
    for name, r in results["layouts"].items():
        rows.append(f"| {name} | {r['ours']['peak_mb']:.0f} MB | {r['before']['peak_mb']:.0f} MB | {r['ratio']:.2f} | "
                    f"{r['ours']['construction_peak_mb']} MB | {r['ours']['save_added_mb']} MB | "
                    f"{r['ours']['largest_checkpoint_file_mb']:.1f} / {r['before']['largest_checkpoint_file_mb']:.1f} MB |")
    c = results["ablation_16b_rank_construction"]
    rows.append(f"\nep 4 largest rank / 1 rank: {results['layouts']['ep 4']['ours']['peak_mb'] / single:.2f}")
    rows.append(f"15.7B ablation, one rank of (pp 2, ep 4): {c['rank_parameters'] / 1e9:.2f}B parameters, bf16 "
                f"{c['rank_bf16_mb']:.0f} MB, construction peak {c['peak_mb']:.0f} MB (whole model in FP32: "
                f"{c['whole_model_fp32_mb']:.0f} MB, never built)")
    results["table"] = "\n".join(rows)
    print(results["table"])
    write_result(args.out, results)


if __name__ == "__main__":
    main()
