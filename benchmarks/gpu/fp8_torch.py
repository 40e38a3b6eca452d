"""Step 3 of ``run_all.sh``: ``--fp8 torch`` (PyTorch's block-scaled ``torch._scaled_mm``) against the
emulated oracle on the same weights and inputs: the tiny model's losses and every gradient, the
largest relative difference of each (``results/fp8_torch.json``). Needs the backend and CUDA.

    python benchmarks/gpu/fp8_torch.py [--dry-run]
"""

from __future__ import annotations

import argparse
import copy

import torch
from device import ROOT, device, skip, write

from plugins.model.config import ModelConfig
from plugins.model.deepseek_v3 import DeepSeekV3
from plugins.precision.policy import FP8_BACKENDS, convert_to_fp8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if "torch" not in FP8_BACKENDS:
        skip("--fp8 torch vs emulated", "the torch backend is not present (plugins.precision.policy.FP8_BACKENDS)")
        return 0
    dev = device()
    if dev.type != "cuda":
        skip("--fp8 torch vs emulated", "needs CUDA (block-scaled torch._scaled_mm runs on Hopper GPUs)")
        return 0
    torch.manual_seed(0)
    reference = DeepSeekV3(ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml")).to(dev, torch.bfloat16)
    models = {backend: copy.deepcopy(reference) for backend in ("emulated", "torch")}
    ids = torch.randint(0, reference.config.vocab_size, (4, 128), device=dev)
    losses = {}
    for backend, model in models.items():
        convert_to_fp8(model, backend)
        out = model(ids, labels=ids)
        out.loss.backward()
        losses[backend] = out.loss.item()
    grads = {}
    for (name, a), b in zip(models["emulated"].named_parameters(), models["torch"].parameters()):
        if a.grad is not None:
            grads[name] = ((b.grad.float() - a.grad.float()).norm() / a.grad.float().norm().clamp_min(1e-30)).item()
    worst = max(grads, key=grads.get)
    print(f"fp8 torch vs emulated: loss {losses['torch']:.6f} vs {losses['emulated']:.6f}; largest relative "
          f"gradient difference {grads[worst]:.2e} ({worst})", flush=True)
    write("fp8_torch", args.dry_run, {"losses": losses, "grad_relative_difference": grads})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
