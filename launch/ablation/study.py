"""A study file (``python -m launch.ablate``): variants of one base config, validated up front, each
run (or resumed) through the real launcher in ``RUN_ROOT/<name>``; a finished variant (its newest
checkpoint at the study's steps: a preempted one exits 0 short of them) is recorded and not run
again, and a run dir of another variant definition is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launch.checkpointing.checkpointer import Checkpointer, read_train_state
from launch.config.run_config import load_run_config
from plugins.atomic import write_text_atomic
from plugins.config_tree import build
from plugins.errors import ConfigError, ProjectError

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "launch" / "pretrain.py"
DONE, VARIANT = "ablation_done.json", "ablation_variant.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
STOP_GRACE_S = 60  # an interrupted variant's launcher gets this long after SIGTERM before SIGKILL


@dataclass
class Variant:
    name: str
    set: list[str] = field(default_factory=list)


@dataclass
class Study:
    config: str
    run_root: str
    variants: list[Variant]
    set: list[str] = field(default_factory=list)
    steps: int | None = None
    launch: list[str] | None = None
    source: str = ""

    def run_dir(self, variant: Variant) -> Path:
        return Path(self.run_root) / variant.name

    def overrides(self, variant: Variant) -> list[str]:
        return [*self.set, *variant.set]


def _variants(raw, source: str) -> list[Variant]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: variants: expected a non-empty list of {{name, set}} mappings, got {raw!r}")
    out: list[Variant] = []
    for index, item in enumerate(raw):
        where = f"variants[{index}]"
        variant = build(Variant, item, where, source)
        if not NAME.fullmatch(variant.name):
            raise ConfigError(f"{source}: {where}.name: {variant.name!r} is not a directory name (letters, digits, "
                              "_ . -)")
        if variant.name in [v.name for v in out]:
            raise ConfigError(f"{source}: {where}.name: {variant.name!r} names two variants")
        out.append(variant)
    return out


def load_study(path: str | Path) -> Study:
    """The study file, validated; every variant's effective config is loaded once (a bad override is
    one line naming the variant) before anything runs."""
    source = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"{source}: no such study file")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with config, run_root and variants")
    raw = dict(raw)
    study = build(Study, raw, "study", source, variants=_variants(raw.pop("variants", None), source), source=source)
    if study.steps is not None and study.steps < 1:
        raise ConfigError(f"{source}: study.steps: expected a positive number of steps, got {study.steps}")
    if not Path(study.config).is_file():
        raise ConfigError(f"{source}: study.config: {study.config}: no such config file")
    if study.launch and shutil.which(study.launch[0]) is None:
        raise ConfigError(f"{source}: study.launch: {study.launch[0]}: no such command (not an executable on PATH)")
    for index, variant in enumerate(study.variants):
        try:
            load_run_config(study.config, study.overrides(variant))
        except ConfigError as error:
            raise ConfigError(f"{source}: variants[{index}] ({variant.name}): {error}") from None
    return study


def command(study: Study, variant: Variant, resume: bool) -> tuple[list[str], dict[str, str]]:
    """The launcher command line of a variant and the environment it adds: under ``launch`` that
    launcher; without, one plain process (``launch/pretrain.py`` then runs as a world of one)."""
    args = [str(PRETRAIN), "--config", study.config, "--run-dir", str(study.run_dir(variant))]
    if study.steps is not None:
        args += ["--steps", str(study.steps)]
    for override in study.overrides(variant):
        args += ["--set", override]
    if resume:
        args.append("--resume")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return [*(study.launch or [sys.executable]), *args], env


def state(study: Study, variant: Variant) -> str:
    """``done``, ``resume`` (a checkpoint to continue from) or ``fresh``; a run dir of another variant
    definition or one that ran past the study's steps is an error."""
    run_dir = study.run_dir(variant)
    recorded = run_dir / VARIANT
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        now = {"config": study.config, "set": study.overrides(variant)}
        if before != now:
            raise ConfigError(f"{study.source}: variant {variant.name}: {run_dir} holds a run of config "
                              f"{before['config']} with --set {before['set']}, not {now['set']}; remove it or rename "
                              "the variant")
    done = run_dir / DONE
    if done.is_file():
        finished = json.loads(done.read_text())["steps"]
        if finished == study.steps:
            return "done"
        if study.steps is not None and finished is not None and finished > study.steps:
            raise ConfigError(f"{study.source}: study.steps: {study.steps}, but variant {variant.name} already ran "
                              f"to step {finished} ({run_dir}); remove it to run it again")
    return "resume" if Checkpointer(run_dir).has_checkpoint() else "fresh"


def reached(study: Study, variant: Variant) -> tuple[int, bool]:
    """The step of the variant's newest checkpoint, and whether its run ended there (the study's
    steps, else the config's ``train.total_tokens``) rather than being preempted."""
    checkpoints = Checkpointer(study.run_dir(variant))
    tag = checkpoints.latest_tag()
    if tag is None:
        return 0, False
    saved = read_train_state(checkpoints.directory / tag)
    if study.steps is not None:
        return saved["step"], saved["step"] >= study.steps
    return saved["step"], saved["tokens"] >= load_run_config(study.config, study.overrides(variant)).train.total_tokens


def run_child(argv: list[str], stdout, stderr, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``subprocess.run`` that stops the child when interrupted (Ctrl-C): SIGTERM to the ``deepspeed``
    command, which dies of it at once; its ranks, finding their launcher gone, save and exit, and
    this waits for them (so the run dir's lock is free when the interrupt goes on), up to
    ``STOP_GRACE_S`` or a second Ctrl-C, then SIGKILL to whatever is left of the tree."""
    import psutil

    child = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env)
    try:
        return subprocess.CompletedProcess(argv, child.wait())
    except BaseException:
        try:
            tree = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        child.terminate()
        try:
            _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE_S)
        except KeyboardInterrupt:
            alive = tree
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        child.wait()
        raise


def run_variant(study: Study, variant: Variant, runner: Callable = run_child) -> str:
    """Runs (or resumes) one variant unless it finished; returns what it did."""
    what = state(study, variant)
    if what == "done":
        return "done before"
    run_dir = study.run_dir(variant)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / VARIANT, json.dumps({"config": study.config, "set": study.overrides(variant)}))
    argv, env = command(study, variant, resume=what == "resume")
    log = run_dir / "ablation.log"
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(argv)}\n")
        handle.flush()
        result = runner(argv, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env})
    if result.returncode != 0:
        raise ProjectError(f"variant {variant.name}: {argv[0]} exited with {result.returncode}; see {log}")
    step, finished = reached(study, variant)
    if not finished:  # exit 0 short of the end: a preemption's save
        end = f"step {study.steps}" if study.steps is not None else "train.total_tokens"
        raise ProjectError(f"variant {variant.name}: stopped at step {step}, before {end} (preempted; its checkpoint is "
                           f"saved); rerun the same command to resume it; see {log}")
    write_text_atomic(run_dir / DONE, json.dumps({"steps": study.steps}))
    return "resumed" if what == "resume" else "ran"
