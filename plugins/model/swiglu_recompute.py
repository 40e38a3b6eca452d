"""SwiGLU whose output is not kept for backward (report 3.3.3: "the SwiGLU output is recomputed"):
one autograd function runs ``y = W_down((silu(g) * u) [* w])`` with ``[g, u] = W_up x`` and keeps
only the GEMM input ``x`` (as ``gemm.keep`` stores it: FP8 tiles under FP8), the SwiGLU input
``[g, u]`` (``store``: FP8 1x128 tiles under ``train.memory.fp8_activations``) and the optional
per-row weights ``w``; backward recomputes ``silu(g) * u`` from ``[g, u]``. Its gradients are the
formulas autograd applies to the same ops run one by one.

``up_weights`` are the projections whose outputs concatenate to ``[g, u]``: (gate, up) of a dense
FFN, or (gate_up,) of an expert bank; ``counts`` the rows per expert (None: dense). With row
weights (``train.memory.weighted_combine``) each row's routing weight multiplies the SwiGLU
output before the down-projection: W_down(w h) = w W_down(h), so the MoE combine keeps no expert
output and the weight's gradient is <d(w h), h>, from the recomputed h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gemm import Gemm


def weighted(h: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """Each row times its weight, multiplied in at least float32 and rounded to ``h``'s dtype once (as
    the gate-weighted combine does)."""
    wide = torch.promote_types(h.dtype, torch.float32)
    return (h.to(wide) * row_weights.to(wide)[:, None]).to(h.dtype)


class _RecomputedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, down, counts, row_weights, gemm: Gemm, store: Gemm, kept, to_input, *up_weights):
        prepared = [gemm.prepare(w) for w in up_weights]
        prepared_down = gemm.prepare(down)
        kept_x = gemm.keep(x) if kept is None else kept
        ctx.to_input = to_input
        parts = [gemm.fprop(kept_x, w, counts).to(x.dtype) for w in prepared]
        gu = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        gate, up = gu.chunk(2, dim=-1)
        h = F.silu(gate) * up
        if row_weights is not None:
            h = weighted(h, row_weights)
        stored = store.store(gu)
        ctx.gemms, ctx.weights = (gemm, store), (prepared, prepared_down)
        ctx.layout = (len(kept_x), len(stored), gu.shape, [p.shape[-2] for p in up_weights], x.shape[-1], x.dtype,
                      [w.dtype for w in up_weights], down.dtype, counts is not None, row_weights is not None)
        extra = [t for t in (counts, row_weights) if t is not None]
        ctx.save_for_backward(*kept_x, *stored, *extra)
        return gemm.fprop(gemm.keep(h), prepared_down, counts).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        (gemm, store), (prepared, prepared_down) = ctx.gemms, ctx.weights
        kept_count, stored_count, gu_shape, widths, x_cols, dtype, up_dtypes, down_dtype, grouped, weighted_rows = \
            ctx.layout
        saved = list(ctx.saved_tensors)
        kept_x, stored = saved[:kept_count], saved[kept_count:kept_count + stored_count]
        rest = saved[kept_count + stored_count:]
        counts = rest.pop(0) if grouped else None
        row_weights = rest.pop(0) if weighted_rows else None
        gate, up = store.load(stored, gu_shape, dtype).chunk(2, dim=-1)
        silu = F.silu(gate)
        h = silu * up
        dh = gemm.dgrad(dy, prepared_down, counts).to(dtype)
        d_row_weights = None
        if row_weights is not None:
            wide = torch.promote_types(dtype, torch.float32)
            d_row_weights = (dh.to(wide) * h.to(wide)).sum(-1)
            h, dh = weighted(h, row_weights), weighted(dh, row_weights)
        d_down = gemm.wgrad(dy, gemm.keep(h), counts, h.shape[-1]).to(down_dtype)
        d_gu = torch.cat([torch.ops.aten.silu_backward(dh * up, gate), dh * silu], dim=-1)
        d_parts = d_gu.split(widths, dim=-1)
        dx = None  # summed in x's dtype, as autograd sums the gradients of x's readers
        for d_part, weight in zip(d_parts, prepared):
            term = gemm.dgrad(d_part.contiguous(), weight, counts).to(dtype)
            dx = term if dx is None else dx + term
        d_up = [gemm.wgrad(d_part.contiguous(), kept_x, counts, x_cols).to(dt) for d_part, dt in zip(d_parts, up_dtypes)]
        if ctx.to_input is not None:
            dx = ctx.to_input(dx)
        return (dx, d_down, None, d_row_weights, None, None, None, None, *d_up)


def recomputed_swiglu(x: torch.Tensor, up_weights: tuple[torch.Tensor, ...], down: torch.Tensor, gemm: Gemm,
                      store: Gemm, counts: torch.Tensor | None = None, row_weights: torch.Tensor | None = None,
                      kept: tuple[torch.Tensor, ...] | None = None, to_input=None) -> torch.Tensor:
    """``W_down((silu(g) * u) [* row_weights])``, ``[g, u]`` the concatenated outputs of ``up_weights``
    on ``x``; backward keeps ``gemm.keep(x)``, ``store.store([g, u])`` and the row weights only.
    ``kept``: the GEMM input already in ``gemm.keep``'s form (FP8-dispatched rows), ``x`` then the
    tensor they came from and ``to_input`` the map of the rows' gradient to ``x``'s."""
    return _RecomputedSwiGLU.apply(x, down, counts, row_weights, gemm, store, kept, to_input, *up_weights)
