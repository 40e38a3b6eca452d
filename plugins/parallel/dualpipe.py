"""Pipeline schedules as per-rank event orders: DualPipe (report 3.2.1, Figure 5), DualPipeV (the
same schedule folded into a V on half the ranks) and 1F1B. One source of truth: the runtime
(``plugins.parallel.pipeline_runtime``) executes these lists and the simulator (``plugins.parallel.pipeline_sim``)
times them.

Each rank runs two model chunks (one for 1F1B). DualPipe: rank r holds stage r for micro-batches
fed at rank 0 (chunk 0) and stage PP-1-r for micro-batches fed at rank PP-1 (chunk 1), so every
stage lives on two ranks whose gradients are summed. DualPipeV: rank r holds stage r and stage
2PP-1-r of a 2PP-stage model; micro-batches go down and come back. An ``Op`` is one of
``F`` (forward of a chunk), ``B`` (full backward), ``I`` (input-gradient half of a backward whose
weight-gradient half is deferred), ``W`` (the oldest deferred weight gradient), or ``FB`` (forward of
one chunk overlapped with the backward of the other, report Figure 4).

    python -m plugins.parallel simulate --pp 8 --micro-batches 20 [--f 1 --b 2 --w 1 --fb 2.5] [--out DIR]
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProjectError

SCHEDULES = ("dualpipe", "dualpipev", "1f1b")


class ScheduleError(ProjectError):
    """A pipeline size or micro-batch count the schedule cannot run."""


@dataclass(frozen=True)
class Op:
    """``forward``/``backward``: (local chunk, micro-batch) or None."""

    kind: str
    forward: tuple[int, int] | None = None
    backward: tuple[int, int] | None = None


@dataclass(frozen=True)
class Layout:
    """Where the stages of a schedule live: ``stages`` model stages over ``ranks`` ranks."""

    schedule: str
    ranks: int
    micro_batches: int

    @property
    def stages(self) -> int:
        return 2 * self.ranks if self.schedule == "dualpipev" else self.ranks

    @property
    def chunks(self) -> int:
        return 1 if self.schedule == "1f1b" else 2

    def route(self, micro: int) -> int:
        """DualPipe feeds the first half of the micro-batches at rank 0, the second at rank PP-1."""
        return int(self.schedule == "dualpipe" and micro >= self.micro_batches // 2)

    def place(self, stage: int, micro: int) -> tuple[int, int]:
        """(rank, local chunk) that runs ``stage`` for ``micro``."""
        if self.schedule == "dualpipe":
            return (stage, 0) if self.route(micro) == 0 else (self.ranks - 1 - stage, 1)
        if self.schedule == "dualpipev":
            return (stage, 0) if stage < self.ranks else (2 * self.ranks - 1 - stage, 1)
        return stage, 0

    def stage(self, rank: int, chunk: int) -> int:
        """The model stage of a rank's local chunk."""
        if self.schedule == "dualpipev":
            return rank if chunk == 0 else 2 * self.ranks - 1 - rank
        return rank if chunk == 0 else self.ranks - 1 - rank

    @classmethod
    def placement(cls, schedule: str, ranks: int) -> Layout:
        """Where the stages live, which does not depend on the micro-batch count (stage cutting,
        replica groups)."""
        return cls(schedule, ranks, micro_batches=2 * ranks)

    def micro_batches_of(self, chunk: int) -> list[int]:
        """The micro-batches a local chunk processes, in order."""
        if self.schedule == "dualpipe":
            half = self.micro_batches // 2
            return list(range(half)) if chunk == 0 else list(range(half, self.micro_batches))
        return list(range(self.micro_batches))


def micro_batch_rule(schedule: str, ranks: int) -> tuple[int, int]:
    """(multiple, minimum) of the micro-batch counts a schedule runs on ``ranks`` pipeline ranks:
    DualPipe an even count >= 2 x pp (half fed from each end), DualPipeV >= 2 x pp, 1F1B >= pp."""
    if schedule == "dualpipe":
        return 2, 2 * ranks
    return 1, 2 * ranks if schedule == "dualpipev" else ranks


