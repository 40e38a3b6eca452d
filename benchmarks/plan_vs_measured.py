"""The planner's predicted peak memory of the largest rank (``python -m launch.plan --device cpu``)
against the measured peak resident memory of real CPU launches: the tiny recipe (4 blocks) and the
scale probe of ``benchmarks/checkpoint_memory.py``, at (pp, ep) in {(1, 1), (1, 4), (2, 2), (4, 1)},
micro-batch 1, 2 steps and the final save, with each ``train.recompute`` mode asked for (``full``
at pp 2 x ep 2 is refused by the trainer and left out).

    python benchmarks/plan_vs_measured.py [--recompute none selective full] [--fp8 none emulated]
        [--precision fp32 bf16] [--recipes tiny "scale probe"] [--measured-from JSON] [--out FILE]

``--fp8 emulated`` runs both sides with the emulated FP8 linears and ``train.memory``'s defaults (FP8
activation storage, the weighted combine, the recomputed SwiGLU, pipeline sends released as they
complete): real float8 storage on the CPU, so what the planner counts for it is measured.
``--precision bf16`` runs both sides under ``train.precision: bf16`` (BF16 weights and activations,
FP32 gradient accumulators), the GPU's recipe, on the CPU.

Measured: the trainer's own ``peak_memory_mb`` of its last step (``ru_maxrss`` of each rank,
the largest over ranks). Not ``getrusage(RUSAGE_CHILDREN)`` of a wrapper around the launcher:
that read 2913 MB for the one-rank scale probe whose trainer peaked at 5307 MB (its own
``ru_maxrss`` and a ``ps`` sampler agree), missing the optimizer step. Predicted: the planner's
largest-rank total plus one constant per-process runtime (Python, torch, DeepSpeed, gloo),
calibrated once: the peak of the tiny recipe on one rank without recompute minus the planner's
total for it (the model there is ~80 MB of the ~0.6 GB); it is ``launch.plan``'s
``CPU_RUNTIME_OVERHEAD``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COMMON = ["--set", "train.micro_batch_size=1", "--set", "train.wandb_mode=disabled", "--set", "train.eval_interval=0",
          "--set", "data.dataset=runs/cache/tiny/packed", "--set", "data.tokenizer=runs/cache/tiny/tokenizer"]
RECIPES = {"tiny": ["--set", "model.num_hidden_layers=4"],
           "scale probe": ["--set", "model.n_routed_experts=64", "--set", "model.hidden_size=256",
                           "--set", "model.moe_intermediate_size=512", "--set", "model.num_hidden_layers=6"]}
LAYOUTS = [(1, 1), (1, 4), (2, 2), (4, 1)]
def ranks_of(pp: int, ep: int) -> int:
    return 1 if (pp, ep) == (1, 1) else 4


def measure(recipe: list[str], pp: int, ep: int, run_dir: Path, port: int) -> float:
    """Peak resident MB of the largest rank of a 2-step launch (one save at the end)."""
    command = ["deepspeed", "--num_gpus", str(ranks_of(pp, ep)), "--master_port", str(port), "launch/pretrain.py",
               "--config", "configs/tiny.yaml", "--run-dir", str(run_dir), "--steps", "2", "--pp", str(pp),
               "--ep", str(ep), *COMMON, *recipe]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode:
        raise SystemExit(f"pp {pp} ep {ep} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r][-1]["peak_memory_mb"]


def predict(recipe: list[str], pp: int, ep: int, recompute: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "launch.plan", "configs/tiny.yaml", "--device", "cpu", "--json",
                          "--pp", str(pp), "--ep", str(ep), "--dp", str(ranks_of(pp, ep) // pp), "--recompute",
                          recompute, *COMMON, *recipe], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/plan_vs_measured.json"))
    parser.add_argument("--measured-from", default=None, metavar="JSON",
                        help="reuse the measured peaks of an earlier result instead of launching again")
    parser.add_argument("--recompute", nargs="+", default=["none", "selective", "full"],
                        choices=["none", "selective", "full"], help="train.recompute modes to launch")
    parser.add_argument("--fp8", default="none", choices=["none", "emulated"], help="parallel.fp8 of every case")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="train.precision of every case")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    modes = args.recompute
    earlier = {(c["recipe"], c["pp"], c["ep"], c["recompute"], c.get("fp8", "none"), c.get("precision", "fp32")):
               c["measured_mb"]
               for c in json.loads(Path(args.measured_from).read_text())["cases"]} if args.measured_from else {}
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        port = 29600
        for name in args.recipes:
            recipe = [*RECIPES[name], "--set", f"parallel.fp8={args.fp8}", "--set", f"train.precision={args.precision}"]
            for pp, ep in LAYOUTS:
                for mode in modes:
                    if mode == "full" and pp > 1 and ep > 1:
                        continue  # the trainer refuses it (train.recompute: full with --pp > 1 and --ep > 1)
                    key = (name, pp, ep, mode, args.fp8, args.precision)
                    port += 1
                    measured = earlier[key] if key in earlier else measure(
                        [*recipe, "--set", f"train.recompute={mode}"] if mode != "none" else recipe, pp, ep,
                        Path(tmp) / f"run{port}", port)
                    plan = predict(recipe, pp, ep, mode)
                    cases.append({"recipe": name, "pp": pp, "ep": ep, "ranks": ranks_of(pp, ep), "recompute": mode,
                                  "fp8": args.fp8, "precision": args.precision,
                                  "measured_mb": measured, "plan_total_mb": plan["largest_rank_total_bytes"] / 2**20,
                                  "runtime_overhead_mb": plan["runtime_overhead_bytes"] / 2**20})
                    print(f"{name:12s} pp {pp} ep {ep} {mode:9s} fp8 {args.fp8} {args.precision} measured {measured:7.0f} MB "
                          f"planned {plan['largest_rank_total_bytes'] / 2**20 + plan['runtime_overhead_bytes'] / 2**20:7.0f} MB",
                          flush=True)
    overhead = cases[0]["runtime_overhead_mb"]
    rows = ["| recipe | (pp, ep) | ranks | recompute | fp8 | precision | planner (model) | predicted (+ runtime) | "
            "measured | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        c["predicted_mb"] = c["plan_total_mb"] + c["runtime_overhead_mb"]
        c["error"] = c["predicted_mb"] / c["measured_mb"] - 1
        rows.append(f"| {c['recipe']} | ({c['pp']}, {c['ep']}) | {c['ranks']} | {c['recompute']} | {c['fp8']} | "
                    f"{c['precision']} | "
                    f"{c['plan_total_mb']:.0f} MB | {c['predicted_mb']:.0f} MB | {c['measured_mb']:.0f} MB | "
                    f"{100 * c['error']:+.1f}% |")
    first = cases[0]
    calibration = first["measured_mb"] - first["plan_total_mb"]
    rows.append(f"\nruntime overhead per process: {overhead:.0f} MB (launch.plan's constant; this run's "
                f"{first['recipe']} ({first['pp']}, {first['ep']}) {first['recompute']} gives {calibration:.0f} MB); "
                f"largest error {100 * max(abs(c['error']) for c in cases):.1f}%")
    result = {"cases": cases, "runtime_overhead_mb": overhead, "calibration_mb": calibration, "table": "\n".join(rows)}
    print(result["table"])
    write_result(args.out, result)


if __name__ == "__main__":
    main()
