"""MTP speculative decoding against plain greedy decoding (report 5.4.3: 85-90% acceptance of the
second token, 1.8x tokens/s) on prompts cut from real code and prose. Prints a table, writes JSON.

    deepspeed launch/pretrain.py --config configs/tiny.yaml     # the model (runs/tiny)
    python benchmarks/speculative_decoding.py --model runs/tiny --prompts 16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import sysconfig
from pathlib import Path

import torch
from common import write_result  # benchmarks/ is the script directory, first on sys.path

from launch.checkpointing.model_source import load_model_and_tokenizer
from plugins.inference.decoding import generate, generate_speculative


def real_prompts(count: int) -> list[tuple[str, str]]:
    """(kind, text) pairs: openings of standard-library modules and of documentation topics."""
    from pydoc_data.topics import topics

    code = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]
    prose = [text for _, text in sorted(topics.items())]
    half = count // 2
    picks = [("code", code[i * len(code) // half]) for i in range(half)]
    picks += [("prose", prose[i * len(prose) // (count - half)]) for i in range(count - half)]
    return [(kind, text[len(text) // 3 :][:200]) for kind, text in picks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/tiny", help="run dir, checkpoint dir or HF dir (with MTP)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--output", default="benchmarks/results/speculative_decoding.json")
    args = parser.parse_args()

    if not Path(args.model).exists():
        sys.exit(f"error: {args.model}: no such model; train one with `deepspeed launch/pretrain.py --config configs/tiny.yaml`")
    loaded, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer)
    model = loaded.model
    rows = []
    generate(model, [tokenizer.bos_id], 4)  # warm-up
    for kind, text in real_prompts(args.prompts):
        prompt = [tokenizer.bos_id, *tokenizer.encode(text)][:64]
        plain = generate(model, prompt, args.new_tokens, eos_id=tokenizer.eos_id)
        fast = generate_speculative(model, prompt, args.new_tokens, eos_id=tokenizer.eos_id)
        rows.append({"kind": kind, "identical": fast.tokens == plain.tokens, "acceptance": fast.acceptance_rate,
                     "drafted": fast.drafted, "greedy_tokens_per_s": plain.tokens_per_s,
                     "speculative_tokens_per_s": fast.tokens_per_s, "main_forwards": fast.main_forwards,
                     "greedy_main_forwards": plain.main_forwards})
    summary = {}
    for kind in ("code", "prose", "all"):
        chosen = [r for r in rows if kind in ("all", r["kind"])]
        drafted = sum(r["drafted"] for r in chosen)
        summary[kind] = {
            "prompts": len(chosen), "identical": all(r["identical"] for r in chosen),
            "acceptance": sum(r["acceptance"] * r["drafted"] for r in chosen) / drafted if drafted else 0.0,
            "greedy_tokens_per_s": statistics.median(r["greedy_tokens_per_s"] for r in chosen),
            "speculative_tokens_per_s": statistics.median(r["speculative_tokens_per_s"] for r in chosen),
            "main_forward_ratio": sum(r["main_forwards"] for r in chosen) / sum(r["greedy_main_forwards"] for r in chosen),
        }
        summary[kind]["speedup"] = summary[kind]["speculative_tokens_per_s"] / summary[kind]["greedy_tokens_per_s"]
    print(f"{loaded.description}: {args.prompts} prompts, {args.new_tokens} new tokens each, batch 1, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} threads")
    print(f"{'prompts':<8}{'identical':>10}{'acceptance':>12}{'greedy tok/s':>14}{'MTP tok/s':>11}{'speed-up':>10}"
          f"{'main fwd ratio':>16}")
    for kind, s in summary.items():
        print(f"{kind:<8}{str(s['identical']):>10}{s['acceptance']:>12.1%}{s['greedy_tokens_per_s']:>14.1f}"
              f"{s['speculative_tokens_per_s']:>11.1f}{s['speedup']:>9.2f}x{s['main_forward_ratio']:>16.2f}")
    write_result(args.output, {"model": loaded.description, "new_tokens": args.new_tokens, "torch": torch.__version__,
                               "machine": platform.machine(), "threads": torch.get_num_threads(),
                               "summary": summary, "prompts": rows})


if __name__ == "__main__":
    main()
