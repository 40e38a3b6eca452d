"""Counting the host reads of a piece of code: every ``Tensor.item``, ``tolist``, ``__bool__``,
``__float__``, ``__int__``, ``cpu`` and ``numpy`` call while a ``HostReads`` is entered, by call site
(the first frame outside torch). On a GPU each one waits for the device to finish the work queued
before it; on CPU the same calls are counted, so a CPU test can hold a training step to a budget."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
_TORCH = str(Path(torch.__file__).parent)


def _site(method: str) -> str:
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return f"{method} (torch internals)"
    path = frame.f_code.co_filename
    short = "/".join(Path(path).parts[-3:])
    return f"{method} {short}:{frame.f_lineno} {frame.f_code.co_name}"


class HostReads:
    """``with HostReads() as reads: ...`` then ``reads.sites``: Counter of call site -> reads."""

    def __init__(self):
        self.sites: Counter[str] = Counter()
        self.saved = {}

    def _wrap(self, method: str, original):
        sites = self.sites

        def counted(tensor, *args, **kwargs):
            sites[_site(method)] += 1
            return original(tensor, *args, **kwargs)

        return counted

    def __enter__(self) -> HostReads:
        for method in READS:
            self.saved[method] = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, self._wrap(method, self.saved[method]))
        return self

    def __exit__(self, *exc) -> None:
        for method, original in self.saved.items():
            setattr(torch.Tensor, method, original)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def table(self) -> str:
        return "\n".join(f"{count:4d}  {site}" for site, count in self.sites.most_common())
