"""Timing a pipeline schedule's event order (``plugins.parallel.dualpipe.build_schedule``) with given op
costs: each rank runs its ops in order, an op starts when its rank is free and its inputs exist
(communication free), and the bubble of a rank is its idle time before its last op ends. The
report's Table 2 formulas are printed beside the measured bubbles (F, B, W: forward, full
backward, weight-gradient cost of one chunk; F&B: an overlapped forward+backward pair). They
agree exactly in the report's unit, B = 2F and W = F, for any F&B; for other ratios the table's
expression is an approximation and the measured bubble is the one to trust.

    python -m plugins.parallel simulate --pp 8 --micro-batches 20 [--f 1 --b 2 --w 1 --fb 2.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import save_figure_atomic, write_text_atomic
from .dualpipe import SCHEDULES, Layout, Op, ScheduleError, build_schedule, check


@dataclass(frozen=True)
class Costs:
    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float = 2.5

    def of(self, op: Op) -> float:
        return {"F": self.f, "B": self.b, "I": self.b - self.w, "W": self.w, "FB": self.fb}[op.kind]


@dataclass(frozen=True)
class Interval:
    rank: int
    start: float
    end: float
    op: Op


def formula(schedule: str, ranks: int, costs: Costs) -> float:
    """Bubble per rank: report Table 2 for 1F1B and DualPipe; DualPipeV on PP ranks is DualPipe on
    2PP ranks folded, so its bubble is DualPipe's with PP replaced by 2PP."""
    if schedule == "1f1b":
        return (ranks - 1) * (costs.f + costs.b)
    pp = ranks if schedule == "dualpipe" else 2 * ranks
    return (pp / 2 - 1) * (costs.fb + costs.b - 3 * costs.w)


def simulate(layout: Layout, costs: Costs | Callable[[int, Op], float]) -> list[Interval]:
    """Executes every rank's ops; raises ScheduleError on a deadlock (an input never produced).
    ``costs``: one cost per op kind, or a function of (rank, op) (per-stage durations)."""
    cost = costs if callable(costs) else (lambda rank, op: costs.of(op))
    programs = [build_schedule(layout, r) for r in range(layout.ranks)]
    last_stage = layout.stages - 1
    done: dict[tuple[str, int, int], float] = {}  # ("F" | "B", stage, micro) -> finish time
    clock = [0.0] * layout.ranks
    cursor = [0] * layout.ranks
    deferred = [0] * layout.ranks
    intervals: list[Interval] = []

    def inputs(rank: int, op: Op) -> list[tuple[str, int, int]] | None:
        needed = []
        if op.forward is not None:
            stage, micro = layout.stage(rank, op.forward[0]), op.forward[1]
            if stage > 0:
                needed.append(("F", stage - 1, micro))
        if op.backward is not None:
            stage, micro = layout.stage(rank, op.backward[0]), op.backward[1]
            needed.append(("F", stage, micro))
            if stage < last_stage:
                needed.append(("B", stage + 1, micro))
        return needed if all(key in done for key in needed) else None

    remaining = sum(len(p) for p in programs)
    while remaining:
        progressed = False
        for rank, program in enumerate(programs):
            while cursor[rank] < len(program):
                op = program[cursor[rank]]
                needed = inputs(rank, op)
                if needed is None:
                    break
                if op.kind == "W" and not deferred[rank]:
                    raise ScheduleError(f"rank {rank}: W with no deferred weight gradient (op {cursor[rank]})")
                start = max([clock[rank], *(done[key] for key in needed)])
                end = start + cost(rank, op)
                clock[rank] = end
                deferred[rank] += (op.kind == "I") - (op.kind == "W")
                if op.forward is not None:
                    done[("F", layout.stage(rank, op.forward[0]), op.forward[1])] = end
                if op.backward is not None:
                    done[("B", layout.stage(rank, op.backward[0]), op.backward[1])] = end
                intervals.append(Interval(rank, start, end, op))
                cursor[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: programs[r][cursor[r]] for r in range(layout.ranks) if cursor[r] < len(programs[r])}
            raise ScheduleError(f"{layout.schedule}: deadlock, waiting ops {stuck}")
    return intervals


