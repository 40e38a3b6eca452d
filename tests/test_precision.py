"""``train.precision: bf16`` (report 3.3): BF16 weights and GEMMs, FP32 masters, and every
micro-batch's gradient added into FP32 — under plain accumulation, DualPipe and expert
parallelism — then reduced across data-parallel ranks in FP32."""

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from launch.config.run_config import load_run_config
from plugins.errors import ConfigError

from .conftest import ROOT

MICRO_BATCHES = 16


def test_precision_key_is_validated_and_resolved_per_device():
    from plugins.precision.recipe import resolve_precision

    with pytest.raises(ConfigError, match=r"train.precision: expected one of auto, bf16, fp32, got 'fp16'"):
        load_run_config(ROOT / "configs" / "tiny.yaml", ["train.precision=fp16"])
    assert load_run_config(ROOT / "configs" / "tiny.yaml").train.precision == "auto"
    assert [resolve_precision(p, gpu) for p in ("auto", "bf16", "fp32") for gpu in (False, True)] == \
        ["fp32", "bf16", "bf16", "bf16", "fp32", "fp32"]


def test_high_precision_pieces_compute_in_float32_from_bf16_weights():
    """On BF16 weights: the output head's logits and the chunked cross-entropy are float32 math on
    the same (BF16-valued) numbers, their gradients within one BF16 rounding of it (backward's GEMMs
    take BF16 operands), and the embedding's weight gradient is the float32 sum rounded once."""
    from plugins.model.high_precision import Float32GradEmbedding, Float32Head
    from plugins.model.losses import chunked_cross_entropy

    torch.manual_seed(0)
    head = Float32Head(64, 300, bias=False).bfloat16()
    h = torch.randn(2, 40, 64).bfloat16().requires_grad_()
    logits = head(h)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, h.float() @ head.weight.float().t(), rtol=1e-6, atol=1e-6)
    targets = torch.randint(0, 300, (80,))
    loss = chunked_cross_entropy(h.reshape(80, 64), head.weight, targets, 16)
    h32, w32 = h.detach().float().requires_grad_(), head.weight.detach().float().requires_grad_()
    h.grad = None
    reference = torch.nn.functional.cross_entropy(h32.reshape(80, 64) @ w32.t(), targets)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    loss.backward(), reference.backward()
    for ours, theirs in ((head.weight.grad, w32.grad), (h.grad, h32.grad)):  # BF16 operands
        assert ((ours.float() - theirs).norm() / theirs.norm()).item() < 2**-8

    embedding = Float32GradEmbedding(50, 64).bfloat16()
    ids = torch.zeros(4096, dtype=torch.long)  # one row's gradient summed over 4096 tokens
    ids[::64] = 1
    grad = torch.randn(4096, 64).bfloat16()
    embedding(ids).backward(grad)
    exact = torch.zeros(50, 64, dtype=torch.float64).index_add_(0, ids, grad.double())
    torch.testing.assert_close(embedding.weight.grad, exact.bfloat16(), rtol=0, atol=0)  # one rounding


