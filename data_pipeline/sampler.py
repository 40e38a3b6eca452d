"""Which samples a step reads, in which order, resumably, whatever the data-parallel size.

The run reads one endless global stream: epoch e is a permutation of all samples drawn from
(seed, e), and the epochs follow each other. A step of G sequences takes the stream's next G;
data-parallel rank r of D reads the r-th contiguous G/D of them (its micro-batches in order). The
only state is how many sequences the run has consumed, a property of the global batch: a
checkpoint saved at one data-parallel size resumes at another with exactly the sequences the
uninterrupted run would have read next (and, at a fixed micro-batch size, the same micro-batches).
A resume refuses another dataset: another size, seed or, where recorded, content.
"""

from __future__ import annotations

import numpy as np

from .dataset import DatasetError


def check_content(what: str, saved: str | None, now: str | None) -> None:
    """The data a checkpoint read (its ``content_sha256``) is the data this run reads, where both are known."""
    if saved is not None and now is not None and saved != now:
        raise DatasetError(f"{what}: its data changed since the checkpoint was saved (content {saved[:12]}… then, "
                           f"{now[:12]}… now, though of the same size): a run resumes with the data it started with")


class GlobalStream:
    """What every sampler of the run shares: a global stream of dataset indices (``global_indices``,
    defined by the subclass), consumed a global batch at a time, this rank reading its share."""

    def __init__(self, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.consumed = 0

    def global_indices(self, start: int, count: int) -> list[int]:
        raise NotImplementedError

    def take(self, global_batch: int) -> list[int]:
        """The next step's ``global_batch`` sequences; returns this rank's contiguous share."""
        if global_batch % self.world_size:
            raise ValueError(f"a global batch of {global_batch} does not split over {self.world_size} ranks")
        share = global_batch // self.world_size
        indices = self.global_indices(self.consumed + self.rank * share, share)
        self.consumed += global_batch
        return indices


class PackedSampler(GlobalStream):
    """The stream of one dataset; ``fingerprint``: its content hash (``manifest.json``'s
    ``content_sha256``), kept in the state so that a resume can check it."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 fingerprint: str | None = None):
        super().__init__(rank, world_size)
        if num_samples < 1:
            raise ValueError("an empty dataset cannot feed a run")
        self.num_samples, self.seed, self.shuffle, self.fingerprint = num_samples, seed, shuffle, fingerprint
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every sample index once, in epoch ``epoch``'s reading order."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle \
                else np.arange(self.num_samples)
        return self._order

    def global_indices(self, start: int, count: int) -> list[int]:
        """Positions ``start .. start + count - 1`` of the global stream."""
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.num_samples)
            out.append(int(self.epoch_order(epoch)[offset]))
        return out

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_samples

    def statistics(self) -> dict:
        """Per-source counts for the step's metrics: none, for one dataset (``MixtureSampler`` has them)."""
        return {}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_samples": self.num_samples,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("num_samples"), state.get("seed")) != (self.num_samples, self.seed):
            saved = f"{state['num_samples']} sequences" if "num_samples" in state else \
                f"the mixture {state.get('sources')}"
            raise DatasetError(f"the checkpoint's data stream was {saved} with seed {state.get('seed')}, this run's is "
                               f"{self.num_samples} sequences with seed {self.seed}: a run resumes with the data it "
                               "started with")
        check_content("the dataset", state.get("fingerprint"), self.fingerprint)
        self.consumed = state["consumed"]
