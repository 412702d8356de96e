"""Truncated SVD: the best rank-r approximation in Frobenius norm (Eckart and Young, 1936).

A rank-r pair ``U (out x r)``, ``V (r x in)`` costs ``r (out + in)`` parameters (plus the bias);
the error is ``sqrt(sum_{i > r} sigma_i^2)``.
"""

from __future__ import annotations

import torch

from flagstaff.jobs.compress.core import Budget, CompressedLayer, Context, register, relative_error

__all__ = ["truncated_svd", "svd_layer", "compress_svd"]


def truncated_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r SVD factors of W (Eckart-Young): ``U_r diag(s_r)`` (out x r), ``V_r^T`` (r x in)
    and all singular values, in float64."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r], S


def svd_layer(name: str, W: torch.Tensor, r: int, bias_params: int = 0) -> CompressedLayer:
    """One layer compressed by truncated SVD at rank r (Eckart-Young 1936)."""
    U, V, S = truncated_svd(W, r)
    W_hat = (U @ V).to(W.dtype)
    m, n = W.shape
    return CompressedLayer(
        name=name,
        weight_hat=W_hat,
        factors={"U": U.float(), "V": V.float()},
        params=r * (m + n) + bias_params,
        rel_error=relative_error(W, U @ V),
        info={"rank": r, "full_rank": min(m, n)},
    )


@register("svd")
def compress_svd(ctx: Context, budget: Budget) -> dict[str, CompressedLayer]:
    """Truncated SVD of every target layer at the budget's rank (Eckart-Young 1936)."""
    out = {}
    for name, W in ctx.matrices.items():
        out[name] = svd_layer(name, W, budget.rank_of(name, W), ctx.bias_params(name))
    return out
