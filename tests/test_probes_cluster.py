"""Issue 38 (part A), long runs on clusters: a lock file that is a link, a reused PID in a lock
record, a torn last line of metrics.jsonl, a full disk or read-only storage outside a save, a
preempted ablation variant, and signals to the ``deepspeed`` command (its runner) or during
validation."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from plugins.run_lock import DirectoryLock, LockedError

from .conftest import ROOT
from .test_cli_probes import hf_dir  # noqa: F401 (a fixture)


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, link):
    precious = tmp_path / "precious.txt"
    precious.write_text("years of notes\n")
    path = tmp_path / "run" / "run.lock"
    path.parent.mkdir()
    (os.symlink if link == "symbolic" else os.link)(precious, path)
    with pytest.raises(LockedError, match=rf"--run-dir run: its lock file {path} is a"):
        DirectoryLock(path, "--run-dir run").acquire()
    assert precious.read_text() == "years of notes\n"


def test_a_record_whose_pid_another_process_has_now_is_taken_over(tmp_path):
    """A requeue in a fresh container: the record names this host and a PID that is alive, but
    nobody holds the flock."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = tmp_path / "run.lock"
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": stranger.pid, "started": "2026-01-01"}))
        lock = DirectoryLock(path, "the directory")
        note = lock.acquire()
        assert f"took over the lock of pid {stranger.pid}" in note and "no longer holds it" in note
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        stranger.kill()
        stranger.wait()


def test_a_resume_drops_a_torn_last_line_of_metrics_jsonl(tmp_path, capsys):
    from launch.training.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    whole = [json.dumps({"step": step, "loss": 5.0 - step}) for step in (1, 2, 3)]
    path.write_text("\n".join(whole) + '\n{"step": 4, "lo')  # a crash (or a full disk) mid-write
    logger = MetricsLogger(tmp_path, {}, "disabled", "p", 100, resume_step=2)  # the checkpoint is at step 2
    logger.log({"step": 3, "loss": 1.5}, None)
    logger.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"note: {path}: dropped 1 line(s) that are not a whole record (a write cut short)"]


def test_a_full_disk_during_training_is_one_warning_and_the_run_goes_on(tmp_path, capsys):
    from launch.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, {}, "disabled", "p", 100, resume_step=None)
    logger.log({"step": 1, "loss": 2.0}, None)
    logger.file.close()
    logger.file = open("/dev/full", "a")  # noqa: SIM115 (every write: ENOSPC)
    for step in (2, 3):
        logger.log({"step": step, "loss": 1.0}, None)
    logger.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {tmp_path / 'metrics.jsonl'}: cannot write (No space left on device); steps from 2 are "
                   "not recorded there"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def _unwritable(monkeypatch, directory, number: int) -> None:
    """Writes into ``directory`` fail as on read-only storage or a full disk (tests run as root, whom
    file modes do not stop)."""
    from pathlib import Path

    write_text = Path.write_text

    def refuse(self, *args, **kwargs):
        if self.parent == directory:
            raise OSError(number, os.strerror(number), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refuse)


def test_evaluate_on_read_only_storage_prints_its_result_and_says_it_was_not_recorded(
        tmp_path, capfd, monkeypatch, hf_dir, tokenizer_dir):  # noqa: F811 (the fixture)
    import errno

    from launch.evaluate import main

    data = tmp_path / "ok.jsonl"
    data.write_text('{"text": "hello world, hello again"}\n')
    out = tmp_path / "ro" / "eval.json"
    out.parent.mkdir()
    _unwritable(monkeypatch, out.parent, errno.EROFS)
    code = main(["--model", str(hf_dir), "--tokenizer", str(tokenizer_dir), "--data", str(data), "--output", str(out)])
    printed, err = capfd.readouterr()
    assert code == 2 and json.loads(printed)["tokens"] > 0
    assert err.strip().splitlines() == [f"error: could not record the result in {out} (Read-only file system); "
                                        "it is printed above"]
    assert not list(out.parent.iterdir())


@pytest.mark.slow
def test_a_full_disk_writing_config_yaml_is_one_line(tmp_path, capfd, monkeypatch):
    import errno

    from launch.pretrain import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # the one-process rendezvous main sets is undone after the test
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "run"
    _unwritable(monkeypatch, run_dir, errno.ENOSPC)
    code = main(["--config", "configs/tiny.yaml", "--run-dir", str(run_dir), "--steps", "1",
                 "--set", "train.wandb_mode=disabled"])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --run-dir {run_dir}: cannot write config.yaml (No space left on device)"], err
    assert not run_dir.exists()  # the run created it and wrote nothing: removed with its lock


def test_a_preempted_ablation_variant_is_not_done_and_resumes_on_the_rerun(tmp_path):
    """Its launcher exits 0 after the preemption's save, short of the study's steps."""
    from launch.ablation.study import DONE, load_study, run_variant, state
    from plugins.errors import ProjectError

    from .test_ablate import FakeLauncher, write_study

    study = load_study(write_study(tmp_path / "s.yaml"))
    a = study.variants[0]
    launcher = FakeLauncher(preempt={"a"})
    with pytest.raises(ProjectError, match=r"variant a: stopped at step 1, before step 3 \(preempted; its checkpoint "
                       r"is saved\); rerun the same command to resume it"):
        run_variant(study, a, launcher)
    assert not (study.run_dir(a) / DONE).exists() and state(study, a) == "resume"
    launcher.preempt.clear()
    assert run_variant(study, a, launcher) == "resumed" and state(study, a) == "done"


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_command_during_validation_saves_at_once_and_frees_the_run_dir(tmp_path):
    """``kill -TERM`` of the ``deepspeed`` command (its runner dies, passing nothing on) right as a
    validation starts: the rank notices its launcher is gone at the next validation micro-batch,
    stops validating (not recorded), saves that step and exits, releasing run.lock, well within
    SLURM's default KillWait of 30 s."""
    import signal
    import time

    import psutil

    from .launcher import eval_records, rank_process, start
    from .test_long_runs import Running

    run_dir = tmp_path / "run"
    running = Running(start(1, run_dir, "--steps", "9", "--resume", "auto", "--set", "train.eval_interval=2",
                            "--set", "train.eval_sequences=256", "--set", "train.wandb_mode=disabled"))
    running.wait_for(r"step 2 \|")  # printed as the validation of step 2 begins
    rank = rank_process(running.process, 0)
    running.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code, out = running.finish()
    assert code == -signal.SIGTERM  # the runner died at once: the launcher below it and the rank went on
    assert psutil.wait_procs([rank], timeout=30)[0], out[-3000:]
    assert time.monotonic() - signalled < 30, out[-3000:]
    assert re.search(r"rank 0: its launcher \(pid \d+\) is gone; saving at the end of this step", out), out[-3000:]
    assert "validation at step 2 stopped on its launcher's exit; not recorded" in out
    assert "saved step 2 on its launcher's exit; rerun the same command with --resume auto" in out
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"
    assert not eval_records(run_dir) and not (run_dir / "run.lock").exists()
