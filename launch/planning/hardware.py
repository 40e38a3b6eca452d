"""A machine as the step-time model sees it: a hardware profile (``configs/hardware/NAME.yaml``, or
what ``python -m launch.calibrate`` measured), read and checked into ``Hardware``.

Rates are per device (one GPU, or one CPU rank): matrix-multiply peak FLOP/s by dtype and the
fraction of it a GEMM reaches by its rows (``gemm_curve``, and ``grouped_gemm_curve`` by rows per
expert: small per-expert GEMMs run below peak), attention's fraction, memory bandwidth, the links
(intra-node: NVLink; inter-node: InfiniBand; host: PCIe, per direction), each with the fraction real
kernels reach, a fixed cost per op (launch, dispatch, Python) and a latency per collective. A
profile names the source of each figure in a comment; a calibrated one is measured (fractions 1).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from pathlib import Path

from plugins.config_tree import build, read_document
from plugins.errors import ConfigError

HARDWARE_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"
DTYPES = ("fp32", "bf16", "fp8")


@dataclass
class Peaks:
    """Dense matrix-multiply peak FLOP/s of one device by dtype (absent: the device does not run it)."""

    fp32: float | None = None
    bf16: float | None = None
    fp8: float | None = None


@dataclass
class Link:
    """One link of a device: bytes/s per direction and the fraction of it transfers reach."""

    bandwidth: float
    efficiency: float = 1.0

    @property
    def rate(self) -> float:
        return self.bandwidth * self.efficiency


@dataclass
class Hardware:
    name: str
    gpus_per_node: int
    flops: Peaks
    memory: Link  # HBM (or DRAM for a CPU rank)
    intra_node: Link  # NVLink per GPU (gloo over shared memory on a CPU machine)
    inter_node: Link  # InfiniBand per GPU
    op_seconds: float  # fixed cost of one op: kernel launch, dispatch, Python
    collective_latency: float  # seconds, per collective call
    sdpa_efficiency: float = 1.0  # attention's fraction of the matmul peak
    host: Link | None = None  # PCIe to pinned host memory (the offload), GPUs only
    # float32 logits through log-softmax per second, one pass (absent: the memory rate; on a CPU the
    # exponentials, not the bytes, bound it)
    cross_entropy: Link | None = None
    sms: int = 0  # streaming multiprocessors (0: not a GPU)
    communication_sms: int = 0  # SMs given to the all-to-all kernels (report 3.2.2: 20 of 132)
    cores: int = 0  # a CPU machine's cores, shared by its ranks (0: a GPU's, each rank its own device)
    background_load: float = 0.0  # runnable threads of other work on those cores, measured by calibrate
    source: str = ""
    gemm_curve: tuple[tuple[float, float], ...] = field(default=((1.0, 1.0),))  # (rows, fraction of peak)
    grouped_gemm_curve: tuple[tuple[float, float], ...] = field(default=((1.0, 1.0),))  # (rows per expert, ...)

    def peak(self, dtype: str) -> float:
        rate = getattr(self.flops, dtype)
        if rate is None:
            raise ConfigError(f"{self.source}: flops.{dtype}: not given; this plan runs {dtype} matrix multiplies")
        return rate

    def gemm_rate(self, dtype: str, rows: float, grouped: bool = False) -> float:
        """FLOP/s of a GEMM over ``rows`` rows (per expert when ``grouped``), log-interpolated in rows."""
        curve = self.grouped_gemm_curve if grouped else self.gemm_curve
        return self.peak(dtype) * interpolate(curve, rows)

    def compute_slowdown(self, local_ranks: int) -> float:
        """How much slower each rank computes when ``local_ranks`` one-thread ranks share the ``cores``
        with ``background_load`` other runnable threads (the scheduler's fair share), 1 on GPUs."""
        return max(1.0, (self.background_load + local_ranks) / self.cores) if self.cores else 1.0


def interpolate(curve: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise linear in log(x) through the (x, y) points, held flat beyond the ends."""
    xs = [p[0] for p in curve]
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return curve[0][1]
    if i == len(curve):
        return curve[-1][1]
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))


def _curve(raw, where: str, source: str) -> tuple[tuple[float, float], ...]:
    ok = isinstance(raw, list) and raw and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and math.isfinite(v) and v > 0 for v in p) for p in raw)
    if not ok or any(a[0] >= b[0] for a, b in zip(raw, raw[1:])) or any(p[1] > 1 for p in raw):
        raise ConfigError(f"{source}: {where}: expected [[rows, fraction of peak], ...] with rows increasing "
                          f"and fractions in (0, 1], got {raw!r}")
    return tuple((float(a), float(b)) for a, b in raw)


def _check(hw: Hardware) -> Hardware:
    src = hw.source
    positive = {"gpus_per_node": hw.gpus_per_node, "memory.bandwidth": hw.memory.bandwidth,
                "intra_node.bandwidth": hw.intra_node.bandwidth, "inter_node.bandwidth": hw.inter_node.bandwidth}
    for key in ("host", "cross_entropy"):
        if getattr(hw, key) is not None:
            positive[f"{key}.bandwidth"] = getattr(hw, key).bandwidth
    for dtype in DTYPES:
        if getattr(hw.flops, dtype) is not None:
            positive[f"flops.{dtype}"] = getattr(hw.flops, dtype)
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{src}: {key}: expected a positive number, got {value}")
    fractions = {"memory.efficiency": hw.memory.efficiency, "intra_node.efficiency": hw.intra_node.efficiency,
                 "inter_node.efficiency": hw.inter_node.efficiency, "sdpa_efficiency": hw.sdpa_efficiency}
    if hw.host is not None:
        fractions["host.efficiency"] = hw.host.efficiency
    for key, value in fractions.items():
        if not 0 < value <= 1:
            raise ConfigError(f"{src}: {key}: expected a fraction in (0, 1], got {value}")
    for key in ("op_seconds", "collective_latency"):
        if getattr(hw, key) < 0:
            raise ConfigError(f"{src}: {key}: expected seconds >= 0, got {getattr(hw, key)}")
    if all(getattr(hw.flops, d) is None for d in DTYPES):
        raise ConfigError(f"{src}: flops: expected a peak for at least one of {', '.join(DTYPES)}")
    if not 0 <= hw.communication_sms < max(hw.sms, 1):
        raise ConfigError(f"{src}: communication_sms: expected 0 <= it < sms ({hw.sms}), got {hw.communication_sms}")
    if hw.cores < 0 or hw.background_load < 0:
        raise ConfigError(f"{src}: cores, background_load: expected >= 0, got {hw.cores}, {hw.background_load}")
    return hw


def load_hardware(name_or_file: str) -> Hardware:
    """A profile by name (``configs/hardware/NAME.yaml``) or by path; a bad one is one line."""
    path = Path(name_or_file)
    if not path.suffix and not path.exists():
        path = HARDWARE_DIR / f"{name_or_file}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml")))
            raise ConfigError(f"--hardware {name_or_file}: no such profile (known: {known}) and no such file")
    if not path.is_file():
        raise ConfigError(f"--hardware {name_or_file}: no such file")
    raw = read_document(path)
    source = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of hardware figures")
    curves = {key: _curve(raw.pop(key), key, source) for key in ("gemm_curve", "grouped_gemm_curve") if key in raw}
    return _check(build(Hardware, raw, "hardware", source, source=source, **curves))
