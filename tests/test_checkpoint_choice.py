"""Which checkpoint a resume picks: the newest not after ``latest`` whose files all have their saved
sizes; damaged ones are named and passed over, ``--resume-from`` must name a sound one."""

from __future__ import annotations

import json

import pytest

from launch.checkpointing.checkpointer import MANIFEST, Checkpointer, CheckpointError, verify


def _saved(directory, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    (directory / MANIFEST).write_text(json.dumps({name: len(content) for name, content in files.items()}))


def test_damaged_and_deleted_checkpoints_are_passed_over(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    _saved(checkpoints / "step00000002", {"__0_0.distcp": b"x" * 100, "train_state.json": b"{}"})
    _saved(checkpoints / "step00000004", {"__0_0.distcp": b"x" * 100, "train_state.json": b"{}"})
    _saved(checkpoints / "step00000008", {"__0_0.distcp": b"x" * 100, "train_state.json": b"{}"})  # after latest
    (checkpoints / "step00000004" / "__0_0.distcp").write_bytes(b"x" * 10)  # truncated
    (checkpoints / "latest").write_text("step00000006")  # its directory was deleted
    tag, skipped = Checkpointer(tmp_path).choose()
    assert tag == "step00000002"
    assert "step00000006: no such checkpoint directory" in skipped[0]
    assert "step00000004/__0_0.distcp: 10 bytes, saved with 100" in skipped[1]
    with pytest.raises(CheckpointError, match="__0_0.distcp: 10 bytes"):
        Checkpointer(tmp_path).choose("step00000004")
    (checkpoints / "step00000002" / "train_state.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        Checkpointer(tmp_path).choose()
    with pytest.raises(CheckpointError, match="train_state.json: missing"):
        verify(checkpoints / "step00000002")
    with pytest.raises(CheckpointError, match="files.json missing"):
        verify(tmp_path)


def test_convert_refuses_an_existing_output_before_reading_anything(tmp_path, capsys):
    from launch.convert import main as convert

    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert convert([str(tmp_path / "no-such-run"), str(out)]) == 2  # the output is checked first
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export: exists and is not empty" in err[0]
