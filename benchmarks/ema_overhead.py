"""What the EMA of the weights costs a training step: ``launch.training.ema.HostEMA`` (host copy, updated on
a worker thread while the next step runs) vs the obvious alternative, an EMA updated in the step
(``torch._foreach_lerp_`` on the training device, as most loops do it), vs no EMA. One process,
the tiny recipe's model widened to the scale probe's experts (so the EMA has real work), AdamW.

    python benchmarks/ema_overhead.py [--steps 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from common import time_interleaved, write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.config.run_config import load_run_config  # noqa: E402
from launch.training.ema import HostEMA  # noqa: E402
from plugins.model.deepseek_v3 import DeepSeekV3  # noqa: E402

PROBE = ["model.n_routed_experts=64", "model.moe_intermediate_size=256", "model.num_hidden_layers=4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed steps of each variant (interleaved)")
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ema_overhead.json"))
    args = parser.parse_args()
    run = load_run_config(ROOT / "configs" / "tiny.yaml", PROBE)
    torch.manual_seed(0)
    model = DeepSeekV3(run.model)
    params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, run.model.vocab_size, (4, run.data.seq_len))
    numel = sum(p.numel() for p in params)

    def step() -> None:
        out = model(ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    in_step = [p.detach().clone() for p in params]
    host = HostEMA({str(i): p.data.view(-1) for i, p in enumerate(params)}, args.decay)

    def with_sync_ema() -> None:
        step()
        torch._foreach_lerp_(in_step, [p.detach() for p in params], 1.0 - args.decay)

    def with_host_ema() -> None:
        host.wait()  # as the trainer does before the optimizer step
        step()
        host.update()

    times = time_interleaved({"none": step, "in_step": with_sync_ema, "host": with_host_ema}, warmup=2,
                             rounds=args.rounds)
    host.close()
    update = time_interleaved({"lerp": lambda: torch._foreach_lerp_(in_step, [p.detach() for p in params], 0.5)},
                              warmup=2, rounds=args.rounds)["lerp"]
    update_ms = statistics.median(update) * 1e3
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    rows = [{"variant": name, "ms_per_step": round(ms, 1), "vs_none": round(ms / median["none"], 3)}
            for name, ms in median.items()]
    print(f"EMA over {numel / 1e6:.1f}M parameters ({numel * 4 / 2**20:.0f} MB fp32), "
          f"{torch.get_num_threads()} threads, median of {args.rounds}; one EMA update alone: {update_ms:.1f} ms")
    print(f"{'variant':10} {'ms/step':>9} {'vs none':>8}")
    for row in rows:
        print(f"{row['variant']:10} {row['ms_per_step']:>9} {row['vs_none']:>8}")
    write_result(args.out, {"parameters": numel, "decay": args.decay, "threads": torch.get_num_threads(),
                            "rounds": args.rounds, "update_alone_ms": round(update_ms, 2), "rows": rows})


if __name__ == "__main__":
    main()
