"""Framework overhead: tokens/s of the tiny recipe through `deepspeed launch/pretrain.py` vs a bare
PyTorch loop (same model, data, batch, AdamW, clipping and bias update) in one process.

    python benchmarks/pretrain_overhead.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(run, dataset, steps: int, batch: int) -> list[float]:
    """The obvious alternative: a plain loop with torch.optim.AdamW; returns seconds per step."""
    from data_pipeline import PackedSampler
    from launch.distributed.ds_internals import parameter_groups
    from launch.training.trainer import collate
    from plugins.model.balance import collect_expert_loads, update_router_biases
    from plugins.model.deepseek_v3 import DeepSeekV3

    t = run.train
    torch.manual_seed(t.seed)
    model = DeepSeekV3(run.model)
    moe_layers = model.moe_layers()
    optimizer = torch.optim.AdamW(parameter_groups(model, t.weight_decay), lr=t.lr.peak, betas=t.betas, eps=t.eps)
    sampler = PackedSampler(len(dataset), seed=t.seed)
    accumulation = batch // t.micro_batch_size
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for _ in range(accumulation):
            data = collate(dataset, sampler.take(t.micro_batch_size), torch.device("cpu"))
            out = model(data["input_ids"], labels=data["labels"], document_ids=data["document_ids"])
            (out.loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loads = collect_expert_loads(moe_layers, run.model.num_moe_layers, run.model.n_routed_experts)
        update_router_biases(moe_layers, loads, 0.001)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    parser.add_argument("--rounds", type=int, default=2, help="alternating repetitions of every variant")
    parser.add_argument("--output", default="benchmarks/results/pretrain_overhead.json")
    args = parser.parse_args()

    from launch.config.run_config import load_run_config
    from launch.training.data import setup_data

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = [f"data.dataset={tmp / 'packed'}", f"data.tokenizer={tmp / 'tokenizer'}", "data.builtin_megabytes=2", "data.validation={}",
                "train.batch.start=16", "train.lr.warmup_steps=0"]
        run = load_run_config(ROOT / "configs" / "tiny.yaml", sets)
        _, dataset = setup_data(run, rank=0)
        batch = run.train.batch.final
        samples: dict[str, list[float]] = {}
        for round_index in range(args.rounds):  # alternate, so machine drift hits every variant alike
            for wandb_mode in ("disabled", "offline"):
                run_dir = tmp / f"run-{wandb_mode}-{round_index}"
                command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "1", "launch/pretrain.py",
                           "--config", "configs/tiny.yaml", "--steps", str(args.steps), "--run-dir", str(run_dir),
                           *[x for s in sets + [f"train.wandb_mode={wandb_mode}", "data.builtin_corpus=false", "data.validation={}"]
                             for x in ("--set", s)]]
                subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
                records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
                samples.setdefault(f"launcher (W&B {wandb_mode})", []).extend(
                    r["step_seconds"] for r in records[args.skip:])
            samples.setdefault("bare PyTorch loop", []).extend(bare_loop(run, dataset, args.steps, batch)[args.skip:])
        results = {name: statistics.median(values) for name, values in samples.items()}

    tokens = batch * run.data.seq_len
    base = results["bare PyTorch loop"]
    table = {name: {"median_step_s": s, "tokens_per_s": tokens / s, "overhead": s / base - 1} for name, s in results.items()}
    print(f"tiny recipe, {tokens} tokens/step, {torch.get_num_threads()} threads, median of steps {args.skip + 1}..{args.steps}")
    print(f"{'':<28}{'step (s)':>10}{'tokens/s':>11}{'overhead':>10}")
    for name, row in table.items():
        print(f"{name:<28}{row['median_step_s']:>10.4f}{row['tokens_per_s']:>11.0f}{row['overhead']:>+10.1%}")
    write_result(args.output, {"steps": args.steps, "rounds": args.rounds, "tokens_per_step": tokens, "results": table,
                               "python": sys.version.split()[0], "torch": torch.__version__})


if __name__ == "__main__":
    main()
