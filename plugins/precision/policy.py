"""Linear-layer precision, chosen at run time (report 3.3.1): ``none`` keeps the model's dtype,
``emulated`` runs DeepSeek-V3's block-scaled FP8 GEMMs exactly on any device (``plugins.fp8``),
``te`` hands the dense linears to Transformer-Engine's ``Float8BlockScaling`` recipe on Hopper GPUs,
``torch`` runs the emulation's quantization and math through PyTorch's block-wise ``scaled_mm`` on SM90
(``plugins.precision.fp8_torch``), routed experts included.

The policy follows the report: FP8 for the linears of MLA and of the FFNs (dense, shared and
routed experts); the embedding, output head, MoE gate, norms, attention core and the MTP
projection stay in higher precision. Modules are picked by name patterns (``fnmatch`` over
``named_modules()``), so the policy is configurable per module (``train.fp8_modules``).
Converted modules keep their parameters, so checkpoints and HF exports are unchanged.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings

import torch
from torch import nn

from ..errors import ConfigError
from ..model.experts import RoutedExperts
from ..model.mlp import SwiGLU
from ..model.moe import DeepSeekMoE
from . import fp8_torch
from . import te as fp8_te
from .fp8 import FP8Gemm, FP8GroupedGemm, fp8_grouped_linear, fp8_linear

FP8_BACKENDS = ("none", "emulated", "te", "torch", "auto")
DEFAULT_FP8_MODULES = ("*.self_attn.*", "*.mlp.*")


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose Fprop, Dgrad and Wgrad run through the emulated block-scaled FP8 GEMM."""

    power_of_two: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_linear(x, self.weight, self.power_of_two)
        return out if self.bias is None else out + self.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, power_of_two: bool) -> FP8Linear:
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        module.weight, module.bias = linear.weight, linear.bias
        module.power_of_two = power_of_two
        return module


class FP8RoutedExperts(RoutedExperts):
    """Routed experts whose grouped GEMMs (and their gradients) run in emulated block-scaled FP8."""

    power_of_two: bool = True

    def linear(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_linear(x, weight, counts, self.power_of_two)

    @classmethod
    def from_experts(cls, experts: RoutedExperts, power_of_two: bool) -> FP8RoutedExperts:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.num_experts = experts.num_experts
        module.gate_up_proj, module.down_proj = experts.gate_up_proj, experts.down_proj
        module.recompute, module.store, module.offload = experts.recompute, experts.store, experts.offload
        module.power_of_two, module.gemm = power_of_two, cls.grouped_gemm(power_of_two)
        return module

    grouped_gemm = FP8GroupedGemm


class TorchFP8Linear(FP8Linear):
    """``FP8Linear`` whose three GEMMs run on PyTorch's block-wise ``scaled_mm`` (``--fp8 torch``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_torch.torch_fp8_linear(x, self.weight, self.power_of_two)
        return out if self.bias is None else out + self.bias


class TorchFP8RoutedExperts(FP8RoutedExperts):
    """``FP8RoutedExperts`` with one block-wise ``scaled_mm`` per expert segment (``--fp8 torch``)."""

    grouped_gemm = fp8_torch.TorchFP8GroupedGemm

    def linear(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return fp8_torch.torch_fp8_grouped_linear(x, weight, counts, self.power_of_two)


def resolve_backend(requested: str) -> str:
    """``auto`` -> ``te`` where Transformer-Engine can run block scaling, else ``torch`` where PyTorch's
    block-wise ``scaled_mm`` can (SM90), else ``emulated`` (with a warning); ``te`` or ``torch`` where
    it cannot run is a one-line ConfigError."""
    if requested not in FP8_BACKENDS:
        raise ConfigError(f"--fp8 {requested}: expected one of {', '.join(FP8_BACKENDS)}")
    reasons = {"te": fp8_te.unavailable_reason, "torch": fp8_torch.unavailable_reason}
    if requested in reasons and (problem := reasons[requested]()):
        raise ConfigError(f"--fp8 {requested}: {problem}; use --fp8 emulated for the same numerics without it")
    if requested == "auto":
        problems = []
        for backend in ("te", "torch"):
            if not (problem := reasons[backend]()):
                return backend
            problems.append(f"{backend}: {problem}")
        warnings.warn(f"--fp8 auto: {'; '.join(problems)}; using the emulated FP8 GEMMs (exact numerics, much "
                      "slower than native FP8)", stacklevel=2)
        return "emulated"
    return requested


def fp8_targets(model: nn.Module, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the linears and routed-expert banks that the policy puts in FP8."""
    return [
        name for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, RoutedExperts)) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def convert_to_fp8(model: nn.Module, backend: str, patterns=DEFAULT_FP8_MODULES, power_of_two: bool = True) -> list[str]:
    """Swap the policy's modules in place for ``backend`` (``emulated``, ``torch`` or ``te``); returns their
    names.
    Under ``te`` the routed experts keep their high-precision grouped GEMM: Transformer-Engine's
    grouped linear stores one parameter per expert, not our stacked [E, out, in] banks, and the
    emulated grouped FP8 GEMM would be slower on a GPU than the native BF16 one."""
    if backend == "none":
        return []
    names = [n for n in fp8_targets(model, patterns)
             if backend != "te" or not isinstance(model.get_submodule(n), RoutedExperts)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent, module = model.get_submodule(parent_name), model.get_submodule(name)
        experts, linear = (TorchFP8RoutedExperts, TorchFP8Linear) if backend == "torch" else (FP8RoutedExperts,
                                                                                               FP8Linear)
        if isinstance(module, RoutedExperts):
            replacement = experts.from_experts(module, power_of_two)
        elif backend == "te":
            replacement = fp8_te.te_linear(module)
        else:
            replacement = linear.from_linear(module, power_of_two)
        setattr(parent, child, replacement)
    gemm = fp8_torch.TorchFP8Gemm if backend == "torch" else FP8Gemm
    for module in model.modules():  # a SwiGLU whose linears all run the FP8 GEMMs: its fused path too
        if isinstance(module, SwiGLU) and all(isinstance(m, FP8Linear) for m in
                                              (module.gate_proj, module.up_proj, module.down_proj)):
            module.gemm = gemm(power_of_two)
    return names


def keep_fp8_activations(model: nn.Module, power_of_two: bool = True) -> None:
    """Report 3.3.3 under any FP8 backend: the SwiGLU input that backward keeps when the SwiGLU output
    is recomputed (``recompute`` of the routed experts and the SwiGLU FFNs) is kept in FP8 1x128 tiles."""
    for module in model.modules():
        if isinstance(module, (RoutedExperts, SwiGLU)):
            module.store = FP8Gemm(power_of_two)


def dispatch_in_fp8(model: nn.Module, power_of_two: bool = True) -> None:
    """Report 3.3.3: the tokens of every MoE block whose experts run the FP8 GEMMs are quantized before
    the dispatch (1x128 tiles, the scales sent with them), so the exchange and the rows the experts
    keep are E4M3; their gradient and the combine stay in the activations' dtype."""
    for module in model.modules():
        if isinstance(module, DeepSeekMoE) and isinstance(module.experts, FP8RoutedExperts):
            module.dispatcher.quantize = FP8Gemm(power_of_two).store


def fp8_autocast(backend: str) -> contextlib.AbstractContextManager:
    """The context the forward pass runs in: Transformer-Engine's block-scaling autocast for ``te``."""
    return fp8_te.autocast() if backend == "te" else contextlib.nullcontext()
