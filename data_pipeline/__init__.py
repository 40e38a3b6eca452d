"""HF datasets in, packed fixed-length samples out (report 4.1): FIM, token splitting, best-fit packing."""

from .dataset import DatasetError, PackedDataset
from .sampler import PackedSampler

__all__ = ["DatasetError", "PackedDataset", "PackedSampler"]