def check(schedule: str, ranks: int, micro_batches: int) -> Layout:
    if schedule not in SCHEDULES:
        raise ScheduleError(f"pipeline schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if ranks < 2:
        raise ScheduleError(f"{schedule}: needs at least 2 pipeline ranks, got {ranks}")
    if schedule == "dualpipe" and ranks % 2:
        raise ScheduleError(f"dualpipe: needs an even number of pipeline ranks, got {ranks}")
    multiple, minimum = micro_batch_rule(schedule, ranks)
    if micro_batches % multiple or micro_batches < minimum:
        need = {"dualpipe": f"an even number of micro-batches >= 2 x pp = {minimum} (half are fed from each end)",
                "dualpipev": f">= 2 x pp = {minimum} micro-batches", "1f1b": f">= pp = {minimum} micro-batches"}
        raise ScheduleError(f"{schedule}: needs {need[schedule]}, got {micro_batches}")
    return Layout(schedule, ranks, micro_batches)


class _Builder:
    """Turns phase-level steps into ops with concrete micro-batches (each chunk forwards and
    backwards its micro-batches in order)."""

    def __init__(self, layout: Layout, swap: bool = False):
        self.ops: list[Op] = []
        self.swap = swap
        self.forward_queue = {c: layout.micro_batches_of(c) for c in range(layout.chunks)}
        self.backward_queue = {c: list(q) for c, q in self.forward_queue.items()}

    def _chunk(self, phase: int) -> int:
        return phase ^ 1 if self.swap else phase

    def _next_forward(self, phase: int) -> tuple[int, int]:
        chunk = self._chunk(phase)
        return chunk, self.forward_queue[chunk].pop(0)

    def _next_backward(self, phase: int) -> tuple[int, int]:
        chunk = self._chunk(phase)
        return chunk, self.backward_queue[chunk].pop(0)

    def f(self, phase: int) -> None:
        self.ops.append(Op("F", forward=self._next_forward(phase)))

    def b(self, phase: int, zero_bubble: bool = False) -> None:
        self.ops.append(Op("I" if zero_bubble else "B", backward=self._next_backward(phase)))

    def w(self) -> None:
        self.ops.append(Op("W"))

    def fb(self, forward_phase: int, backward_phase: int) -> None:
        self.ops.append(Op("FB", forward=self._next_forward(forward_phase), backward=self._next_backward(backward_phase)))


def _eight_steps(s: _Builder, half: int, h: int, chunks: int) -> list[Op]:
    """The eight steps of DualPipe (report Figure 5) for a rank ``h`` ranks from its end of a
    pipeline of ``2 * half`` stage positions, with ``chunks`` micro-batches per phase."""
    for _ in range(2 * (half - h - 1)):  # 1: warm up phase 0
        s.f(0)
    for _ in range(h + 1):  # 2: F0 F1
        s.f(0)
        s.f(1)
    for _ in range(half - h - 1):  # 3: B1 W F1, zero bubble
        s.b(1, zero_bubble=True)
        s.w()
        s.f(1)
    for i in range(chunks - 2 * half + h + 1):  # 4: main, F0&B1 then F1&B0
        if i == 0 and h == half - 1:  # not overlapped: the middle ranks' first pair is on the critical path
            s.f(0)
            s.b(1)
        else:
            s.fb(0, 1)
        s.fb(1, 0)
    for _ in range(half - h - 1):  # 5: B1 then F1&B0
        s.b(1)
        s.fb(1, 0)
    zero_bubble = False
    for i in range(h + 1):  # 6: B1 B0; the second half of them defer their weight gradients
        if i == (h + 1) // 2 and h % 2 == 1:
            zero_bubble = True
        s.b(1, zero_bubble)
        if i == (h + 1) // 2 and h % 2 == 0:
            zero_bubble = True
        s.b(0, zero_bubble)
    for _ in range(half - h - 1):  # 7: W B0, zero bubble
        s.w()
        s.b(0, zero_bubble=True)
    for _ in range(h + 1):  # 8: the deferred weight gradients
        s.w()
    return s.ops


def _dualpipe(layout: Layout, rank: int) -> list[Op]:
    """Phase 0 is the direction fed from this rank's own end of the pipeline, so ranks in the
    second half swap the chunk of each phase."""
    half = layout.ranks // 2
    second_half = rank >= half
    h = layout.ranks - 1 - rank if second_half else rank  # distance from the nearer end
    return _eight_steps(_Builder(layout, swap=second_half), half, h, layout.micro_batches // 2)


def _dualpipev(layout: Layout, rank: int) -> list[Op]:
    """DualPipe folded: chunk 0 goes down the ranks, chunk 1 comes back up; the turning rank
    is the middle one."""
    return _eight_steps(_Builder(layout), layout.ranks, rank, layout.micro_batches)


def _one_f_one_b(layout: Layout, rank: int) -> list[Op]:
    """Warm-up forwards, steady one-forward-one-backward, cool-down backwards."""
    s = _Builder(layout)
    warmup = min(layout.ranks - rank - 1, layout.micro_batches)
    for _ in range(warmup):
        s.f(0)
    for _ in range(layout.micro_batches - warmup):
        s.f(0)
        s.b(0)
    for _ in range(warmup):
        s.b(0)
    return s.ops


def build_schedule(layout: Layout, rank: int) -> list[Op]:
    """The ops rank ``rank`` executes in one training step, in order."""
    return {"dualpipe": _dualpipe, "dualpipev": _dualpipev, "1f1b": _one_f_one_b}[layout.schedule](layout, rank)
