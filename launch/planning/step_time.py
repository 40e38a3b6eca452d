"""How long a step takes: the step-time model beside the memory planner (``launch.plan --hardware``).

Per pipeline stage and micro-batch, the forward (F), backward-for-inputs (I) and backward-for-weights
(W) durations come from each op's work at its real shape (``block_work``) on the hardware's rates
(GEMMs on the calibrated curve by rows, per expert for the grouped GEMMs), plus a fixed cost per op
(``op_count``: the ops this project's model runs, counted) and recomputation where it runs (I
repeats what it recomputes). Each F and B also sends: the expert all-to-alls under node-limited
routing and the pipeline send (``comm_time``). The schedule's ops are timed by the pipeline
simulator (``plugins.parallel.pipeline_sim.simulate``) on those durations: a plain F, B, I or W
exposes its communication; DualPipe's overlapped forward-and-backward pair (FB, report 3.2.1) runs
the two computations beside the two sets of transfers, slowed by the SMs given to communication
(report 3.2.2: 20 of 132), and exposes only what the transfers last beyond the computation. Then
the data-parallel reduce-scatter and all-gather (and DualPipe's replica sum), the optimizer step
(memory-bound: masters, gradients, moments, the FP8 weight copy) and the offload's copy back.

``breakdown`` (seconds, summing to the step): compute and exposed communication of the busiest
pipeline rank, its bubble (idle until the pipeline's last op ends), the data-parallel
communication (counted as exposed communication), the optimizer and the offload.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.config.run_config import RunConfig
from plugins.parallel.dualpipe import Layout, Op, build_schedule, check
from plugins.parallel.pipeline_sim import bubbles, simulate
from plugins.parallel.pipeline_stages import layer_spans

from .block_work import Work, block_work, dtypes, embedding_work, head_work
from .comm_time import host_copy_seconds, moe_exchange_seconds, ring_seconds, send_seconds
from .hardware import Hardware
from .op_count import count_ops
from .rank_memory import Precision


@dataclass(frozen=True)
class StageTimes:
    """Seconds of one micro-batch through one stage: compute of F, I, W; communication of F and B."""

    f: float
    i: float
    w: float
    f_comm: float = 0.0
    b_comm: float = 0.0


def work_seconds(work: Work, hw: Hardware) -> float:
    """Forward seconds of one op's work, without its fixed cost."""
    if work.kind in ("gemm", "grouped"):
        return work.flops / hw.gemm_rate(work.dtype, work.rows, grouped=work.kind == "grouped")
    if work.kind == "sdpa":
        return work.flops / (hw.peak(work.dtype) * hw.sdpa_efficiency)
    if work.kind == "cross_entropy" and hw.cross_entropy is not None:
        return work.bytes / hw.cross_entropy.rate
    return work.bytes / hw.memory.rate


def _compute(works: list[Work], ops_forward: int, ops_backward: int, recompute: str,
             hw: Hardware) -> tuple[float, float, float]:
    """(F, I, W) seconds of a list of ops: a GEMM's input and weight gradients each cost its forward,
    attention's backward twice its forward, a memory-bound op's backward twice its forward (the
    log-softmax's as long as its forward); what recomputation repeats is added to I; the fixed costs: forward ops to F, one per weight GEMM to W,
    the other backward ops (and the recomputed ones) to I."""
    f = i = w = 0.0
    weight_ops = sum(x.kind in ("gemm", "grouped") for x in works)
    for x in works:
        s = work_seconds(x, hw)
        f += s
        if x.kind in ("gemm", "grouped"):
            i += s
            w += s
        else:
            i += s if x.kind == "cross_entropy" else 2 * s
        if x.always or recompute == "full" or (recompute == "selective" and x.selective):
            i += s
    recomputed = ops_forward if recompute == "full" else (
        sum(x.selective or x.always for x in works) if recompute == "selective" else sum(x.always for x in works))
    op = hw.op_seconds
    return (f + ops_forward * op, i + (max(ops_backward - weight_ops, 0) + recomputed) * op,
            w + min(weight_ops, ops_backward) * op)


