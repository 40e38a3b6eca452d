"""What every step of ``benchmarks/gpu/run_all.sh`` shares: the device, its named dense peak, the
results directory (``results/``; ``results/dry-run/`` for the CPU dry run) and the JSON writer, which
writes a step's file the moment it has numbers."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plugins.atomic import write_text_atomic  # noqa: E402
from plugins.model.flops import H800_BF16_PEAK  # noqa: E402

# Dense (not 2:4 sparse) peaks of the SXM Hopper parts this project is lent; MFU is against BF16's.
DENSE_PEAKS = {"H100": H800_BF16_PEAK, "H200": H800_BF16_PEAK, "H800": H800_BF16_PEAK}


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def dense_peak() -> tuple[float | None, str]:
    """(dense BF16 FLOP/s, its name) of this GPU; (None, why) where it is not one of ``DENSE_PEAKS``."""
    if not torch.cuda.is_available():
        return None, "no GPU: MFU is not computed on CPU"
    name = torch.cuda.get_device_name(0)
    part = next((key for key in DENSE_PEAKS if key in name), None)
    if part is None:
        return None, f"{name}: no dense peak known (DENSE_PEAKS)"
    return DENSE_PEAKS[part], f"{part} SXM dense BF16 {DENSE_PEAKS[part] / 1e12:.1f} TFLOP/s"


def environment() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": gpu, "deepspeed": ds, "peak": dense_peak()[1]}


def results_dir(dry_run: bool) -> Path:
    return ROOT / "benchmarks" / "gpu" / "results" / ("dry-run" if dry_run else "")


def write(name: str, dry_run: bool, result: dict) -> Path:
    """``results/<name>.json`` (atomically), with the environment."""
    out = results_dir(dry_run) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps({"environment": environment(), **result}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}", flush=True)
    return out


def skip(step: str, why: str) -> None:
    print(f"skip: {step}: {why}", flush=True)