# ----------------------------------------------------------------------------- FP32 accumulation
def _accumulation_worker(rank: int, world: int, store: str, data: dict, run_dir: str, layout: list[str],
                         results) -> None:
    import deepspeed
    import torch.distributed as dist

    from launch.training.trainer import RunOptions, Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    deepspeed.init_distributed("gloo")
    overrides = ["train.precision=bf16", "train.micro_batch_size=1", f"train.batch.start={MICRO_BATCHES * world}",
                 f"train.batch.final={MICRO_BATCHES * world}", "train.wandb_mode=disabled", "train.eval_interval=0",
                 f"data.dataset={data['dataset']}", f"data.tokenizer={data['tokenizer']}",
                 "data.builtin_corpus=false", "data.validation={}", "train.grad_clip=1e9", *layout]
    run = load_run_config(ROOT / "configs" / "tiny.yaml", overrides)
    trainer = Trainer(run, RunOptions(run_dir=Path(run_dir), steps=1), torch.device("cpu"))
    zero = trainer.engine.optimizer
    contributions: dict[int, list[torch.Tensor]] = {}
    fill = zero._fill_param_grad_accum_attribute

    def recording_fill(param):  # where each backward's BF16 gradient enters the FP32 buffer
        if param.grad is not None:
            contributions.setdefault(id(param), []).append(param.grad.detach().clone())
        fill(param)

    zero._fill_param_grad_accum_attribute = recording_fill
    before_reduction: dict[int, torch.Tensor] = {}
    reduce = zero.reduce_gradients

    def recording_reduce(*args, **kwargs):
        for group in zero.bit16_groups:
            for param in group:
                before_reduction[id(param)] = param.grad_accum.detach().clone()
        return reduce(*args, **kwargs)

    zero.reduce_gradients = recording_reduce
    applied = []
    inner_step = zero.optimizer.step

    def recording_step(*args, **kwargs):
        applied.extend(p.grad.detach().clone() for g in zero.optimizer.param_groups for p in g["params"])
        return inner_step(*args, **kwargs)

    zero.optimizer.step = recording_step
    trainer.train_step()
    trainer.close()

    params = [p for group in zero.bit16_groups for p in group]
    assert all(p.dtype == torch.bfloat16 for p in params)
    fp32_sum, bf16_sum, held = [], [], []
    for param in params:
        pieces = contributions.get(id(param), [])
        total32 = torch.zeros(param.shape, dtype=torch.float32)
        total16 = torch.zeros(param.shape, dtype=torch.bfloat16)
        for piece in pieces:
            total32 += piece.float()
            total16 += piece
        fp32_sum.append(total32.flatten()), bf16_sum.append(total16.float().flatten())
        held.append(before_reduction[id(param)].flatten())
    replicated = {id(p): group for group, ps in getattr(getattr(trainer.steps, "replicas", None), "buckets", [])
                  for p in ps}
    for index, param in enumerate(params):  # pipeline replicas of a piece: their FP32 sums summed
        if id(param) in replicated:
            for total in (fp32_sum[index], bf16_sum[index]):
                dist.all_reduce(total, group=replicated[id(param)])
    fp32_sum, bf16_sum, held = torch.cat(fp32_sum), torch.cat(bf16_sum), torch.cat(held)
    counts = [len(contributions.get(id(p), [])) for p in params]
    norm = fp32_sum.norm()
    flat_applied = torch.cat([a.flatten() for a in applied])
    results[rank] = {"most_backwards": max(counts), "held_vs_fp32": ((held - fp32_sum).norm() / norm).item(),
                     "bf16_vs_fp32": ((bf16_sum - fp32_sum).norm() / norm).item(),
                     "applied_dtype": str(flat_applied.dtype),
                     "applied_vs_held": ((flat_applied[:held.numel()] - held).norm() / held.norm()).item()
                     if trainer.groups.dp == 1 else None}


def _accumulate(world: int, data: dict, layout: list[str]) -> dict:
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_accumulation_worker, args=(world, str(Path(directory) / "store"), data,
                                             str(Path(directory) / "run"), layout, results), nprocs=world, join=True)
    return dict(results)


@pytest.mark.parametrize("world,layout", [(1, []), (2, ["parallel.pp=2", "parallel.pipeline_schedule=dualpipe"]),
                                          (2, ["parallel.ep=2"])], ids=["accumulation", "dualpipe_pp2", "ep2"])
def test_the_step_applies_the_fp32_sum_of_the_micro_batches_gradients(embedded_run, world, layout):
    """16 micro-batches of the tiny model's real gradients per rank: what each parameter holds
    before the data-parallel reduction is their FP32 sum (the same additions in the same order:
    bitwise), which a BF16 running sum misses by ~1e-3 of the gradient's norm; with one
    data-parallel rank the optimizer's FP32 partition receives exactly that sum (an FP32
    reduction; DeepSpeed's default BF16 one rounds it once more)."""
    for rank, result in _accumulate(world, embedded_run[1], layout).items():
        assert result["most_backwards"] >= MICRO_BATCHES, (rank, result)
        assert result["held_vs_fp32"] == 0.0, (rank, result)
        assert result["bf16_vs_fp32"] > 1e-4, (rank, result)  # the test can tell the two apart
        assert result["applied_dtype"] == "torch.float32"
        if result["applied_vs_held"] is not None:
            assert result["applied_vs_held"] == 0.0, (rank, result)
