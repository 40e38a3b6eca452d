"""Pipeline schedules on CPU gloo ranks: DualPipe against 1F1B (and DualPipeV) for the tiny
model, one optimizer step's forward+backward: step time, activations held at once (micro-batches
in flight) and peak resident memory per rank, parameters per rank; and DualPipe with expert
parallelism with the F&B overlap on and off. Prints tables, writes JSON.

    python benchmarks/pipeline_schedules.py [--pp 2 --micro-batches 8 --seq-len 256 --layers 4 --steps 4]

Limits: CPU ranks share the machine's cores, so ranks that would run in parallel on separate GPUs
compete here and idle (bubble) time is partly filled by the other ranks' work; step times compare
schedules on this machine only. Resident memory includes the Python/torch runtime common to all.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import statistics
import time

import deepspeed
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import write_result  # benchmarks/ is the script directory, first on sys.path

from launch.distributed import ds_internals
from launch.distributed.groups import build_groups
from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.parallel.dualpipe import check
from plugins.parallel.expert import ExpertExchange, apply_expert_parallel
from plugins.parallel.pipeline_runtime import PipelineRuntime
from plugins.parallel.pipeline_stages import PipelineShard
from plugins.parallel.replicas import ReplicaSync, stages_of
from plugins.parallel.streams import Sequential, ThreadOverlap


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, schedule, args, ep, overlap, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    deepspeed.init_distributed(dist_backend="gloo")
    ds_internals.release_shared_memory_names()
    try:
        torch.manual_seed(0)
        config = ModelConfig.from_yaml("configs/tiny.yaml", [f"model.num_hidden_layers={args.layers}"])
        model = DeepSeekV3(config)
        groups = build_groups(args.pp, ep, schedule, config)  # the trainer's groups: ep ranks inside dp = ep
        if ep > 1:
            apply_expert_parallel(model, ExpertExchange(groups.ep_group, config.n_routed_experts,
                                                        groups.ep_backward_group, groups.ep_nodes))
        layout = check(schedule, args.pp, args.micro_batches)
        shard = PipelineShard(model, stages_of(layout, groups.pipeline_rank), layout.stages)
        runtime = PipelineRuntime(layout, groups.pipeline_rank, shard, groups.pipeline_peers, groups.channels,
                                  overlap=ThreadOverlap() if overlap else Sequential())
        replicas = ReplicaSync(layout, shard.model, groups.pipeline_rank, groups.replicas)
        g = torch.Generator().manual_seed(groups.dp_rank)
        batches = []
        for _ in range(args.micro_batches):
            ids = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=g)
            batches.append({"input_ids": ids, "labels": ids.roll(-1, 1), "document_ids": torch.zeros_like(ids)})
        times, in_flight = [], 0
        for step in range(args.steps + 1):
            dist.barrier()
            start = time.perf_counter()
            totals = runtime.step(batches, 0.3)
            replicas.sum_gradients()
            dist.barrier()
            if step:  # the first step warms up
                times.append(time.perf_counter() - start)
            in_flight = max(in_flight, totals.peak_in_flight)
            shard.model.zero_grad(set_to_none=True)
        results[rank] = {"step_s": statistics.median(times), "in_flight": in_flight,
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         "parameters": sum(p.numel() for p in shard.model.parameters())}
    finally:
        dist.destroy_process_group()


def run(schedule: str, args, ep: int = 1, overlap: bool = True) -> list[dict]:
    world = args.pp * ep
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _port(), schedule, args, ep, overlap, results), nprocs=world)
    return [results[r] for r in range(world)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/pipeline_schedules.json")
    args = parser.parse_args()
    rows = []
    for name, schedule, ep, overlap in (("1f1b", "1f1b", 1, True), ("dualpipe", "dualpipe", 1, True),
                                        ("dualpipev", "dualpipev", 1, True),
                                        ("dualpipe ep2 overlap", "dualpipe", 2, True),
                                        ("dualpipe ep2 sequential", "dualpipe", 2, False)):
        ranks = run(schedule, args, ep, overlap)
        rows.append({"name": name, "ranks": len(ranks), "step_s": max(r["step_s"] for r in ranks),
                     "in_flight_max": max(r["in_flight"] for r in ranks),
                     "peak_rss_mb_max": max(r["peak_rss_mb"] for r in ranks),
                     "parameters_max": max(r["parameters"] for r in ranks), "per_rank": ranks})
        r = rows[-1]
        print(f"{name:<24} ranks {r['ranks']}  step {r['step_s'] * 1000:8.1f} ms  activations in flight {r['in_flight_max']:>2}"
              f"  peak RSS {r['peak_rss_mb_max']:7.0f} MB  parameters/rank {r['parameters_max']:,}", flush=True)
    by = {r["name"]: r for r in rows}
    ratios = {"dualpipe_vs_1f1b_step": by["dualpipe"]["step_s"] / by["1f1b"]["step_s"],
              "dualpipe_vs_1f1b_parameters": by["dualpipe"]["parameters_max"] / by["1f1b"]["parameters_max"],
              "ep2_overlap_vs_sequential_step": by["dualpipe ep2 overlap"]["step_s"] / by["dualpipe ep2 sequential"]["step_s"]}
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    write_result(args.out, {"args": vars(args), "machine": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), "rows": rows, "ratios": ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
