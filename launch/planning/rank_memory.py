"""What each rank of a layout holds at its peak, from the config alone (nothing is allocated): the
estimator behind ``python -m launch.plan``.

Per pipeline rank (every expert-parallel rank of it holds as much):
- parameters: the rank's stages and 1/ep of each routed-expert bank (``plugins.parallel.rank_share``,
  built on ``meta`` as the trainer builds it), in ``train.precision``'s dtype (BF16 under ``bf16``,
  the GPU's default; FP32 under ``fp32``), and under FP8 one E4M3 copy of each FP8 weight, shared
  by the step's micro-batches;
- gradients: one FP32 accumulator per parameter under either precision (report 3.3: the
  gradients of batch-size accumulation stay FP32; ZeRO-1 keeps them whole until the step; a
  backward's BF16 gradient lives only until it is added in), plus the rank's flat FP32 partition
  of them that DeepSpeed's ZeRO-1 builds at the accumulation boundary, while the whole ones are
  still held (measured: a one-rank launch peaks at weights + 2 gradients + master + two moments,
  in the last backward of a step);
- optimizer: the FP32 master weights and AdamW's two moments (``train.optimizer_moments_dtype``),
  ZeRO-1-partitioned over the data-parallel ranks, routed experts over their expert-data-parallel
  group (dp / ep ranks);
- activations: what autograd keeps per token of each block (``block_activation_bytes``) for every
  micro-batch the schedule holds at once, found by walking the rank's own op list
  (``plugins.parallel.dualpipe.build_schedule``: F adds a micro-batch's chunk, B drops it, I keeps it
  until its deferred W), plus one block's working set for the backward (or one chunk of the
  chunked cross-entropy); what ``train.memory`` changes in a block is in ``block_activation_bytes``,
  checked against autograd's saved tensors per block (``tests/test_memory_switches.py``); with
  ``offload_ffn`` on a GPU, the FFNs' kept tensors are in host memory, reported apart with the bytes
  copied per step;
- communication: point-to-point sends in flight (every send of the step, or, released as they
  complete, the most the schedule lets a rank hold under any op durations:
  ``plugins.parallel.pipeline_sim.sends_in_flight``), one all-to-all send buffer under expert parallelism (E4M3
  under FP8 dispatch), the ZeRO reduce bucket (the gradients
  flattened for the data-parallel reduction, up to DeepSpeed's bucket size; on a GPU always), one
  bucket of the pipeline replicas' gradient sum;
- EMA (report 3.2.3: kept in host memory) is reported apart: one FP32 copy of the rank's partition;
  so is the staging copy of asynchronous checkpoints (``train.async_save``): the partition's master
  weights and moments once more in host memory.

Report 3.2.3's selective recomputation (RMSNorm and the MLA up-projections, ``train.recompute:
selective``) drops those outputs; ``full`` keeps each block's input and recomputes the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

from launch.config.run_config import MemoryConfig
from plugins.model.config import ModelConfig
from plugins.model.experts import RoutedExperts
from plugins.parallel.dualpipe import Layout, build_schedule, check
from plugins.parallel.pipeline_sim import sends_in_flight
from plugins.parallel.pipeline_stages import layer_spans
from plugins.parallel.rank_share import rank_model
from plugins.parallel.replicas import BUCKET as REPLICA_BUCKET
from plugins.precision.policy import fp8_targets
from plugins.precision.recipe import resolve_precision


@functools.lru_cache(maxsize=512)
def _rank_model(config_json: str, pp: int, ep: int, schedule: str, rank: int):
    """``rank_model``, built once per layout and rank in a process (``launch.plan --search`` plans
    one layout many times over); only read here."""
    return rank_model(ModelConfig.from_dict(json.loads(config_json)), pp, ep, schedule, rank)


_sends_in_flight = functools.lru_cache(maxsize=64)(sends_in_flight)  # a pure function of the (frozen) Layout
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default ZeRO reduce_bucket_size (elements)
def fp8_bytes(width: int) -> int:
    """One row of ``width`` values in E4M3 1x128 tiles: zero-padded to whole tiles, one FP32 scale each."""
    return -(-width // 128) * (128 + 4)


@dataclass(frozen=True)
class Precision:
    """Bytes of the weights and activations (``act``: 2 under ``train.precision: bf16``, 4 under
    ``fp32``; gradients accumulate in FP32 under both) and of the optimizer's moments; whether the
    policy's linears run in FP8 (and keep their inputs in FP8), and which modules they are."""

    act: int
    moments: int
    fp8: bool
    fp8_experts: bool = False  # the routed experts' GEMMs too (not under Transformer-Engine: BF16 grouped GEMMs)
    fp8_modules: tuple[str, ...] = ()
    head_copy: bool = False  # BF16 weights on a CPU: the float32 head's GEMMs read a float32 copy of it

    @classmethod
    def of(cls, device: str, moments_dtype: str, fp8: str, fp8_modules=(), precision: str = "auto") -> Precision:
        """``fp8`` the backend; ``auto`` plans as it resolves where TE is installed (te on a GPU). ``emulated``
        and ``torch`` hold the same FP8 bytes (the same quantization, routed experts included).
        ``precision``: ``train.precision`` (``auto``: bf16 on a GPU, fp32 on a CPU)."""
        te = fp8 == "te" or (fp8 == "auto" and device == "gpu")
        bf16 = resolve_precision(precision, device == "gpu") == "bf16"
        return cls(act=2 if bf16 else 4, moments=4 if moments_dtype == "float32" else 2,
                   fp8=fp8 != "none", fp8_experts=fp8 != "none" and not te, fp8_modules=tuple(fp8_modules),
                   head_copy=bf16 and device != "gpu")


