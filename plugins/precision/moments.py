"""AdamW with its moments in BF16 and the update in FP32 (report 3.3.1, "Low-Precision Optimizer
States": BF16 ``exp_avg``/``exp_avg_sq``, FP32 master weights). Neither ``torch.optim.AdamW`` (its
states take the parameter's dtype, FP32 for ZeRO's master partitions) nor DeepSpeed's Adams (the
same, or everything in the parameter's dtype) keep BF16 moments beside FP32 weights.

Each step reads the BF16 moments into FP32, applies AdamW's update exactly as
``torch.optim.AdamW`` does (decoupled weight decay, bias corrections, ``eps`` outside the square
root) to the FP32 weight, and stores the new moments rounded to nearest BF16. With ``float32``
moments the step is ``torch.optim.AdamW``'s own (its fused kernel)."""

from __future__ import annotations

import math

import torch

MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``exp_avg``/``exp_avg_sq`` are stored in ``moments_dtype``.

    Neither path allocates a temporary the size of a parameter: ZeRO hands the optimizer one flat
    FP32 partition per group, and the unfused step's ``exp_avg_sq.sqrt() / c`` would hold two
    more copies of it at the step's peak. FP32 moments take torch's fused kernel (CPU and CUDA);
    BF16 moments are updated ``CHUNK`` elements at a time."""

    CHUNK = 1 << 22

    def __init__(self, params, moments_dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(params, **({"fused": True} if moments_dtype == torch.float32 else {}), **kwargs)
        self.moments_dtype = moments_dtype

    def new_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """A parameter's state before its first step: step 0 (on the parameter's device, as the
        fused kernel keeps it), zero moments in ``moments_dtype``."""
        step_device = param.device if self.moments_dtype == torch.float32 else "cpu"
        return {"step": torch.zeros((), dtype=torch.float32, device=step_device),
                "exp_avg": torch.zeros_like(param, dtype=self.moments_dtype),
                "exp_avg_sq": torch.zeros_like(param, dtype=self.moments_dtype)}

    @torch.no_grad()
    def step(self, closure=None):
        if self.moments_dtype == torch.float32:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(self.new_state(param))
                state["step"] += 1
                step = state["step"].item()
                flat = [param.view(-1), param.grad.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)]
                for start in range(0, param.numel(), self.CHUNK):
                    self._update(*(t[start:start + self.CHUNK] for t in flat), group, step)
        return loss

    @staticmethod
    def _update(param, grad, exp_avg_bf16, exp_avg_sq_bf16, group: dict, step: float) -> None:
        """AdamW on one slice, in FP32 as ``torch.optim.AdamW`` does it; the moments are stored back
        rounded to nearest BF16."""
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        grad = grad.float()
        exp_avg, exp_avg_sq = exp_avg_bf16.float(), exp_avg_sq_bf16.float()
        param.mul_(1 - lr * decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        param.addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**step))
        exp_avg_bf16.copy_(exp_avg)
        exp_avg_sq_bf16.copy_(exp_avg_sq)
