"""What each rank of a layout holds at its peak, from the config alone (nothing is allocated): the
estimator behind ``python -m launch.plan``.

Per pipeline rank (every expert-parallel rank of it holds as much):
- parameters: the rank's stages and 1/ep of each routed-expert bank (``plugins.parallel.rank_share``,
  built on ``meta`` as the trainer builds it), bf16 on a GPU, fp32 on a CPU (the trainer's engine);
- gradients: one per parameter in the weights' dtype (ZeRO-1 keeps them whole until the step),
  plus the rank's flat FP32 partition of them that DeepSpeed's ZeRO-1 builds at the accumulation
  boundary, while the whole ones are still held (measured: a one-rank launch peaks at weights +
  2 gradients + master + two moments, in the last backward of a step);
- optimizer: the FP32 master weights and AdamW's two moments (``train.optimizer_moments_dtype``),
  ZeRO-1-partitioned over the data-parallel ranks, routed experts over their expert-data-parallel
  group (dp / ep ranks);
- activations: what autograd keeps per token of each block (``block_activation_bytes``) for every
  micro-batch the schedule holds at once, found by walking the rank's own op list
  (``plugins.parallel.dualpipe.build_schedule``: F adds a micro-batch's chunk, B drops it, I keeps it
  until its deferred W), plus one block's working set for the backward;
- communication: point-to-point sends the pipeline runtime keeps until the step ends, one
  all-to-all send buffer under expert parallelism, the ZeRO reduce bucket (the gradients
  flattened for the data-parallel reduction, up to DeepSpeed's bucket size; on a GPU always), one
  bucket of the pipeline replicas' gradient sum;
- EMA (report 3.2.3: kept in host memory) is reported apart: one FP32 copy of the rank's partition;
  so is the staging copy of asynchronous checkpoints (``train.async_save``): the partition's master
  weights and moments once more in host memory.

Report 3.2.3's selective recomputation (RMSNorm and the MLA up-projections, ``train.recompute:
selective``) drops those outputs; ``full`` keeps each block's input and recomputes the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from plugins.model.config import ModelConfig
from plugins.model.experts import RoutedExperts
from plugins.parallel.dualpipe import Layout, build_schedule, check
from plugins.parallel.pipeline_stages import layer_spans
from plugins.parallel.rank_share import rank_model
from plugins.parallel.replicas import BUCKET as REPLICA_BUCKET

REDUCE_BUCKET = 500_000_000  # DeepSpeed's default ZeRO reduce_bucket_size (elements)
FP8_BYTES = 1 + 4 / 128  # an E4M3 value and its share of a 1x128 tile's FP32 scale


@dataclass(frozen=True)
class Precision:
    """Bytes of the weights/gradients/activations (``act``) and of the optimizer's moments."""

    act: int
    moments: int
    fp8: bool

    @classmethod
    def of(cls, device: str, moments_dtype: str, fp8: str) -> Precision:
        return cls(act=2 if device == "gpu" else 4, moments=4 if moments_dtype == "float32" else 2,
                   fp8=fp8 != "none" and device == "gpu")


def _norm(width: int, p: Precision) -> list[tuple[float, str]]:
    """RMSNorm in float32 (``plugins.model.norm``): two float32 casts of the input on bf16, the
    normalised value kept for the weight's gradient, and the output."""
    casts = 0 if p.act == 4 else 2 * 4 * width
    return [(casts + p.act * width, "norm"), (p.act * width, "norm_out")]


def _linear_input(width: int, p: Precision) -> float:
    return width * (FP8_BYTES if p.fp8 else p.act)


def block_activation_bytes(config: ModelConfig, moe: bool, p: Precision) -> dict[str, float]:
    """Bytes autograd keeps per token of one block (MLA, then dense SwiGLU or DeepSeekMoE), by kind:
    ``input`` (the residual stream entering the block and after attention), ``norm``/``norm_out``
    (RMSNorm internals and outputs), ``up`` (the MLA up-projection outputs and what is built from
    them: q, k, v), ``other``."""
    c, a = config, p.act
    h, heads, qk = c.hidden_size, c.num_attention_heads, c.qk_head_dim
    parts: list[tuple[float, str]] = [(a * h, "input"), (a * h, "input")]  # block input, after attention
    parts += _norm(h, p) + _norm(h, p)  # input and post-attention norms
    if c.q_lora_rank:
        parts += [(a * c.q_lora_rank, "other")] + _norm(c.q_lora_rank, p)
    parts += [(a * heads * qk, "up"),  # q_b output, kept by the rotary's view of q_pe
              (4 * heads * c.qk_rope_head_dim, "up"),  # the rotary's float32 pairs
              (a * heads * qk, "up"), (a * heads * qk, "up"), (a * heads * qk, "up")]  # q, k, padded v
    parts += [(a * (c.kv_lora_rank + c.qk_rope_head_dim), "other"), (4 * c.qk_rope_head_dim, "other")]
    parts += _norm(c.kv_lora_rank, p)
    parts += [(a * heads * qk, "other"), (4 * heads, "other"),  # attention output (padded), log-sum-exp
              (_linear_input(heads * c.v_head_dim, p), "other")]  # o_proj input
    if moe:
        k, inner = c.num_experts_per_tok, c.moe_intermediate_size
        parts += [(0 if a == 4 else 4 * h, "other"), (4 * c.n_routed_experts * 2, "other")]  # gate input, scores
        parts += [(k * _linear_input(h, p), "other"),  # dispatched rows
                  (k * a * 2 * inner + k * a * inner, "other"), (k * _linear_input(inner, p), "other"),  # SwiGLU
                  (k * 4 * h if a != 4 else k * a * h, "other")]  # combine: expert outputs (float32 on bf16)
        shared = inner * c.n_shared_experts
    else:
        shared = c.intermediate_size
    if shared:
        parts += [(3 * a * shared, "other"), (_linear_input(shared, p), "other")]  # gate, up, silu; down input
    out: dict[str, float] = {}
    for size, kind in parts:
        out[kind] = out.get(kind, 0.0) + size
    return out