def _norm(width: int, p: Precision, fp8_readers: int = 0, other_readers: bool = True,
          fp8_kind: str = "other") -> list[tuple[float, str]]:
    """RMSNorm in float32 (``plugins.model.norm``): two float32 casts of the input on bf16, the
    normalised value kept for the weight's gradient, and the output, kept while a reader other than
    an FP8 linear needs it. ``fp8_readers`` FP8 linears read it: they keep an FP8 copy, one for all
    of them with this project's FP8 linears (which quantize a shared input once), one each with
    Transformer-Engine's; recomputation does not free those copies (``fp8_kind``: "ffn" where a
    recomputing SwiGLU keeps it, which ``offload_ffn`` moves to the host)."""
    casts = 0 if p.act == 4 else 2 * 4 * width
    parts = [(casts + p.act * width + 4, "norm")]  # (and the float32 reciprocal RMS)
    if other_readers or not (p.fp8 and fp8_readers):
        parts.append((p.act * width, "norm_out"))
    if p.fp8 and fp8_readers:
        parts.append((fp8_bytes(width) * (1 if p.fp8_experts else fp8_readers), fp8_kind))
    return parts


def _linear_input(width: int, p: Precision) -> float:
    return fp8_bytes(width) if p.fp8 else width * p.act


def block_activation_bytes(config: ModelConfig, moe: bool, p: Precision, m: MemoryConfig
                           ) -> dict[str, float]:
    """Bytes autograd keeps per token of one block (MLA, then dense SwiGLU or DeepSeekMoE), by kind:
    ``input`` (the residual stream entering the block and after attention), ``norm``/``norm_out``
    (RMSNorm internals and outputs), ``up`` (the MLA up-projection outputs and what is built from
    them: q, k, v), ``other``. Attention is SDPA's: q, k, v (v zero-padded to q's head size, as the
    fused kernels want one head size), the output and the float32 log-sum-exp; the flash and
    memory-efficient backends keep no score matrix (the CPU kernel neither). ``m``: what the
    feed-forward layers keep (``train.memory``); what a recomputing SwiGLU keeps is the ``ffn`` kind."""
    c, a = config, p.act
    h, heads, qk = c.hidden_size, c.num_attention_heads, c.qk_head_dim
    te = p.fp8 and not p.fp8_experts  # Transformer-Engine's linears run their own autograd: no fused SwiGLU
    fused = m.swiglu_recompute and not te  # the dense FFN / shared experts recompute their SwiGLU output
    parts: list[tuple[float, str]] = [(a * h, "input"), (a * h, "input")]  # block input, after attention
    parts += _norm(h, p, fp8_readers=2, other_readers=False)  # read by the q and kv down-projections
    # read by the dense FFN's gate and up projections, or by the router (which keeps it), the shared
    # experts' gate and up projections and the dispatch
    parts += _norm(h, p, fp8_readers=2 if not moe or c.n_shared_experts else 0, other_readers=moe,
                   fp8_kind="ffn" if fused else "other")
    if c.q_lora_rank:
        # the latent norms and up-projections run inside selective's recomputed unit: their FP8 copies too
        parts += [(a * c.q_lora_rank, "other")] + _norm(c.q_lora_rank, p, fp8_readers=1, other_readers=False,
                                                       fp8_kind="up")
    parts += [(a * heads * qk, "up"), (a * heads * qk, "up"), (a * heads * qk, "up")]  # q, k, padded v (RoPE keeps none)
    parts += [(a * (c.kv_lora_rank + c.qk_rope_head_dim), "other"), (4 * c.qk_rope_head_dim, "other")]
    parts += _norm(c.kv_lora_rank, p, fp8_readers=1, other_readers=False, fp8_kind="up")
    parts += [(a * heads * qk, "other"), (4 * heads, "other"),  # attention output (padded), log-sum-exp
              (_linear_input(heads * c.v_head_dim, p), "other")]  # o_proj input
    if moe:
        k, inner = c.num_experts_per_tok, c.moe_intermediate_size
        # the gate's float32 affinities and routing weights, the chosen experts and the permutation (int64)
        # (its input: the norm's output)
        parts += [(4 * c.n_routed_experts + 4 * k + 4 + 2 * 8 * k, "other")]
        # the dispatched rows (the gate/up GEMM's input) and, recomputing, the SwiGLU input (FP8 tiles under
        # fp8_activations) and the routing weights
        routed = "ffn" if m.swiglu_recompute else "other"
        parts += [(k * (fp8_bytes(h) if p.fp8_experts else h * a), routed)]
        if m.swiglu_recompute:
            parts += [(k * (fp8_bytes(2 * inner) if p.fp8 and m.fp8_activations else 2 * inner * a), routed)]
        else:  # silu's and the product's inputs, the down-projection's input (and the weighting's)
            parts += [(k * a * 2 * inner + k * a * inner + k * (fp8_bytes(inner) if p.fp8_experts else inner * a),
                       "other")]
            parts += [(k * max(a, 4) * inner if m.weighted_combine else 0, "other")]
        # combine: the routing weight per row, or (gate-weighted) every expert output, float32 on bf16
        # the weighted combine keeps each row's weight and its position (int64); the gate-weighted one the
        # expert outputs (float32 on bf16) and their weighted copies
        parts += [(12 * k, routed) if m.weighted_combine else (k * (max(a, 4) + a) * h + 12 * k, "other")]
        shared = inner * c.n_shared_experts
    else:
        shared = c.intermediate_size
    if shared and fused:  # the SwiGLU input only; its output recomputed
        parts += [(fp8_bytes(2 * shared) if p.fp8 and m.fp8_activations else 2 * shared * a, "ffn")]
    elif shared:
        parts += [(3 * a * shared, "other"), (_linear_input(shared, p), "other")]  # gate, up, silu; down input
    out: dict[str, float] = {}
    for size, kind in parts:
        out[kind] = out.get(kind, 0.0) + size
    return out


