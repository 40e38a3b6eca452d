"""Expert parallelism: (1) the grouped expert computation against a per-expert loop, forward +
backward, on one process; (2) the all-to-all dispatch/combine on N gloo ranks: rows and bytes sent
per token, distinct destination ranks per token, and exchange time against expert compute time.
Prints tables, writes JSON.

    python benchmarks/expert_parallel.py [--experts 64 --hidden 512 --moe-ffn 256 --top-k 6 --groups 8 \
        --topk-groups 4 --tokens 4096 --ranks 2 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from common import time_interleaved, write_result  # benchmarks/ is the script directory, first on sys.path

from plugins.model.config import ModelConfig
from plugins.model.dispatch import permutation, permute
from plugins.model.experts import RoutedExperts
from plugins.model.init import init_weights
from plugins.model.moe import DeepSeekMoE
from plugins.parallel.expert import ExpertExchange, apply_expert_parallel


def config_from(args) -> ModelConfig:
    base = ModelConfig.from_yaml("configs/tiny.yaml").to_dict()
    base.update(hidden_size=args.hidden, moe_intermediate_size=args.moe_ffn, n_routed_experts=args.experts,
                num_experts_per_tok=args.top_k, n_group=args.groups, topk_group=args.topk_groups)
    return ModelConfig.from_dict(base, source="benchmark")


def per_expert_loop(experts: RoutedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The obvious alternative: one small matmul pair per expert."""
    outputs = []
    for e, rows in enumerate(x.split(counts.tolist())):
        gate, up = F.linear(rows, experts.gate_up_proj[e]).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, experts.down_proj[e]))
    return torch.cat(outputs)


def grouped_vs_loop(config: ModelConfig, tokens: int, rounds: int) -> dict:
    torch.manual_seed(0)
    moe = DeepSeekMoE(config)
    init_weights(moe, 0.02)
    x = torch.randn(tokens, config.hidden_size)
    perm = permutation(moe.gate(x).indices, config.n_routed_experts)
    rows = permute(x, perm)

    def step(fn):
        moe.zero_grad(set_to_none=True)
        fn(moe.experts, rows, perm.counts).square().mean().backward()

    times = time_interleaved({"grouped GEMM": lambda: step(lambda m, r, c: m(r, c)),
                              "per-expert loop": lambda: step(per_expert_loop)}, 1, rounds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"rows": int(perm.counts.sum()), "median_s": medians,
            "loop_over_grouped": medians["per-expert loop"] / medians["grouped GEMM"]}


def _exchange_worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        config = config_from(args)
        torch.manual_seed(0)
        moe = DeepSeekMoE(config)
        init_weights(moe, 0.02)
        exchange = ExpertExchange(None, config.n_routed_experts)
        apply_expert_parallel(moe, exchange)
        x = torch.randn(args.tokens // world, config.hidden_size, generator=torch.Generator().manual_seed(rank))
        routing = moe.gate(x)
        perm = permutation(routing.indices, config.n_routed_experts)
        rows = permute(x, perm)
        exchange.observe(routing.indices)
        timings = {"dispatch": [], "experts": [], "combine": []}
        for _ in range(args.rounds):
            dist.barrier()
            start = time.perf_counter()
            local, xplan = exchange.dispatch(rows, perm.counts)
            dispatched = time.perf_counter()
            out = moe.experts(local, xplan.local_counts)
            computed = time.perf_counter()
            exchange.combine(out, xplan)
            timings["dispatch"].append(dispatched - start)
            timings["experts"].append(computed - dispatched)
            timings["combine"].append(time.perf_counter() - computed)
        sent_elsewhere = sum(n for r, n in enumerate(xplan.send_splits) if r != rank)
        tokens, total, most = exchange.take_statistics(torch.device("cpu"))[:3].tolist()
        results[rank] = {"tokens": x.shape[0], "rows_sent_elsewhere": sent_elsewhere,
                         "destinations_mean": total / tokens, "destinations_max": most,
                         **{name: statistics.median(t) for name, t in timings.items()}}
    finally:
        dist.destroy_process_group()


def exchange_volume(args, world: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_exchange_worker, args=(world, port, args, results), nprocs=world, join=True)
    per_rank = [results[r] for r in range(world)]
    tokens = sum(r["tokens"] for r in per_rank)
    rows = sum(r["rows_sent_elsewhere"] for r in per_rank)
    bytes_per_row = args.hidden * 2  # BF16 activations on the wire in a GPU run
    return {
        "ranks": world, "rows_sent_per_token": rows / tokens,
        "dispatch_plus_combine_bytes_per_token_bf16": 2 * rows / tokens * bytes_per_row,
        "destinations_mean": sum(r["destinations_mean"] * r["tokens"] for r in per_rank) / tokens,
        "destinations_max": max(r["destinations_max"] for r in per_rank),
        "dispatch_s": max(r["dispatch"] for r in per_rank), "experts_s": max(r["experts"] for r in per_rank),
        "combine_s": max(r["combine"] for r in per_rank),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-ffn", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--topk-groups", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/expert_parallel.json")
    args = parser.parse_args()

    config = config_from(args)
    compute = grouped_vs_loop(config, args.tokens, args.rounds)
    print(f"routed experts forward+backward: {args.experts} experts, hidden {args.hidden}, expert FFN {args.moe_ffn}, "
          f"top-{args.top_k}, {args.tokens} tokens ({compute['rows']} rows), {torch.get_num_threads()} threads")
    print(f"{'implementation':<18}{'median (s)':>12}")
    for name, seconds in compute["median_s"].items():
        print(f"{name:<18}{seconds:>12.4f}")
    print(f"per-expert loop / grouped GEMM: {compute['loop_over_grouped']:.2f}x")

    exchanges = [exchange_volume(args, world) for world in args.ranks]
    print(f"\nall-to-all on gloo ranks (1 thread each), groups {args.groups} keep {args.topk_groups}, "
          f"{args.tokens} tokens in all")
    print(f"{'ranks':>5}{'rows sent/token':>17}{'bytes/token (bf16)':>20}{'dest. mean':>12}{'dest. max':>10}"
          f"{'dispatch (s)':>14}{'experts (s)':>13}{'combine (s)':>13}")
    for row in exchanges:
        print(f"{row['ranks']:>5}{row['rows_sent_per_token']:>17.2f}{row['dispatch_plus_combine_bytes_per_token_bf16']:>20.0f}"
              f"{row['destinations_mean']:>12.2f}{row['destinations_max']:>10.0f}{row['dispatch_s']:>14.4f}"
              f"{row['experts_s']:>13.4f}{row['combine_s']:>13.4f}")
    write_result(args.output, {"torch": torch.__version__, "machine": platform.machine(), "config": vars(args),
                               "compute": compute, "exchange": exchanges})


if __name__ == "__main__":
    main()
