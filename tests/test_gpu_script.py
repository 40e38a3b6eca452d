"""``benchmarks/gpu/run_all.sh --dry-run``: every step of the device script on CPU at toy shapes,
each GPU-only part skipped with a line saying why, each step's JSON written."""

import json
import subprocess

import pytest

from .conftest import ROOT

RESULTS = ROOT / "benchmarks" / "gpu" / "results" / "dry-run"


@pytest.mark.slow
def test_the_device_script_dry_run_passes_and_says_why_it_skips():
    for old in RESULTS.glob("*.json"):
        old.unlink()
    result = subprocess.run(["bash", "benchmarks/gpu/run_all.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "run_all: 0 step(s) failed" in out
    assert "skip: F&B on two CUDA streams: no CUDA" in out
    assert "skip: FP8 vs BF16 GEMMs: needs CUDA" in out
    for line in (line for line in out.splitlines() if line.startswith("skip: ")):
        assert len(line.split(": ", 2)) == 3 and line.split(": ", 2)[2], line  # step and reason named
    written = {path.stem for path in RESULTS.glob("*.json")}
    assert {"env", "blocks", "fb_streams"} <= written, written
    blocks = json.loads((RESULTS / "blocks.json").read_text())
    assert {(row["precision"], row["compile"] != "off") for row in blocks["rows"]} >= {("float32", False),
                                                                                       ("float32", True)}
    assert all(row["tokens_per_s"] > 0 and row["flops_per_token"] > 0 and row["sdpa_backend"] for row in blocks["rows"])
    assert json.loads((RESULTS / "fb_streams.json").read_text())["overlapped_s"] > 0
    assert "usage:" in subprocess.run(["bash", "benchmarks/gpu/run_all.sh", "--bogus"], cwd=ROOT, capture_output=True,
                                      text=True).stderr