def head_activation_bytes(config: ModelConfig, p: Precision, m: MemoryConfig, recompute: str) -> float:
    """Per token of the last stage: final norm and the float32 log-softmax of the logits (with
    ``m.loss_chunk_tokens`` only the normed hidden state: the chunks' logits are recomputed), and per
    MTP depth its two norms, concatenation, projection (not FP8), one block and another head."""
    c = config
    head = sum(s for s, _ in _norm(c.hidden_size, p)) + (0 if m.loss_chunk_tokens else 4 * c.vocab_size)
    block = kept(block_activation_bytes(c, c.is_moe_layer(c.num_hidden_layers), p, m), recompute, m.offload_ffn)
    mtp = 2 * sum(s for s, _ in _norm(c.hidden_size, p)) + p.act * 2 * c.hidden_size + block + head
    return head + c.num_nextn_predict_layers * mtp


def loss_chunk_bytes(config: ModelConfig, p: Precision, m: MemoryConfig) -> float:
    """The working set of one chunk of the chunked cross-entropy: its float32 logits, softmax and
    gradient (report 3.3.1: the head in float32), and the head's float32 copy where the device has no
    GEMM from BF16 operands to a float32 result (``plugins.model.high_precision.float32_mm``)."""
    if not m.loss_chunk_tokens:
        return 0.0
    upcast = 4 * config.vocab_size * config.hidden_size if p.head_copy else 0
    return m.loss_chunk_tokens * config.vocab_size * 12 + upcast


