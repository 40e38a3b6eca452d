"""The run config tree: ``model:`` (``plugins.model.config.ModelConfig``), ``data:``, ``train:`` and
``parallel:``, read by the one config loader (``plugins.config_tree``: ``base:`` inheritance,
``--set section.key=value``, numbers in any YAML spelling, one-line errors naming the key path).

Every schedule is token-based as in the report (4.2 "Training Hyper-Parameters"); the 671B
config carries the report's numbers, the tiny one the same shape scaled down. The run directory's
``config.yaml`` records the effective values, parallel layout included.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugins.config_tree import build, read_document
from plugins.errors import ConfigError
from plugins.model.config import ModelConfig
from plugins.model.recompute import MODES as RECOMPUTE_MODES
from plugins.parallel.dualpipe import SCHEDULES
from plugins.precision.moments import MOMENT_DTYPES
from plugins.precision.policy import DEFAULT_FP8_MODULES, FP8_BACKENDS
from plugins.precision.recipe import PRECISIONS

SECTIONS = ("model", "data", "train", "parallel")


@dataclass
class LRSchedule:
    """Linear warm-up over ``warmup_steps``; ``peak`` until ``constant_tokens``; cosine to
    ``cosine_final`` over ``cosine_tokens``; held for ``hold_tokens``; then ``final``."""

    peak: float = 2.2e-4
    warmup_steps: int = 2000
    constant_tokens: float = 10.0e12
    cosine_tokens: float = 4.3e12
    cosine_final: float = 2.2e-5
    hold_tokens: float = 333e9
    final: float = 7.3e-6


@dataclass
class BatchSchedule:
    """Global batch in sequences, ramped from ``start`` to ``final`` over ``ramp_tokens``."""

    start: int = 3072
    final: int = 15360
    ramp_tokens: float = 469e9


@dataclass
class StepSchedule:
    """A value that switches to ``then`` once ``until_tokens`` have been trained on."""

    value: float
    until_tokens: float
    then: float


@dataclass
class SourceConfig:
    """One source of a mixture (issue 18): a prepared directory, a directory of shard directories or a
    glob of them, drawn in proportion to ``weight`` (weights are normalised)."""

    name: str
    path: str
    weight: float


@dataclass
class DataConfig:
    dataset: str = "data/packed"
    sources: list[SourceConfig] = field(default_factory=list)  # a mixture, in place of dataset
    tokenizer: str = "data/tokenizer"
    builtin_corpus: bool = False  # build tokenizer and dataset from Python's own text when missing
    seq_len: int = 4096
    builtin_megabytes: int = 8
    # held-out sets by domain, {name: prepared dir or glob}, scored every train.eval_interval steps
    validation: dict[str, str] = field(default_factory=dict)


@dataclass
class EMAConfig:
    """An EMA of the parameters in host memory (report 3.2.3), updated after every step."""

    decay: float


@dataclass
class SpikeConfig:
    """Loss spikes: a step whose loss or gradient norm exceeds ``factor`` x the median of the last
    ``window`` steps is skipped (``action: skip``: no optimizer step, no router-bias update,
    the batch consumed) or stops the run (``stop``)."""

    window: int = 100
    factor: float = 3.0
    action: str = "skip"


@dataclass
class MemoryConfig:
    """What backward keeps (report 3.3.3, docs/memory.md); the trainer and ``launch.plan`` read the same
    switches."""

    weighted_combine: bool = True  # routing weights applied before the down-projection: no expert output kept
    swiglu_recompute: bool = True  # the routed experts' SwiGLU output recomputed in backward from its input
    fp8_activations: bool = True  # under parallel.fp8: that SwiGLU input kept in FP8 (1x128 tiles)
    fp8_dispatch: bool = True  # under parallel.fp8 with FP8 experts: tokens quantized before the dispatch
    release_sends: bool = True  # a pipeline send's tensor released when the send completes, not at the step's end
    loss_chunk_tokens: int = 1024  # cross-entropies computed this many tokens at a time, logits recomputed (0: whole)
    offload_ffn: bool = False  # with swiglu_recompute: what every SwiGLU (experts, dense FFNs) keeps, in pinned host memory


@dataclass
class TrainConfig:
    total_tokens: float = 14.8e12
    micro_batch_size: int = 1
    lr: LRSchedule = field(default_factory=LRSchedule)
    batch: BatchSchedule = field(default_factory=BatchSchedule)
    bias_update_speed: StepSchedule = field(default_factory=lambda: StepSchedule(0.001, 14.3e12, 0.0))
    mtp_weight: StepSchedule = field(default_factory=lambda: StepSchedule(0.3, 10.0e12, 0.1))
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    log_interval: int = 1
    save_interval: int = 1000
    keep_checkpoints: int = 0  # retain the newest N checkpoints (0: all)
    heatmap_interval: int = 50
    ema: EMAConfig | None = None  # e.g. {decay: 0.999}; launch.convert/evaluate --ema read it
    eval_interval: int = 0  # validate on data.validation every N steps and at the end (0: never)
    eval_sequences: int = 64  # per domain, rounded down to a multiple of micro_batch_size x dp
    wandb_project: str = "deepseek-pretrain"
    wandb_mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline; or online/offline/disabled
    # activations recomputed in backward (report 3.2.3): none, selective (RMSNorm and MLA
    # up-projection outputs) or full (every block); plugins.model.recompute
    recompute: str = "none"
    compile: bool = False  # each decoder block through torch.compile (launch.training.parallelize.compile_blocks)
    optimizer_moments_dtype: str = "float32"  # AdamW's exp_avg/exp_avg_sq: float32 or bfloat16 (report 3.3.1)
    # bf16: BF16 compute, FP32 masters and FP32 gradient accumulation (report 3.3); fp32; auto: bf16 on a GPU
    precision: str = "auto"
    # long runs on clusters (docs/training.md#long-runs-on-clusters)
    hang_timeout_s: float = 1800.0  # a rank without progress this long ends the job (0: no watchdog)
    preempt_grace_s: float = 25.0  # the save on SIGTERM/SIGUSR1/SIGINT must be done within this
    async_save: bool = False  # checkpoints written from a host copy while training goes on
    spike: SpikeConfig | None = None  # e.g. {window: 100, factor: 3.0, action: skip}
    memory: MemoryConfig = field(default_factory=MemoryConfig)


@dataclass
class ParallelConfig:
    """The layout (report 3.2): world = pp x dp ranks, expert parallelism inside dp, and the FP8
    recipe of the linears (report 3.3). ``--pp``, ``--ep``, ``--pipeline-schedule`` and ``--fp8``
    override these."""

    pp: int = 1
    ep: int = 1
    pipeline_schedule: str = "dualpipe"
    fp8: str = "none"  # none, emulated, te, torch or auto
    fp8_modules: list[str] = field(default_factory=lambda: list(DEFAULT_FP8_MODULES))  # module-name patterns
    fp8_power_of_two_scales: bool = True  # scales rounded up to powers of two, as TE's block-scaling recipe


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    parallel: ParallelConfig
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "data": dataclasses.asdict(self.data),
                "train": {**dataclasses.asdict(self.train), "betas": list(self.train.betas)},
                "parallel": dataclasses.asdict(self.parallel)}


def _validate(run: RunConfig) -> None:
    src, t, d, p = run.source, run.train, run.data, run.parallel

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{src}: {key}: {message}")

    for key in ["micro_batch_size", "log_interval", "save_interval", "heatmap_interval"]:
        if getattr(t, key) <= 0:
            fail(f"train.{key}", f"must be positive, got {getattr(t, key)}")
    if t.ema is not None and not 0.0 < t.ema.decay < 1.0:
        fail("train.ema.decay", f"expected 0 < decay < 1, got {t.ema.decay}")
    if t.eval_interval < 0:
        fail("train.eval_interval", f"must be >= 0 (0: no validation), got {t.eval_interval}")
    if t.eval_sequences <= 0:
        fail("train.eval_sequences", f"must be positive, got {t.eval_sequences}")
    if p.fp8 not in ("none", "te") and t.memory.fp8_dispatch and not t.memory.swiglu_recompute:
        fail("train.memory.fp8_dispatch", "FP8-dispatched rows train through the recomputing SwiGLU; set "
                                          "train.memory.swiglu_recompute: true or fp8_dispatch: false")
    if t.memory.offload_ffn and not t.memory.swiglu_recompute:
        fail("train.memory.offload_ffn", "offloads what the recomputing SwiGLU keeps; it needs "
                                             "train.memory.swiglu_recompute: true")
    if t.memory.loss_chunk_tokens < 0:
        fail("train.memory.loss_chunk_tokens", f"must be >= 0 (0: one cross-entropy over the micro-batch), "
                                               f"got {t.memory.loss_chunk_tokens}")
    if t.keep_checkpoints < 0:
        fail("train.keep_checkpoints", f"must be >= 0 (0 keeps all), got {t.keep_checkpoints}")
    if t.total_tokens <= 0:
        fail("train.total_tokens", "must be positive")
    if not 0 < t.batch.start <= t.batch.final:
        fail("train.batch.start", f"expected 0 < start <= final, got {t.batch.start} and {t.batch.final}")
    _check_optimizer(t, fail)
    if t.wandb_mode not in ("auto", "online", "offline", "disabled"):
        fail("train.wandb_mode", f"expected auto, online, offline or disabled, got {t.wandb_mode!r}")
    if t.recompute not in RECOMPUTE_MODES:
        fail("train.recompute", f"expected one of {', '.join(RECOMPUTE_MODES)}, got {t.recompute!r}")
    if t.precision not in PRECISIONS:
        fail("train.precision", f"expected one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if t.optimizer_moments_dtype not in MOMENT_DTYPES:
        fail("train.optimizer_moments_dtype", f"expected one of {', '.join(MOMENT_DTYPES)}, "
                                              f"got {t.optimizer_moments_dtype!r}")
    if t.recompute == "full" and p.pp > 1 and p.ep > 1:
        fail("train.recompute", "full with --pp > 1 and --ep > 1 cannot run: a block's recomputed forward would "
                                "issue its expert all-to-alls inside a backward that the pipeline overlaps with "
                                "another micro-batch's forward on the same process group; use selective")
    if t.recompute == "full" and run.model.balance == "batch_aux":
        fail("train.recompute", "full with model.balance: batch_aux cannot run: the recomputed block would "
                                "all-reduce its expert counts again in backward; use selective")
    if t.compile and t.recompute != "none":
        fail("train.compile", f"true with train.recompute: {t.recompute} cannot run: the recomputation's hooks "
                              "and checkpoints are not traced; use train.recompute: none")
    check_recompute(run)
    if d.seq_len < 2:
        fail("data.seq_len", "must be at least 2")
    if d.sources and d.builtin_corpus:
        fail("data.builtin_corpus", "builds only data.dataset, not data.sources; set it false "
                                    "(--set data.builtin_corpus=false)")
    if d.seq_len > run.model.max_position_embeddings:
        fail("data.seq_len", f"{d.seq_len} exceeds model.max_position_embeddings={run.model.max_position_embeddings}")
    if p.fp8 not in FP8_BACKENDS:
        fail("parallel.fp8", f"expected one of {', '.join(FP8_BACKENDS)}, got {p.fp8!r}")
    if p.pipeline_schedule not in SCHEDULES:
        fail("parallel.pipeline_schedule", f"expected one of {', '.join(SCHEDULES)}, got {p.pipeline_schedule!r}")
    if p.pp < 1:
        fail("parallel.pp", f"must be a positive number of pipeline ranks, got {p.pp}")
    if p.pipeline_schedule == "dualpipe" and p.pp > 1 and p.pp % 2:
        fail("parallel.pp", f"{p.pp}: DualPipe needs an even number of pipeline ranks (each rank holds stage i "
                            "and stage pp-1-i); use --pipeline-schedule dualpipev or 1f1b")
    if p.ep < 1 or run.model.n_routed_experts % p.ep:
        fail("parallel.ep", f"{p.ep}: must be a positive divisor of model.n_routed_experts = "
                            f"{run.model.n_routed_experts}")
    if t.hang_timeout_s < 0:
        fail("train.hang_timeout_s", f"must be >= 0 (0: no watchdog), got {t.hang_timeout_s}")
    if t.preempt_grace_s <= 0:
        fail("train.preempt_grace_s", f"must be positive, got {t.preempt_grace_s}")
    if t.spike is not None:
        if t.spike.window < 1:
            fail("train.spike.window", f"must be at least 1 step, got {t.spike.window}")
        if not t.spike.factor > 1.0:
            fail("train.spike.factor", f"must be > 1 (a multiple of the median), got {t.spike.factor}")
        if t.spike.action not in ("skip", "stop"):
            fail("train.spike.action", f"expected skip or stop, got {t.spike.action!r}")


def _check_optimizer(t: TrainConfig, fail) -> None:
    """AdamW's settings and the learning-rate schedule within the ranges the optimizer runs with."""
    for i, beta in enumerate(t.betas):
        if not 0.0 <= beta < 1.0:
            fail(f"train.betas[{i}]", f"expected 0 <= beta < 1, got {beta}")
    if not t.eps > 0:
        fail("train.eps", f"must be positive, got {t.eps}")
    for key in ("weight_decay", "grad_clip"):
        if getattr(t, key) < 0:
            fail(f"train.{key}", f"must be >= 0{' (0: no clipping)' if key == 'grad_clip' else ''}, got {getattr(t, key)}")
    if not t.lr.peak > 0:
        fail("train.lr.peak", f"must be positive, got {t.lr.peak}")
    for key in ("warmup_steps", "constant_tokens", "cosine_tokens", "cosine_final", "hold_tokens", "final"):
        if getattr(t.lr, key) < 0:
            fail(f"train.lr.{key}", f"must be >= 0, got {getattr(t.lr, key)}")


