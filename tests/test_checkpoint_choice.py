"""Which checkpoint a resume picks: the newest not after ``latest`` whose files all have their saved
sizes; damaged ones are named and passed over, ``--resume-from`` must name a sound one."""

from __future__ import annotations

import hashlib
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


def _hashed(directory, files: dict[str, bytes]) -> None:
    """A checkpoint directory whose files.json records sizes and checksums, as saves write it."""
    directory.mkdir(parents=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    (directory / MANIFEST).write_text(json.dumps(
        {name: {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()} for name, content in files.items()}))


def test_same_size_damage_is_named_and_passed_over(tmp_path, capsys):
    """Garbage of the right size in a shard, the train state or an RNG file fails its checksum; the
    previous checkpoint is used; a damaged ``latest`` pointer falls back to the newest directory
    that verifies."""
    checkpoints = tmp_path / "checkpoints"
    files = {"__0_0.distcp": bytes(range(256)) * 4, "train_state.json": b'{"step": 2}', "rng_rank0.pt": b"r" * 64}
    for step in (2, 4, 6, 8):
        _hashed(checkpoints / f"step0000000{step}", files)
    (checkpoints / "latest").write_text("step00000008")
    damage = {"step00000008": "__0_0.distcp", "step00000006": "train_state.json", "step00000004": "rng_rank0.pt"}
    for tag, name in damage.items():
        path = checkpoints / tag / name
        path.write_bytes(b"\x00" * path.stat().st_size)  # same size, other bytes
    tag, skipped = Checkpointer(tmp_path).choose()
    assert tag == "step00000002"
    assert [line.split("/")[-2:] for line in skipped] == [[t, f"{n}: its bytes differ from those saved (sha256 "
                                                          "mismatch; the checkpoint is damaged)"]
                                                         for t, n in damage.items()]
    (checkpoints / "latest").write_bytes(b"\xff\xfe garbage")
    (checkpoints / "step00000008" / "__0_0.distcp").write_bytes(files["__0_0.distcp"])  # repaired
    tag, skipped = Checkpointer(tmp_path).choose()
    assert tag == "step00000008" and skipped == [f"{checkpoints / 'latest'}: damaged (it names no checkpoint)"]


def test_checksums_are_those_of_the_written_files(tmp_path):
    """What a save records while writing equals a fresh read of each file (DCP's files included)."""
    import torch

    from launch.checkpointing import dcp_pieces
    from launch.checkpointing.dcp_pieces import Piece
    from launch.checkpointing.digests import file_digest

    entries = dcp_pieces.save(tmp_path, [Piece("model/w", 1000, 0, torch.randn(1000))], {"buffers/b": torch.ones(3)})
    assert set(entries) == {p.name for p in tmp_path.iterdir()} == {".metadata", "__0_0.distcp"}
    for name, entry in entries.items():
        assert entry == {"bytes": (tmp_path / name).stat().st_size, "sha256": file_digest(tmp_path / name)}