def kept(parts: dict[str, float], recompute: str, offload: bool = False) -> float:
    """What a block keeps in device memory between its forward and backward under a recompute mode
    (``offload``: what the recomputing SwiGLUs keep is in host memory instead)."""
    if recompute == "full":
        return parts["input"] / 2  # the block's input only
    drop = ({"norm", "norm_out", "up"} if recompute == "selective" else set()) | ({"ffn"} if offload else set())
    return sum(v for kind, v in parts.items() if kind not in drop)


def offloaded(parts: dict[str, float], recompute: str, offload: bool) -> float:
    """What a block keeps in host memory (``train.memory.offload_ffn``)."""
    return parts.get("ffn", 0.0) if offload and recompute != "full" else 0.0


def stage_activation_bytes(config: ModelConfig, stage: int, stages: int, p: Precision, recompute: str,
                           m: MemoryConfig) -> float:
    """Per token of one micro-batch through one pipeline stage (the whole model when stages == 1);
    a stage before the last also holds its output (the pipeline runtime keeps it as the root of
    the stage's backward)."""
    total = sum(kept(block_activation_bytes(config, config.is_moe_layer(i), p, m), recompute, m.offload_ffn)
                for i in layer_spans(config.num_hidden_layers, stages)[stage])
    if stage == stages - 1:
        total += config.hidden_size * p.act if recompute == "full" else head_activation_bytes(config, p, m, recompute)
    else:
        total += config.hidden_size * p.act
    return total


def stage_offload_bytes(config: ModelConfig, stage: int, stages: int, p: Precision, recompute: str,
                        m: MemoryConfig) -> float:
    """Per token of one micro-batch through one stage: what ``offload_ffn`` keeps in host memory
    (the last stage's MTP block included)."""
    layers = list(layer_spans(config.num_hidden_layers, stages)[stage])
    if stage == stages - 1:
        layers += [config.num_hidden_layers] * config.num_nextn_predict_layers
    return sum(offloaded(block_activation_bytes(config, config.is_moe_layer(i), p, m), recompute, m.offload_ffn)
               for i in layers)


def in_flight(layout: Layout, rank: int, weight: dict[int, float]) -> tuple[float, int]:
    """(peak of the summed ``weight[chunk]`` of the micro-batches held, most held at once) while
    ``rank`` runs its schedule: F adds (chunk, micro), B drops it, I keeps it until its W."""
    deferred: list[tuple[int, int]] = []
    alive: dict[tuple[int, int], float] = {}
    peak, most = 0.0, 0
    for op in build_schedule(layout, rank):
        if op.forward is not None:  # an FB op's forward is counted before its backward frees anything
            alive[op.forward] = weight[op.forward[0]]
            peak, most = max(peak, sum(alive.values())), max(most, len(alive))
        if op.backward is not None:
            if op.kind == "I":
                deferred.append(op.backward)
            else:
                alive.pop(op.backward)
        if op.kind == "W":
            alive.pop(deferred.pop(0))
    return peak, most


@dataclass
class Layout3D:
    """The planned layout: pipeline, expert and data-parallel sizes, micro-batch and window."""

    pp: int
    ep: int
    dp: int
    micro_batch: int
    seq_len: int
    schedule: str
    micro_batches: int  # per pipeline per step (the final batch's)
    recompute: str
    device: str


def fp8_weight_bytes(model, p: Precision) -> float:
    """One FP8 copy (E4M3 and a float32 scale per 128x128 block) of every weight the FP8 policy
    converts: made once per optimizer step and shared by every micro-batch's GEMMs and backward
    (``plugins.precision.fp8.quantized_weight``)."""
    if not p.fp8:
        return 0.0
    total = 0.0
    for name in fp8_targets(model, p.fp8_modules):
        if isinstance(model.get_submodule(name), RoutedExperts) and not p.fp8_experts:
            continue
        for weight in model.get_submodule(name).parameters(recurse=False):
            rows, cols = weight.shape[-2:]
            blocks = weight.numel() // (rows * cols) * -(-rows // 128) * -(-cols // 128)
            total += weight.numel() + 4 * blocks
    return total


