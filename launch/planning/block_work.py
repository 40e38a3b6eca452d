"""The work of each op of a block, per micro-batch at its real shape: the GEMMs (FLOPs, rows, dtype,
grouped or not), attention's core, and the memory-bound ops (bytes moved: norms, RoPE, residual adds,
routing, the token permutes, SwiGLU, FP8 quantization, the cross-entropy) — what the step-time model
turns into seconds with a hardware profile. FLOPs are 2 x rows x in x out a GEMM (forward; its input
and weight gradients each as much again) and the causal attention of ``plugins.model.flops``
(backward twice the forward), so the GEMM and attention FLOPs sum to ``flops_per_token``.

The routed experts on a rank (report 2.1.2, 3.2.2): under expert parallelism each of the ``ep``
ranks holds ``E / ep`` experts and receives ``tokens x k`` rows in all (balanced routing), so an
expert's GEMM has ``tokens x k x ep / E`` rows — the rows the grouped-GEMM curve is read at.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launch.config.run_config import MemoryConfig
from plugins.model.config import ModelConfig

from .rank_memory import Precision


@dataclass(frozen=True)
class Work:
    """One op's forward work on one micro-batch. ``kind``: gemm, grouped (per-expert GEMMs, ``rows``
    per expert), sdpa, memory (``bytes`` moved), cross_entropy (``bytes`` of float32 logits through
    log-softmax). ``selective``: run again in backward under selective recomputation (RMSNorms and the
    MLA up-projections, report 3.2.3); full recomputation runs every op of a block again."""

    name: str
    kind: str
    flops: float = 0.0
    bytes: float = 0.0
    rows: float = 0.0
    dtype: str = "bf16"
    selective: bool = False
    always: bool = False  # recomputed in backward whatever train.recompute says (SwiGLUs, the chunked loss's logits)


def dtypes(p: Precision, device: str) -> tuple[str, str]:
    """(activations' GEMM dtype, the FP8 policy's linears' dtype): BF16 on a GPU (FP8 where the
    policy runs it), FP32 on a CPU, where emulated FP8 multiplies dequantized FP32 values."""
    act = "bf16" if device == "gpu" else "fp32"
    return act, ("fp8" if p.fp8 and device == "gpu" else act)


def _gemm(name, tokens, d_in, d_out, dtype, selective=False, grouped_rows=None) -> Work:
    kind = "grouped" if grouped_rows is not None else "gemm"
    return Work(name, kind, flops=2.0 * tokens * d_in * d_out, rows=grouped_rows or tokens, dtype=dtype,
                selective=selective)


def _memory(name, tokens, values, a, selective=False, always=False) -> Work:
    """An elementwise op reading and writing ``values`` per token of ``a`` bytes each."""
    return Work(name, "memory", bytes=2.0 * tokens * values * a, selective=selective, always=always)


def _quantize(name, tokens, width, p: Precision) -> list[Work]:
    """An FP8 linear's input quantized to E4M3 1x128 tiles: read in the activations' dtype, write one byte."""
    return [Work(f"{name} quantize", "memory", bytes=tokens * width * (p.act + 1))] if p.fp8 else []


def attention_work(c: ModelConfig, tokens: int, seq_len: int, p: Precision, device: str) -> list[Work]:
    """MLA (report 2.1.1): the down- and up-projections, the latent norms, RoPE, SDPA, the output projection."""
    act, lin = dtypes(p, device)
    a, h, heads = p.act, c.hidden_size, c.num_attention_heads
    work = [_memory("attention norm", tokens, 1.5 * h, a, selective=True)]
    work += _quantize("q/kv down", tokens, h, p)
    if c.q_lora_rank:
        work += [_gemm("q_a", tokens, h, c.q_lora_rank, lin),
                 _memory("q norm", tokens, 1.5 * c.q_lora_rank, a, selective=True),
                 _gemm("q_b", tokens, c.q_lora_rank, heads * c.qk_head_dim, lin, selective=True)]
    else:
        work.append(_gemm("q_proj", tokens, h, heads * c.qk_head_dim, lin))
    work += [_gemm("kv_a", tokens, h, c.kv_lora_rank + c.qk_rope_head_dim, lin),
             _memory("kv norm", tokens, 1.5 * c.kv_lora_rank, a, selective=True),
             _gemm("kv_b", tokens, c.kv_lora_rank, heads * (c.qk_nope_head_dim + c.v_head_dim), lin, selective=True),
             _memory("rope", tokens, (heads + 1) * c.qk_rope_head_dim, a, selective=True),
             Work("sdpa", "sdpa", flops=tokens * heads * (c.qk_head_dim + c.v_head_dim) * seq_len, dtype=act)]
    work += _quantize("o_proj", tokens, heads * c.v_head_dim, p)
    work += [_gemm("o_proj", tokens, heads * c.v_head_dim, h, lin), _memory("residual add", tokens, 1.5 * h, a)]
    return work


def ffn_work(c: ModelConfig, moe: bool, tokens: int, ep: int, p: Precision, device: str,
             m: MemoryConfig) -> list[Work]:
    """The dense SwiGLU FFN, or DeepSeekMoE: router, routing, dispatch permute, the rank's experts as
    grouped GEMMs, the shared experts, the combine (report 2.1.2)."""
    act, lin = dtypes(p, device)
    a, h = p.act, c.hidden_size
    again = m.swiglu_recompute  # every SwiGLU's output recomputed in backward (train.memory)
    work = [_memory("ffn norm", tokens, 1.5 * h, a, selective=True)]
    if not moe:
        i = c.intermediate_size
        return work + _quantize("ffn", tokens, h, p) + [
            _gemm("gate_up", tokens, h, 2 * i, lin), _memory("swiglu", tokens, 1.5 * i, a, always=again),
            *_quantize("down", tokens, i, p), _gemm("down", tokens, i, h, lin),
            _memory("residual add", tokens, 1.5 * h, a)]
    k, f, experts = c.num_experts_per_tok, c.moe_intermediate_size, c.n_routed_experts
    rows = tokens * k  # routed rows this rank computes (balanced)
    per_expert = rows * ep / experts
    expert_dtype = "fp8" if p.fp8_experts and device == "gpu" else act
    work += [_gemm("router", tokens, h, experts, act),
             _memory("routing", tokens, 6 * experts, 4),  # sigmoid, bias, group scores, top-k, normalise: float32
             _memory("dispatch permute", rows, h, a)]
    work += _quantize("experts gate_up", rows, h, p) if p.fp8_experts else []
    work += [_gemm("experts gate_up", rows, h, 2 * f, expert_dtype, grouped_rows=per_expert),
             _memory("experts swiglu", rows, 1.5 * f, a, always=again)]
    work += _quantize("experts down", rows, f, p) if p.fp8_experts else []
    work += [_gemm("experts down", rows, f, h, expert_dtype, grouped_rows=per_expert),
             _memory("combine", rows, h, a)]
    if c.n_shared_experts:
        s = f * c.n_shared_experts
        work += _quantize("shared", tokens, h, p) + [
            _gemm("shared gate_up", tokens, h, 2 * s, lin), _memory("shared swiglu", tokens, 1.5 * s, a, always=again),
            *_quantize("shared down", tokens, s, p), _gemm("shared down", tokens, s, h, lin)]
    return work + [_memory("residual add", tokens, 1.5 * h, a)]


def block_work(c: ModelConfig, layer: int, tokens: int, seq_len: int, ep: int, p: Precision, device: str,
               m: MemoryConfig) -> list[Work]:
    return attention_work(c, tokens, seq_len, p, device) + ffn_work(c, c.is_moe_layer(layer), tokens, ep, p, device, m)


def embedding_work(c: ModelConfig, tokens: int, p: Precision) -> list[Work]:
    return [_memory("embedding", tokens, c.hidden_size, p.act)]


def head_work(c: ModelConfig, tokens: int, seq_len: int, ep: int, p: Precision, device: str,
              m: MemoryConfig) -> list[Work]:
    """The last stage's: final norm, output head and cross-entropy (log-softmax of float32 logits,
    its backward as long), and per MTP depth
    the embedding, two norms, the projection, one block, its norm, the shared head again (report 2.2)."""
    act, _ = dtypes(p, device)
    h, v = c.hidden_size, c.vocab_size
    chunked = m.loss_chunk_tokens > 0  # the chunked cross-entropy recomputes its logits in backward
    head = [_memory("final norm", tokens, 1.5 * h, p.act),
            dataclasses.replace(_gemm("lm_head", tokens, h, v, act), always=chunked),
            Work("cross-entropy", "cross_entropy", bytes=tokens * v * 4.0)]
    work = list(head)
    for depth in range(c.num_nextn_predict_layers):
        layer = c.num_hidden_layers + depth
        work += [*embedding_work(c, tokens, p), _memory("mtp norms", tokens, 3 * h, p.act),
                 _gemm("mtp projection", tokens, 2 * h, h, act),
                 *block_work(c, layer, tokens, seq_len, ep, p, device, m), *head]
    return work
