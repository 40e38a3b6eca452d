"""Training FLOPs per token and model FLOPs utilisation (MFU), from a config alone.

    FLOPs/token = 6 * N + 3 * L_attn * H * (d_qk + d_v) * T      (causal: half the score matrix)

``N`` is every weight a token passes through (``param_count.count_parameters``'s activated count
without the embedding lookup, plus the MTP module's activated weights and one more
pass through the shared output head per MTP depth, report 2.2); 6 = forward 2 + backward 4. The
attention term is the score and value products of each MLA layer (main blocks and MTP blocks) over
a ``T``-token causal window. MFU = FLOPs/token x tokens/s / (devices x peak FLOP/s of one device).
"""

from __future__ import annotations

from .config import ModelConfig
from .param_count import count_parameters

H800_BF16_PEAK = 989.5e12  # dense BF16 FLOP/s of an H800/H100 SXM (the report's GPU)


def flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """{parameters, dense, attention, total} training FLOPs of one token in a ``seq_len`` window."""
    counts = count_parameters(config)
    embedding = config.vocab_size * config.hidden_size  # a lookup, not a product; a tied head is counted once
    weights = (counts["activated"] - embedding + (embedding if config.tie_word_embeddings else 0)
              + counts["mtp_activated"] + config.num_nextn_predict_layers * embedding)
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    attention = 3 * layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * seq_len
    return {"parameters": weights, "dense": 6.0 * weights, "attention": float(attention),
            "total": 6.0 * weights + attention}


def mfu(flops_per_token_total: float, tokens_per_second: float, devices: int,
        peak_flops: float = H800_BF16_PEAK) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak."""
    return flops_per_token_total * tokens_per_second / (devices * peak_flops)
