import numpy as np
import pytest

from data_pipeline.packing import best_fit_decreasing, concatenate


def _check_valid(packing, lengths, seq_len):
    # Every token of every document is placed exactly once, inside the window, without overlap.
    covered = np.zeros(lengths.sum(), dtype=int)
    doc_start = np.cumsum(lengths) - lengths
    for d, off, n in zip(packing.document, packing.doc_offset, packing.length):
        covered[doc_start[d] + off : doc_start[d] + off + n] += 1
    assert (covered == 1).all()
    end = packing.start + packing.length
    assert end.max() <= seq_len
    for s in range(packing.num_sequences):
        rows = packing.sequence == s
        starts, ends = packing.start[rows], end[rows]
        assert (starts[1:] == ends[:-1]).all() and starts[0] == 0  # contiguous from 0, no gaps


def _reference_best_fit_bins(lengths, seq_len):
    pieces = []
    for n in lengths:
        pieces += [seq_len] * (n // seq_len) + ([n % seq_len] if n % seq_len else [])
    free = []
    for size in sorted(pieces, reverse=True):
        fits = [i for i, f in enumerate(free) if f >= size]
        if fits:
            best = min(fits, key=lambda i: free[i])
            free[best] -= size
        else:
            free.append(seq_len - size)
    return len(free)


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_matches_a_brute_force_best_fit(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=200)
    packing = best_fit_decreasing(lengths, 128)
    _check_valid(packing, lengths, 128)
    assert packing.num_sequences == _reference_best_fit_bins(lengths, 128)


def test_best_fit_cuts_only_documents_longer_than_the_window():
    lengths = np.array([100, 64, 64, 130, 28, 36, 257])
    packing = best_fit_decreasing(lengths, 128)
    _check_valid(packing, lengths, 128)
    pieces_per_doc = np.bincount(packing.document, minlength=len(lengths))
    assert pieces_per_doc.tolist() == [1, 1, 1, 2, 1, 1, 3]
    assert packing.truncated_documents == 2


def test_concatenate_cuts_anywhere():
    lengths = np.array([100, 64, 64, 130, 28])
    packing = concatenate(lengths, 128)
    _check_valid(packing, lengths, 128)
    assert packing.num_sequences == 4  # ceil(386 / 128)
    assert packing.truncated_documents == 3  # documents 1, 3 and 4 cross a multiple of 128
