"""Evaluation by likelihood (report 4.3/5.x): mean token loss, perplexity and bits per byte of
held-out text, and multiple-choice accuracy by per-option likelihood.

Every document is ``<bos> text``; every text token is scored once, given at most L-1 tokens
before it: documents longer than L go through windows of L tokens advanced by S, each scoring
only the tokens the previous window did not. Bits per byte (tokenizer-independent) = sum of token
NLL in nats / (ln 2 x UTF-8 bytes of the texts). The chosen option of a multiple-choice item is
the one with the lowest NLL per UTF-8 byte of the option, given the context.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from plugins.errors import ConfigError
from plugins.model.deepseek_v3 import DeepSeekV3
from tokenizer.load import TokenizerBundle


def windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over a sequence whose positions 1..n-1
    are to be scored (position 0 is the BOS): every position is scored exactly once."""
    spans, scored = [], 1
    while scored < num_tokens:
        end = min(scored + (stride if spans else seq_len - 1), num_tokens)
        start = max(0, end - seq_len)
        spans.append((start, end, scored))
        scored = end
    return spans


@torch.no_grad()
def token_nll(model: DeepSeekV3, ids: list[int], seq_len: int, stride: int) -> torch.Tensor:
    """NLL (nats, float64) of ``ids[1:]`` each given what precedes it, through sliding windows."""
    device = next(model.parameters()).device
    losses = []
    for start, end, scored in windows(len(ids), seq_len, stride):
        window = torch.tensor(ids[start:end], device=device)[None]
        logits = model(window).logits[0, scored - start - 1 : end - start - 1].float()
        targets = window[0, scored - start : end - start]
        losses.append(F.cross_entropy(logits, targets, reduction="none").double())
    return torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)


def evaluate_texts(model: DeepSeekV3, tokenizer: TokenizerBundle, texts, seq_len: int, stride: int,
                   sources: Sequence[Path] = ()) -> dict:
    """Loss, perplexity and bits per byte of ``texts`` (read from ``sources``, named in errors)."""
    nll, tokens, text_bytes, documents = 0.0, 0, 0, 0
    for text in tqdm(texts, desc="evaluating", unit=" docs", file=sys.stderr, disable=None):
        losses = token_nll(model, [tokenizer.bos_id, *tokenizer.encode(text)], seq_len, stride)
        nll += losses.sum().item()
        tokens += losses.numel()
        text_bytes += len(text.encode("utf-8"))
        documents += 1
    if not tokens:
        raise ConfigError(f"--data {' '.join(map(str, sources))}: no text to evaluate")
    loss = nll / tokens
    return {"documents": documents, "tokens": tokens, "bytes": text_bytes, "loss": loss,
            "perplexity": math.exp(loss), "bits_per_byte": nll / (math.log(2) * text_bytes)}


def read_choices(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"--choices {path}: no such file")
    items = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid UTF-8 (byte offset {error.start})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: line {number}: invalid JSON ({error.msg})") from None
        ok = (isinstance(item, dict) and isinstance(item.get("context"), str) and isinstance(item.get("options"), list)
              and len(item["options"]) >= 2 and all(isinstance(o, str) and o for o in item["options"])
              and isinstance(item.get("answer"), int) and 0 <= item["answer"] < len(item["options"]))
        if not ok:
            raise ConfigError(f"{path}: line {number}: expected {{\"context\": str, \"options\": [>=2 non-empty str], "
                              "\"answer\": index into options}")
        items.append(item)
    if not items:
        raise ConfigError(f"{path}: no multiple-choice items")
    return items


@torch.no_grad()
def score_choices(model: DeepSeekV3, tokenizer: TokenizerBundle, items: list[dict], seq_len: int) -> dict:
    predictions = []
    for item in tqdm(items, desc="multiple choice", unit=" items", file=sys.stderr, disable=None):
        context = [tokenizer.bos_id, *tokenizer.encode(item["context"])]
        scores = []
        for option in item["options"]:
            option_ids = tokenizer.encode(option)
            if len(option_ids) >= seq_len:
                raise ConfigError(f"an option of {len(option_ids)} tokens does not fit --seq-len {seq_len}")
            ids = (context + option_ids)[-seq_len:]
            nll = token_nll(model, ids, seq_len, seq_len - 1)[-len(option_ids):].sum().item()
            scores.append(nll / len(option.encode("utf-8")))
        predictions.append(min(range(len(scores)), key=scores.__getitem__))
    correct = sum(p == item["answer"] for p, item in zip(predictions, items))
    return {"items": len(items), "accuracy": correct / len(items), "predictions": predictions}
