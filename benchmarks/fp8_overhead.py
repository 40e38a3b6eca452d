"""FP8 with DeepSeek-V3's block scaling against full precision: GEMM-level forward+backward time
and error for the 16B ablation's linear shapes, then training steps of a model (step time and the
loss gap after N steps from the same weights on the same batch). Prints tables, writes JSON.

    python benchmarks/fp8_overhead.py                      # CPU: emulated FP8 vs float32, tiny model
    python benchmarks/fp8_overhead.py --config configs/ablation_16b.yaml --layers 2 --vocab 32768 \
        --batch 4 --seq-len 2048                           # GPU: + Transformer-Engine vs BF16

Rows: ``full`` (float32 on CPU, BF16 on GPU), ``emulated`` (plugins.precision.fp8), ``te`` (where
Transformer-Engine block scaling can run: a Hopper GPU with ``pip install -e ".[gpu]"``).
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from common import time_interleaved, write_result  # benchmarks/ is the script directory, first on sys.path

from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.gemm import grouped_mm
from plugins.precision import te as fp8_te
from plugins.precision.fp8 import fp8_grouped_linear, fp8_linear
from plugins.precision.policy import convert_to_fp8, fp8_autocast

# (name, K, N, experts): the 16B ablation's MLA, dense-FFN and expert GEMMs (hidden 2048).
SHAPES = [("kv_a_proj (2048->576)", 2048, 576, 0), ("o_proj (2048->2048)", 2048, 2048, 0),
          ("dense up (2048->10944)", 2048, 10944, 0), ("64 experts gate_up (2048->2816)", 2048, 2816, 64)]


def gemm_rows(tokens: int, device: torch.device, dtype: torch.dtype, backends: list[str], warmup: int, rounds: int):
    rows = []
    for name, k, n, experts in SHAPES:
        x = torch.randn(tokens, k, device=device)
        w = torch.randn(max(experts, 1), n, k, device=device) * k**-0.5
        counts = torch.full((experts,), tokens // experts, device=device) if experts else None
        if experts:
            x = x[: int(counts.sum())]
        grad = torch.randn(x.shape[0], n, device=device)
        pieces = x.double().split(counts.tolist()) if experts else [x.double()]
        reference = torch.cat([xe @ we.double().T for xe, we in zip(pieces, w)])

        def run(backend: str) -> torch.Tensor:
            xi = x.to(dtype if backend != "emulated" else torch.float32).requires_grad_()
            wi = (w if experts else w[0]).to(xi.dtype).requires_grad_()
            if backend == "emulated":
                y = fp8_grouped_linear(xi, wi, counts) if experts else fp8_linear(xi, wi)
            elif backend == "te":
                with fp8_te.autocast():
                    y = te_modules[name](xi)
            else:
                y = grouped_mm(xi, wi.transpose(1, 2), counts) if experts else xi @ wi.T
            y.backward(grad.to(y.dtype))
            return y.detach()

        te_modules = {}
        active = [b for b in backends if not (b == "te" and experts)]  # TE: dense linears only (see convert_to_fp8)
        if "te" in active:
            linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
            linear.weight.data.copy_(w[0])
            te_modules[name] = fp8_te.te_linear(linear)
        errors = {b: ((run(b).double() - reference).norm() / reference.norm()).item() for b in active}
        times = time_interleaved({b: (lambda b=b: run(b)) for b in active}, warmup, rounds)
        base = statistics.median(times["full"])
        for b in active:
            median = statistics.median(times[b])
            rows.append({"gemm": name, "backend": b, "median_s": median, "vs_full": median / base,
                         "rel_error_vs_fp64": errors[b]})
    return rows


def model_rows(config: ModelConfig, device, dtype, backends, batch: int, seq_len: int, steps: int):
    torch.manual_seed(0)
    state = DeepSeekV3(config).state_dict()
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    labels = ids.roll(-1, 1)
    runs = {}
    for backend in backends:
        model = DeepSeekV3(config)
        model.load_state_dict(state)
        model.to(device, dtype)
        convert_to_fp8(model, backend if backend != "full" else "none")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

        def step(model=model, optimizer=optimizer, backend=backend) -> float:
            optimizer.zero_grad(set_to_none=True)
            with fp8_autocast(backend):
                loss = model(ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return loss.item()

        runs[backend] = step
    losses: dict[str, list[float]] = {b: [] for b in backends}
    times = time_interleaved({b: (lambda b=b: losses[b].append(runs[b]())) for b in backends}, 0, steps)
    final = {b: statistics.mean(losses[b][-3:]) for b in backends}
    base = statistics.median(times["full"][1:])
    return [{"backend": b, "median_step_s": statistics.median(times[b][1:]),
             "vs_full": statistics.median(times[b][1:]) / base, "final_loss": final[b],
             "rel_loss_gap": (final[b] - final["full"]) / final["full"]} for b in backends]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--layers", type=int, default=None, help="keep this many layers (first dense, rest MoE)")
    parser.add_argument("--vocab", type=int, default=None, help="shrink the vocabulary (the head is not FP8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="training steps per backend")
    parser.add_argument("--gemm-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/fp8_overhead.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = ["full", "emulated"] + ([] if fp8_te.unavailable_reason() else ["te"])
    config = ModelConfig.from_yaml(args.config)
    if args.layers is not None:
        config.num_hidden_layers, config.first_k_dense_replace = args.layers, min(config.first_k_dense_replace, 1)
    if args.vocab is not None:
        config.vocab_size = args.vocab
    config.num_nextn_predict_layers = 0

    gemms = gemm_rows(args.gemm_tokens, device, dtype, backends, 1, args.rounds)
    print(f"forward+backward of one GEMM, {args.gemm_tokens} tokens, {device} ({dtype} as full precision), "
          f"{torch.get_num_threads()} threads; TE: {fp8_te.unavailable_reason() or 'available'}")
    print(f"{'GEMM':<34}{'backend':>10}{'median (s)':>12}{'vs full':>9}{'rel. error':>12}")
    for row in gemms:
        print(f"{row['gemm']:<34}{row['backend']:>10}{row['median_s']:>12.4f}{row['vs_full']:>8.2f}x"
              f"{row['rel_error_vs_fp64']:>12.2e}")
    models = model_rows(config, device, dtype, backends, args.batch, args.seq_len, args.steps)
    print(f"\ntraining steps: {args.config}, {config.num_hidden_layers} layers, vocab {config.vocab_size}, "
          f"batch {args.batch} x {args.seq_len}, {args.steps} steps from the same weights on one batch")
    print(f"{'backend':<10}{'median step (s)':>16}{'vs full':>9}{'final loss':>12}{'rel. gap':>10}")
    for row in models:
        print(f"{row['backend']:<10}{row['median_step_s']:>16.4f}{row['vs_full']:>8.2f}x{row['final_loss']:>12.4f}"
              f"{row['rel_loss_gap']:>+10.2%}")
    write_result(args.output, {
        "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
        "config": args.config, "layers": config.num_hidden_layers, "vocab": config.vocab_size,
        "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "gemm_tokens": args.gemm_tokens,
        "gemms": gemms, "models": models,
    })


if __name__ == "__main__":
    main()
