"""Memory a rank uses, as the trainer reports it: allocated GPU memory on a GPU, resident memory
(RSS) on a CPU. ``peak_mb`` is the process's peak so far; ``Increase`` measures what one phase
(a checkpoint save or load) adds on top of what the rank held when it began."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
import torch.distributed as dist

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def largest(value: float, device: torch.device) -> float:
    """The maximum over all ranks."""
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Increase:
    """``with Increase(device) as phase: ...`` then ``phase.mb``: the phase's peak minus the memory
    held when it began (resets the GPU allocator's or the kernel's peak counter, Linux's
    ``clear_refs``; ``None`` where neither is available)."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, None

    def __enter__(self) -> Increase:
        if self.device.type == "cuda":
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                self.start = _status_mb("VmRSS")
                _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
            except (OSError, KeyError):
                self.start = None
        return self

    def __exit__(self, *exc) -> None:
        if self.start is None:
            return
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else _status_mb("VmHWM")
        self.mb = max(0.0, peak - self.start)


class SavedActivations:
    """``with SavedActivations(model) as saved: loss = model(...)`` then ``saved.bytes()``: the bytes
    of the tensors autograd keeps for backward, counted once per storage, parameters excluded,
    measured when called (a storage freed after the forward counts 0). Recomputation regions
    (``torch.utils.checkpoint``) save through their own hooks: what they keep is their inputs,
    which are counted. ``label`` (a module name or None) is charged for the tensors saved while set."""

    def __init__(self, model: torch.nn.Module):
        self.parameters = {p.untyped_storage()._cdata for p in model.parameters()}
        self.storages: dict[int, tuple[str | None, torch.UntypedStorage]] = {}
        self.label: str | None = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.parameters:  # the storage itself (held here, so never reused)
            self.storages.setdefault(storage._cdata, (self.label, storage))
        return tensor

    def __enter__(self) -> SavedActivations:
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    def bytes(self, label: str | None = ...) -> int:
        """All saved bytes, or those saved while ``label`` was set."""
        return sum(s.nbytes() for owner, s in self.storages.values() if label is ... or owner == label)
