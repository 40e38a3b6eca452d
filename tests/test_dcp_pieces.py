"""Flat pieces through torch.distributed.checkpoint: saved by one split over ranks, read back by any
other split (DCP's resharding), compared with the global tensor they came from."""

from __future__ import annotations

import pytest
import torch

from launch.checkpointing import dcp_pieces
from launch.checkpointing.dcp_pieces import Piece, PieceError

from .distributed import spawn

GLOBAL = torch.arange(1000, dtype=torch.float32) * 0.5
SAVE_SPLIT = [(0, 130), (130, 1000)]  # two ranks, uneven, like ZeRO-1 fragments of one parameter


def _save(rank: int, world: int, directory: str) -> None:
    start, stop = SAVE_SPLIT[rank]
    buffer = {"buffers/bias": torch.full((4,), 7.0)}  # replicated on both ranks: written once
    dcp_pieces.save(directory, [Piece("model/w", 1000, start, GLOBAL[start:stop].clone())], buffer)


def _load(rank: int, world: int, directory: str, results) -> None:
    start, stop = [(0, 333), (333, 998), (998, 1000)][rank]
    piece = Piece("model/w", 1000, start, torch.zeros(stop - start))
    bias = torch.zeros(4)
    dcp_pieces.load(directory, [piece], {"buffers/bias": bias})
    results[rank] = (piece.tensor.clone(), bias.clone())


@pytest.mark.slow
def test_pieces_saved_by_two_ranks_read_back_by_three_and_by_one(tmp_path):
    spawn(_save, 2, str(tmp_path))
    assert dcp_pieces.stored_keys(tmp_path) == {"model/w": [1000], "buffers/bias": [4]}
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    spawn(_load, 3, str(tmp_path), results)
    torch.testing.assert_close(torch.cat([results[r][0] for r in range(3)]), GLOBAL, rtol=0, atol=0)
    assert all(torch.equal(results[r][1], torch.full((4,), 7.0)) for r in range(3))

    whole = Piece("model/w", 1000, 0, torch.zeros(1000))  # one process, no process group
    middle = Piece("model/w", 1000, 100, torch.zeros(50))
    dcp_pieces.load(tmp_path, [whole])
    dcp_pieces.load(tmp_path, [middle])
    assert torch.equal(whole.tensor, GLOBAL) and torch.equal(middle.tensor, GLOBAL[100:150])
    with pytest.raises(PieceError, match="holds no model/v"):
        dcp_pieces.load(tmp_path, [Piece("model/v", 1000, 0, torch.zeros(10))])
    with pytest.raises(PieceError, match="1000"):
        dcp_pieces.load(tmp_path, [Piece("model/w", 2000, 0, torch.zeros(10))])
