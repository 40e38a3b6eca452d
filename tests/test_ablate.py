"""The ablation runner: study files, the launcher command, skip/resume, the comparison table."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.ablate import main as ablate
from launch.ablation.comparison import write_comparison
from launch.ablation.study import DONE, PRETRAIN, ROOT, command, load_study, run_variant, state
from plugins.errors import ConfigError, ProjectError
from plugins.model.config import ModelConfig

TINY = str(ROOT / "configs" / "tiny.yaml")


def write_study(path: Path, **fields) -> Path:
    study = {"config": TINY, "run_root": str(path.parent / "runs"), "steps": 3,
             "variants": [{"name": "a", "set": ["model.aux_loss_alpha=0.001"]}, {"name": "b"}], **fields}
    path.write_text(json.dumps(study))  # JSON is YAML
    return path


def test_a_study_file_is_read_with_its_defaults(tmp_path):
    study = load_study(write_study(tmp_path / "s.yaml", set=["train.seed=3"]))
    assert [v.name for v in study.variants] == ["a", "b"] and study.steps == 3 and study.launch is None
    assert study.overrides(study.variants[0]) == ["train.seed=3", "model.aux_loss_alpha=0.001"]
    assert study.run_dir(study.variants[1]) == tmp_path / "runs" / "b"


@pytest.mark.parametrize("fields, message", [
    ({"variants": []}, "variants: expected a non-empty list"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "variants[1].name: 'a' names two variants"),
    ({"variants": [{"name": "../x"}]}, "variants[0].name: '../x' is not a directory name"),
    ({"variants": [{"name": "a", "sets": ["x=1"]}]}, "variants[0].sets: unknown key"),
    ({"variants": [{"name": "a"}, {"name": "b", "set": ["train.nope=1"]}]},
     f"variants[1] (b): {TINY}: train.nope: unknown key"),
    ({"steps": 0}, "study.steps: expected a positive number of steps, got 0"),
    ({"steps": "many"}, "study.steps: expected an integer"),
    ({"config": "nowhere.yaml"}, "study.config: nowhere.yaml: no such config file"),
    ({"launch": "deepspeed"}, "study.launch: expected a non-empty list of strings"),
    ({"launch": ["nosuchlauncher", "--num_gpus", "2"]}, "study.launch: nosuchlauncher: no such command"),
    ({"runroot": "x"}, "study.runroot: unknown key"),
])
def test_a_bad_study_file_is_one_line_naming_the_file_and_field(tmp_path, capsys, fields, message):
    path = write_study(tmp_path / "s.yaml", **fields)
    assert ablate([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1, err


def test_a_missing_required_field_and_a_missing_file(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("config: x.yaml\nvariants: [{name: a}]\n")
    with pytest.raises(ConfigError, match=r"s.yaml: study.run_root: required$"):
        load_study(path)
    with pytest.raises(ConfigError, match="nope.yaml: no such study file"):
        load_study(tmp_path / "nope.yaml")


def test_the_launcher_command_of_a_variant(tmp_path):
    study = load_study(write_study(tmp_path / "s.yaml", set=["train.seed=3"]))
    argv, env = command(study, study.variants[0], resume=False)
    run_dir = str(tmp_path / "runs" / "a")
    assert argv == [sys.executable, str(PRETRAIN), "--config", TINY, "--run-dir", run_dir, "--steps", "3",
                    "--set", "train.seed=3", "--set", "model.aux_loss_alpha=0.001"]
    assert env == {"PYTHONPATH": env["PYTHONPATH"]} and env["PYTHONPATH"].split(":")[0] == str(ROOT)
    launched = dataclasses.replace(study, launch=["deepspeed", "--num_gpus", "8"], steps=None)
    argv, env = command(launched, study.variants[1], resume=True)
    assert argv == ["deepspeed", "--num_gpus", "8", str(PRETRAIN), "--config", TINY,
                    "--run-dir", str(tmp_path / "runs" / "b"), "--set", "train.seed=3", "--resume"]
    assert "RANK" not in env  # the launcher sets the rendezvous


FAKE_LAUNCHER = """
import pathlib, signal, sys, time
here = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (here.joinpath("terminated").write_text("yes"), sys.exit(143)))
here.joinpath("pid").write_text(str(__import__("os").getpid()))
time.sleep(120)
"""


def test_ctrl_c_stops_the_running_launcher_and_says_how_to_go_on(tmp_path):
    """SIGINT to ``launch.ablate`` while a variant runs: its launcher is sent SIGTERM (and exits), then
    one line naming the variant, exit 130, no traceback."""
    import os
    import signal
    import time

    fake = tmp_path / "fake_launcher.py"
    fake.write_text(FAKE_LAUNCHER)
    path = write_study(tmp_path / "s.yaml", launch=[sys.executable, str(fake), str(tmp_path)])
    # Ctrl-C as at a terminal: SIGINT at its default action, which Python turns into KeyboardInterrupt
    # (a suite started in the background of a script inherits SIGINT ignored, and Python keeps that)
    ablation = subprocess.Popen([sys.executable, "-m", "launch.ablate", str(path)], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "pid").is_file() and time.monotonic() < deadline and ablation.poll() is None:
        time.sleep(0.1)
    assert (tmp_path / "pid").is_file(), ablation.communicate()
    ablation.send_signal(signal.SIGINT)
    out, err = ablation.communicate(timeout=60)
    assert ablation.returncode == 130, err
    assert err.count("\n") == 1 and err.startswith("error: interrupted variant a (") and "Traceback" not in err, err
    assert "rerun the same command to go on" in err
    assert (tmp_path / "terminated").read_text() == "yes"
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid").read_text()), 0)


class FakeLauncher:
    """Records each command; "trains" by saving a checkpoint (its train state and the ``latest``
    pointer) at the command's --steps, or at step 1 for a variant that fails (exit 1) or is
    preempted (exit 0 after its save)."""

    def __init__(self, fail=(), preempt=()):
        self.calls, self.fail, self.preempt = [], set(fail), set(preempt)

    def __call__(self, argv, stdout, stderr, env):
        run_dir = Path(argv[argv.index("--run-dir") + 1])
        self.calls.append((run_dir.name, "--resume" in argv))
        step = 1 if run_dir.name in self.fail | self.preempt else int(argv[argv.index("--steps") + 1])
        tag = f"step{step:08d}"
        (run_dir / "checkpoints" / tag).mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / tag / "train_state.json").write_text(json.dumps({"step": step, "tokens": step * 8}))
        (run_dir / "checkpoints" / "latest").write_text(tag)
        return subprocess.CompletedProcess(argv, 1 if run_dir.name in self.fail else 0)


def test_finished_variants_are_skipped_and_half_done_ones_resume(tmp_path):
    study = load_study(write_study(tmp_path / "s.yaml"))
    a, b = study.variants
    launcher = FakeLauncher(fail={"b"})
    assert run_variant(study, a, launcher) == "ran"
    with pytest.raises(ProjectError, match=r"variant b: .* exited with 1; see .*runs/b/ablation.log"):
        run_variant(study, b, launcher)
    assert (state(study, a), state(study, b)) == ("done", "resume")  # b crashed after its first checkpoint
    launcher.fail.clear()
    assert run_variant(study, a, launcher) == "done before"
    assert run_variant(study, b, launcher) == "resumed"
    assert launcher.calls == [("a", False), ("b", False), ("b", True)]
    assert "$ " in (tmp_path / "runs" / "b" / "ablation.log").read_text()
    longer = dataclasses.replace(study, steps=5)  # the study asks for more: continue from the checkpoint
    assert state(longer, a) == "resume"
    shorter = dataclasses.replace(study, steps=2)
    with pytest.raises(ConfigError, match="study.steps: 2, but variant a already ran to step 3"):
        state(shorter, a)
    changed = dataclasses.replace(a, set=["model.aux_loss_alpha=0.1"])
    with pytest.raises(ConfigError, match=r"variant a: .* holds a run of config .* not \['model.aux_loss_alpha=0.1'\]"):
        state(study, changed)


def _write_run(run_dir: Path, losses, speeds, evals):
    run_dir.mkdir(parents=True)
    lines = [{"step": i + 1, "tokens": (i + 1) * 100, "loss": loss, "lm_loss": loss, "mtp_loss": 0.0,
              "tokens_per_s": speed, "maxvio_global": 1.0 / (i + 1)} for i, (loss, speed) in enumerate(zip(losses, speeds))]
    lines += evals
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _eval(step, web, code, maxvio, spec):
    return {"step": step, "tokens": step * 100, "val": {"web": {"loss": web, "bpb": web / 4, "tokens": 10},
                                                         "code": {"loss": code, "bpb": code / 4, "tokens": 10}},
            "maxvio_batch": maxvio, "maxvio_batch_per_block": [maxvio], "specialization": spec,
            "specialization_per_block": [spec],
            "domain_load": {"web": [[5, 1, 1, 1]], "code": [[1, 1, 1, 5]]}}


def test_the_comparison_table_reads_the_last_evaluation_and_the_train_records(tmp_path):
    _write_run(tmp_path / "x", [5.0, 4.0, 3.5], [100.0, 400.0, 600.0],
               [_eval(2, 4.5, 3.0, 0.9, 0.1), _eval(3, 4.25, 2.5, 0.5, 0.2)])
    _write_run(tmp_path / "y", [5.0, 4.5], [50.0, 300.0], [])
    written = write_comparison(tmp_path / "study", [("x", tmp_path / "x"), ("y", tmp_path / "y")])
    assert sorted(p.name for p in written) == ["comparison.json", "comparison.md", "maxvio.png", "specialization.png",
                                               "val_loss.png"]
    table = json.loads((tmp_path / "study" / "comparison.json").read_text())
    assert table["x"]["val"] == {"code": {"loss": 2.5, "bpb": 0.625}, "web": {"loss": 4.25, "bpb": 1.0625}}
    assert (table["x"]["maxvio_batch"], table["x"]["specialization"], table["x"]["eval_step"]) == (0.5, 0.2, 3)
    assert table["x"]["train_loss"] == 3.5 and table["x"]["tokens_per_s"] == 500.0  # steps 2-3: (400 + 600) / 2
    assert table["y"]["val"] == {} and table["y"]["maxvio_batch"] is None and table["y"]["tokens_per_s"] == 300.0
    md = (tmp_path / "study" / "comparison.md").read_text().splitlines()
    assert md[0] == "| metric | x | y |"
    assert "| val code loss | 2.5000 | — |" in md and "| val web BPB | 1.0625 | — |" in md
    assert "| MaxVio_batch | 0.5000 | — |" in md and "| final train loss | 3.5000 | 4.5000 |" in md
    assert "| tokens/s (mean) | 500 | 300 |" in md


@pytest.mark.skipif("balance" not in {f.name for f in dataclasses.fields(ModelConfig)},
                    reason="model.balance comes with the balance-strategy change")
def test_the_shipped_balance_study_is_valid():
    study = load_study(ROOT / "configs" / "ablations" / "balance.yaml")
    assert [v.name for v in study.variants] == ["aux_free", "seq_aux", "batch_aux", "none"]


def test_a_real_two_variant_study_runs_once_and_a_rerun_skips_both(embedded_run, tmp_path, capsys):
    """Through the real launcher (one plain process), 3 steps per variant, the variants differing by
    the balance loss's alpha; the rerun launches nothing."""
    data = embedded_run[1]
    path = write_study(tmp_path / "s.yaml", steps=3, set=[
        f"data.dataset={data['dataset']}", f"data.tokenizer={data['tokenizer']}", "data.builtin_corpus=false",
        *[f"data.validation.{name}={path}" for name, path in data["validation"].items()], "train.eval_sequences=8",
        "train.wandb_mode=disabled"], variants=[{"name": "small", "set": ["model.aux_loss_alpha=0.0001"]},
                                                {"name": "large", "set": ["model.aux_loss_alpha=0.1"]}])
    assert ablate([str(path)]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "variant small: ran" in out and "variant large: ran" in out
    runs = tmp_path / "runs"
    lines = {name: [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("small", "large")}
    records = {name: [r for r in rows if "loss" in r] for name, rows in lines.items()}
    assert [r["step"] for r in records["small"]] == [1, 2, 3] and (runs / "small" / DONE).is_file()
    assert records["large"][0]["aux_loss"] > 100 * records["small"][0]["aux_loss"]  # alpha 0.1 vs 1e-4
    table = json.loads((runs / "comparison.json").read_text())
    evaluated = [r for r in lines["small"] if "val" in r][-1]
    assert table["small"]["val"]["code"]["loss"] == evaluated["val"]["code"]["loss"]
    assert table["large"]["train_loss"] == records["large"][-1]["loss"] and table["small"]["steps"] == 3
    before = {name: (runs / name / "metrics.jsonl").stat().st_mtime_ns for name in ("small", "large")}
    assert ablate([str(path)]) == 0
    out = capsys.readouterr().out
    assert "variant small: done before" in out and "variant large: done before" in out
    assert before == {name: (runs / name / "metrics.jsonl").stat().st_mtime_ns for name in ("small", "large")}
