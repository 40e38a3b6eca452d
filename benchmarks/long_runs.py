"""What the long-run machinery costs (issue 29), on the scale probe of ``checkpoint_memory.py`` (64
routed experts, hidden 256, 6 blocks) at 2 ranks with expert parallelism 2:

- the training stall per checkpoint, synchronous against asynchronous saves: the time the loop
  blocks in a save (what the trainer prints) and the whole slowdown per save of 12 steps saving every
  2nd against the same steps without saves (the writer thread's competition for the cores included);
- the per-step cost of the hang watchdog's phase marks and of the end-of-step all-reduce (preemption
  flag and busy times), as the number of phase boundaries a step crosses x the cost of one, and the
  all-reduce timed, against the step's time;
- checksums: SHA-256 while DCP writes a 256 MB piece against the plain writer, and verification
  (a file read back and hashed) per GB, from the page cache.

    python benchmarks/long_runs.py [--rounds 2] [--out benchmarks/results/long_runs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
import timeit
import warnings
from pathlib import Path

from common import write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ["--set", "model.n_routed_experts=64", "--set", "model.hidden_size=256",
         "--set", "model.moe_intermediate_size=512", "--set", "model.num_hidden_layers=6",
         "--set", "train.micro_batch_size=1", "--set", "train.wandb_mode=disabled",
         "--set", "data.dataset=runs/cache/tiny/packed", "--set", "data.tokenizer=runs/cache/tiny/tokenizer",
         "--set", "data.validation={}"]
STEPS, EVERY = 12, 2
SAVES = {"none": ["--save-interval", "1000"], "synchronous": ["--save-interval", str(EVERY)],
         "asynchronous": ["--save-interval", str(EVERY), "--set", "train.async_save=true"]}


def run(kind: str, run_dir: Path, port: int) -> dict:
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/pretrain.py", "--config",
               "configs/tiny.yaml", "--run-dir", str(run_dir), "--steps", str(STEPS), "--ep", "2", *PROBE, *SAVES[kind]]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode:
        raise SystemExit(f"{kind} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    blocked = [float(s) for s in re.findall(r"(?:saved|staged) checkpoint \S+ (?:in host memory )?in ([\d.]+) s",
                                            result.stdout)]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_seconds"] for r in records if "loss" in r]
    blocked = blocked[:-1] if kind == "none" else blocked  # the final save every run makes
    files = sorted((run_dir / "checkpoints").glob("step*/__*.distcp"))
    return {"blocked_s": blocked, "step_s": steps, "loop_s": sum(steps[1:]) + sum(blocked),  # step 1 warms up
            "rank_checkpoint_mb": max(f.stat().st_size for f in files) / 2**20}


def save_stall(rounds: int) -> dict:
    runs: dict[str, list[dict]] = {kind: [] for kind in SAVES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for i, kind in enumerate(SAVES):
                runs[kind].append(run(kind, Path(tmp) / f"{kind}{r}", 29500 + 10 * r + i))
                print(f"round {r} {kind}: loop {runs[kind][-1]['loop_s']:.2f} s, blocked per save "
                      f"{statistics.mean(runs[kind][-1]['blocked_s'] or [0]):.3f} s", flush=True)
    saves = STEPS // EVERY
    out = {"saves_per_run": saves, "rank_checkpoint_mb": runs["synchronous"][0]["rank_checkpoint_mb"]}
    base = statistics.median(r["loop_s"] for r in runs["none"])
    for kind in ("synchronous", "asynchronous"):
        out[kind] = {"blocked_per_save_s": statistics.median(s for r in runs[kind] for s in r["blocked_s"]),
                     "slowdown_per_save_s": (statistics.median(r["loop_s"] for r in runs[kind]) - base) / saves,
                     "mean_step_s": statistics.mean(s for r in runs[kind] for s in r["step_s"][1:])}
    out["mean_step_s_without_saves"] = statistics.mean(s for r in runs["none"] for s in r["step_s"][1:])
    out["blocked_ratio"] = out["asynchronous"]["blocked_per_save_s"] / out["synchronous"]["blocked_per_save_s"]
    out["slowdown_ratio"] = out["asynchronous"]["slowdown_per_save_s"] / out["synchronous"]["slowdown_per_save_s"]
    return out


def _phases_worker(rank: int, world: int, store: str, results) -> None:
    """One rank of the probe in this process, phase boundaries counted and the end-of-step all-reduce
    timed (the counting wrappers are installed before the training modules import them)."""
    import contextlib

    import torch
    import torch.distributed as dist

    from plugins import progress

    counts = {"crossings": 0}
    phase, waiting = progress.phase, progress.waiting

    def counted(inner):
        @contextlib.contextmanager
        def wrapper(name):
            counts["crossings"] += 1
            with inner(name):
                yield
        return wrapper

    progress.phase, progress.waiting = counted(phase), counted(waiting)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                               auto_mpi_discovery=False)
    from launch.config.run_config import load_run_config
    from launch.training import stragglers, trainer

    timed = {"all_reduce_s": []}

    def step_end(*args):
        start = time.perf_counter()
        out = stragglers.step_end(*args)
        timed["all_reduce_s"].append(time.perf_counter() - start)
        return out

    trainer.step_end = step_end
    overrides = [s for s in PROBE if s != "--set"] + ["parallel.ep=2", "data.builtin_corpus=false"]
    run = load_run_config(ROOT / "configs" / "tiny.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t = trainer.Trainer(run, trainer.RunOptions(Path(tmp) / "run", steps=12), torch.device("cpu"))
        t.train_step()  # warm-up
        counts["crossings"], timed["all_reduce_s"], seconds = 0, [], []
        for _ in range(8):
            start = time.perf_counter()
            t.train_step()
            seconds.append(time.perf_counter() - start)
        t.close()
    results[rank] = {"crossings_per_step": counts["crossings"] / 8, "step_s": statistics.median(seconds),
                     "all_reduce_s": statistics.median(timed["all_reduce_s"])}
    dist.destroy_process_group()


def phase_costs() -> dict:
    import torch.multiprocessing as mp

    setup = "from plugins.progress import phase, waiting"
    per_crossing = min(timeit.repeat("with phase('forward'):\n    pass", setup=setup, number=200_000, repeat=5)) / 200_000
    per_wait = min(timeit.repeat("with waiting('expert all-to-all'):\n    pass", setup=setup, number=200_000,
                                 repeat=5)) / 200_000
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_phases_worker, args=(2, str(Path(tmp) / "store"), results), nprocs=2, join=True)
    ranks = [results[r] for r in range(2)]
    crossings = max(r["crossings_per_step"] for r in ranks)
    step = statistics.median(r["step_s"] for r in ranks)
    all_reduce = statistics.median(r["all_reduce_s"] for r in ranks)
    marks = crossings * max(per_crossing, per_wait)
    return {"phase_s": per_crossing, "waiting_s": per_wait, "crossings_per_step": crossings, "step_s": step,
            "marks_per_step_s": marks, "end_of_step_all_reduce_s": all_reduce,
            "overhead_fraction": (marks + all_reduce) / step}


def checksums() -> dict:
    import torch

    from launch.checkpointing import dcp_pieces
    from launch.checkpointing.dcp_pieces import Piece
    from launch.checkpointing.digests import file_digest

    piece = torch.randn(64 * 2**20)  # 256 MB
    times: dict[str, list[float]] = {"hashed": [], "plain": []}
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        for r in range(3):
            for kind in times:
                directory = Path(tmp) / f"{kind}{r}"
                start = time.perf_counter()
                if kind == "hashed":
                    dcp_pieces.save(directory, [Piece("model/w", piece.numel(), 0, piece)])
                else:
                    import torch.distributed.checkpoint as dcp

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        dcp.save({}, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True,
                                 planner=dcp_pieces._SavePlanner([Piece("model/w", piece.numel(), 0, piece)]))
                times[kind].append(time.perf_counter() - start)
        shard = next(Path(tmp).glob("hashed0/__0_0.distcp"))
        file_digest(shard)  # into the page cache
        verify = min(timeit.repeat(lambda: file_digest(shard), number=1, repeat=3))
        gb = shard.stat().st_size / 1e9
    hashed, plain = statistics.median(times["hashed"]), statistics.median(times["plain"])
    return {"piece_gb": gb, "save_hashed_s": hashed, "save_plain_s": plain, "hashing_cost_fraction": hashed / plain - 1,
            "verify_s_per_gb": verify / gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/long_runs.json"))
    args = parser.parse_args()
    (ROOT / "runs").mkdir(exist_ok=True)
    results = {"checksums": checksums()}
    print(json.dumps(results["checksums"], indent=1), flush=True)
    results["phases"] = phase_costs()
    print(json.dumps(results["phases"], indent=1), flush=True)
    results["save_stall"] = save_stall(args.rounds)
    s, p, c = results["save_stall"], results["phases"], results["checksums"]
    rows = ["| save | blocks the loop per save | slowdown per save (12 steps) | mean step |", "|---|---|---|---|",
            f"| none | - | - | {s['mean_step_s_without_saves']:.3f} s |"]
    for kind in ("synchronous", "asynchronous"):
        rows.append(f"| {kind} | {s[kind]['blocked_per_save_s']:.3f} s | {s[kind]['slowdown_per_save_s']:.3f} s | "
                    f"{s[kind]['mean_step_s']:.3f} s |")
    rows += [f"\nasynchronous / synchronous: blocked {s['blocked_ratio']:.3f}, slowdown {s['slowdown_ratio']:.2f} "
             f"({s['rank_checkpoint_mb']:.0f} MB written per rank per save)",
             f"phase marks: {p['crossings_per_step']:.0f} boundaries a step x {p['waiting_s'] * 1e6:.2f} us = "
             f"{p['marks_per_step_s'] * 1e3:.3f} ms; end-of-step all-reduce {p['end_of_step_all_reduce_s'] * 1e3:.3f} ms; "
             f"step {p['step_s']:.3f} s: {p['overhead_fraction']:.3%} of a step",
             f"checksums while writing {c['piece_gb']:.2f} GB: {c['save_hashed_s']:.2f} s against {c['save_plain_s']:.2f} s "
             f"({c['hashing_cost_fraction']:+.1%}); verification {c['verify_s_per_gb']:.2f} s per GB (page cache)"]
    results["table"] = "\n".join(rows)
    print(results["table"])
    write_result(args.out, results)


if __name__ == "__main__":
    main()
