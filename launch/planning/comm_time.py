"""Seconds of each transfer the step makes, from its volume per rank and the hardware's links.

- The expert all-to-all under node-limited routing (report 3.2.2): a token's ``k`` experts lie on
  at most ``M`` nodes (``topk_group`` of ``n_group`` groups, groups spread over the nodes the
  expert-parallel group spans); it crosses InfiniBand once to each of those nodes but its own, then
  NVLink forwards it to each GPU there that holds one of its experts. The two run pipelined
  (DeepEP), so a transfer takes the longer of the two. Dispatch sends E4M3 rows under FP8 dispatch
  (1x128 tiles: 132 bytes per 128 values), the combine returns BF16 rows; backward sends gradients
  in the activations' dtype both ways.
- Pipeline sends: one micro-batch's hidden state between neighbouring stages, over InfiniBand when
  the world spans nodes (ranks are pipeline-major), else the node's link.
- ZeRO-1: the gradients reduce-scattered and the updated weights all-gathered over the
  data-parallel group (ring: each rank sends (n - 1) / n of the data each way), routed experts over
  their dp / ep ranks; pipeline replicas (DualPipe's two copies of each stage) all-reduce theirs.
- The FFN offload's copies over the host link (PCIe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plugins.model.config import ModelConfig

from .hardware import Hardware


def fp8_row_bytes(width: int) -> float:
    return math.ceil(width / 128) * (128 + 4)


def nodes_per_token(c: ModelConfig, nodes: int) -> float:
    """Expected distinct nodes a token's ``k`` experts lie on, among the ``nodes`` an expert-parallel
    group spans: ``k`` experts drawn uniformly over the nodes, capped at ``topk_group`` nodes when
    the routing groups map onto nodes (each node one or more whole groups)."""
    k = c.num_experts_per_tok
    unrestricted = nodes * (1 - (1 - 1 / nodes) ** k)
    if c.n_group >= nodes and c.n_group % nodes == 0 and c.topk_group < c.n_group:
        return min(unrestricted, float(c.topk_group))
    return unrestricted


@dataclass(frozen=True)
class AllToAll:
    """One exchange of ``tokens`` rows of ``row_bytes`` each from one rank: bytes over InfiniBand
    and NVLink, and seconds (the longer of the two, plus one collective latency per call)."""

    ib_bytes: float
    nvlink_bytes: float
    seconds: float


def all_to_all(c: ModelConfig, tokens: int, row_bytes: float, ep: int, hw: Hardware, calls: int) -> AllToAll:
    if ep == 1:
        return AllToAll(0.0, 0.0, 0.0)
    k = c.num_experts_per_tok
    nodes = math.ceil(ep / hw.gpus_per_node)
    local = min(ep, hw.gpus_per_node)
    if nodes == 1:
        nvlink = tokens * k * (ep - 1) / ep * row_bytes
        ib = 0.0
    else:
        remote = nodes_per_token(c, nodes) * (nodes - 1) / nodes
        ib = tokens * remote * row_bytes
        nvlink = tokens * k * (local - 1) / local * row_bytes  # forwarded inside each destination node
    seconds = max(ib / hw.inter_node.rate if ib else 0.0, nvlink / hw.intra_node.rate)
    return AllToAll(ib, nvlink, seconds + calls * hw.collective_latency)


def moe_exchange_seconds(c: ModelConfig, tokens: int, ep: int, hw: Hardware, act_bytes: int,
                         fp8_dispatch: bool) -> tuple[float, float]:
    """(forward, backward) seconds of one MoE block's all-to-alls on one micro-batch: forward the
    dispatch (counts, then rows) and the combine; backward the two reverse exchanges."""
    h = c.hidden_size
    dispatch = all_to_all(c, tokens, fp8_row_bytes(h) if fp8_dispatch else h * act_bytes, ep, hw, calls=2)
    combine = all_to_all(c, tokens, h * act_bytes, ep, hw, calls=1)
    backward = 2 * all_to_all(c, tokens, h * act_bytes, ep, hw, calls=1).seconds
    return dispatch.seconds + combine.seconds, backward


def send_seconds(c: ModelConfig, tokens: int, act_bytes: int, world: int, hw: Hardware) -> float:
    """One pipeline send of a micro-batch's hidden state."""
    link = hw.inter_node if world > hw.gpus_per_node else hw.intra_node
    return tokens * c.hidden_size * act_bytes / link.rate + hw.collective_latency


def ring_seconds(bytes_per_rank: float, ranks: int, hw: Hardware, spans_nodes: bool, phases: int) -> float:
    """A ring reduce-scatter or all-gather (``phases`` of them) of ``bytes_per_rank`` over ``ranks``."""
    if ranks <= 1 or bytes_per_rank == 0:
        return 0.0
    link = hw.inter_node if spans_nodes else hw.intra_node
    return phases * ((ranks - 1) / ranks * bytes_per_rank / link.rate + (ranks - 1) * hw.collective_latency)


def host_copy_seconds(bytes_: float, hw: Hardware) -> float:
    if bytes_ == 0:
        return 0.0
    if hw.host is None:
        return 0.0  # a CPU rank's "offload" stays in its own memory
    return bytes_ / hw.host.rate
