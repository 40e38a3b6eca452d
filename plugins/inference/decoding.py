"""Decoding through the MLA latent cache (weight-absorbed attention): plain greedy / top-p sampling,
and greedy speculative decoding with the MTP module as the drafter (report 2.2 "MTP in Inference",
5.4.3: the second token is accepted 85-90% of the time).

Speculative step: the main model runs on [last token, MTP's draft of the token after it] in one
forward; its own prediction at the first position decides the next token, and the draft is kept
only if it equals that prediction, in which case the second position's prediction comes free. The
output is therefore exactly plain greedy decoding's; rejected positions leave the main cache. The
MTP block keeps its own latent cache over the positions whose next token is known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..model.deepseek_v3 import DeepSeekV3
from ..model.mla import LatentCache


@dataclass
class Decoded:
    tokens: list[int]
    seconds: float
    main_forwards: int
    drafted: int = 0
    accepted: int = 0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else float("inf")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits.float() / temperature).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest prefix whose mass reaches top_p
    sorted_probs = sorted_probs * keep
    return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])


def _step(model: DeepSeekV3, ids: list[int], cache: LatentCache) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    device = model.embed_tokens.weight.device
    rope = model.rope(len(ids), device, start=cache.seq_len)
    h = model.trunk(model.embed_tokens(torch.tensor([ids], device=device)), rope, cache=cache)
    return model.lm_head(model.norm(h))[0], h, rope


@torch.no_grad()
def generate(model: DeepSeekV3, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int = 0) -> Decoded:
    """One token per forward through the latent cache; greedy when ``temperature`` is 0."""
    generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    cache = LatentCache(len(model.layers))
    started = time.perf_counter()
    logits, _, _ = _step(model, prompt, cache)
    tokens = [pick_token(logits[-1], temperature, top_p, generator)]
    forwards = 1
    while len(tokens) < max_new_tokens and tokens[-1] != eos_id:
        logits, _, _ = _step(model, tokens[-1:], cache)
        tokens.append(pick_token(logits[-1], temperature, top_p, generator))
        forwards += 1
    return Decoded(tokens, time.perf_counter() - started, forwards)


@torch.no_grad()
def generate_speculative(model: DeepSeekV3, prompt: list[int], max_new_tokens: int,
                         eos_id: int | None = None) -> Decoded:
    """Greedy decoding with MTP depth 1 drafting one token ahead; the same tokens as ``generate``."""
    if not len(model.mtp):
        raise ConfigError("speculative decoding with MTP needs a model with num_nextn_predict_layers >= 1")
    main_layers = range(len(model.layers))
    cache = LatentCache(len(model.layers) + 1)  # the MTP block's cache sits at index num_hidden_layers
    mtp = model.mtp[0]
    device = model.embed_tokens.weight.device

    def draft_after(h: torch.Tensor, known_next: list[int], rope: tuple) -> int:
        """MTP over positions whose hidden state ``h`` and next token are known: the token after."""
        ahead = model.embed_tokens(torch.tensor([known_next], device=device))
        h_mtp = mtp(h, ahead, rope, cache)
        return int(model.lm_head(mtp.norm(h_mtp))[0, -1].argmax())

    started = time.perf_counter()
    logits, h, rope = _step(model, prompt, cache)
    tokens = [int(logits[-1].argmax())]
    draft = draft_after(h, prompt[1:] + tokens, rope)
    result = Decoded(tokens, 0.0, 1)
    while len(tokens) < max_new_tokens and tokens[-1] != eos_id:
        length = cache.seq_len
        logits, h, rope = _step(model, [tokens[-1], draft], cache)
        result.main_forwards += 1
        result.drafted += 1
        verified = int(logits[0].argmax())
        result.accepted += int(verified == draft)
        if verified == draft and verified != eos_id and len(tokens) + 1 < max_new_tokens:
            tokens += [verified, int(logits[1].argmax())]
            draft = draft_after(h, tokens[-2:], rope)
        else:
            cache.truncate(length + 1, main_layers)
            tokens.append(verified)
            draft = draft_after(h[:, :1], tokens[-1:], (rope[0][:1], rope[1][:1]))
    result.seconds = time.perf_counter() - started
    return result
