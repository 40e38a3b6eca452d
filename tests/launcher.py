"""Running ``launch/pretrain.py`` through the real ``deepspeed`` launcher on CPU (gloo) from tests."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys

from .conftest import ROOT
from .distributed import free_port


def _pretrain(run_dir, args, data, config) -> list[str]:
    sets = ["--set", "train.wandb_mode=offline"]
    if data is not None:
        sets += ["--set", f"data.dataset={data['dataset']}", "--set", f"data.tokenizer={data['tokenizer']}",
                 "--set", "data.builtin_corpus=false", "--set", "data.validation={}"]
    return ["launch/pretrain.py", "--config", config, "--run-dir", str(run_dir), *sets, *args]


def launch(ranks: int, run_dir, *args, data=None, config="configs/tiny.yaml") -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus RANKS launch/pretrain.py --config CONFIG --run-dir RUN_DIR ...``; ``data``
    points the run at an existing tokenizer and packed dataset."""
    launcher = [shutil.which("deepspeed")] if shutil.which("deepspeed") else [sys.executable, "-m", "deepspeed.launcher.runner"]
    command = [*launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()),
               *_pretrain(run_dir, args, data, config)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def launch_nodes(nodes: int, per_node: int, run_dir, *args, data=None, config="configs/tiny.yaml"
                 ) -> list[subprocess.CompletedProcess]:
    """A multi-node launch on this machine: DeepSpeed's per-node launcher
    (``deepspeed.launcher.launch``) once per node, all at once, as ``deepspeed --hostfile`` runs on
    each host; returns each node's result."""
    world_info = base64.urlsafe_b64encode(json.dumps(
        {f"node{n}": list(range(per_node)) for n in range(nodes)}).encode()).decode()
    port = free_port()
    running = [subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                                 f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}",
                                 *_pretrain(run_dir, args, data, config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
               for n in range(nodes)]
    results = []
    for process in running:
        out, err = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def metrics(run_dir) -> list[dict]:
    """The training records of metrics.jsonl (one per logged step)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def eval_records(run_dir) -> list[dict]:
    """The validation records of metrics.jsonl (``train.eval_interval``)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val" in r]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_loads_match(a: list[list[float]], b: list[list[float]], context, moved: float = 0.002) -> None:
    """Expert loads of two layouts of the same run: every block routes the same number of tokens and
    at most ``moved`` of them chose another expert. Sums run in another order across layouts, so an
    affinity tie to the last bit may break the other way; anything more is a real difference."""
    for block_a, block_b in zip(a, b, strict=True):
        total = sum(block_a)
        assert sum(block_b) == total, (context, block_a, block_b)
        assert sum(abs(x - y) for x, y in zip(block_a, block_b)) / 2 <= moved * total, (context, block_a, block_b)
