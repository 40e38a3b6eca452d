"""The pre-training loop (TorchTitan's ``Trainer``): ``__init__`` builds the process groups, data,
model, engine and checkpointer; ``train_step`` runs one optimizer step and returns its metrics;
``train`` loops, logs and saves.

Each step (nanoGPT order): the schedules' values at the tokens trained so far (report 4.2) ->
the step's micro-batches through ``forward_backward`` (gradient accumulation or the pipeline
schedule) -> one all-reduce of the losses and the [MoE blocks, experts] loads -> a non-finite
check -> DeepSpeed reduces, clips (1.0) and applies AdamW -> every MoE block's router bias moves by
+-gamma from the whole batch's loads (report 2.1.2) -> metrics, validation on the held-out domains
at ``train.eval_interval`` (``launch.training.validation``), and a checkpoint at the interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
import yaml

from data_pipeline import PackedDataset
from data_pipeline.mixture import sampler_for
from launch.checkpointing.checkpointer import Checkpointer
from launch.config.run_config import RunConfig
from launch.config.schedules import batch_size, check_schedule, learning_rate, ramp_note, step_value
from launch.distributed import ds_internals
from launch.distributed.groups import build_groups
from plugins.atomic import write_text_atomic
from plugins.errors import ConfigError, ProjectError
from plugins.model.balance import (
    bias_update_speed,
    collect_expert_loads,
    max_violation,
    reset_expert_loads,
    update_router_biases,
)
from plugins.precision.fp8 import release_copies
from plugins.precision.moments import MOMENT_DTYPES, AdamW
from plugins.precision.recipe import resolve_precision
from plugins.progress import RECORD, phase, waiting
from plugins.run_lock import DirectoryLock, LockedError

from . import memory, moe_stats, preemption
from .data import check_fills_a_micro_batch, setup_data, validating, validation_sets
from .ema import HostEMA
from .forward_backward import GradientAccumulation, PipelineSchedule
from .parallelize import parallelize
from .preemption import Preemption
from .spikes import SpikeGuard
from .stragglers import step_end
from .validation import Stopped, Validator
from .watchdog import Watchdog, process_group_timeout

LOCK_FILE = "run.lock"
T = TypeVar("T")


class TrainingStopped(ProjectError):
    """A run that cannot go on (non-finite loss or gradient); the message says where to resume."""


@dataclass
class RunOptions:
    """What the command line adds to the config: where the run lives and how it starts and stops.
    ``resume``: None (a fresh run), "strict" (``--resume``) or "auto" (resume if there is a checkpoint)."""

    run_dir: Path
    steps: int | None = None
    resume: str | None = None
    resume_from: str | None = None  # a checkpoint tag; default: the newest that verifies
    init_from: str | None = None


def deepspeed_config(run: RunConfig, dp: int, pipelined: bool, global_batch: int) -> dict:
    """Under pipelining the schedule owns the micro-batches: the engine sees one batch per step and
    reduces the gradients the schedule left at ``step()``. Under ``train.precision: bf16`` (report
    3.3) the engine keeps BF16 weights, adds every backward's gradient into an FP32 buffer per
    parameter (``data_types.grad_accum_dtype``) and reduces those in FP32
    (``communication_data_type``): BF16 would round the step's summed gradient once more and sum
    the data-parallel ranks' shares in 8 mantissa bits."""
    micro = global_batch // dp if pipelined else run.train.micro_batch_size
    bf16 = run.train.precision == "bf16"
    return {
        **({"managed_gradient_accumulation": False} if pipelined else {}),
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": global_batch // (micro * dp),
        "zero_optimization": {"stage": 1},
        "gradient_clipping": run.train.grad_clip,
        "bf16": {"enabled": bf16},
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"} if bf16 else {}),
        "steps_per_print": 2**62,
        "zero_allow_untested_optimizer": True,
    }


