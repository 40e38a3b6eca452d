"""Weighted mixtures of prepared sources (issue 18; report 4.1's tuned mixture of domains).

``MixtureDataset`` puts the sources' sequences (each source one or more prepared directories)
into one index space, source after source. ``MixtureSampler`` reads one global stream, as
``PackedSampler`` does: position n of the stream comes from the source the period pattern names
at n mod P, and is that source's next sequence in its own epoch order (a permutation of the
source drawn from (seed, source name, epoch)); a source's epoch e + 1 starts only once all its
sequences were read in epoch e. The pattern spreads each source's share q_s = round(P w_s) of
the P = 65536 positions evenly (position k of source s at time (k + 1/2) / q_s, all sorted), so
any window of m positions holds m q_s / P sequences of s to within one or two, and the shares
equal the normalised weights to within 1/P.

Everything is a closed function of the stream position: a step takes the next global batch and
data-parallel rank r of D reads its contiguous r-th share, so the only state is the sequences
consumed, and a checkpoint resumes exactly at any data-parallel size. The sequences and epochs
each source has given are computed from it too (``statistics``). A resume checks that the stream
is the saved one: the sources' names, sizes, weights (normalised) and content (``fingerprint``).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .dataset import DatasetError, PackedDataset
from .sampler import GlobalStream, PackedSampler, check_content

PERIOD = 1 << 16


@dataclass
class Source:
    name: str
    weight: float
    datasets: list[PackedDataset]


def fingerprint(datasets: list[PackedDataset]) -> str | None:
    """A source's content: its directories' ``content_sha256`` hashed in order (None when a directory
    was prepared before manifests kept one)."""
    contents = [d.manifest.get("content_sha256") for d in datasets]
    if None in contents:
        return None
    return contents[0] if len(contents) == 1 else hashlib.sha256("".join(contents).encode()).hexdigest()


def _normalised(weights: list[float]) -> list[float]:
    return [w / sum(weights) for w in weights]


class MixtureDataset(torch.utils.data.Dataset):
    """``dataset[i]``: sequence i of the sources' concatenation; ``sizes[s]`` sequences of source s
    start at ``starts[s]``."""

    def __init__(self, sources: list[Source]):
        self.sources = sources
        self.parts = [dataset for source in sources for dataset in source.datasets]
        self.part_start = np.cumsum([0] + [len(d) for d in self.parts])
        self.sizes = [sum(len(d) for d in source.datasets) for source in sources]
        self.starts = np.cumsum([0] + self.sizes)[:-1].tolist()
        self.seq_len = self.parts[0].seq_len

    def __len__(self) -> int:
        return int(self.part_start[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} sequences")
        part = int(np.searchsorted(self.part_start, index, side="right")) - 1
        return self.parts[part][index - int(self.part_start[part])]


def period_pattern(weights: list[float], period: int = PERIOD) -> tuple[np.ndarray, np.ndarray]:
    """(source of each of the ``period`` positions, the per-source quota q_s); every source gets >= 1."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights) * period
    quota = np.maximum(1, np.floor(share)).astype(np.int64)
    while quota.sum() < period:  # largest remainders first
        quota[np.argmax(share - quota)] += 1
    while quota.sum() > period:
        quota[np.argmax(np.where(quota > 1, quota - share, -np.inf))] -= 1
    source = np.repeat(np.arange(len(quota)), quota)
    time = (np.arange(period) - np.repeat(np.cumsum(quota) - quota, quota) + 0.5) / quota[source]
    return source[np.lexsort((source, time))], quota