def sends_in_flight(layout: Layout) -> list[int]:
    """Per rank, the most point-to-point sends it can hold at once under any op durations, when the
    runtime lets go of a send once its receiver has taken it (checked after each op): a send of op
    i is still held at op t unless its receiving op must have run before op t - 1 ended, i.e. is an
    ancestor of op t - 1 in the schedule's dependency graph (program order and data inputs)."""
    programs = [build_schedule(layout, r) for r in range(layout.ranks)]
    last_stage = layout.stages - 1
    producer: dict[tuple[str, int, int], tuple[int, int]] = {}
    for rank, program in enumerate(programs):
        for index, op in enumerate(program):
            if op.forward is not None:
                producer[("F", layout.stage(rank, op.forward[0]), op.forward[1])] = (rank, index)
            if op.backward is not None:
                producer[("B", layout.stage(rank, op.backward[0]), op.backward[1])] = (rank, index)
    consumer = {}  # what each sent message is: the op that receives it
    for rank, program in enumerate(programs):
        for index, op in enumerate(program):
            if op.forward is not None and layout.stage(rank, op.forward[0]) > 0:
                consumer[("F", layout.stage(rank, op.forward[0]) - 1, op.forward[1])] = (rank, index)
            if op.backward is not None and layout.stage(rank, op.backward[0]) < last_stage:
                consumer[("B", layout.stage(rank, op.backward[0]) + 1, op.backward[1])] = (rank, index)
    order, seen = [], [0] * layout.ranks  # each rank's ops come in program order
    for interval in simulate(layout, Costs()):
        order.append((interval.rank, seen[interval.rank]))
        seen[interval.rank] += 1
    ancestors: dict[tuple[int, int], set] = {}
    for rank, index in order:  # a topological order: each op after its inputs
        op, preds = programs[rank][index], [(rank, index - 1)] if index else []
        if op.forward is not None and layout.stage(rank, op.forward[0]) > 0:
            preds.append(producer[("F", layout.stage(rank, op.forward[0]) - 1, op.forward[1])])
        if op.backward is not None and layout.stage(rank, op.backward[0]) < last_stage:
            preds.append(producer[("B", layout.stage(rank, op.backward[0]) + 1, op.backward[1])])
        ancestors[(rank, index)] = set(preds).union(*(ancestors[p] for p in preds))
    peaks = []
    for rank, program in enumerate(programs):
        sends = []  # (op index, receiving op) of each message this rank sends to another rank
        for index, op in enumerate(program):
            for key in ([("F", layout.stage(rank, op.forward[0]), op.forward[1])] if op.forward else []) + \
                    ([("B", layout.stage(rank, op.backward[0]), op.backward[1])] if op.backward else []):
                if key in consumer and consumer[key][0] != rank:
                    sends.append((index, consumer[key]))
        peak = 0
        for t in range(len(program)):
            before = ancestors.get((rank, t - 1), set())
            peak = max(peak, sum(1 for index, receiver in sends if index <= t and receiver not in before))
        peaks.append(peak)
    return peaks


def bubbles(layout: Layout, intervals: list[Interval]) -> list[float]:
    """Idle time of each rank between the step's start and its own last op."""
    result = []
    for rank in range(layout.ranks):
        own = [i for i in intervals if i.rank == rank]
        result.append(max(i.end for i in own) - sum(i.end - i.start for i in own))
    return result


COLOURS = {"F": "#4c72b0", "B": "#55a868", "I": "#8fd19e", "W": "#c9c9c9", "FB": "#dd8452"}


