"""The step-time model (``launch.plan --hardware``) against measured steps on this machine: for
each case, calibrate (``python -m launch.calibrate``), predict the step (``launch.plan --device cpu
--hardware FILE --global-batch 8 --json``), run the launcher 41 steps and take the median
``step_seconds`` of steps 10-40 — back to back, so the calibration sees the load the run sees. The
cases: the tiny recipe at 1 rank, DualPipe pp 2, EP 2, pp 2 x ep 2 (global batch 8 sequences of
128 tokens; the micro-batch each schedule needs). Every rank runs one thread (``OMP_NUM_THREADS=1``),
as the model assumes; the load average before and after each case is recorded.

    python benchmarks/time_vs_measured.py [--cases NAME ...] [--steps 41] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8
COMMON = ["--set", "train.wandb_mode=disabled", "--set", "train.eval_interval=0", "--set", "train.save_interval=100000",
          "--set", f"train.batch.start={BATCH}", "--set", f"train.batch.final={BATCH}"]
CASES = {  # name: (pp, ep, ranks, micro-batch)
    "tiny, 1 rank": (1, 1, 1, 4),
    "DualPipe pp 2": (2, 1, 2, 2),
    "EP 2": (1, 2, 2, 4),
    "pp 2 x ep 2": (2, 2, 4, 1),
}


def run(command: list[str], env: dict, timeout: float = 3600) -> str:
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


def case(name: str, pp: int, ep: int, ranks: int, micro: int, steps: int, work: Path, port: int, env: dict) -> dict:
    hw = work / f"hw_{ranks}.yaml"
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    run([sys.executable, "-m", "launch.calibrate", "--output", str(hw), "--ranks", str(max(ranks, 2)),
         "--device", "cpu"], env)
    calibrate_s = time.perf_counter() - started
    layout = ["--pp", str(pp), "--ep", str(ep), "--set", f"train.micro_batch_size={micro}"]
    plan = json.loads(run([sys.executable, "-m", "launch.plan", "configs/tiny.yaml", "--device", "cpu", "--dp",
                           str(ranks // pp), "--hardware", str(hw), "--global-batch", str(BATCH), "--json", *layout,
                           *COMMON], env))
    run_dir = work / name.replace(" ", "_").replace(",", "")
    run(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), "launch/pretrain.py", "--config",
         "configs/tiny.yaml", "--run-dir", str(run_dir), "--steps", str(steps), *layout, *COMMON], env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = statistics.median(r["step_seconds"] for r in records if "step_seconds" in r and 10 <= r["step"] <= 40)
    predicted = plan["step_seconds"]
    return {"case": name, "pp": pp, "ep": ep, "ranks": ranks, "micro_batch": micro, "predicted_s": predicted,
            "measured_median_s": measured, "error": predicted / measured - 1, "breakdown": plan["breakdown"],
            "background_load": plan_hw_load(hw), "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0], "calibrate_s": calibrate_s}


def plan_hw_load(path: Path) -> float:
    import yaml

    return float(yaml.safe_load(path.read_text()).get("background_load", 0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "time_vs_measured.json"))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.cases):
            rows.append(case(name, *CASES[name], args.steps, Path(tmp), 29700 + i, env))
            r = rows[-1]
            print(f"{name}: predicted {r['predicted_s']:.3f} s, measured {r['measured_median_s']:.3f} s "
                  f"({100 * r['error']:+.1f}%), background load {r['background_load']}", flush=True)
    print("\n| case | ranks | micro-batch | predicted | measured (median, steps 10-40) | error | background load | "
          "load average before / after |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ranks']} | {r['micro_batch']} | {r['predicted_s']:.3f} s | "
              f"{r['measured_median_s']:.3f} s | {100 * r['error']:+.1f}% | {r['background_load']:.1f} | "
              f"{r['load_average_before']:.1f} / {r['load_average_after']:.1f} |")
    write_result(args.out, {"cases": rows, "cpu_count": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
