"""Scoring packed sequences (report 4.5): every label of a batch given the sequence before it, summed
as (NLL in nats, scored tokens, UTF-8 bytes of the scored tokens), then loss per token and bits per
byte. Validation during training (``launch.training.validation``) and ``launch.evaluate --packed``
(``score_packed``: a prepared directory through one whole model) score with these functions, so
the two agree on the same checkpoint."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_pipeline.catalog import open_prepared, prepared_dirs
from data_pipeline.dataset import IGNORE_INDEX, DatasetError
from data_pipeline.mixture import MixtureDataset, Source
from plugins.errors import ConfigError
from plugins.model.deepseek_v3 import DeepSeekV3
from tokenizer.load import TokenizerBundle


def score_logits(logits: torch.Tensor, labels: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """float64 (summed NLL in nats, scored tokens, UTF-8 bytes of the scored tokens) of one batch."""
    scored = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return torch.stack([nll.double(), scored.sum().double(), token_bytes[labels[scored]].sum().double()])


@torch.no_grad()
def model_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The main model's logits of a whole (unpipelined) ``DeepSeekV3``, MTP modules skipped."""
    rope = model.rope(input_ids.shape[1], input_ids.device)
    return model.outputs(model.trunk(model.embed_tokens(input_ids), rope), input_ids, rope, with_mtp=False).logits


def summarize(totals: torch.Tensor) -> dict:
    """(nll, tokens, bytes) -> loss per token and bits per byte."""
    nll, tokens, text_bytes = totals.tolist()
    return {"loss": nll / max(tokens, 1.0), "bpb": nll / (math.log(2) * max(text_bytes, 1.0)), "tokens": int(tokens)}


@torch.no_grad()
def score_packed(model: DeepSeekV3, tokenizer: TokenizerBundle, token_bytes: torch.Tensor, directory: str,
                 max_sequences: int | None, batch_size: int) -> dict:
    """Loss and bits per byte of a prepared directory's first ``max_sequences`` sequences."""
    try:
        dataset = MixtureDataset([Source(directory, 1.0, open_prepared(prepared_dirs(directory), tokenizer.fingerprint))])
    except DatasetError as error:
        raise ConfigError(f"--packed {directory}: {error}") from None
    if dataset.seq_len > model.config.max_position_embeddings:
        raise ConfigError(f"--packed {directory}: sequences of {dataset.seq_len} tokens exceed the model's "
                          f"{model.config.max_position_embeddings} positions")
    device = next(model.parameters()).device
    count = min(max_sequences or len(dataset), len(dataset))
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in tqdm(range(0, count, batch_size), desc=f"scoring {directory}", unit=" batches", file=sys.stderr,
                      disable=None):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        input_ids = torch.stack([s["input_ids"] for s in samples]).to(device)
        labels = torch.stack([s["labels"] for s in samples]).to(device)
        totals += score_logits(model_logits(model, input_ids), labels, token_bytes)
    return {"directory": directory, "sequences": count, **summarize(totals)}