def stage_times(run: RunConfig, stage: int, stages: int, ep: int, world: int, hw: Hardware, p: Precision,
                device: str) -> StageTimes:
    """One micro-batch through ``stage`` of ``stages`` (the whole model when ``stages`` is 1)."""
    c, t = run.model, run.train
    tokens, seq_len = t.micro_batch_size * run.data.seq_len, run.data.seq_len
    counts = count_ops(c)
    layers = list(layer_spans(c.num_hidden_layers, stages)[stage])
    works: list[Work] = []
    ops_f = ops_b = 0
    for layer in layers:
        works += block_work(c, layer, tokens, seq_len, ep, p, device, t.memory)
        n = counts.moe if c.is_moe_layer(layer) else counts.dense
        ops_f, ops_b = ops_f + n.forward, ops_b + n.backward
    if stage == 0:
        works += embedding_work(c, tokens, p)
    if stage == stages - 1:
        works += head_work(c, tokens, seq_len, ep, p, device, t.memory)
        ops_f, ops_b = ops_f + counts.head.forward, ops_b + counts.head.backward
    f, i, w = _compute(works, ops_f, ops_b, t.recompute, hw)
    slow = hw.compute_slowdown(min(world, hw.gpus_per_node))
    moe_blocks = sum(c.is_moe_layer(layer) for layer in layers) + (
        c.num_nextn_predict_layers if stage == stages - 1 and c.is_moe_layer(c.num_hidden_layers) else 0)
    fp8_dispatch = p.fp8_experts and t.memory.fp8_dispatch
    exchange_f, exchange_b = moe_exchange_seconds(c, tokens, ep, hw, p.act, fp8_dispatch)
    send = send_seconds(c, tokens, p.act, world, hw) if stages > 1 else 0.0
    return StageTimes(f * slow, i * slow, w * slow, moe_blocks * exchange_f + send * (stage < stages - 1),
                      moe_blocks * exchange_b + send * (stage > 0))


def sm_slowdown(hw: Hardware, ep: int) -> float:
    """Compute beside the all-to-all runs on the SMs left to it (report 3.2.2)."""
    return hw.sms / (hw.sms - hw.communication_sms) if hw.sms and ep > 1 else 1.0


def op_parts(layout: Layout, rank: int, times: list[StageTimes], sm: float) -> list[tuple[float, float]]:
    """(compute, exposed communication) of each op of ``rank``'s schedule, in order: F, B, I and W
    expose their transfers; an FB pair runs both computations (slowed by ``sm``) beside both
    transfers. A W is the weight gradient of the oldest deferred I (first in, first out)."""
    parts, deferred = [], []
    for op in build_schedule(layout, rank):
        if op.kind == "FB":
            a = times[layout.stage(rank, op.forward[0])]
            b = times[layout.stage(rank, op.backward[0])]
            compute, comm = (a.f + b.i + b.w) * sm, a.f_comm + b.b_comm
            parts.append((compute, max(0.0, comm - compute)))
            continue
        if op.kind == "W":
            s = deferred.pop(0)
            parts.append((s.w, 0.0))
            continue
        s = times[layout.stage(rank, (op.forward or op.backward)[0])]
        if op.kind == "I":
            deferred.append(s)
        parts.append({"F": (s.f, s.f_comm), "B": (s.i + s.w, s.b_comm), "I": (s.i, s.b_comm)}[op.kind])
    return parts


def pipeline_time(layout: Layout, times: list[StageTimes], sm: float = 1.0) -> dict:
    """The schedule timed by the simulator on these durations: the step's pipeline part, and the
    busiest rank's compute, exposed communication and bubble (summing to it), every rank's bubble."""
    parts = [op_parts(layout, rank, times, sm) for rank in range(layout.ranks)]
    cursor = [0] * layout.ranks

    def cost(rank: int, op: Op) -> float:  # the simulator runs each rank's ops in order
        compute, comm = parts[rank][cursor[rank]]
        cursor[rank] += 1
        return compute + comm

    intervals = simulate(layout, cost)
    end = max(x.end for x in intervals)
    totals = [(sum(c for c, _ in p), sum(m for _, m in p)) for p in parts]
    busiest = max(range(layout.ranks), key=lambda r: sum(totals[r]))
    compute, comm = totals[busiest]
    return {"seconds": end, "compute": compute, "communication": comm, "bubble": max(0.0, end - compute - comm),
            "rank": busiest, "bubbles": bubbles(layout, intervals)}


