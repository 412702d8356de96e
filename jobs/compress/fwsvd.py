"""Fisher-weighted SVD (Hsu, Hua, Tai, Lee, Ke, Shen, Jin, "Language model compression with
weighted low-rank factorization", ICLR 2022).

Fisher importance of a weight: ``I_ij = sum over batches (dL/dW_ij)^2``; rows share one importance
``I_i = sum_j I_ij``. FWSVD takes the SVD of ``diag(sqrt(I)) W``, keeps rank r and undoes the row
scaling: ``W ~ diag(sqrt(I))^-1 [diag(sqrt(I)) W]_r``. This is the exact minimizer of the
row-weighted error ``||diag(sqrt(I)) (W - W_hat)||_F`` over rank-r matrices (Eckart-Young in the
weighted norm), and plain truncated SVD when all rows weigh the same. The row sums are a
data-parallel sum: :func:`jobs.compress.core.fisher_row_sums_sharded` computes them on Ray actors.
"""

from __future__ import annotations

import torch

from flagstaff.jobs.compress.core import (
    Budget,
    CompressedLayer,
    Context,
    fisher_row_sums_sharded,
    register,
    relative_error,
)

__all__ = ["fwsvd", "fwsvd_layer", "compress_fwsvd", "row_weights", "weigh"]


def row_weights(importance: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """sqrt(I_i) (Hsu et al. 2022), floored at ``floor`` times the largest so the row scaling can
    be undone (rows with zero Fisher information, e.g. dead units, get the floor); all-zero
    importance gives equal weights (plain SVD)."""
    w = importance.double().clamp_min(0).sqrt()
    top = w.max()
    if not bool(top > 0):
        return torch.ones_like(w)
    return w.clamp_min(floor * top)


def weigh(W: torch.Tensor, w: torch.Tensor, axis: str = "input") -> torch.Tensor:
    """``W`` (out x in) with its input columns (``axis="input"``) or output rows scaled by ``w``."""
    return W * w[None, :] if axis == "input" else w[:, None] * W


def fwsvd(
    W: torch.Tensor, importance: torch.Tensor, r: int, axis: str = "input"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r FWSVD factors (Hsu et al., ICLR 2022) of a torch weight ``W`` (out x in): ``U``
    (out x r) and ``V`` (r x in) with the Fisher scaling undone, and the singular values of the
    scaled matrix, in float64; ``importance`` is per input feature or per output unit (``axis``)."""
    w = row_weights(importance)
    U, S, Vh = torch.linalg.svd(weigh(W.double(), w, axis), full_matrices=False)
    if axis == "input":
        return U[:, :r] * S[:r], Vh[:r] / w[None, :], S
    return (U[:, :r] * S[:r]) / w[:, None], Vh[:r], S


def fwsvd_layer(
    name: str,
    W: torch.Tensor,
    importance: torch.Tensor,
    r: int,
    bias_params: int = 0,
    axis: str = "input",
) -> CompressedLayer:
    """One layer compressed by FWSVD at rank r (Hsu et al., ICLR 2022)."""
    U, V, S = fwsvd(W, importance, r, axis)
    m, n = W.shape
    w = row_weights(importance)
    W_hat = U @ V
    werr = torch.linalg.norm(weigh(W.double() - W_hat, w, axis)) / torch.linalg.norm(
        weigh(W.double(), w, axis)
    )
    return CompressedLayer(
        name=name,
        weight_hat=W_hat.to(W.dtype),
        factors={"U": U.float(), "V": V.float()},
        params=r * (m + n) + bias_params,
        rel_error=relative_error(W, W_hat),
        info={"rank": r, "full_rank": min(m, n), "weighted_rel_error": float(werr)},
    )


def fisher(ctx: Context) -> dict[str, torch.Tensor]:
    """The Fisher row sums of the context's target layers, accumulated over the calibration data
    on ``ctx.hosts`` shards (Ray actors when ``ctx.backend == "ray"``); cached."""
    if "fisher" not in ctx.cache:
        ctx.progress("fisher row sums")
        sums, info = fisher_row_sums_sharded(
            ctx.model,
            list(ctx.layers),
            ctx.x_calib,
            ctx.y_calib,
            int(getattr(ctx.job, "fisher_batch", 1)),
            ctx.backend,
            ctx.hosts,
            fisher_axis(ctx),
        )
        ctx.cache["fisher"], ctx.cache["fisher_info"] = sums, info
    return ctx.cache["fisher"]


def fisher_axis(ctx: Context) -> str:
    """The job's ``fisher_axis`` (default "input", the paper's rows)."""
    return str(getattr(ctx.job, "fisher_axis", "input"))


@register("fwsvd")
def compress_fwsvd(ctx: Context, budget: Budget) -> dict[str, CompressedLayer]:
    """FWSVD of every target layer at the budget's rank (Hsu et al., ICLR 2022)."""
    rows = fisher(ctx)
    out = {}
    for name, W in ctx.matrices.items():
        r = budget.rank_of(name, W)
        out[name] = fwsvd_layer(name, W, rows[name], r, ctx.bias_params(name), fisher_axis(ctx))
    return out
