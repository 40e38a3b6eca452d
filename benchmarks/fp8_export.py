"""What DeepSeek's FP8 release format costs and saves: ``launch.convert``'s export of one checkpoint
as FP32 (today's default: the master weights), BF16 and FP8 (``--fp8``), time and bytes on disk,
each read back into a whole FP32 model (time and host memory the reading adds); and, on the meta
device, what each rank of the report's layout (PP16 DualPipe x EP64) reads of DeepSeek-V3-Base and
the largest tensor it holds at once.

The checkpoint is a 1-step run of a scaled-down model (the tiny recipe at hidden 512, 64 routed
experts of 512, 4 layers: ~0.2B parameters, dims multiples of 128 as in V3), trained through the
launcher. Export and read-back run in this process, interleaved over ``--rounds``; the memory a
read adds is sampled every 5 ms (RSS above the level before the read).

    python benchmarks/fp8_export.py [--rounds 3] [--out benchmarks/results/fp8_export.json]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from common import write_result  # benchmarks/ is the script directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.checkpointing.export import checkpoint_tensors  # noqa: E402
from launch.checkpointing.model_source import find_checkpoint  # noqa: E402
from plugins.interop.fp8_release import is_release_quantized, scale_shape  # noqa: E402
from plugins.interop.hf import hf_tensors, load_hf_weights, write_hf_directory  # noqa: E402
from plugins.model.config import ModelConfig  # noqa: E402
from plugins.model.deepseek_v3 import DeepSeekV3  # noqa: E402
from plugins.model.init import materialize  # noqa: E402
from plugins.parallel.rank_share import rank_model  # noqa: E402

SCALED = ["model.hidden_size=512", "model.intermediate_size=1536", "model.moe_intermediate_size=512",
          "model.n_routed_experts=64", "model.num_hidden_layers=4", "model.q_lora_rank=256",
          "model.kv_lora_rank=128", "model.num_attention_heads=8", "model.qk_nope_head_dim=64",
          "model.qk_rope_head_dim=32", "model.v_head_dim=64"]


def train_one_step(run_dir: Path) -> None:
    sets = [x for s in SCALED + ["train.micro_batch_size=2", "train.wandb_mode=disabled", "data.validation={}"]
            for x in ("--set", s)]
    with socket.socket() as probe:  # a free port: other launches may hold DeepSpeed's default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["deepspeed", "--num_gpus", "1", "--master_port", str(port), "launch/pretrain.py", "--config", "configs/tiny.yaml",
               "--run-dir", str(run_dir), "--steps", "1", "--save-interval", "1", *sets]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise SystemExit(f"training the checkpoint failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


class PeakRSS:
    """The largest RSS above the level at entry, sampled every 5 ms on a thread."""

    def __enter__(self) -> PeakRSS:
        self.process, self.done = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.added_mb = (max(self.peak, self.process.memory_info().rss) - self.base) / 2**20


def export(source, form: str, out: Path) -> float:
    tensors = checkpoint_tensors(source)
    if form == "bf16":
        tensors = ((key, tensor.to(torch.bfloat16)) for key, tensor in tensors)
    start = time.perf_counter()
    write_hf_directory(source.config, torch.bfloat16 if form == "bf16" else torch.float32, tensors, out,
                       fp8=form == "fp8")
    return time.perf_counter() - start


def read_back(directory: Path, model: DeepSeekV3) -> tuple[float, float]:
    with PeakRSS() as peak:
        start = time.perf_counter()
        missing = load_hf_weights(directory, model)
        seconds = time.perf_counter() - start
    assert not missing, missing
    return seconds, peak.added_mb


def release_reads(config: ModelConfig, pp: int = 16, ep: int = 64) -> list[dict]:
    """Per pipeline rank of (PP pp DualPipe, EP ep): the bytes one of its ranks reads from the FP8
    release (FP8 linears + FP32 scales, BF16 rest), the largest tensor it reads and the largest FP32
    dequantisation temporary (on the rank's device)."""
    rows = []
    for pipeline_rank in range(pp):
        model = rank_model(config, pp, ep, "dualpipe", pipeline_rank)
        read = largest = dequantised = 0
        for name, tensor in model.state_dict().items():
            for key, value in hf_tensors(name, tensor, config):
                if ".layers." in key and int(key.split(".")[2]) >= config.num_hidden_layers \
                        and key.endswith(("embed_tokens.weight", "shared_head.head.weight")):
                    continue  # the MTP module's copies of the embedding and head are not read
                if is_release_quantized(key):
                    rows_, cols = scale_shape(value.shape)
                    size = value.numel() + 4 * rows_ * cols
                    dequantised = max(dequantised, 4 * value.numel())
                else:
                    size = value.numel() * (4 if key.endswith("e_score_correction_bias") else 2)
                largest = max(largest, size)
                read += size
        rows.append({"pipeline_rank": pipeline_rank, "read_gb": read / 1e9, "largest_tensor_gb": largest / 1e9,
                     "largest_fp32_dequantised_gb": dequantised / 1e9})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fp8_export.json"))
    args = parser.parse_args()
    forms = ("fp32", "bf16", "fp8")
    times: dict[str, list[float]] = {f: [] for f in forms}
    reads: dict[str, list[tuple[float, float]]] = {f: [] for f in forms}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        train_one_step(run_dir)
        source = find_checkpoint(run_dir)
        with torch.device("meta"):
            model = DeepSeekV3(source.config)
        materialize(model, "cpu", std=None)
        parameters = sum(p.numel() for p in model.parameters())
        for round_ in range(args.rounds):
            for form in forms:
                out = Path(tmp) / f"{form}{round_}"
                times[form].append(export(source, form, out))
                sizes[form] = sum(p.stat().st_size for p in out.iterdir())
                reads[form].append(read_back(out, model))
                shutil.rmtree(out)
    rows = [{"format": f, "export_s": statistics.median(times[f]), "bytes": sizes[f],
             "vs_bf16": sizes[f] / sizes["bf16"], "read_s": statistics.median(r[0] for r in reads[f]),
             "read_added_mb": max(r[1] for r in reads[f])} for f in forms]
    v3 = release_reads(ModelConfig.from_yaml(ROOT / "configs" / "deepseek_v3_671b.yaml"))
    print(f"scaled-down model: {parameters / 1e6:.0f}M parameters (FP32 model {parameters * 4 / 2**20:.0f} MB), "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'format':8} {'export s':>9} {'MB on disk':>11} {'vs BF16':>8} {'read s':>7} {'read adds MB':>13}")
    for r in rows:
        print(f"{r['format']:8} {r['export_s']:>9.2f} {r['bytes'] / 2**20:>11.1f} {r['vs_bf16']:>8.3f} "
              f"{r['read_s']:>7.2f} {r['read_added_mb']:>13.0f}")
    most = max(v3, key=lambda r: r["read_gb"])
    print(f"DeepSeek-V3-Base FP8 release at PP16 x EP64: a rank reads {min(r['read_gb'] for r in v3):.2f}-"
          f"{most['read_gb']:.2f} GB (pipeline rank {most['pipeline_rank']} the most); largest tensor read "
          f"{max(r['largest_tensor_gb'] for r in v3):.2f} GB, largest FP32 dequantisation "
          f"{max(r['largest_fp32_dequantised_gb'] for r in v3):.2f} GB")
    write_result(args.out, {"parameters": parameters, "threads": torch.get_num_threads(), "rounds": args.rounds,
                            "rows": rows, "deepseek_v3_pp16_ep64": v3})


if __name__ == "__main__":
    main()
