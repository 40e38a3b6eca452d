"""The pipeline runtime on 2 and 4 gloo ranks against one process running the whole model on the
same micro-batches: the losses and every parameter's gradient after one step, with the memory
switches on (``train.memory``: the weighted combine and the recomputed SwiGLU in the split
backward), and the sends' tensors released as they complete."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.distributed.groups import pipeline_groups
from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.model.moe import set_ffn_memory
from plugins.parallel import replicas as replica_sync
from plugins.parallel.dualpipe import build_schedule, check
from plugins.parallel.pipeline_runtime import PipelineRuntime
from plugins.parallel.pipeline_sim import sends_in_flight
from plugins.parallel.pipeline_stages import PipelineShard
from plugins.parallel.replicas import ReplicaSync, stages_of

from .conftest import ROOT
from .distributed import STEP_RTOL, spawn

pytestmark = pytest.mark.slow


def _model() -> DeepSeekV3:
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml")
    config = dataclasses.replace(config, num_hidden_layers=4)
    model = DeepSeekV3(config)
    set_ffn_memory(model, weighted_combine=True, swiglu_recompute=True)
    return model


def _batches(count: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 4096, (2, 32), generator=g)
        documents = (torch.arange(32) >= 20).long().expand(2, 32)
        batches.append({"input_ids": ids, "labels": torch.roll(ids, -1, 1), "document_ids": documents})
    return batches


def _worker(rank: int, world: int, schedule: str, micro: int, bucket: int, results) -> None:
    replica_sync.BUCKET = bucket
    batches = _batches(micro)
    reference = _model()
    outs = [reference(b["input_ids"], labels=b["labels"], document_ids=b["document_ids"]) for b in batches]
    (torch.stack([o.loss for o in outs]).mean()).backward()
    expected = torch.tensor([[o.lm_loss.item(), o.mtp_loss.item(), o.aux_loss.item()] for o in outs]).mean(0)

    layout = check(schedule, world, micro)
    model = _model()
    channels, replicas = pipeline_groups(schedule, world, 1, model.config)
    shard = PipelineShard(model, stages_of(layout, rank), layout.stages)
    runtime = PipelineRuntime(layout, rank, shard, list(range(world)), channels)
    totals = runtime.step(batches, mtp_weight=reference.config.mtp_loss_weight)
    ReplicaSync(layout, shard.model, rank, replicas).sum_gradients()
    values = totals.values.clone()
    dist.all_reduce(values)
    reference_grads = dict(reference.named_parameters())
    worst = max(((p.grad - reference_grads[n].grad).abs().max() / reference_grads[n].grad.abs().max().clamp_min(1e-8)).item()
                for n, p in shard.model.named_parameters())
    stages = layout.stages
    issued = sum((op.forward is not None and layout.stage(rank, op.forward[0]) < stages - 1)
                 + (op.backward is not None and layout.stage(rank, op.backward[0]) > 0) for op in build_schedule(layout, rank))
    results[rank] = ((((values / micro).float() - expected).abs() / expected.abs()).max().item(), worst,
                     totals.peak_sends, sends_in_flight(layout)[rank], issued)


@pytest.mark.parametrize("schedule,world,micro,bucket", [
    ("dualpipe", 2, 4, replica_sync.BUCKET),
    ("dualpipe", 2, 4, 4000),  # replica gradients summed in many small all-reduces, large tensors alone
    ("dualpipe", 4, 8, replica_sync.BUCKET), ("dualpipev", 2, 4, replica_sync.BUCKET), ("1f1b", 2, 3, replica_sync.BUCKET)])
def test_pipeline_step_equals_one_process(schedule, world, micro, bucket):
    results = mp.Manager().dict()
    spawn(_worker, world, schedule, micro, bucket, results)
    for rank in range(world):
        loss_error, grad_error, peak_sends, bound, issued = results[rank]  # relative
        assert loss_error <= STEP_RTOL, (rank, loss_error)
        assert grad_error <= STEP_RTOL, (rank, grad_error)
        # completed sends let go: never more held than the schedule allows under any timing
        assert peak_sends <= bound <= issued, (rank, peak_sends, bound, issued)