class MixtureSampler(GlobalStream):
    """The ``PackedSampler`` interface over a ``MixtureDataset``'s weighted sources."""

    def __init__(self, dataset: MixtureDataset, rank: int = 0, world_size: int = 1, seed: int = 0):
        super().__init__(rank, world_size)
        self.names = [source.name for source in dataset.sources]
        self.weights = [float(source.weight) for source in dataset.sources]
        self.sizes, self.starts, self.seq_len = dataset.sizes, dataset.starts, dataset.seq_len
        self.fingerprints = [fingerprint(source.datasets) for source in dataset.sources]
        self.seed = seed
        self.pattern, self.quota = period_pattern(self.weights)
        counts = np.zeros(len(self.quota), dtype=np.int64)
        self.rank_in_period = np.empty(PERIOD, dtype=np.int64)  # how many earlier positions share the source
        for position, source in enumerate(self.pattern.tolist()):
            self.rank_in_period[position] = counts[source]
            counts[source] += 1
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def _order(self, source: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            key = [self.seed, zlib.crc32(self.names[source].encode()), epoch]
            cached = self._orders[source] = (epoch, np.random.default_rng(key).permutation(self.sizes[source]))
        return cached[1]

    def global_indices(self, start: int, count: int) -> list[int]:
        """Dataset indices of stream positions ``start .. start + count - 1``."""
        out = []
        for position in range(start, start + count):
            period, offset = divmod(position, PERIOD)
            source = int(self.pattern[offset])
            drawn = period * int(self.quota[source]) + int(self.rank_in_period[offset])  # earlier draws of it
            epoch, within = divmod(drawn, self.sizes[source])
            out.append(self.starts[source] + int(self._order(source, epoch)[within]))
        return out

    def drawn(self, consumed: int | None = None) -> np.ndarray:
        """Sequences each source has given in the first ``consumed`` positions (default: so far)."""
        consumed = self.consumed if consumed is None else consumed
        period, offset = divmod(consumed, PERIOD)
        return period * self.quota + np.bincount(self.pattern[:offset], minlength=len(self.quota))

    def statistics(self) -> dict:
        """Tokens (sequences x L, as the run counts them) and the epoch each source is in."""
        drawn = self.drawn()
        return {"source_tokens": {n: int(d) * self.seq_len for n, d in zip(self.names, drawn)},
                "source_epochs": {n: int(d) // size for n, d, size in zip(self.names, drawn, self.sizes)}}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed,
                "sources": [[n, w, s] for n, w, s in zip(self.names, self.weights, self.sizes)],
                "fingerprints": self.fingerprints}

    def load_state_dict(self, state: dict) -> None:
        """The saved stream's position, if the stream is this one: same seed, source names and sizes,
        weights equal once normalised ([1, 1] is [0.5, 0.5]) and, where recorded, the same content."""
        mine = [[n, w, s] for n, w, s in zip(self.names, self.weights, self.sizes)]
        saved = state.get("sources")
        same = saved is not None and state.get("seed") == self.seed and \
            [[n, s] for n, _, s in saved] == [[n, s] for n, _, s in mine] and \
            all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(_normalised([w for _, w, _ in saved]),
                                                                  _normalised(self.weights)))
        if not same:
            saved = saved or f"one dataset of {state.get('num_samples')} sequences"
            raise DatasetError(f"the checkpoint's data stream was {saved} with seed {state.get('seed')}, this run's "
                               f"is {mine} with seed {self.seed}: a run resumes with the sources, weights and data "
                               "it started with")
        for name, before, now in zip(self.names, state.get("fingerprints") or [None] * len(mine), self.fingerprints):
            check_content(f"data source {name}", before, now)
        self.consumed = state["consumed"]


def sampler_for(dataset, rank: int = 0, world_size: int = 1, seed: int = 0):
    """A ``MixtureSampler`` for a mixture of several sources, else the plain ``PackedSampler``."""
    if isinstance(dataset, MixtureDataset) and len(dataset.sources) > 1:
        return MixtureSampler(dataset, rank=rank, world_size=world_size, seed=seed)
    content = fingerprint(dataset.parts) if isinstance(dataset, MixtureDataset) else None
    return PackedSampler(len(dataset), rank=rank, world_size=world_size, seed=seed, fingerprint=content)