def check_recompute(run: RunConfig) -> None:
    """Recomputation (report 3.2.3) with Transformer-Engine's FP8 linears is refused: backward, where
    the recomputation runs, is outside ``te.autocast``, so the recomputed GEMMs would not be the FP8
    ones the forward ran. Checked on every config (``launch.plan`` included) and again by the trainer
    once ``parallel.fp8: auto`` is resolved."""
    if run.train.recompute != "none" and run.parallel.fp8 == "te":
        raise ConfigError(f"{run.source}: train.recompute: {run.train.recompute} with --fp8 te cannot run: the "
                          "recomputation in backward runs outside te.autocast; use --fp8 emulated or "
                          "train.recompute=none")


def check_world(pp: int, ep: int, world: int) -> int:
    """The data-parallel size of a layout, or a one-line error saying what would run."""
    if world % pp:
        raise ConfigError(f"--pp {pp}: does not divide the {world} launched ranks (world = pp x dp); "
                          f"launch a multiple of {pp} ranks or pick a --pp dividing {world}")
    dp = world // pp
    if dp % ep:
        raise ConfigError(f"--ep {ep}: does not divide the data-parallel size {dp} (the {world} launched ranks / "
                          f"--pp {pp}); pick an --ep dividing {dp}")
    return dp


def _sources(raw: Any, source: str) -> list[SourceConfig]:
    """``data.sources``: a list of {name, path, weight} mappings, names unique, weights positive."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: data.sources: expected a list of {{name, path, weight}} mappings, got {raw!r}")
    out: list[SourceConfig] = []
    for index, item in enumerate(raw):
        where = f"data.sources[{index}]"
        entry = build(SourceConfig, item, where, source)
        if entry.weight <= 0:
            raise ConfigError(f"{source}: {where}.weight: must be positive, got {entry.weight}")
        if not entry.name or not entry.path:
            raise ConfigError(f"{source}: {where}: name and path must be non-empty")
        if entry.name in [o.name for o in out]:
            raise ConfigError(f"{source}: {where}.name: {entry.name!r} names two sources")
        out.append(entry)
    return out


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The effective run config of ``path`` with ``overrides`` (``section.key=value``) applied."""
    document = read_document(path, overrides)
    source = str(path)
    train = document.get("train") or {}
    for key in [k for k in train if k.startswith("fp8")]:  # run dirs written before parallel: existed
        document.setdefault("parallel", {}).setdefault(key, train.pop(key))
    unknown = set(document) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: {sorted(unknown)[0]}: unknown section (expected {', '.join(SECTIONS)})")
    if "model" not in document:
        raise ConfigError(f"{source}: expected a top-level 'model:' section")
    data = dict(document.get("data") or {})
    sources = data.pop("sources", None)
    run = RunConfig(
        model=ModelConfig.from_dict(document["model"], source=source),
        data=build(DataConfig, data, "data", source, sources=_sources(sources, source)),
        train=build(TrainConfig, document.get("train") or {}, "train", source),
        parallel=build(ParallelConfig, document.get("parallel") or {}, "parallel", source),
        source=source,
    )
    _validate(run)
    return run

