"""Long runs on clusters (issue 29), through the launcher on 2 gloo ranks with expert parallelism: a
kill -9 during an asynchronous save, a second launch into a locked run dir, SIGTERM on one rank,
``--resume auto`` twice -- and the losses (loss spikes skipped included) of the uninterrupted run,
bit for bit; a rank frozen with SIGSTOP; a save that fails (file-size limit) or misses its grace.
Everything that trains is slow (``embedded_run``). Also the pieces alone: a skipped optimizer step leaves weights and moments as they were, and the
end-of-step all-reduce names the slowest rank and spreads a signal."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import threading
import time

import pytest
import torch

from launch.checkpointing.checkpointer import verify
from launch.config.run_config import SpikeConfig
from launch.training.spikes import SpikeGuard

from .distributed import spawn
from .launcher import launch, metrics, ok, rank_process, start

# The command a scheduler would requeue unchanged: asynchronous saves every step (the newest 3 kept),
# loss spikes skipped (grad norm above 1.1 x the median of 3 steps: a few of the first 10 steps).
ONE_RANK = ("--steps", "10", "--save-interval", "1", "--resume", "auto", "--set", "train.async_save=true",
            "--set", "train.keep_checkpoints=3", "--set", "train.spike.window=3", "--set", "train.spike.factor=1.1",
            "--set", "train.wandb_mode=disabled")
SAME = (*ONE_RANK, "--ep", "2")


class Running:
    """A started launch whose merged output a thread reads as it comes."""

    def __init__(self, process):
        self.process, self.lines = process, []
        self.reader = threading.Thread(target=lambda: self.lines.extend(process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((m for m in map(re.compile(pattern).match, list(self.lines)) if m), None)
            if found:
                return found
            assert self.process.poll() is None, "".join(self.lines[-40:])
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}")

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        return code, "".join(self.lines)


def _files(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text()


@pytest.fixture(scope="module")
def chain(embedded_run, tmp_path_factory):
    """The uninterrupted run, and the same run killed (-9) during an asynchronous save, resumed with
    ``--resume auto``, frozen while a second launch is refused, stopped by SIGTERM on rank 1, and
    resumed again to the end."""
    data, root = embedded_run[1], tmp_path_factory.mktemp("long_runs")
    reference, run_dir = root / "reference", root / "run"
    ok(launch(2, reference, *SAME, "--save-interval", "100", "--set", "train.async_save=false", data=data))
    out = {"reference": metrics(reference), "run_dir": run_dir, "data": data}

    first = Running(start(2, run_dir, *SAME, data=data))  # 1: killed during an asynchronous save
    checkpoints, partial = run_dir / "checkpoints", []
    while first.process.poll() is None:
        partial = [n for n in (os.listdir(checkpoints) if checkpoints.is_dir() else [])
                   if re.fullmatch(r"\.step0000000([3-9])\.partial", n)]
        if partial:
            os.killpg(first.process.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    out["killed"] = {"code": first.finish()[0], "partial": partial, "latest": _latest(run_dir),
                     "output": "".join(first.lines)}

    second = Running(start(2, run_dir, *SAME, data=data))  # 2: resumed, frozen, refused, SIGTERM
    second.wait_for(r"resumed .* from step")
    step = int(second.wait_for(r"step (\d+) \|")[1])
    holder = rank_process(second.process, 0).pid
    os.killpg(second.process.pid, signal.SIGSTOP)
    before = _files(run_dir)
    out["refused"] = launch(1, run_dir, *ONE_RANK, data=data)
    out["untouched"], out["holder"] = _files(run_dir) == before, holder
    os.killpg(second.process.pid, signal.SIGCONT)
    rank_process(second.process, 1).send_signal(signal.SIGTERM)
    code, text = second.finish()
    out["preempted"] = {"code": code, "output": text, "first_step": step, "latest": _latest(run_dir),
                        "logged": [r["step"] for r in metrics(run_dir)]}

    out["resumed"] = ok(launch(2, run_dir, *SAME, data=data))  # 3: the same command again
    out["records"] = metrics(run_dir)
    return out


def test_a_kill_during_an_asynchronous_save_leaves_the_previous_checkpoint(chain):
    killed = chain["killed"]
    assert killed["code"] == -signal.SIGKILL and killed["partial"], killed["output"][-3000:]
    assert "holds no checkpoint; starting afresh" in killed["output"]
    saving = int(killed["partial"][0][5:13])
    assert killed["latest"] < f"step{saving:08d}"  # the pointer never moved to the save in flight
    preempted = chain["preempted"]["output"]
    assert re.search(r"note: took over the lock of pid \d+ on host .*: that process is gone", preempted)
    assert f"from {killed['latest']}" in preempted  # resumed from the newest committed checkpoint


def test_a_second_launch_into_a_locked_run_dir_is_refused(chain):
    refused = chain["refused"]
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = next(line for line in refused.stderr.splitlines() if line.startswith("error:"))
    assert f"--run-dir {chain['run_dir']}: in use by pid {chain['holder']} on host" in line
    assert chain["untouched"]


def test_sigterm_saves_the_step_and_resume_auto_gives_the_uninterrupted_losses(chain):
    preempted = chain["preempted"]
    assert preempted["code"] == 0, preempted["output"][-3000:]
    saved = preempted["logged"][-1]
    assert saved >= preempted["first_step"] and preempted["latest"] == f"step{saved:08d}"
    assert "rank 1: SIGTERM received; saving at the end of this step" in preempted["output"]
    assert f"saved step {saved} on SIGTERM; rerun the same command with --resume auto" in preempted["output"]
    assert f"from step{saved:08d}" in chain["resumed"].stdout
    records, reference = chain["records"], chain["reference"]
    assert [r["step"] for r in records] == list(range(1, 11))
    for ours, theirs in zip(records, reference, strict=True):  # same layout, same sums: bit for bit
        for key in ("loss", "grad_norm", "skipped", "skipped_steps", "tokens", "lr"):
            assert ours[key] == theirs[key], (ours["step"], key, ours[key], theirs[key])
    skipped = [r["step"] for r in reference if r["skipped"]]
    assert skipped and any(step > saved for step in skipped), skipped  # judged after the resume too
    assert all(r["rank_step_seconds_max"] >= r["rank_step_seconds_min"] > 0 and r["slowest_rank"] in (0, 1)
               for r in records)
    kept = sorted(p.name for p in (chain["run_dir"] / "checkpoints").iterdir())
    assert kept == ["latest", "step00000008", "step00000009", "step00000010"]


def test_a_frozen_rank_ends_the_job_with_the_stacks(chain, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(chain["run_dir"], run_dir)
    running = Running(start(2, run_dir, *SAME, "--steps", "40", "--set", "train.hang_timeout_s=15",
                            data=chain["data"]))
    running.wait_for(r"step 11 \|")
    rank_process(running.process, 1).send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    code, text = running.finish()
    # the watchdog's 15 s, then DeepSpeed's launcher: SIGTERM to the ranks, SIGKILL 30 s later (rank 1 is stopped)
    assert code != 0 and time.monotonic() - stopped < 15 + 45, text[-3000:]
    line = next(line for line in text.splitlines() if line.startswith("error: rank 0: no progress for"))
    assert "(train.hang_timeout_s = 15)" in line and re.search(r"at step 1\d; every thread's stack", line)
    stacks = (run_dir / "hang-rank0.txt").read_text()
    assert "no progress" in stacks and "Thread 0x" in stacks and "launch/training/trainer.py" in stacks
    assert not (run_dir / "run.lock").exists()  # released for the requeued job


def test_a_failed_save_names_the_last_good_checkpoint(chain, tmp_path):
    """Files above 4 MB cannot be written (RLIMIT_FSIZE, inherited by the launcher and its ranks)."""
    run_dir = tmp_path / "run"
    shutil.copytree(chain["run_dir"], run_dir)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    result = launch(1, run_dir, *ONE_RANK, "--steps", "12", data=chain["data"],
                    preexec_fn=limit)
    assert result.returncode == 2, result.stderr[-3000:]
    line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert line == (f"error: saving checkpoint step00000011 failed (rank 0: [Errno 27] File too large); the last "
                    f"good checkpoint is {run_dir / 'checkpoints' / 'step00000010'}")
    assert _latest(run_dir) == "step00000010" and not list((run_dir / "checkpoints").glob(".*partial"))
    verify(run_dir / "checkpoints" / "step00000010")


def test_a_save_past_its_grace_leaves_the_last_checkpoint(chain, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(chain["run_dir"], run_dir)
    running = Running(start(1, run_dir, *ONE_RANK, "--steps", "40",
                            "--save-interval", "100", "--set", "train.async_save=false",
                            "--set", "train.preempt_grace_s=0.001", data=chain["data"]))
    running.wait_for(r"step 11 \|")
    rank_process(running.process, 0).send_signal(signal.SIGTERM)
    code, text = running.finish()
    assert code == 5, text[-3000:]
    assert re.search(r"error: the save of step000000\d\d did not finish within train.preempt_grace_s = 0.001 s; the "
                     rf"last good checkpoint {re.escape(str(run_dir / 'checkpoints' / 'step00000010'))} is untouched",
                     text)
    assert _latest(run_dir) == "step00000010"
    verify(run_dir / "checkpoints" / "step00000010")


def test_loss_spikes_are_judged_against_the_median_of_the_window():
    guard = SpikeGuard(SpikeConfig(window=3, factor=2.0))
    for loss in (9.0, 1.0, 1.2):
        assert guard.judge(loss, 1.0) is None  # nothing judged before 3 steps
        guard.add(loss, 1.0)
    assert guard.judge(2.3, 1.0) is None and "loss 2.5 > 2 x 1.2" in guard.judge(2.5, 1.0)
    assert "grad_norm 2.1 > 2 x 1" in guard.judge(1.0, 2.1)
    restored = SpikeGuard(SpikeConfig(window=3, factor=2.0))
    restored.load_state_dict(guard.state_dict())
    for value in (2.5, 3.0, 3.0):  # a lasting shift becomes the median: spikes no more
        assert restored.judge(value, 1.0) == guard.judge(value, 1.0)
        restored.add(value, 1.0)
        guard.add(value, 1.0)
    assert guard.judge(3.1, 1.0) is None


def _skip(rank: int, world: int, root: str, data: dict, results) -> None:
    from pathlib import Path

    from launch.config.run_config import load_run_config
    from launch.config.schedules import batch_size
    from launch.distributed import ds_internals
    from launch.training.trainer import RunOptions, Trainer

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    run = load_run_config("configs/tiny.yaml", [f"data.dataset={data['dataset']}", f"data.tokenizer={data['tokenizer']}",
                                                "data.builtin_corpus=false", "train.wandb_mode=disabled",
                                                "data.validation={}", "train.async_save=true"])
    trainer = Trainer(run, RunOptions(Path(root) / "run", steps=3), torch.device("cpu"))
    trainer.train_step()

    def state() -> dict:
        shares = ds_internals.zero_fragments(trainer.engine)
        return {"adam_step": ds_internals.adam_step(trainer.engine),
                **{f"{key}/{name}": value.clone() for name, _, _, states in shares for key, value in states.items()},
                **{f"weights/{name}": p.detach().clone() for name, p in trainer.module.named_parameters()}}

    batch = batch_size(run.train.batch, trainer.tokens, trainer.grid)
    for decision in (True, False):
        trainer.forward_backward(batch, 0.3)
        before = state()
        applied = ds_internals.gated_step(trainer.engine, lambda norm, decision=decision: decision and norm > 0)
        after = state()
        results[decision] = {"applied": applied, "grads": [p.grad is None for p in trainer.module.parameters()],
                             "unchanged": [k for k in before if k != "adam_step" and torch.equal(before[k], after[k])],
                             "adam_steps": (before["adam_step"], after["adam_step"]), "keys": len(before) - 1}
    trainer.save()  # asynchronous: from the host staging copy the planner counts
    trainer.checkpointer.wait()
    from launch.planning.estimate import estimate

    results["staging"] = (sum(t.numel() * t.element_size() for t in trainer.checkpointer.staging.values()),
                          estimate(run, 1, "cpu", 80)["save_staging_host_bytes_per_rank"])
    trainer.close()


def test_a_skipped_step_leaves_weights_and_moments_as_they_were(embedded_run, tmp_path):
    """ZeRO's skipped-step path: after a skip every master weight, moment and model weight is
    bitwise what it was, Adam's step count too, and the reduced gradients are gone; the next step
    applies normally. And an asynchronous save's host staging copy is what launch.plan counts."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    spawn(_skip, 1, str(tmp_path), embedded_run[1], results)
    skipped, applied = results[True], results[False]
    assert not skipped["applied"] and all(skipped["grads"])
    assert len(skipped["unchanged"]) == skipped["keys"] and skipped["adam_steps"] == (1.0, 1.0)
    assert applied["applied"] and applied["adam_steps"] == (1.0, 2.0)
    assert not [k for k in applied["unchanged"] if k.startswith(("model/", "exp_avg"))]
    staged, planned = results["staging"]
    assert staged == planned > 0


def _step_end(rank: int, world: int, results) -> None:
    from launch.training.stragglers import step_end

    results[rank] = step_end(0.5 if rank == 1 else 0.2, signal.SIGUSR1 if rank == 0 else 0, torch.device("cpu"))


@pytest.mark.slow
def test_the_end_of_step_all_reduce_names_the_slowest_rank_and_spreads_a_signal():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    spawn(_step_end, 3, results)
    for rank in range(3):
        ranks, received = results[rank]
        assert ranks == {"rank_step_seconds_max": 0.5, "rank_step_seconds_min": 0.2, "slowest_rank": 1}
        assert received == signal.SIGUSR1