def collate(dataset: PackedDataset, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    samples = [dataset[i] for i in indices]
    return {key: torch.stack([s[key] for s in samples]).to(device) for key in samples[0]}


class Trainer:
    def __init__(self, run: RunConfig, options: RunOptions, device: torch.device):
        self.run, self.options, self.device = run, options, device
        run.train.precision = resolve_precision(run.train.precision, device.type == "cuda")  # config.yaml says which
        p = run.parallel
        timeout = process_group_timeout(run.train.hang_timeout_s)
        self.groups = groups = build_groups(p.pp, p.ep, p.pipeline_schedule, run.model, timeout)
        self.rank0 = groups.rank == 0
        self.pipelined = groups.pp > 1
        self.lock = self._lock_run_dir()
        self.preemption = Preemption(groups.rank).install()
        self.watchdog = Watchdog(options.run_dir, groups.rank, run.train.hang_timeout_s).start()
        try:
            self._build(timeout)
        except BaseException:
            self.close()
            raise

    def _build(self, timeout: timedelta | None) -> None:
        run, options, device, groups = self.run, self.options, self.device, self.groups
        t, p = run.train, run.parallel
        self._check_run_dir()
        bundle, self.dataset = setup_data(run, groups.rank)
        held_out = validation_sets(run, bundle) if validating(run) else {}
        self.grid = check_schedule(run, groups.pp, groups.dp)
        check_fills_a_micro_batch(run, self.dataset, groups.dp)
        note = ramp_note(run, groups.dp, self.grid)
        if note:
            self._say(f"note: {note}")
        self._rank0_writes("config.yaml", lambda: write_text_atomic(options.run_dir / "config.yaml", yaml.safe_dump(
            run.to_dict(), sort_keys=False)))

        torch.manual_seed(t.seed)
        init_from = options.init_from if not self.resuming else None
        with phase("building the model"):
            built = parallelize(run, groups, device, init_from)
        if init_from:
            self._say(f"initialised the weights from {init_from}")
        self.module, self.exchange = built.module, built.exchange
        self.moe_layers = self.module.moe_layers()
        self._describe(built)
        held = torch.tensor([sum(p.numel() for p in self.module.parameters())], device=device)
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        self._say(f"built this rank's part of the model: at most {int(held.item()):,} parameters on a rank; "
                  f"peak memory after construction {self._peak_memory_mb():.0f} MB (largest rank)")
        first_batch = batch_size(t.batch, 0, self.grid)
        optimizer = AdamW(ds_internals.parameter_groups(self.module, t.weight_decay),
                          MOMENT_DTYPES[t.optimizer_moments_dtype], lr=learning_rate(t.lr, 0, 0), betas=t.betas,
                          eps=t.eps)
        with phase("building the engine"):
            self.engine = ds_internals.initialize(self.module, optimizer, deepspeed_config(
                run, groups.dp, self.pipelined, first_batch), groups.mpu)
        ds_internals.mark_gradient_reduction(self.engine)
        for moe in self.moe_layers:  # bf16 engines cast buffers too; the bias stays float32 (report 3.3.1)
            moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.data.float()
        self.ema = HostEMA({name: states["model"] for name, _, _, states in ds_internals.zero_fragments(self.engine)},
                           t.ema.decay) if t.ema is not None else None
        self.steps = (PipelineSchedule(built.shard, groups, p.pipeline_schedule, p.fp8, t.memory.release_sends,
                                       ds_internals.gradient_attribute(self.engine))
                      if self.pipelined
                      else GradientAccumulation(self.engine, p.fp8))
        self.checkpointer = Checkpointer(
            options.run_dir, groups.rank, dist.get_world_size(), run.model.n_routed_experts, built.expert_offset,
            t.keep_checkpoints, layout={"pp": groups.pp, "ep": groups.ep, "dp": groups.dp,
                                        "pipeline_schedule": p.pipeline_schedule, "precision": t.precision},
            asynchronous=t.async_save, timeout_s=timeout.total_seconds() if timeout else 0.0)
        self.validator = Validator(held_out, bundle.token_bytes(), self.module, built.shard, groups,
                                   t.micro_batch_size, p.pipeline_schedule, p.fp8, run.source, t.eval_sequences,
                                   device) if held_out else None
        self.sampler = sampler_for(self.dataset, rank=groups.dp_rank, world_size=groups.dp, seed=t.seed)
        self.spikes = SpikeGuard(t.spike) if t.spike is not None else None
        self.step, self.tokens = 0, 0
        if self.resuming:
            with phase("restore"):
                self.restore()
        self.logger = self._rank0_writes("metrics.jsonl", self._metrics_logger)

    # ------------------------------------------------------------------------------ building
    def _say(self, message: str) -> None:
        if self.rank0:
            print(message, flush=True)

    def _rank0_writes(self, what: str, write: Callable[[], T]) -> T | None:
        """Rank 0 writes ``what`` into the run dir; storage that refuses it (a full disk, read-only) is
        one line on every rank. Returns what ``write`` returned (None on other ranks). Collective."""
        result, failure = None, [None]
        if self.rank0:
            try:
                result = write()
            except OSError as error:
                failure = [f"--run-dir {self.options.run_dir}: cannot write {what} ({error.strerror or error})"]
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise ProjectError(failure[0])
        return result

    def _metrics_logger(self):
        from .metrics import MetricsLogger  # rank 0's alone (W&B, the figures)

        t = self.run.train
        return MetricsLogger(self.options.run_dir, self.run.to_dict(), t.wandb_mode, t.wandb_project,
                             t.heatmap_interval, resume_step=self.step if self.resuming else None)

    def _lock_run_dir(self) -> DirectoryLock | None:
        """Rank 0 takes the run dir's lock before anything is written (creating the directory); every
        rank learns the outcome. Collective."""
        run_dir, lock, outcome = self.options.run_dir, None, [None, None]
        if self.rank0:
            self.created_run_dir = not run_dir.exists()
            lock = DirectoryLock(run_dir / LOCK_FILE, f"--run-dir {run_dir}")
            try:
                outcome = [None, lock.acquire()]
            except LockedError as error:
                lock, outcome = None, [str(error), None]
            except OSError as error:  # the directory or its lock file cannot be created
                lock, outcome = None, [f"--run-dir {run_dir}: cannot take its lock ({error})", None]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise LockedError(outcome[0])
        if outcome[1] is not None:
            self._say(f"note: {outcome[1]}")
        return lock

    def _check_run_dir(self) -> None:
        """Before any work: a resume has a checkpoint that verifies (damaged newer ones are named and
        passed over); ``--resume auto`` resumes if the run has a checkpoint; a fresh run does not
        overwrite one. Collective (the ranks verify the files between them)."""
        checkpoints = Checkpointer(self.options.run_dir, self.groups.rank)
        mode, saved = self.options.resume, checkpoints.has_checkpoint()
        if mode == "auto":
            mode = "strict" if saved or self.options.resume_from else None
            if mode is None:
                self._say(f"--resume auto: {self.options.run_dir} holds no checkpoint; starting afresh")
        self.resuming = mode is not None
        self.resume_tag = None
        if self.resuming:
            if not saved and self.options.resume_from is None:
                raise ConfigError(f"{self.options.run_dir}: --resume given but there is no complete checkpoint to "
                                  "resume from")
            self.resume_tag, skipped = checkpoints.choose(self.options.resume_from)
            for line in skipped:
                self._say(f"warning: {line}; passing over it")
        elif saved:
            raise ConfigError(f"{self.options.run_dir}: already holds checkpoints; pass --resume (or --resume auto) to "
                              "continue it or pick another --run-dir")

    def _describe(self, built) -> None:
        p = self.run.parallel
        if self.exchange is not None:
            self._say(f"expert parallelism: {p.ep} ranks x {self.exchange.local_experts} routed experts per MoE block")
        if built.fp8_modules:
            self._say(f"FP8 ({p.fp8}): {len(built.fp8_modules)} modules with 1x128 / 128x128 block-scaled E4M3 GEMMs "
                      "(report 3.3); embedding, head, gate, norms and MTP projection stay in higher precision")
        if self.pipelined:
            self._say(f"pipeline: {p.pipeline_schedule} over {p.pp} ranks x {self.groups.dp} data-parallel replicas")

    # -------------------------------------------------------------------------------- a step
    def forward_backward(self, global_batch: int, mtp_weight: float) -> torch.Tensor:
        """The step's micro-batches of this rank through the model; (lm, mtp, balance) sums."""
        micro = self.run.train.micro_batch_size
        indices = self.sampler.take(global_batch)
        batches = [collate(self.dataset, indices[i:i + micro], self.device) for i in range(0, len(indices), micro)]
        return self.steps.forward_backward(batches, mtp_weight)

    def train_step(self) -> tuple[dict, torch.Tensor]:
        t = self.run.train
        started = time.perf_counter()
        RECORD.step, RECORD.waited = self.step + 1, 0.0
        global_batch = batch_size(t.batch, self.tokens, self.grid)
        if not self.pipelined and global_batch != self.engine.train_batch_size():
            self.engine.set_train_batch_size(global_batch)
        lr = learning_rate(t.lr, self.step, self.tokens)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        gamma = bias_update_speed(self.run.model.balance, step_value(t.bias_update_speed, self.tokens))  # 0 unless aux_free
        lam = step_value(t.mtp_weight, self.tokens)

        reset_expert_loads(self.moe_layers)
        with phase("forward and backward"):
            values = self.forward_backward(global_batch, lam)
        if self.run.parallel.fp8 != "none":
            release_copies(self.module)  # FP8 weight copies: the step changes the weights
        # every micro-batch's losses and loads live on exactly one rank: one sum over the world
        loads = collect_expert_loads(self.moe_layers, self.run.model.num_moe_layers, self.run.model.n_routed_experts,
                                     self.device)
        statistics = self.exchange.take_statistics(self.device).double() if self.exchange is not None else None
        sums = [values, loads.double().flatten()] + ([statistics[[0, 1, 3]]] if statistics is not None else [])
        reduced = torch.cat(sums)
        with waiting("loss all-reduce"):
            dist.all_reduce(reduced)
            if statistics is not None:
                maxima = statistics[[2, 4]]
                dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
                reduced = torch.cat([reduced, maxima])
        count = loads.numel()
        loads = reduced[3:3 + count].float().view_as(loads)  # stays on the device for the bias update
        # the step's one host read before the optimizer step: losses, loads, MaxVio, destination statistics
        host = np.array(torch.cat([reduced, max_violation(loads).double()]).tolist())
        host[:3] /= global_batch // t.micro_batch_size
        lm, mtp, aux = host[:3].tolist()
        loads_host = host[3:3 + count].reshape(tuple(loads.shape))
        destinations = self._destinations(host[3 + count:len(host) - len(loads)])
        maxvio = host[len(host) - len(loads):].tolist() if count else []
        if not np.isfinite(host[:3]).all():  # a NaN anywhere reaches every rank through the sum
            raise TrainingStopped(
                f"step {self.step + 1}: non-finite loss ({self._summary(host[:3])}); MaxVio per MoE block: "
                f"{np.round(maxvio, 3).tolist()}; last good checkpoint: {self._last_good()} (resume with --resume)")
        if self.ema is not None:
            self.ema.wait()  # the last update has read the weights this step overwrites
        with phase("optimizer step"):
            spike, grad_norm = self._optimizer_step(lm + mtp + aux)
        if spike is None:
            if self.ema is not None:
                self.ema.update()
            update_router_biases(self.moe_layers, loads, gamma)
        biases = moe_stats.router_bias_stats(self.moe_layers, self.run.model.num_moe_layers, self.device)
        if not np.isfinite(grad_norm):
            raise TrainingStopped(f"step {self.step + 1}: non-finite gradient norm ({grad_norm}); MaxVio per MoE block: "
                                  f"{np.round(maxvio, 3).tolist()}; last good checkpoint: "
                                  f"{self._last_good()} (resume with --resume)")
        if spike is not None and self.run.train.spike.action == "stop":
            raise TrainingStopped(f"step {self.step + 1}: loss spike ({spike}); the step was not applied; last good "
                                  f"checkpoint: {self._last_good()} (resume with --resume)")
        self.step += 1
        self.tokens += global_batch * self.run.data.seq_len
        seconds = time.perf_counter() - started
        record = {
            "step": self.step, "tokens": self.tokens, "loss": lm + mtp + aux, "lm_loss": lm, "mtp_loss": mtp,
            "aux_loss": aux, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": global_batch * self.run.data.seq_len / seconds, "step_seconds": seconds,
            "batch_size": global_batch, "mtp_weight": lam, "bias_update_speed": gamma,
            "maxvio": maxvio, "maxvio_global": float(np.mean(maxvio)) if maxvio else 0.0,
            "mtp_ce": moe_stats.mtp_cross_entropy(mtp, lam, self.run.model.num_nextn_predict_layers),
            **biases, "starved": moe_stats.starved_experts(loads_host),
        }
        record.update(destinations)
        record.update(self.sampler.statistics())  # source_tokens/source_epochs of a data.sources mixture
        if self.spikes is not None:
            record.update(skipped=spike is not None, skipped_steps=self.spikes.skipped,
                          **({"spike": spike} if spike is not None else {}))
        record["peak_memory_mb"] = self._peak_memory_mb()
        ranks, self.signal = step_end(time.perf_counter() - started - RECORD.waited,
                                      self.preemption.pending(), self.device)
        record.update(ranks)
        return record, loads_host

    def _optimizer_step(self, loss: float) -> tuple[str | None, float]:
        """DeepSpeed reduces, clips and applies the gradients; under ``train.spike`` a spike (judged
        on the loss and the reduced gradients' norm) is not applied. Returns (why the step was a
        spike or None, the gradient norm)."""
        if self.spikes is None:
            self.engine.step()
            return None, float(self.engine.get_global_grad_norm())
        judged = {}

        def skip(grad_norm: float) -> bool:
            judged.update(norm=grad_norm, spike=self.spikes.judge(loss, grad_norm))
            return judged["spike"] is not None

        ds_internals.gated_step(self.engine, skip)
        self.spikes.add(loss, judged["norm"])
        if judged["spike"] is not None:
            self.spikes.skipped += 1
            self._say(f"step {self.step + 1}: skipped, a loss spike ({judged['spike']})")
        return judged["spike"], judged["norm"]

    def _peak_memory_mb(self) -> float:
        """The largest rank's peak so far."""
        return memory.largest(memory.peak_mb(self.device), self.device)

    @staticmethod
    def _destinations(reduced: np.ndarray) -> dict[str, float]:
        """Mean and max distinct expert-parallel ranks and nodes a token reached, over the whole batch,
        from the reduced [tokens, rank sum, node sum, rank max, node max] (empty without ``--ep``)."""
        if not reduced.size:
            return {}
        tokens, rank_sum, node_sum, rank_max, node_max = reduced.tolist()
        tokens = max(tokens, 1.0)
        return {"ep_destinations_mean": rank_sum / tokens, "ep_destinations_max": rank_max,
                "ep_destination_nodes_mean": node_sum / tokens, "ep_destination_nodes_max": node_max}

    @staticmethod
    def _summary(values: np.ndarray) -> str:
        lm, mtp, aux = values.tolist()
        return f"loss={lm + mtp + aux:.4g}, lm={lm:.4g}, mtp={mtp:.4g}, aux={aux:.4g}"

    def _last_good(self) -> str:
        last = self.checkpointer.last_good
        return str(self.checkpointer.directory / last) if last else "none"

    # --------------------------------------------------------------------------- the loop
    def finished(self) -> bool:
        return (self.options.steps is not None and self.step >= self.options.steps) or \
            self.tokens >= self.run.train.total_tokens

    def train(self) -> str | None:
        """Train to the end, or to the step boundary after a preemption signal, whose checkpoint it
        saves; returns that signal's name (None: the run finished)."""
        t = self.run.train
        RECORD.owner = threading.get_ident()
        try:
            while not self.finished():
                record, loads = self.train_step()
                if self.logger is not None and self.step % t.log_interval == 0:
                    self.logger.log(record, loads if loads.size else None)
                    print(f"step {self.step} | tokens {self.tokens} | loss {record['loss']:.4f} "
                          f"(lm {record['lm_loss']:.4f} mtp {record['mtp_loss']:.4f} aux {record['aux_loss']:.2e}) | "
                          f"lr {record['lr']:.3e} | grad norm {record['grad_norm']:.3f} | "
                          f"MaxVio {record['maxvio_global']:.3f} | {record['tokens_per_s']:.0f} tokens/s", flush=True)
                if not self.signal and self.validator is not None and (self.step % t.eval_interval == 0 or
                                                                       self.finished()):
                    with phase("validation"):
                        self.validate()  # a signal during it stops it at the next micro-batch
                if self.signal:
                    self.save(deadline=(time.monotonic() + t.preempt_grace_s,
                                        f"train.preempt_grace_s = {t.preempt_grace_s:g} s"))
                    self.checkpointer.wait()
                    return preemption.name(self.signal)
                if self.step % t.save_interval == 0 or self.finished():
                    self.save()
                self.checkpointer.poll()
            self.checkpointer.wait()
        finally:
            self.close()
        self._say(f"finished at step {self.step} ({self.tokens} tokens); run dir {self.options.run_dir} "
                  f"(metrics.jsonl, checkpoints/, wandb/; plots: python -m launch.dashboard {self.options.run_dir})")
        return None

    def close(self) -> None:
        """Wait for a save in flight, stop the helpers, release the run dir (removing it if this run
        created it and wrote nothing). Safe to call on a half-built trainer, and twice."""
        try:
            if getattr(self, "checkpointer", None) is not None:
                self.checkpointer.close()
        finally:
            for part in ("ema", "logger"):
                if getattr(self, part, None) is not None:
                    getattr(self, part).close()
                    setattr(self, part, None)
            self.watchdog.close()
            self.preemption.restore()
            if self.lock is not None:
                self.lock.release()
                self.lock = None
                run_dir = self.options.run_dir
                if self.created_run_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
                    run_dir.rmdir()

    def validate(self) -> None:
        """Validation at this step, recorded; one a preemption stopped is not (``self.signal`` says why)."""
        try:
            record = self.validator.run(self.step, self.tokens, self.preemption.pending)
        except Stopped as stopped:
            self.signal = stopped.cause
            self._say(f"validation at step {self.step} stopped on {preemption.name(stopped.cause)}; not recorded")
            return
        if self.logger is not None:
            self.logger.log_eval(record)
        domains = " | ".join(f"{name} loss {v['loss']:.4f} bpb {v['bpb']:.4f}" for name, v in record["val"].items())
        self._say(f"validation at step {self.step} | {domains} | MaxVio_batch {record['maxvio_batch']:.3f} | "
                  f"specialization {record['specialization']:.4f}")

    # ------------------------------------------------------------------------ checkpoints
    def save(self, deadline: tuple[float, str] | None = None) -> None:
        state = {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state_dict(),
                 **({"spikes": self.spikes.state_dict()} if self.spikes is not None else {})}
        if self.ema is not None:
            self.ema.wait()
        started = time.perf_counter()
        with phase("save"), memory.Increase(self.device) as added:
            tag = self.checkpointer.save(self.engine, self.step, state,
                                         self.ema.shadow if self.ema is not None else None, deadline)
        stalled = time.perf_counter() - started
        if self.run.train.async_save:
            self._say(f"staged checkpoint {tag} in host memory in {stalled:.2f} s, writing it in the background"
                      f"{self._added(added)}")
        else:
            self._say(f"saved checkpoint {self.checkpointer.directory / tag} in {stalled:.2f} s{self._added(added)}")

    def _added(self, phase: memory.Increase) -> str:
        added = memory.largest(-1.0 if phase.mb is None else phase.mb, self.device)  # collective on every rank
        return "" if added < 0 else f" (memory added while at it: {added:.0f} MB on the largest rank)"

    def restore(self) -> None:
        tag = self.resume_tag
        with memory.Increase(self.device) as phase:
            state = self.checkpointer.load(self.engine, tag, self.ema.shadow if self.ema is not None else None)
        if self.ema is not None and not state["ema_restored"]:
            self.ema.reset_to_weights()
            self._say(f"{tag} holds no EMA: the EMA starts at its weights")
        self.step, self.tokens = state["step"], state["tokens"]
        self.sampler.load_state_dict(state["sampler"])
        self.checkpointer.last_good = tag
        if self.spikes is not None and "spikes" in state:
            self.spikes.load_state_dict(state["spikes"])
        saved = dict(state["layout"])
        saved_precision = saved.pop("precision", None)  # None: written before train.precision (unknown)
        now = {key: value for key, value in self.checkpointer.layout.items() if key != "precision"}
        layout = "" if saved == now else \
            f", saved at pp {saved['pp']} ep {saved['ep']} dp {saved['dp']}, resharded on load"
        self._say(f"resumed {self.options.run_dir} from {tag} (step {self.step}, {self.tokens} tokens{layout})"
                  f"{self._added(phase)}")
        if saved_precision not in (None, self.run.train.precision):
            self._say(f"note: {tag} was trained under train.precision {saved_precision}; it continues under "
                      f"{self.run.train.precision}: the FP32 master weights and AdamW moments carry over as they are, "
                      f"the weights the GEMMs read are their {self.run.train.precision} copies")