def timeline_png(layout: Layout, intervals: list[Interval], path: Path) -> Path:
    """Ranks x time; each op a box labelled with its micro-batch(es)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    end = max(i.end for i in intervals)
    fig, ax = plt.subplots(figsize=(max(8, end * 0.35), 0.5 * layout.ranks + 1.2))
    for i in intervals:
        ax.barh(i.rank, i.end - i.start, left=i.start, color=COLOURS[i.op.kind], edgecolor="black", linewidth=0.4)
        label = "/".join(str(x[1]) for x in (i.op.forward, i.op.backward) if x is not None)
        if label:
            ax.text((i.start + i.end) / 2, i.rank, label, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(layout.ranks), [f"rank {r}" for r in range(layout.ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time (op cost units)")
    ax.set_title(f"{layout.schedule}: PP={layout.ranks}, {layout.micro_batches} micro-batches")
    names = {"F": "forward", "B": "backward", "I": "backward (input grad)", "W": "weight grad",
             "FB": "forward & backward overlapped"}
    ax.legend(handles=[Patch(color=COLOURS[k], label=v) for k, v in names.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.25), ncol=5, fontsize=7, frameon=False)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    return path


def _flag_problem(args, costs: Costs) -> str | None:
    """What is wrong with the costs or ``--out``, checked before anything is written."""
    for flag in ("f", "b", "fb"):
        if not getattr(args, flag) > 0:
            return f"--{flag} {getattr(args, flag)}: expected a positive cost"
    if not (0 < costs.w < costs.b):
        return f"--w {costs.w}: the weight-gradient part must be positive and below --b {costs.b}"
    if args.out.exists() and not args.out.is_dir():
        return f"--out {args.out}: exists and is not a directory"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.parallel", description="pipeline schedules")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="time DualPipe, DualPipeV and 1F1B; timeline PNGs; bubbles vs formulas")
    sim.add_argument("--pp", type=int, required=True, help="pipeline ranks")
    sim.add_argument("--micro-batches", type=int, required=True)
    for name, default in (("f", 1.0), ("b", 2.0), ("w", 1.0), ("fb", 2.5)):
        sim.add_argument(f"--{name}", type=float, default=default, help=f"cost of {name.upper()} (default {default})")
    sim.add_argument("--out", type=Path, default=Path("runs/pipeline_sim"), help="where the PNGs and JSON go")
    args = parser.parse_args(argv)
    costs = Costs(args.f, args.b, args.w, args.fb)
    problem = _flag_problem(args, costs)
    if problem is None:
        try:  # DualPipeV runs the same stages on half the ranks
            layouts = [check(schedule, args.pp // 2 if schedule == "dualpipev" else args.pp, args.micro_batches)
                       for schedule in SCHEDULES]
        except ScheduleError as error:
            problem = f"--pp {args.pp} --micro-batches {args.micro_batches}: {error}"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for schedule, layout in zip(SCHEDULES, layouts):
        ranks = layout.ranks
        intervals = simulate(layout, costs)
        measured = bubbles(layout, intervals)
        png = timeline_png(layout, intervals, args.out / f"{schedule}_pp{args.pp}_m{args.micro_batches}.png")
        rows.append({"schedule": schedule, "ranks": ranks, "stages": layout.stages,
                     "bubble_max": max(measured), "bubble_min": min(measured), "formula": formula(schedule, ranks, costs),
                     "makespan": max(i.end for i in intervals), "timeline": str(png)})
    print(f"{'schedule':<10} {'ranks':>5} {'stages':>6} {'bubble (max rank)':>18} {'formula':>8} {'makespan':>9}")
    for r in rows:
        print(f"{r['schedule']:<10} {r['ranks']:>5} {r['stages']:>6} {r['bubble_max']:>18.2f} {r['formula']:>8.2f} "
              f"{r['makespan']:>9.2f}")
    report = args.out / f"bubbles_pp{args.pp}_m{args.micro_batches}.json"
    write_text_atomic(report, json.dumps({"costs": costs.__dict__, "schedules": rows}, indent=1))
    print(f"wrote {report} and the timelines {', '.join(r['timeline'] for r in rows)}")
    return 0
