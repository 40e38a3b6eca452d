"""One optimizer step's forward and backward over the step's micro-batches, behind one call:
``forward_backward(batches, mtp_weight)`` leaves the gradients of the mean loss for the engine to
reduce, clip and apply, and returns this rank's unscaled (lm, mtp, balance) sums over its
micro-batches. Without pipelining that is DeepSpeed's gradient accumulation; with ``--pp`` the
pipeline schedule runs the micro-batches and the replicated pieces' gradients are summed."""

from __future__ import annotations

import torch

from launch.distributed import ds_internals
from launch.distributed.groups import ParallelGroups
from plugins.parallel.dualpipe import Layout, check
from plugins.parallel.pipeline_runtime import PipelineRuntime
from plugins.parallel.pipeline_stages import PipelineShard
from plugins.parallel.replicas import ReplicaSync
from plugins.precision.policy import fp8_autocast
from plugins.progress import phase


class GradientAccumulation:
    def __init__(self, engine, fp8_backend: str):
        self.engine, self.fp8_backend = engine, fp8_backend

    def forward_backward(self, batches: list[dict[str, torch.Tensor]], mtp_weight: float) -> torch.Tensor:
        values = torch.zeros(3, dtype=torch.float64, device=batches[0]["input_ids"].device)
        for micro_step, batch in enumerate(batches):
            # The boundary said outright: DeepSpeed's own counter (micro-steps modulo the accumulation
            # steps) puts it mid-step once the batch-size ramp changes the micro-batch count.
            self.engine.set_gradient_accumulation_boundary(micro_step == len(batches) - 1)
            with phase("forward"), fp8_autocast(self.fp8_backend):
                out = self.engine(batch["input_ids"], labels=batch["labels"], document_ids=batch["document_ids"],
                                  mtp_weight=mtp_weight)
            values += torch.stack([out.lm_loss, out.mtp_loss, out.aux_loss]).detach().double()
            with phase("backward"):
                self.engine.backward(out.loss)  # gradients accumulate; the trainer's step applies the update
        return values


class PipelineSchedule:
    """DualPipe, DualPipeV or 1F1B over this rank's stages; a runtime per micro-batch count (the
    batch-size ramp changes it)."""

    def __init__(self, shard: PipelineShard, groups: ParallelGroups, schedule: str, fp8_backend: str,
                 release_sends: bool = True, grad_attribute: str = "grad"):
        self.shard, self.groups, self.schedule, self.fp8_backend = shard, groups, schedule, fp8_backend
        self.release_sends = release_sends
        self.replicas = ReplicaSync(Layout.placement(schedule, groups.pp), shard.model, groups.pipeline_rank,
                                    groups.replicas, grad_attribute)
        ds_internals.mark_pipe_replicated(self.replicas.secondary)
        self.runtimes: dict[int, PipelineRuntime] = {}

    def forward_backward(self, batches: list[dict[str, torch.Tensor]], mtp_weight: float) -> torch.Tensor:
        count = len(batches)
        if count not in self.runtimes:
            self.runtimes[count] = PipelineRuntime(check(self.schedule, self.groups.pp, count),
                                                   self.groups.pipeline_rank, self.shard,
                                                   self.groups.pipeline_peers, self.groups.channels,
                                                   release_sends=self.release_sends)
        with fp8_autocast(self.fp8_backend):
            totals = self.runtimes[count].step(batches, mtp_weight)
        self.replicas.sum_gradients()
        return totals.values
