"""Pre-train a DeepSeek-V3-style model on DeepSpeed (ZeRO-1 data parallel) with the report's recipe.

    deepspeed [--num_gpus N | --hostfile FILE] launch/pretrain.py --config configs/tiny.yaml \
        [--run-dir DIR] [--steps N] [--save-interval N] [--resume | --init-from PATH] [--pp N] [--ep N] \
        [--pipeline-schedule dualpipe|dualpipev|1f1b] [--fp8 none|emulated|te|auto] [--set dotted.key=value ...]

Each optimizer step: the global batch of the batch-size ramp is split into micro-batches
(gradient accumulation, or the pipeline schedule's micro-batches with ``--pp``), DeepSpeed
reduces, clips (1.0) and applies AdamW; then every MoE block's router bias moves by +-gamma from
the whole batch's expert loads (report 2.1.2), and rank 0 logs metrics.jsonl and W&B.
Checkpoints (``--save-interval``) resume exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from deepspeed.moe.utils import is_moe_param

from data_pipeline import DatasetError, PackedDataset, PackedSampler
from plugins.balance import max_violation, update_router_bias
from plugins.config import ConfigError
from plugins.dualpipe import SCHEDULES
from plugins.model import DeepSeekV3
from plugins.precision import FP8_BACKENDS, convert_to_fp8, fp8_autocast, fp8_targets, resolve_backend
from tokenizer.load import TokenizerDirError

from launch.checkpoint import Checkpointer
from launch.expert_engine import initialize as initialize_engine, shard_for_expert_parallel
from launch.data_setup import setup_data
from launch.groups import ParallelGroups, build_groups, check_parallel_flags
from launch.pipeline_step import PipelineStep, check_schedule
from launch.recipe import RunConfig, load_run_config
from launch.schedules import batch_size, learning_rate, step_value


class TrainingStopped(RuntimeError):
    """A run that cannot go on (non-finite loss or gradient); the message says where to resume."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/pretrain.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML with model:, data: and train: sections")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<config name>")
    parser.add_argument("--steps", type=int, default=None, help="stop after this optimizer step (default: total_tokens)")
    parser.add_argument("--save-interval", type=int, default=None, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the run dir's latest complete checkpoint")
    parser.add_argument("--init-from", default=None, metavar="PATH",
                        help="start from these weights (a run dir, checkpoint dir or HF dir) with a fresh optimizer "
                             "and schedules: the long-context stages")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks (world = pp x dp)")
    parser.add_argument("--pipeline-schedule", default="dualpipe", choices=SCHEDULES,
                        help="with --pp > 1: DualPipe (report 3.2.1), DualPipeV or 1F1B (default: dualpipe)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel ranks")
    parser.add_argument("--fp8", default=None, choices=FP8_BACKENDS,
                        help="FP8 linears (report 3.3): emulated block-scaled GEMMs, Transformer-Engine, or auto "
                             "(default: the config's train.fp8, none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; none on norms (the router bias is a buffer, not a parameter).
    Expert-parallel banks form their own group, which DeepSpeed reduces and partitions over the
    ranks holding the same experts."""
    experts = [p for p in model.parameters() if is_moe_param(p)]
    decay = [p for p in model.parameters() if p.ndim >= 2 and not is_moe_param(p)]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if experts:
        groups.append({"params": experts, "weight_decay": weight_decay, "moe": True, "name": experts[0].group_name})
    return groups


def deepspeed_config(run: RunConfig, groups: ParallelGroups, global_batch: int, on_gpu: bool) -> dict:
    """Under pipelining the schedule owns the micro-batches: the engine sees one batch per step and
    reduces the gradients the schedule left in ``.grad`` at ``step()``."""
    micro = run.train.micro_batch_size if groups.pp == 1 else global_batch // groups.dp
    pipeline = {"managed_gradient_accumulation": False} if groups.pp > 1 else {}
    return {
        **pipeline,
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": global_batch // (micro * groups.dp),
        "zero_optimization": {"stage": 1},
        "gradient_clipping": run.train.grad_clip,
        "bf16": {"enabled": on_gpu},
        "steps_per_print": 2**62,
        "zero_allow_untested_optimizer": True,
    }


def collate(dataset: PackedDataset, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    samples = [dataset[i] for i in indices]
    return {key: torch.stack([s[key] for s in samples]).to(device) for key in samples[0]}


def _check_batch(run: RunConfig, groups: ParallelGroups, dataset: PackedDataset) -> int:
    granularity = run.train.micro_batch_size * groups.dp
    for name in ("start", "final"):
        value = getattr(run.train.batch, name)
        if value % granularity:
            raise ConfigError(f"{run.source}: train.batch.{name}: {value} sequences is not a multiple of "
                              f"micro_batch_size x data-parallel ranks = {run.train.micro_batch_size} x {groups.dp}")
    if len(dataset) < granularity:
        raise ConfigError(f"{run.data.dataset}: the dataset's {len(dataset)} sequences cannot fill one micro-batch per rank")
    return granularity


def _summary(values: torch.Tensor) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in zip(("loss", "lm", "mtp", "aux"), values.tolist()))


def initialise_from(model: DeepSeekV3, path: str) -> None:
    """Copy a pre-trained model's weights and router biases (report 4.3: the extension stages start
    from the pre-trained model); the architecture must match, the rope scaling may differ."""
    from launch.model_source import load_model

    source = load_model(path).model.state_dict()
    target = model.state_dict()
    mismatched = [k for k in target if k not in source or source[k].shape != target[k].shape]
    if mismatched or len(source) != len(target):
        raise ConfigError(f"--init-from {path}: its weights do not fit this config's model "
                          f"(first difference: {(mismatched or sorted(set(source) - set(target)))[0]})")
    model.load_state_dict(source)


def check_fp8_policy(run: RunConfig) -> None:
    """An FP8 run whose ``train.fp8_modules`` match nothing is a config error, found on the meta device."""
    if run.train.fp8 == "none":
        return
    with torch.device("meta"):
        probe = DeepSeekV3(run.model)
    if not fp8_targets(probe, run.train.fp8_modules):
        raise ConfigError(f"{run.source}: train.fp8_modules: {run.train.fp8_modules} match no linear layer of the model")


def train(run: RunConfig, args: argparse.Namespace, on_gpu: bool) -> int:
    groups = build_groups(args.pp, args.ep)
    rank0 = groups.rank == 0
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem
    pipelined = groups.pp > 1
    checkpointer = Checkpointer(run_dir, groups.rank, pipeline_rank=groups.pipeline_rank if pipelined else None,
                                dense_writer=groups.dp_rank == 0 if pipelined else None)
    if args.resume and checkpointer.latest_tag() is None:
        raise ConfigError(f"{run_dir}: --resume given but there is no complete checkpoint to resume from")
    if not args.resume and checkpointer.latest_tag() is not None:
        raise ConfigError(f"{run_dir}: already holds checkpoints; pass --resume to continue it or pick another --run-dir")
    if args.save_interval is not None:
        run.train.save_interval = args.save_interval
    bundle, dataset = setup_data(run, groups.rank)
    granularity = _check_batch(run, groups, dataset)
    t = run.train
    if pipelined:
        check_schedule(args.pipeline_schedule, groups, [t.batch.start, t.batch.final], t.micro_batch_size, run.source)
    device = torch.device("cuda", args.local_rank) if on_gpu else torch.device("cpu")
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml.tmp").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
        (run_dir / "config.yaml.tmp").replace(run_dir / "config.yaml")

    torch.manual_seed(run.train.seed)
    model = DeepSeekV3(run.model)
    if args.init_from and not args.resume:
        initialise_from(model, args.init_from)
        if rank0:
            print(f"initialised the weights from {args.init_from}", flush=True)
    fp8_modules = convert_to_fp8(model, t.fp8, t.fp8_modules, t.fp8_power_of_two_scales)
    exchange = shard_for_expert_parallel(model, groups)
    if exchange is not None:
        checkpointer.expert_slice, checkpointer.expert_writer = exchange.local_slice, groups.expert_dp_rank == 0
        if rank0:
            print(f"expert parallelism: {groups.ep} ranks x {exchange.local_experts} routed experts per MoE block",
                  flush=True)
    if rank0 and fp8_modules:
        print(f"FP8 ({t.fp8}): {len(fp8_modules)} modules with 1x128 / 128x128 block-scaled E4M3 GEMMs "
              f"(report 3.3); embedding, head, gate, norms and MTP projection stay in higher precision",
              flush=True)
    first_batch = batch_size(t.batch, 0, granularity)
    pipeline, module, moe_layers = None, model, list(enumerate(model.moe_layers()))
    num_moe = len(moe_layers)
    if pipelined:
        pipeline = PipelineStep(model, groups, args.pipeline_schedule, first_batch // (t.micro_batch_size * groups.dp))
        module, moe_layers = pipeline.shard, pipeline.shard.moe_layers()
        del model  # the other ranks' stages are freed; this rank trains its shard
        if rank0:
            print(f"pipeline: {args.pipeline_schedule} over {groups.pp} ranks x {groups.dp} data-parallel replicas",
                  flush=True)
    optimizer = torch.optim.AdamW(parameter_groups(module, t.weight_decay), lr=learning_rate(t.lr, 0, 0),
                                  betas=t.betas, eps=t.eps)
    engine = initialize_engine(module, optimizer, deepspeed_config(run, groups, first_batch, on_gpu), groups.mpu)
    for _, moe in moe_layers:  # bf16 engines cast buffers too; the bias stays float32 (report 3.3.1)
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.data.float()

    sampler = PackedSampler(len(dataset), rank=groups.dp_rank, world_size=groups.dp, seed=t.seed)
    step, tokens = 0, 0
    if args.resume:
        tag, client = checkpointer.load(engine)
        step, tokens = client["step"], client["tokens"]
        sampler.load_state_dict(client["sampler"])
        if rank0:
            print(f"resumed {run_dir} from {tag} (step {step}, {tokens} tokens)", flush=True)
    last_good = checkpointer.latest_tag()
    logger = None
    if rank0:
        from launch.metrics import MetricsLogger

        logger = MetricsLogger(run_dir, run.to_dict(), t.wandb_mode, t.wandb_project, t.heatmap_interval,
                               resume_step=step if args.resume else None)
    stream = iter(sampler)
    seq_len = run.data.seq_len
    n_experts = run.model.n_routed_experts
    try:
        while (args.steps is None or step < args.steps) and tokens < t.total_tokens:
            started = time.perf_counter()
            global_batch = batch_size(t.batch, tokens, granularity)
            if pipeline is None and global_batch != engine.train_batch_size():
                engine.set_train_batch_size(global_batch)
            lr = learning_rate(t.lr, step, tokens)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            gamma, lam = step_value(t.bias_update_speed, tokens), step_value(t.mtp_weight, tokens)

            losses = torch.zeros(4, dtype=torch.float64, device=device)
            loads = torch.zeros(num_moe, n_experts, device=device)
            accumulation = engine.gradient_accumulation_steps() if pipeline is None else \
                global_batch // (t.micro_batch_size * groups.dp)
            batches = (collate(dataset, [next(stream) for _ in range(t.micro_batch_size)], device)
                       for _ in range(accumulation))
            if pipeline is not None:
                with fp8_autocast(t.fp8):
                    losses, loads = pipeline.forward_backward(list(batches), lam)
            else:
                for micro_step, batch in enumerate(batches):
                    with fp8_autocast(t.fp8):
                        out = engine(batch["input_ids"], labels=batch["labels"], document_ids=batch["document_ids"],
                                     mtp_weight=lam)
                    losses += torch.stack([out.loss, out.lm_loss, out.mtp_loss, out.aux_loss]).detach().double()
                    if out.expert_loads is not None:
                        loads += out.expert_loads
                    engine.backward(out.loss)
                    if micro_step < accumulation - 1:
                        engine.step()  # accumulates; the boundary step below applies the update
            # every micro-batch's losses and loads live on exactly one rank: sums over the world
            dist.all_reduce(losses)
            dist.all_reduce(loads)
            destinations = None
            if exchange is not None:  # distinct expert-parallel ranks per token, over the whole batch
                tokens_sum_max = exchange.take_statistics()
                dist.all_reduce(tokens_sum_max[:2])
                dist.all_reduce(tokens_sum_max[2:], op=dist.ReduceOp.MAX)
                destinations = (tokens_sum_max[1] / tokens_sum_max[0]).item(), tokens_sum_max[2].item()
            losses /= accumulation * groups.dp
            if not torch.isfinite(losses).all():  # a NaN anywhere reaches every rank through the sum
                raise TrainingStopped(
                    f"step {step + 1}: non-finite loss ({_summary(losses)}); MaxVio per MoE block: "
                    f"{np.round(max_violation(loads).tolist(), 3).tolist()}; last good checkpoint: "
                    f"{checkpointer.directory / last_good if last_good else 'none'} (resume with --resume)"
                )
            engine.step()
            for index, moe in moe_layers:
                update_router_bias(moe.gate.e_score_correction_bias, loads[index], gamma)
            grad_norm = float(engine.get_global_grad_norm())
            if not np.isfinite(grad_norm):
                raise TrainingStopped(f"step {step + 1}: non-finite gradient norm ({grad_norm}); last good "
                                      f"checkpoint: {checkpointer.directory / last_good if last_good else 'none'}")
            step += 1
            tokens += global_batch * seq_len
            seconds = time.perf_counter() - started
            if logger is not None and step % t.log_interval == 0:
                maxvio = max_violation(loads).tolist() if len(loads) else []
                record = {
                    "step": step, "tokens": tokens, "loss": losses[0].item(), "lm_loss": losses[1].item(),
                    "mtp_loss": losses[2].item(), "aux_loss": losses[3].item(), "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": global_batch * seq_len / seconds, "step_seconds": seconds,
                    "batch_size": global_batch, "mtp_weight": lam, "bias_update_speed": gamma,
                    "maxvio": maxvio, "maxvio_global": float(np.mean(maxvio)) if maxvio else 0.0,
                }
                if destinations is not None:
                    record["ep_destinations_mean"], record["ep_destinations_max"] = destinations
                logger.log(record, loads.cpu().numpy() if len(loads) else None)
                print(f"step {step} | tokens {tokens} | loss {record['loss']:.4f} (lm {record['lm_loss']:.4f} "
                      f"mtp {record['mtp_loss']:.4f} aux {record['aux_loss']:.2e}) | lr {lr:.3e} | "
                      f"grad norm {grad_norm:.3f} | MaxVio {record['maxvio_global']:.3f} | "
                      f"{record['tokens_per_s']:.0f} tokens/s", flush=True)
            finished = (args.steps is not None and step >= args.steps) or tokens >= t.total_tokens
            if step % t.save_interval == 0 or finished:
                last_good = checkpointer.save(engine, step, {"step": step, "tokens": tokens,
                                                              "sampler": sampler.state_dict()})
                if rank0:
                    print(f"saved checkpoint {checkpointer.directory / last_good}", flush=True)
    finally:
        if logger is not None:
            logger.close()
    if rank0:
        print(f"finished at step {step} ({tokens} tokens); run dir {run_dir} "
              f"(metrics.jsonl, checkpoints/, wandb/; plots: python -m launch.dashboard {run_dir})", flush=True)
    return 0


def release_shared_memory_names() -> None:
    """DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm buffer per rank and never unlinks it, so
    every run leaks them until /dev/shm is full. Once every rank has mapped its peers' buffers
    (the barrier), each rank unlinks its own name; the mappings stay valid until exit."""
    dist.barrier()
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ.get('MASTER_PORT', '*')}_{dist.get_rank()}"
    for path in Path("/dev/shm").glob(pattern):
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = load_run_config(args.config, args.set)
        check_parallel_flags(args.pp, args.ep, run.model.n_routed_experts, args.pipeline_schedule)
        run.train.fp8 = resolve_backend(args.fp8 or run.train.fp8)
        check_fp8_policy(run)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import deepspeed

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(args.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    release_shared_memory_names()
    try:
        return train(run, args, on_gpu)
    except (ConfigError, DatasetError, TokenizerDirError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
