"""Summation-order noise: how far the same run's logged numbers move when only the order of its float
sums changes, the yardstick for the tolerances of the tests that compare layouts (docs/testing.md).

    python benchmarks/summation_noise.py [--steps 4]

The one-process run of ``tests/test_dualpipe.py`` (tiny config, 4 layers, micro-batch 1, 8
micro-batches a step, the embedded 2 MB corpus) is repeated with only its float summation order
changed: one OpenMP thread instead of the machine's cores (other reduction blocks), torch's and MKL's
AVX2 kernels instead of AVX-512 (other vector widths: what an AVX2-only CPU runs), both, and no
vector kernels at all. The DualPipe ``--pp 2`` run is repeated under the same changes. Every run is
the same computation up to the order of its sums, so every pair of them measures that noise:
printed per logged key, the largest relative difference |a - b| / |a| over the steps, among the runs
of one layout and between the layouts, the expert loads' tokens routed elsewhere (an affinity tie
broken the other way moves a token, and its loss and gradient with it), and the final weights' largest
difference and share of entries differing by more than 5e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("loss", "lm_loss", "mtp_loss", "grad_norm")
LAYERS = ["--set", "model.num_hidden_layers=4", "--set", "train.micro_batch_size=1"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
ORDERS = {  # environment changes that alter only the order of float sums
    "default": {},
    "1 thread": ONE_THREAD,
    "AVX2 kernels": AVX2,
    "AVX2, 1 thread": {**AVX2, **ONE_THREAD},
    "no vector kernels": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                          "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def _weights(run_dir: Path) -> dict:
    from launch.checkpointing.model_source import load_model

    return {name: p.detach().clone() for name, p in load_model(run_dir).model.state_dict().items()}


def _launch(ranks: int, run_dir: Path, env: dict, *args: str) -> list[dict]:
    launcher = shutil.which("deepspeed") or "deepspeed"
    with socket.socket() as probe:  # not the default port: another launch may hold it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [launcher, "--num_gpus", str(ranks), "--master_port", str(port), "launch/pretrain.py", "--config", "configs/tiny.yaml",
               "--run-dir", str(run_dir), "--set", "train.wandb_mode=disabled", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]
    records[-1]["weights"] = _weights(run_dir)
    return records


def relative(reference: list[dict], other: list[dict]) -> dict[str, float]:
    """Per key, the largest |a - b| / |a| over the steps both runs logged; and the largest share of a
    block's routed tokens that chose another expert."""
    out = {key: max(abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(reference, other)) for key in KEYS}
    out["moved"] = max(sum(abs(x - y) for x, y in zip(p, q)) / 2 / sum(p) for a, b in zip(reference, other)
                       for p, q in zip(a["expert_load"], b["expert_load"]))
    ours, theirs = reference[-1]["weights"], other[-1]["weights"]
    differences = [(ours[k] - theirs[k]).abs() for k in ours]
    out["weights_max"] = max(d.max().item() for d in differences)
    out["weights_over_5e-5"] = sum((d > 5e-5).sum().item() for d in differences) / sum(d.numel() for d in differences)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output", default="benchmarks/results/summation_noise.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = [f"data.dataset={tmp / 'cache' / 'packed'}", f"data.tokenizer={tmp / 'cache' / 'tokenizer'}",
                "data.validation={}"]
        sets = [x for s in data for x in ("--set", s)]
        _launch(1, tmp / "build", {}, "--steps", "1", *sets, "--set", "data.builtin_megabytes=2")  # the corpus
        sets += ["--set", "data.builtin_corpus=false"]
        runs = {}
        for name, env in ORDERS.items():
            runs[f"1 rank, {name}"] = _launch(1, tmp / f"one-{len(runs)}", env, "--steps", str(args.steps), *LAYERS, *sets)
        for name, env in ORDERS.items():
            runs[f"pp 2, {name}"] = _launch(2, tmp / f"pp2-{len(runs)}", env, "--steps", str(args.steps), "--pp", "2",
                                            *LAYERS, *sets)
    names = list(runs)
    pairs = {(a, b): relative(runs[a], runs[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    columns = (*KEYS, "moved", "weights_max", "weights_over_5e-5")
    envelope = {}
    for kind, same in (("one layout", True), ("across layouts", False)):
        chosen = [row for (a, b), row in pairs.items() if (a.split(",")[0] == b.split(",")[0]) == same]
        envelope[kind] = {key: max(row[key] for row in chosen) for key in columns}
    print(f"largest relative difference between two runs over {args.steps} steps ({len(runs)} runs, "
          f"{len(pairs)} pairs); moved: share of a block's tokens routed to another expert")
    print(f"{'pairs':<16}" + "".join(f"{key:>18}" for key in columns))
    for kind, row in envelope.items():
        print(f"{kind:<16}" + "".join(f"{row[key]:>18.2e}" for key in columns))
    write_result(args.output, {"steps": args.steps, "envelope": envelope,
                               "pairs": {f"{a} vs {b}": row for (a, b), row in pairs.items()},
                               "runs": {name: [{key: r[key] for key in (*KEYS, "expert_load")} for r in records]
                                        for name, records in runs.items()},
                               "python": sys.version.split()[0]})


if __name__ == "__main__":
    main()