def plan_ranks(config: ModelConfig, layout: Layout3D, p: Precision, m: MemoryConfig) -> list[dict]:
    """One dict per pipeline rank: counts and bytes of each kind (see the module docstring)."""
    if layout.device == "cpu":  # host offload moves nothing where the activations already live in host memory
        m = dataclasses.replace(m, offload_ffn=False)
    tokens = layout.micro_batch * layout.seq_len
    pipelined = layout.pp > 1
    sched = check(layout.schedule, layout.pp, layout.micro_batches) if pipelined else None
    in_flight_sends = _sends_in_flight(sched) if sched else []
    stages = sched.stages if sched else 1
    per_stage = [stage_activation_bytes(config, s, stages, p, layout.recompute, m) * tokens for s in range(stages)]
    per_stage_host = [stage_offload_bytes(config, s, stages, p, layout.recompute, m) * tokens for s in range(stages)]
    working = max(max(sum(block_activation_bytes(config, config.is_moe_layer(i), p, m).values())
                      for i in range(config.num_hidden_layers)) * tokens, loss_chunk_bytes(config, p, m))
    hidden_message = tokens * config.hidden_size * p.act
    ranks = []
    for rank in range(layout.pp):
        model = _rank_model(json.dumps(config.to_dict(), sort_keys=True), layout.pp, layout.ep, layout.schedule, rank)
        experts = sum(t.numel() for m in model.modules() if isinstance(m, RoutedExperts) for t in m.parameters())
        params = sum(t.numel() for t in model.parameters())
        shard = (params - experts) / layout.dp + experts / max(1, layout.dp // layout.ep)
        if sched:
            weight = {c: per_stage[sched.stage(rank, c)] for c in range(sched.chunks)}
            activations, held = in_flight(sched, rank, weight)
            host, _ = in_flight(sched, rank, {c: per_stage_host[sched.stage(rank, c)] for c in range(sched.chunks)})
            ops = build_schedule(sched, rank)
            traffic = sum(per_stage_host[sched.stage(rank, op.forward[0])] for op in ops if op.forward is not None)
            sends = sum((op.forward is not None and sched.stage(rank, op.forward[0]) < stages - 1)
                        + (op.backward is not None and sched.stage(rank, op.backward[0]) > 0) for op in ops)
            if m.release_sends:  # a send holds its tensor until its receiver takes it
                sends = min(sends, in_flight_sends[rank])
        else:
            activations, held, sends = per_stage[0], 1, 0
            host, traffic = per_stage_host[0], per_stage_host[0] * layout.micro_batches
        # the dispatch's send buffer: every token's k rows, E4M3 tiles under FP8 dispatch
        row = fp8_bytes(config.hidden_size) if p.fp8_experts and m.fp8_dispatch else config.hidden_size * p.act
        communication = sends * hidden_message + (config.num_experts_per_tok * tokens * row if layout.ep > 1 else 0)
        # ZeRO's flat reduce bucket (FP32); a CPU engine skips it at dp 1 unless its FP32 accumulators feed it (bf16)
        if layout.dp > 1 or layout.device == "gpu" or p.act < 4:
            communication += min(REDUCE_BUCKET, params) * 4  # FP32: the reduction is FP32 under either precision
        if sched:  # one bucket of the replicas' (FP32) gradient sum
            communication += min(REPLICA_BUCKET, params * 4)
        out = {
            "pipeline_rank": rank, "parameters": params, "routed_expert_parameters": experts,
            "optimizer_partition_parameters": shard,
            "parameters_bytes": params * p.act,
            "fp8_weights_bytes": fp8_weight_bytes(model, p),
            "gradients_bytes": params * 4 + shard * 4,
            "master_weights_bytes": shard * 4,
            "moments_bytes": shard * 2 * p.moments,
            "activations_bytes": activations + working,
            "activation_micro_batches": held,
            "communication_bytes": communication,
            "ema_host_bytes": shard * 4,
            "save_staging_host_bytes": shard * (4 + 2 * p.moments),
            "offload_host_bytes": host,  # train.memory.offload_ffn: pinned host memory at the peak
            "offload_bytes_per_step": traffic,  # copied device -> host in forward, and back in backward
        }
        out["optimizer_bytes"] = out["master_weights_bytes"] + out["moments_bytes"]
        out["total_bytes"] = sum(out[k] for k in ("parameters_bytes", "fp8_weights_bytes", "gradients_bytes",
                                                  "optimizer_bytes", "activations_bytes", "communication_bytes"))
        ranks.append(out)
    return ranks