def step_time(run: RunConfig, plan: dict, hw: Hardware) -> dict:
    """``plan`` is ``launch.planning.estimate``'s answer for ``run``; returns the timing keys
    (``step_seconds``, ``tokens_per_second_per_gpu``, ``mfu``, ``breakdown``, ``stages``)."""
    L, device = plan["layout"], plan["device"]
    pp, ep, dp, m = L["pp"], L["ep"], L["dp"], L["micro_batches_per_step"]
    world = pp * dp
    t = run.train
    p = Precision.of(device, t.optimizer_moments_dtype, run.parallel.fp8, run.parallel.fp8_modules)
    if pp > 1:
        layout = check(run.parallel.pipeline_schedule, pp, m)
        times = [stage_times(run, s, layout.stages, ep, world, hw, p, device) for s in range(layout.stages)]
        pipe = pipeline_time(layout, times, sm_slowdown(hw, ep))
    else:
        s = stage_times(run, 0, 1, ep, world, hw, p, device)
        times = [s]
        pipe = {"seconds": m * (s.f + s.i + s.w + s.f_comm + s.b_comm), "compute": m * (s.f + s.i + s.w),
                "communication": m * (s.f_comm + s.b_comm), "bubble": 0.0, "rank": 0}
    ranks = plan["ranks"]
    data_parallel = max(_data_parallel_seconds(r, pp, ep, dp, world, run, hw, p) for r in ranks)
    optimizer = max(_optimizer_seconds(r, p, hw) for r in ranks)
    offload = host_copy_seconds(max(r["offload_bytes_per_step"] for r in ranks), hw) if device == "gpu" else 0.0
    breakdown = {"compute": pipe["compute"], "exposed_communication": pipe["communication"] + data_parallel,
                 "bubble": pipe["bubble"], "optimizer": optimizer, "offload": offload}
    step = sum(breakdown.values())
    tokens = m * dp * L["micro_batch"] * L["seq_len"]
    per_gpu = tokens / step / world
    act, _ = dtypes(p, device)
    return {"hardware": hw.name, "step_seconds": step, "tokens_per_step": tokens,
            "tokens_per_second_per_gpu": per_gpu, "mfu": plan["flops_per_token"] * per_gpu / hw.peak(act),
            "mfu_peak": f"{act} {hw.peak(act):.4g} FLOP/s", "breakdown": breakdown,
            "breakdown_detail": {"pipeline_rank": pipe["rank"], "data_parallel": data_parallel,
                                 "pipeline_communication": pipe["communication"]},
            "stages": [vars(s) for s in times]}


def _data_parallel_seconds(rank: dict, pp: int, ep: int, dp: int, world: int, run: RunConfig, hw: Hardware,
                           p: Precision) -> float:
    """ZeRO-1's gradient reduce-scatter and weight all-gather over dp (experts over dp / ep), and the
    pipeline replicas' gradient all-reduce under DualPipe (every stage on two ranks)."""
    spans = dp > hw.gpus_per_node
    experts = rank["routed_expert_parameters"]
    seconds = ring_seconds((rank["parameters"] - experts) * p.act, dp, hw, spans, phases=2)
    seconds += ring_seconds(experts * p.act, max(1, dp // ep), hw, spans, phases=2)
    if pp > 1 and run.parallel.pipeline_schedule == "dualpipe":
        seconds += ring_seconds(rank["parameters"] * p.act, 2, hw, world > hw.gpus_per_node, phases=2)
    return seconds


def _optimizer_seconds(rank: dict, p: Precision, hw: Hardware) -> float:
    """Memory-bound: the gradients copied into ZeRO's FP32 partition and read for the norm, AdamW on
    the partition (masters read and written, moments read and written, the new weights written in
    the weights' dtype), the new weights gathered into place, and the step's FP8 weight copy."""
    params, shard = rank["parameters"], rank["optimizer_partition_parameters"]
    moved = params * (p.act + 4 + p.act) + shard * (8 + 4 + 4 * p.moments + p.act)
    moved += rank["fp8_weights_bytes"] * (1 + p.act)
    return moved / hw.memory.rate



def time_table(plan: dict) -> str:
    """The timing keys of a plan as text: the step, its breakdown, and each stage's durations."""
    b = plan["breakdown"]
    lines = [f"on {plan['hardware']}: step {plan['step_seconds']:.4g} s for {plan['tokens_per_step']} tokens, "
             f"{plan['tokens_per_second_per_gpu']:.4g} tokens/s per GPU, MFU {100 * plan['mfu']:.1f}% "
             f"(of {plan['mfu_peak']})",
             "  " + "  ".join(f"{k.replace('_', ' ')} {v:.4g} s ({100 * v / plan['step_seconds']:.0f}%)"
                              for k, v in b.items()),
             f"  {'stage':>5} {'F':>9} {'I':>9} {'W':>9} {'F comm':>9} {'B comm':>9}  (seconds per micro-batch)"]
    for s, t in enumerate(plan["stages"]):
        lines.append(f"  {s:>5} {t['f']:>9.4g} {t['i']:>9.4g} {t['w']:>9.4g} {t['f_comm']:>9.4g} {t['b_comm']:>9.4g}")
    return "\n".join(lines)