def head_activation_bytes(config: ModelConfig, p: Precision) -> float:
    """Per token of the last stage: final norm, the float32 log-softmax of the logits, and per MTP
    depth its two norms, concatenation, projection, one block and another log-softmax."""
    c = config
    head = sum(s for s, _ in _norm(c.hidden_size, p)) + 4 * c.vocab_size
    block = sum(block_activation_bytes(c, c.is_moe_layer(c.num_hidden_layers), p).values())
    mtp = 2 * sum(s for s, _ in _norm(c.hidden_size, p)) + _linear_input(2 * c.hidden_size, p) + block + head
    return head + c.num_nextn_predict_layers * mtp


def kept(parts: dict[str, float], recompute: str) -> float:
    """What a block keeps between its forward and backward under a recompute mode."""
    if recompute == "full":
        return parts["input"] / 2  # the block's input only
    drop = {"norm", "norm_out", "up"} if recompute == "selective" else set()
    return sum(v for kind, v in parts.items() if kind not in drop)


def stage_activation_bytes(config: ModelConfig, stage: int, stages: int, p: Precision, recompute: str) -> float:
    """Per token of one micro-batch through one pipeline stage (the whole model when stages == 1)."""
    total = sum(kept(block_activation_bytes(config, config.is_moe_layer(i), p), recompute)
                for i in layer_spans(config.num_hidden_layers, stages)[stage])
    if stage == stages - 1:
        total += config.hidden_size * p.act if recompute == "full" else head_activation_bytes(config, p)
    return total


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


def plan_ranks(config: ModelConfig, layout: Layout3D, p: Precision) -> list[dict]:
    """One dict per pipeline rank: counts and bytes of each kind (see the module docstring)."""
    tokens = layout.micro_batch * layout.seq_len
    pipelined = layout.pp > 1
    sched = check(layout.schedule, layout.pp, layout.micro_batches) if pipelined else None
    stages = sched.stages if sched else 1
    per_stage = [stage_activation_bytes(config, s, stages, p, layout.recompute) * tokens for s in range(stages)]
    working = max(sum(block_activation_bytes(config, config.is_moe_layer(i), p).values())
                  for i in range(config.num_hidden_layers)) * tokens
    hidden_message = tokens * config.hidden_size * p.act
    ranks = []
    for rank in range(layout.pp):
        model = rank_model(config, layout.pp, layout.ep, layout.schedule, rank)
        experts = sum(t.numel() for m in model.modules() if isinstance(m, RoutedExperts) for t in m.parameters())
        params = sum(t.numel() for t in model.parameters())
        shard = (params - experts) / layout.dp + experts / max(1, layout.dp // layout.ep)
        if sched:
            weight = {c: per_stage[sched.stage(rank, c)] for c in range(sched.chunks)}
            activations, held = in_flight(sched, rank, weight)
            ops = build_schedule(sched, rank)
            sends = sum((op.forward is not None and sched.stage(rank, op.forward[0]) < stages - 1)
                        + (op.backward is not None and sched.stage(rank, op.backward[0]) > 0) for op in ops)
        else:
            activations, held, sends = per_stage[0], 1, 0
        communication = sends * hidden_message + (config.num_experts_per_tok * hidden_message if layout.ep > 1 else 0)
        if layout.dp > 1 or layout.device == "gpu":  # ZeRO's flat reduce bucket (a CPU engine skips it at dp 1)
            communication += min(REDUCE_BUCKET, params) * p.act
        if sched:  # one bucket of the replicas' gradient sum
            communication += min(REPLICA_BUCKET, params * p.act)
        out = {
            "pipeline_rank": rank, "parameters": params, "routed_expert_parameters": experts,
            "optimizer_partition_parameters": shard,
            "parameters_bytes": params * p.act,
            "gradients_bytes": params * p.act + shard * 4,
            "master_weights_bytes": shard * 4,
            "moments_bytes": shard * 2 * p.moments,
            "activations_bytes": activations + working,
            "activation_micro_batches": held,
            "communication_bytes": communication,
            "ema_host_bytes": shard * 4,
            "save_staging_host_bytes": shard * (4 + 2 * p.moments),
        }
        out["optimizer_bytes"] = out["master_weights_bytes"] + out["moments_bytes"]
        out["total_bytes"] = sum(out[k] for k in ("parameters_bytes", "gradients_bytes", "optimizer_bytes",
                                                  "activations_bytes", "communication_bytes"))
        ranks.append(out)
    return ranks
