"""Executing a pipeline schedule (``plugins.dualpipe``) on real model chunks over
``torch.distributed`` point-to-point (gloo or NCCL).

Activations and gradients travel on one process group per (kind, sending chunk), so the messages
between two ranks on one group always come in micro-batch order and never cross. Sends are
asynchronous, each tensor held until its send completes (``release_sends``: checked after every
op — NCCL's work reports it; a gloo send completes only in ``wait``, which a waiter thread calls
for it — else at the end of the step; ``pipeline_sim.sends_in_flight`` bounds how many); a rank
blocks only on the receives of its next op, which the schedule orders so they always arrive
(``plugins.pipeline_sim`` checks the same order for deadlocks). Backward is
split into an input-gradient part (sent on at once) and a weight-gradient part that a later
``W`` op runs, with ``torch.distributed.pipelining``'s graph splitting.

An ``FB`` op runs the forward of one micro-batch and the backward of another as one unit through
``overlap`` (report 3.2.1, Figure 4; ``plugins.parallel.streams``): on CUDA each chunk's work on a
stream of its own, ordered by events; elsewhere the backward on a second thread. With expert
parallelism each direction's all-to-all uses its own process group
(``ExpertExchange(..., backward_group=...)``), so one chunk's dispatch/combine is in flight while
the other chunk computes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from ..progress import waiting
from .dualpipe import Layout, Op, build_schedule
from .pipeline_stages import PipelineShard, StageResult
from .streams import StreamOverlap, ThreadOverlap, overlap_for

_WAITERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pipeline-send-wait")


class _Send:
    """An asynchronous send and its tensor, done when the transfer is (``work.is_completed`` on
    NCCL; a waiter thread's ``wait`` where the backend only completes a send in ``wait``: gloo)."""

    def __init__(self, work, tensor: torch.Tensor):
        self.work, self.tensor = work, tensor
        self.waited = None if tensor.is_cuda else _WAITERS.submit(work.wait)

    def done(self) -> bool:
        return self.work.is_completed() if self.waited is None else self.waited.done()

    def wait(self) -> None:
        if self.waited is None:
            self.work.wait()
        else:
            self.waited.result()


@dataclass
class _Saved:
    """What a forward keeps for its backward."""

    inputs: torch.Tensor
    result: StageResult
    input_grad: torch.Tensor | None = None


@dataclass
class StepTotals:
    """Unscaled (lm, mtp, balance) sums over this rank's micro-batches (expert loads are counted
    by the MoE blocks themselves)."""

    values: torch.Tensor
    sends: list = field(default_factory=list)
    peak_in_flight: int = 0  # most micro-batches whose activations this rank held at once
    peak_sends: int = 0  # most sends (and their tensors) this rank held at once


class PipelineRuntime:
    """``peers[p]``: global rank of pipeline rank p (this data-parallel replica); ``channels``:
    ("act" | "grad", chunk) -> process group; ``overlap``: how ops are issued (default: streams on
    CUDA, a second thread for an FB's backward elsewhere)."""

    def __init__(self, layout: Layout, rank: int, shard: PipelineShard, peers: list[int],
                 channels: dict[tuple[str, int], dist.ProcessGroup | None],
                 overlap: ThreadOverlap | StreamOverlap | None = None, release_sends: bool = True):
        self.layout, self.rank, self.shard, self.peers, self.channels = layout, rank, shard, peers, channels
        self.ops = build_schedule(layout, rank)
        self.weights = list(shard.model.parameters())
        self.overlap = overlap if overlap is not None else overlap_for(self.weights[0].device)
        self.release_sends = release_sends

    def step(self, batches: list[dict[str, torch.Tensor]], mtp_weight: float) -> StepTotals:
        """Forward and backward of all micro-batches of one optimizer step; gradients accumulate in
        ``.grad`` (each micro-batch's losses scaled by 1 / micro-batches)."""
        if len(batches) != self.layout.micro_batches:
            raise ValueError(f"{len(batches)} micro-batches given, the schedule was built for {self.layout.micro_batches}")
        device = batches[0]["input_ids"].device
        self.batches, self.mtp_weight = batches, mtp_weight
        self.totals = StepTotals(torch.zeros(3, dtype=torch.float64, device=device))
        self.saved: dict[tuple[int, int], _Saved] = {}
        self.local: dict[tuple[str, int, int], torch.Tensor] = {}  # hand-offs between chunks of this rank
        self.deferred: deque[tuple[int, Callable[[], None]]] = deque()  # (chunk, weight gradient)
        for op in self.ops:
            self._run(op)
            if self.release_sends:  # drop the tensors of completed sends (their memory returns now)
                self.totals.sends = [send for send in self.totals.sends if not send.done()]
        with waiting("pipeline send"):
            for send in self.totals.sends:
                send.wait()
        self.totals.sends.clear()
        return self.totals

    def _run(self, op: Op) -> None:
        if op.kind == "W":
            self.overlap.run(*self.deferred.popleft())
            return
        f_in = self._receive_forward(*op.forward) if op.forward else None
        b_in = self._receive_backward(*op.backward) if op.backward else None
        if op.kind == "FB":
            self.overlap.pair((op.forward[0], lambda: self._forward(*op.forward, f_in)),
                              (op.backward[0], lambda: self._backward(*op.backward, b_in, False)))
        elif op.kind == "F":
            self.overlap.run(op.forward[0], lambda: self._forward(*op.forward, f_in))
        else:
            self.overlap.run(op.backward[0], lambda: self._backward(*op.backward, b_in, op.kind == "I"))
        if op.forward:
            self._send_forward(*op.forward)
        if op.backward:
            self._send_backward(*op.backward)

    def _hidden_shape(self, micro: int) -> tuple[int, ...]:
        ids = self.batches[micro]["input_ids"]
        return (*ids.shape, self.shard.config.hidden_size)

    def _receive(self, kind: str, stage: int, micro: int) -> torch.Tensor:
        rank, chunk = self.layout.place(stage, micro)
        if rank == self.rank:
            return self.local.pop((kind, stage, micro))
        buffer = torch.empty(self._hidden_shape(micro), dtype=self.weights[0].dtype, device=self.batches[0]["input_ids"].device)
        with waiting(f"pipeline receive from rank {self.peers[rank]}"):
            dist.recv(buffer, src=self.peers[rank], group=self.channels[(kind, chunk)])
        return buffer

    def _send(self, kind: str, chunk: int, stage: int, micro: int, tensor: torch.Tensor) -> None:
        rank, _ = self.layout.place(stage, micro)
        if rank == self.rank:  # keyed like the receiver asks: by the sending stage
            self.local[(kind, stage - 1 if kind == "act" else stage + 1, micro)] = tensor
        else:
            tensor = tensor.contiguous()  # kept with its request until the step's sends complete
            work = dist.isend(tensor, dst=self.peers[rank], group=self.channels[(kind, chunk)])
            self.totals.sends.append(_Send(work, tensor))
            self.totals.peak_sends = max(self.totals.peak_sends, len(self.totals.sends))

    def _receive_forward(self, chunk: int, micro: int) -> torch.Tensor:
        stage = self.layout.stage(self.rank, chunk)
        if stage == 0:
            return self.batches[micro]["input_ids"]
        return self._receive("act", stage - 1, micro).requires_grad_()

    def _receive_backward(self, chunk: int, micro: int) -> torch.Tensor | None:
        stage = self.layout.stage(self.rank, chunk)
        return None if stage == self.layout.stages - 1 else self._receive("grad", stage + 1, micro)

    def _forward(self, chunk: int, micro: int, inputs: torch.Tensor) -> None:
        stage = self.layout.stage(self.rank, chunk)
        result = self.shard.run_stage(stage, inputs, self.batches[micro], 1.0 / self.layout.micro_batches, self.mtp_weight)
        self.saved[(chunk, micro)] = _Saved(inputs, result)
        self.totals.peak_in_flight = max(self.totals.peak_in_flight, len(self.saved))
        self.totals.values += result.values

    def _send_forward(self, chunk: int, micro: int) -> None:
        stage = self.layout.stage(self.rank, chunk)
        if stage < self.layout.stages - 1:
            self._send("act", chunk, stage + 1, micro, self.saved[(chunk, micro)].result.output.detach())

    def _backward(self, chunk: int, micro: int, grad: torch.Tensor | None, split: bool) -> None:
        """Input gradient now; the weight gradient now (``split`` False) or in a later ``W`` op."""
        saved = self.saved[(chunk, micro)]
        outputs, grads = [], []
        if saved.result.output is not None:
            outputs.append(saved.result.output)
            grads.append(grad)
        if saved.result.objective is not None:
            outputs.append(saved.result.objective)
            grads.append(torch.ones_like(saved.result.objective))
        has_input = saved.inputs.requires_grad
        if not split or not has_input:  # stage 0 has no input gradient: its whole backward runs here
            torch.autograd.backward(outputs, grads)
            saved.input_grad = saved.inputs.grad
            if split:
                self.deferred.append((chunk, lambda: None))
            return
        (saved.input_grad,), groups = stage_backward_input(outputs, grads, [saved.inputs], iter(self.weights))
        self.deferred.append((chunk, lambda: stage_backward_weight(iter(self.weights), groups)))

    def _send_backward(self, chunk: int, micro: int) -> None:
        stage = self.layout.stage(self.rank, chunk)
        saved = self.saved.pop((chunk, micro))
        if stage > 0:
            self._send("grad", chunk, stage - 1, micro, saved.input_grad)
