"""The step-time model (``launch.plan --hardware``) against measured steps on this machine: for
each case, calibrate (``python -m launch.calibrate``), predict the step (``launch.plan --device cpu
--hardware FILE --global-batch 8 --json``), run the launcher 41 steps and take the median
``step_seconds`` of steps 10-40 — back to back, so the calibration sees the load the run sees. The
cases: the tiny recipe at 1 rank, DualPipe pp 2, EP 2, pp 2 x ep 2 (global batch 8 sequences of
128 tokens; the micro-batch each schedule needs). Every rank runs one thread (``OMP_NUM_THREADS=1``),
as the model assumes.

The machine is shared: other work's load is the one figure that moves between the calibration and
the run. So each case is predicted twice: with the calibration's own background load (what
``launch.plan --hardware FILE`` says), and with the background load during the run (the kernel's
1-minute load average sampled every 2 s while it runs, less the run's own ranks), every other
figure the calibration's. Neither reads the run's timings.

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

import yaml
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


def launch_sampling_load(command: list[str], env: dict, timeout: float = 3600) -> list[float]:
    """Run ``command``; the 1-minute load average every 2 s while it runs."""
    samples = []
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        started = time.monotonic()
        while process.poll() is None:
            samples.append(os.getloadavg()[0])
            if time.monotonic() - started > timeout:
                process.kill()
                raise SystemExit(f"{' '.join(command)}: timed out")
            time.sleep(2)
        if process.returncode:
            out.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{out.read()[-4000:]}")
    return samples


def predict(hw: Path, layout: list[str], ranks: int, pp: int, env: dict) -> dict:
    return json.loads(run([sys.executable, "-m", "launch.plan", "configs/tiny.yaml", "--device", "cpu", "--dp",
                           str(ranks // pp), "--hardware", str(hw), "--global-batch", str(BATCH), "--json", *layout,
                           *COMMON], env))


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
    plan = predict(hw, layout, ranks, pp, env)
    run_dir = work / name.replace(" ", "_").replace(",", "")
    samples = launch_sampling_load(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port),
                                    "launch/pretrain.py", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
                                    "--steps", str(steps), *layout, *COMMON], env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = statistics.median(r["step_seconds"] for r in records if "step_seconds" in r and 10 <= r["step"] <= 40)
    profile = yaml.safe_load(hw.read_text())
    during = max(0.0, statistics.mean(samples) - ranks)
    at_run = work / f"hw_{ranks}_during.yaml"
    at_run.write_text(yaml.safe_dump({**profile, "background_load": round(during, 2)}, sort_keys=False))
    plan_during = predict(at_run, layout, ranks, pp, env)
    return {"case": name, "pp": pp, "ep": ep, "ranks": ranks, "micro_batch": micro,
            "predicted_s": plan["step_seconds"], "predicted_at_run_load_s": plan_during["step_seconds"],
            "measured_median_s": measured, "error": plan["step_seconds"] / measured - 1,
            "error_at_run_load": plan_during["step_seconds"] / measured - 1, "breakdown": plan["breakdown"],
            "background_load_calibrated": profile.get("background_load", 0.0), "background_load_during_run": during,
            "load_average_before": load_before, "calibrate_s": calibrate_s}


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
            print(f"{name}: measured {r['measured_median_s']:.3f} s; predicted {r['predicted_s']:.3f} s "
                  f"({100 * r['error']:+.1f}%, background load {r['background_load_calibrated']:.1f}), "
                  f"{r['predicted_at_run_load_s']:.3f} s at the run's load ({100 * r['error_at_run_load']:+.1f}%, "
                  f"{r['background_load_during_run']:.1f})", flush=True)
    print("\n| case | ranks | micro-batch | measured (median, steps 10-40) | predicted (calibration's load) | error | "
          "predicted (load during the run) | error | background load: calibration / run |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ranks']} | {r['micro_batch']} | {r['measured_median_s']:.3f} s | "
              f"{r['predicted_s']:.3f} s | {100 * r['error']:+.1f}% | {r['predicted_at_run_load_s']:.3f} s | "
              f"{100 * r['error_at_run_load']:+.1f}% | {r['background_load_calibrated']:.1f} / "
              f"{r['background_load_during_run']:.1f} |")
    write_result(args.out, {"cases": rows, "cpu_count": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
