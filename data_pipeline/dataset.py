"""Reading a packed dataset directory: fixed-length samples with next-token labels and the
packed documents' boundaries (for MTP masking, report 2.2, and optional document masking)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from plugins.errors import ProjectError

from .layout import FORMAT_VERSION, MANIFEST, PIECES

IGNORE_INDEX = -100


class DatasetError(ProjectError):
    """A packed dataset that cannot serve this run; one line naming the file."""


class PackedDataset(torch.utils.data.Dataset):
    """``dataset[i]`` -> ``input_ids`` [L], ``labels`` [L] (``labels[t]`` = token t+1 of the
    sequence, -100 for the last real token and padding) and ``document_ids`` [L] (index of the
    packed piece each token belongs to, -1 for padding).

    ``tokenizer_fingerprint``: refuse a dataset built with another tokenizer than the run's.
    """

    def __init__(self, directory: str | Path, tokenizer_fingerprint: str | None = None):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise DatasetError(f"{manifest_path}: missing (build the dataset with `python -m data_pipeline.prepare`)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
            built_with = self.manifest["tokenizer"]["fingerprint"]
            self.seq_len = self.manifest["seq_len"]
        except (ValueError, KeyError, TypeError) as error:
            raise DatasetError(f"{manifest_path}: not a packed-dataset manifest ({error})") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{manifest_path}: format_version {self.manifest.get('format_version')} "
                               f"(this reader expects {FORMAT_VERSION}); rebuild the dataset")
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != built_with:
            raise DatasetError(f"{manifest_path}: built with tokenizer {built_with[:12]}… "
                               f"({self.manifest['tokenizer']['path']}), but this run uses {tokenizer_fingerprint[:12]}…")
        self.shards = [self._load(name, mmap_mode="r") for name in self.manifest["shards"]]
        self.shard_start = np.cumsum([0] + [len(s) for s in self.shards])
        pieces = self._load(PIECES)
        self._check(pieces)
        self.piece_start, self.piece_length = pieces[:, 1], pieces[:, 2]
        self.piece_ptr = np.searchsorted(pieces[:, 0], np.arange(len(self) + 1))

    def _load(self, name: str, mmap_mode: str | None = None) -> np.ndarray:
        try:
            return np.load(self.directory / name, mmap_mode=mmap_mode)
        except (OSError, ValueError, EOFError) as error:  # missing, truncated or not .npy
            raise DatasetError(f"{self.directory / name}: unreadable ({str(error).splitlines()[0][:160]}); "
                               "rebuild the dataset") from None

    def _check(self, pieces: np.ndarray) -> None:
        """The files agree with the manifest (a damaged or foreign file is an error before any work)."""
        for name, shard in zip(self.manifest["shards"], self.shards):
            if shard.ndim != 2 or shard.shape[1] != self.seq_len or shard.dtype.name != self.manifest["dtype"]:
                raise DatasetError(f"{self.directory / name}: holds {shard.dtype.name}{list(shard.shape)}, expected "
                                   f"{self.manifest['dtype']}[rows, {self.seq_len}] (manifest.json); rebuild the dataset")
        if len(self) != self.manifest["sequences"]:
            raise DatasetError(f"{self.directory}: {len(self)} sequences in the token files, "
                               f"{self.manifest['sequences']} in manifest.json; rebuild the dataset")
        if pieces.ndim != 2 or pieces.shape[1] != 5 or (pieces.size and not 0 <= pieces[:, 0].max() < len(self)):
            raise DatasetError(f"{self.directory / PIECES}: does not index these {len(self)} sequences; "
                               "rebuild the dataset")

    def __len__(self) -> int:
        return int(self.shard_start[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} sequences")
        shard = int(np.searchsorted(self.shard_start, index, side="right")) - 1
        ids = torch.from_numpy(self.shards[shard][index - self.shard_start[shard]].astype(np.int64))
        lo, hi = self.piece_ptr[index], self.piece_ptr[index + 1]
        lengths = self.piece_length[lo:hi]
        used = int(lengths.sum())
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        labels[: used - 1] = ids[1:used]
        document_ids = torch.full((self.seq_len,), -1, dtype=torch.long)
        document_ids[:used] = torch.from_numpy(np.repeat(np.arange(hi - lo), lengths))
        return {"input_ids": ids, "labels": labels, "document_ids": document_ids}
