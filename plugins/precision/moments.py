"""AdamW with its moments in BF16 and the update in FP32 (report 3.3.1, "Low-Precision Optimizer
States": BF16 ``exp_avg``/``exp_avg_sq``, FP32 master weights). Neither ``torch.optim.AdamW`` (its
states take the parameter's dtype, FP32 for ZeRO's master partitions) nor DeepSpeed's Adams (the
same, or everything in the parameter's dtype) keep BF16 moments beside FP32 weights.

Each step reads the BF16 moments into FP32, applies AdamW's update exactly as
``torch.optim.AdamW`` does (decoupled weight decay, bias corrections, ``eps`` outside the square
root) to the FP32 weight, and stores the new moments rounded to nearest BF16. With ``float32``
moments the step is ``torch.optim.AdamW``'s own."""

from __future__ import annotations

import math

import torch

MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``exp_avg``/``exp_avg_sq`` are stored in ``moments_dtype``."""

    def __init__(self, params, moments_dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(params, **kwargs)
        self.moments_dtype = moments_dtype

    def new_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """A parameter's state before its first step: step 0, zero moments in ``moments_dtype``."""
        return {"step": torch.zeros((), dtype=torch.float32),
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
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(self.new_state(param))
                grad = param.grad.float()
                state["step"] += 1
                step = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"].float(), state["exp_avg_sq"].float()
                param.mul_(1 - lr * decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                param.addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**step))
                state["exp_avg"].copy_(exp_avg)  # rounded to nearest BF16
                state["exp_avg_sq"].copy_(exp_avg_sq)
        return loss
