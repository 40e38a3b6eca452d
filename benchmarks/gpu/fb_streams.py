"""Step 6 of ``run_all.sh``: the F&B unit (report 3.2.1, Figure 4) on one device: the forward of one
micro-batch through chunk 0's blocks and the backward of another through chunk 1's, issued through
``plugins.parallel.streams`` on two CUDA streams (``StreamOverlap``) against forward then backward
(``Sequential``); on CPU the second thread (``ThreadOverlap``) stands in for the streams. Writes
``results/fb_streams.json``.

    python benchmarks/gpu/fb_streams.py [--dry-run]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from blocks import build, dtype_on
from device import ROOT, device, skip, write

from plugins.model.config import ModelConfig
from plugins.model.rope import RotaryEmbedding
from plugins.parallel.streams import CudaStreams, Sequential, StreamOverlap, ThreadOverlap


def unit_seconds(overlap, chunks, rope, inputs, rounds: int, dev) -> float:
    """Median time of ``overlap.pair``: forward of ``inputs[0]`` on chunk 0 with the backward of
    ``inputs[1]``'s forward (run before, untimed) on chunk 1."""

    def forward(chunk, h, kept):
        def run():
            out = h
            for layer in chunks[chunk]:
                out = layer(out, rope)
            kept.append(out)
        return run

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(rounds + 1):
        earlier = []
        overlap.run(1, forward(1, inputs[1], earlier))
        sync()
        now = []
        started = time.perf_counter()
        overlap.pair((0, forward(0, inputs[0], now)), (1, lambda kept=earlier: kept[0].float().square().mean().backward()))
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per chunk (the first dense, then MoE)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    dev = device()
    config = ModelConfig.from_yaml(ROOT / "configs" / ("tiny.yaml" if args.dry_run else "ablation_16b.yaml"))
    seq_len = args.seq_len or (128 if args.dry_run else 4096)
    rounds = args.rounds or (2 if args.dry_run else 5)
    chunks = [build(config, args.blocks, dev, fp8=False, compiled=None) for _ in range(2)]
    rope = RotaryEmbedding(config).to(dev)(torch.arange(seq_len, device=dev))
    inputs = [torch.randn(1, seq_len, config.hidden_size, device=dev, dtype=dtype_on(dev), requires_grad=True)
              for _ in range(2)]
    if dev.type == "cuda":
        overlapped, name = StreamOverlap(CudaStreams(dev)), "two CUDA streams"
    else:
        skip("F&B on two CUDA streams", "no CUDA; the CPU's second thread (ThreadOverlap) is timed in its place")
        overlapped, name = ThreadOverlap(), "second thread (CPU)"
    unit_seconds(Sequential(), chunks, rope, inputs, 1, dev)  # warm-up: first kernels, allocator
    sequential = unit_seconds(Sequential(), chunks, rope, inputs, rounds, dev)
    overlap = unit_seconds(overlapped, chunks, rope, inputs, rounds, dev)
    print(f"F&B unit: F then B {sequential * 1000:.1f} ms, {name} {overlap * 1000:.1f} ms "
          f"({sequential / overlap:.2f}x)", flush=True)
    write("fb_streams", args.dry_run, {"args": {**vars(args), "seq_len": seq_len, "rounds": rounds},
                                       "overlap": name, "sequential_s": sequential, "overlapped_s": overlap,
                                       "speedup": sequential / overlap})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
