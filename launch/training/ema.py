"""Exponential moving average of the parameters in host memory (report 3.2.3): an early estimate
of the model after learning-rate decay, at no device memory and no step time.

Each rank keeps the EMA of exactly the FP32 master weights it owns (its ZeRO-1 partitions of the
stages and experts it holds), so the EMA is sharded like the optimizer state and checkpointed
beside it (``ema/NAME`` pieces of the same global tensors). After every optimizer step ``update``
hands the new master weights to a worker thread: on a GPU they are copied device -> pinned host
memory on a side stream (``non_blocking``), then ``ema = decay * ema + (1 - decay) * weights``
runs on the host while the next step's forward and backward run; on a CPU the copy and update
are the worker's too. ``wait`` (called before the next optimizer step changes the weights, and
before a checkpoint) joins the worker: it only blocks if one update outlasts a whole step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


class HostEMA:
    """``weights``: this rank's FP32 master-weight partitions (views the optimizer updates in place)."""

    def __init__(self, weights: dict[str, torch.Tensor], decay: float):
        self.weights, self.decay = weights, decay
        pinned = any(w.is_cuda for w in weights.values())
        self.shadow = {name: w.detach().to("cpu", copy=True) for name, w in weights.items()}
        self.staging = {name: torch.empty(w.shape, dtype=w.dtype, pin_memory=pinned) for name, w in weights.items()}
        self.stream = torch.cuda.Stream() if pinned else None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self.pending: Future | None = None

    def update(self) -> None:
        """Fold the weights just written by the optimizer step into the EMA, in the background."""
        self.wait()
        done = None
        if self.stream is not None:  # start the device -> host copies behind the optimizer step's kernels
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                for name, w in self.weights.items():
                    self.staging[name].copy_(w.detach(), non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
        self.pending = self.worker.submit(self._fold, done)

    def _fold(self, done) -> None:
        if done is not None:
            done.synchronize()
        for name, shadow in self.shadow.items():
            staged = self.staging[name] if done is not None else self.weights[name].detach()
            shadow.lerp_(staged, 1.0 - self.decay)

    def wait(self) -> None:
        """Block until the last update has read the weights and folded them in."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def reset_to_weights(self) -> None:
        """Start the average at the current weights (a run resumed without a stored EMA)."""
        self.wait()
        for name, shadow in self.shadow.items():
            shadow.copy_(self.weights[name].detach().cpu())

    def close(self) -> None:
        self.wait()
        self.worker.shutdown()
