"""Which samples each data-parallel rank reads, in which order, resumably.

Each epoch is a permutation drawn from (seed, epoch); rank r takes every world_size-th index of
it (the tail that does not divide evenly is left out, so every rank sees the same count). The
position within the epoch is state: ``state_dict()`` in a checkpoint and ``load_state_dict()``
on resume give exactly the samples an uninterrupted run would have read next.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class PackedSampler:
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot feed {world_size} data-parallel ranks")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0

    @property
    def per_rank(self) -> int:
        return self.num_samples // self.world_size

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle \
            else np.arange(self.num_samples)
        return order[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        """Endless: continues from the saved position, then runs epoch after epoch."""
        while True:
            indices = self.epoch_indices(self.epoch)
            while self.position < len(indices):
                index = int(indices[self.position])
                self.position += 1
                yield index
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_samples"], state["world_size"], state["seed"]) != (self.num_samples, self.world_size, self.seed):
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples over {state['world_size']} ranks with seed "
                f"{state['seed']}, not {self.num_samples} over {self.world_size} with seed {self.seed}"
            )
        self.epoch, self.position = state["epoch"], state["position"]
