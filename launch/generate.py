"""Generate text from a run, checkpoint or HF directory through the MLA latent cache.

    python -m launch.generate --model runs/tiny --prompt "def main(" [--max-new-tokens 64] \
        [--temperature 0.8 --top-p 0.95 --seed 0] [--speculative mtp] [--tokenizer DIR]

Greedy by default. ``--speculative mtp`` drafts each next-but-one token with the MTP module and
verifies it with the main model (greedy only); it also decodes the prompt plainly and reports
both speeds, the acceptance rate and whether the tokens are identical (they must be).
"""

from __future__ import annotations

import argparse
import json
import sys

from launch.checkpointing.model_source import load_model_and_tokenizer
from plugins.errors import ConfigError, ProjectError
from plugins.inference.decoding import generate, generate_speculative


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run dir, checkpoint dir or HF DeepseekV3 dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the run's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speculative", choices=["mtp"], default=None)
    args = parser.parse_args(argv)
    try:
        for flag, value, ok, expected in [("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
                                          ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
                                          ("--temperature", args.temperature, args.temperature >= 0, ">= 0")]:
            if not ok:
                raise ConfigError(f"{flag} {value}: expected {expected}")
        if args.speculative and args.temperature > 0:
            raise ConfigError("--speculative mtp decodes greedily: drop --temperature")
        loaded, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer)
        prompt = [tokenizer.bos_id, *tokenizer.encode(args.prompt)]
        limit = loaded.model.config.max_position_embeddings
        if len(prompt) + args.max_new_tokens + 1 > limit:
            raise ConfigError(f"prompt ({len(prompt)} tokens) + --max-new-tokens {args.max_new_tokens} exceed the "
                              f"model's {limit} positions")
        if args.speculative and not len(loaded.model.mtp):
            raise ConfigError(f"{args.model}: --speculative mtp needs a model with an MTP module")
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model, eos = loaded.model, tokenizer.eos_id
    plain = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p, eos, args.seed)
    report = {"new_tokens": len(plain.tokens), "tokens_per_s": round(plain.tokens_per_s, 1)}
    if args.speculative:
        fast = generate_speculative(model, prompt, args.max_new_tokens, eos)
        report = {"new_tokens": len(fast.tokens), "identical_to_greedy": fast.tokens == plain.tokens,
                  "acceptance_rate": round(fast.acceptance_rate, 4), "tokens_per_s": round(fast.tokens_per_s, 1),
                  "greedy_tokens_per_s": round(plain.tokens_per_s, 1),
                  "speedup": round(fast.tokens_per_s / plain.tokens_per_s, 3),
                  "main_forwards": fast.main_forwards, "greedy_main_forwards": plain.main_forwards}
    print(args.prompt + tokenizer.decode(plain.tokens))
    print(json.dumps(report), file=sys.stderr)
    return 0 if report.get("identical_to_greedy", True) else 1


if __name__ == "__main__":
    sys.exit(main())
