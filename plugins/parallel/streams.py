"""Where a pipeline op's work is issued (report 3.2.1, Figure 4: the overlapped forward and backward).

The runtime (``plugins.parallel.pipeline_runtime``) runs each op through an overlap policy:
``run(chunk, fn)`` for an F, B, I or W op and ``pair((chunk, forward), (chunk, backward))`` for an FB op.

- ``ThreadOverlap`` (CPU): one op at a time, an FB's backward on a second Python thread beside its
  forward, so gloo's blocking all-to-alls of one chunk overlap the other chunk's compute.
- ``StreamOverlap`` (CUDA): no second thread. Chunk c's work is issued on stream c from this thread:
  autograd runs a backward op on the stream of its forward op, so every forward of chunk c runs on
  stream c and an FB (which pairs the two chunks; ``pair`` refuses one chunk twice) has its forward
  and its backward on different streams; the GPU runs them at once while the host issues both. Events order
  the rest: a chunk's stream waits for what the main stream did before the op (its received
  inputs), the main stream waits for the chunk's stream before the op's sends. The expert
  all-to-alls (``communication``) go on a communication stream per compute stream, after an event
  on it and before the compute stream goes on; tensors crossing streams are kept alive for the
  stream that reads them (``Streams.keep``).

``StreamOverlap`` takes a ``Streams`` device seam: ``CudaStreams`` on a GPU, a recording fake in the
tests, so the CUDA path's ordering logic is the code the CPU tests drive.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

_SIDE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-backward")
# What StreamOverlap is issuing: (overlap, chunk, compute stream) or None. Module-wide, not per thread:
# one thread issues, but on CUDA autograd runs the backward (and its all-to-alls) on its device thread.
_ACTIVE = types.SimpleNamespace(issuing=None)

Work = tuple[int, Callable[[], None]]


class ThreadOverlap:
    """CPU: ops in order, an FB's backward on a second thread beside its forward."""

    def run(self, chunk: int, fn: Callable[[], None]) -> None:
        fn()

    def pair(self, forward: Work, backward: Work) -> None:
        pending = _SIDE.submit(backward[1])
        try:
            forward[1]()
        finally:
            pending.result()


class Sequential(ThreadOverlap):
    """No overlap: an FB's forward, then its backward (the benchmarks' reference)."""

    def pair(self, forward: Work, backward: Work) -> None:
        forward[1]()
        backward[1]()


class Streams:
    """The device seam ``StreamOverlap`` issues through: ``current()`` stream, a named ``stream``
    (created once), a new ``event()`` (``event.record(stream)``, ``stream.wait_event(event)``),
    ``use(stream)`` (make it current), ``keep(tensor, stream)`` (the tensor's memory is not reused
    before ``stream`` is done with it)."""

    def current(self):
        raise NotImplementedError

    def stream(self, name: str):
        raise NotImplementedError

    def event(self):
        raise NotImplementedError

    def use(self, stream) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def keep(self, tensor: torch.Tensor, stream) -> None:
        raise NotImplementedError


class CudaStreams(Streams):
    """CUDA streams and events of one device."""

    def __init__(self, device: torch.device):
        self.device, self.streams = device, {}

    def current(self):
        return torch.cuda.current_stream(self.device)

    def stream(self, name: str):
        if name not in self.streams:
            self.streams[name] = torch.cuda.Stream(self.device)
        return self.streams[name]

    def event(self):
        return torch.cuda.Event()

    def use(self, stream):
        return torch.cuda.stream(stream)

    def keep(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)


class StreamOverlap:
    """CUDA: chunk c's work on stream ``chunk{c}``, its all-to-alls on ``comm{c}``, ordered by events."""

    def __init__(self, streams: Streams):
        self.streams = streams

    def _after(self, stream, before) -> None:
        """``stream`` waits for what ``before`` has issued so far."""
        event = self.streams.event()
        event.record(before)
        stream.wait_event(event)

    def run(self, chunk: int, fn: Callable[[], None]) -> None:
        self._issue([(chunk, fn)])

    def pair(self, forward: Work, backward: Work) -> None:
        if forward[0] == backward[0]:
            raise ValueError(f"an FB op pairs the two chunks; got chunk {forward[0]} twice")
        self._issue([forward, backward])

    def _issue(self, work: list[Work]) -> None:
        main = self.streams.current()
        targets = [self.streams.stream(f"chunk{chunk}") for chunk, _ in work]
        for stream in targets:
            self._after(stream, main)
        for (chunk, fn), stream in zip(work, targets):
            _ACTIVE.issuing = (self, chunk, stream)
            try:
                with self.streams.use(stream):
                    fn()
            finally:
                _ACTIVE.issuing = None
        for stream in targets:
            self._after(main, stream)

    @contextlib.contextmanager
    def communicate(self, chunk: int, compute, tensors: list[torch.Tensor]) -> Iterator[None]:
        comm = self.streams.stream(f"comm{chunk}")
        self._after(comm, compute)
        for tensor in tensors:
            self.streams.keep(tensor, comm)
        with self.streams.use(comm):
            yield
        self._after(compute, comm)


def communication(*tensors: torch.Tensor) -> contextlib.AbstractContextManager:
    """Around an expert all-to-all reading or filling ``tensors``: on the communication stream of the
    chunk being issued under ``StreamOverlap`` (ordered by events both ways); otherwise nothing."""
    issuing = _ACTIVE.issuing
    if issuing is None:
        return contextlib.nullcontext()
    overlap, chunk, compute = issuing
    return overlap.communicate(chunk, compute, list(tensors))


def overlap_for(device: torch.device) -> ThreadOverlap | StreamOverlap:
    """Streams on CUDA, the second thread elsewhere."""
    return StreamOverlap(CudaStreams(device)) if device.type == "cuda" else ThreadOverlap()
