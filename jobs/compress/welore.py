"""WeLore (Jaiswal, Yin, Liu, Chen, Wang, "From GaLore to WeLore: how low-rank weights
non-uniformly emerge from low-rank gradients", 2024).

Per matrix the singular values are min-max normalized to [0, 1]; one global threshold ``t`` prunes
the values below it (keeps those ``>= t``), so each matrix gets its own rank. Matrices whose rank
reduction ``1 - r / min(m, n)`` reaches ``min_ratio`` (and whose factor pair is smaller than the
dense matrix) become low-rank components (rank-r SVD factors); the others stay dense, unchanged.
``target_reduction`` finds ``t`` by bisection over the normalized singular values so the achieved
parameter reduction of the target layers is as close as possible to the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flagstaff.jobs.compress.core import Budget, CompressedLayer, Context, register
from flagstaff.jobs.compress.svd import svd_layer

__all__ = [
    "normalized_spectrum",
    "welore_ranks",
    "welore_plan",
    "find_threshold",
    "compress_welore",
    "Plan",
]


def normalized_spectrum(S: torch.Tensor) -> torch.Tensor:
    """Min-max normalized singular values (WeLore): (s - min) / (max - min); all ones if flat."""
    S = S.double()
    lo, hi = S.min(), S.max()
    if not bool(hi > lo):
        return torch.ones_like(S)
    return (S - lo) / (hi - lo)


def welore_ranks(spectra: dict[str, torch.Tensor], t: float) -> dict[str, int]:
    """Rank per matrix under the global threshold t: normalized singular values >= t kept."""
    return {n: int((normalized_spectrum(S) >= t).sum()) for n, S in spectra.items()}


@dataclass
class Plan:
    """WeLore's decision for a threshold: ranks, which matrices are low-rank, parameters."""

    threshold: float
    ranks: dict[str, int]
    lowrank: dict[str, bool]
    params_before: int
    params_after: int

    @property
    def reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before


def welore_plan(
    shapes: dict[str, tuple[int, int]],
    spectra: dict[str, torch.Tensor],
    t: float,
    min_ratio: float = 0.0,
) -> Plan:
    """Ranks and low-rank/dense split at threshold t (weights only; biases are unchanged)."""
    ranks = welore_ranks(spectra, t)
    lowrank, before, after = {}, 0, 0
    for n, (m, k) in shapes.items():
        r = ranks[n]
        ratio = 1.0 - r / min(m, k)
        lowrank[n] = ratio >= min_ratio and ratio > 0 and r * (m + k) < m * k
        before += m * k
        after += r * (m + k) if lowrank[n] else m * k
    return Plan(float(t), ranks, lowrank, before, after)


def find_threshold(
    shapes: dict[str, tuple[int, int]],
    spectra: dict[str, torch.Tensor],
    target_reduction: float,
    min_ratio: float = 0.0,
) -> Plan:
    """Bisection for the global threshold whose parameter reduction is closest to the target.

    The reduction is a non-decreasing step function of t that changes only at the normalized
    singular values, so the search bisects over their sorted union and returns the better of the
    two thresholds around the target."""
    cand = torch.unique(torch.cat([normalized_spectrum(S) for S in spectra.values()]))
    cand = torch.cat([torch.zeros(1, dtype=cand.dtype), cand]).unique()  # sorted ascending
    lo, hi = 0, len(cand) - 1  # reduction(cand[lo]) <= target assumed; find first >= target
    if welore_plan(shapes, spectra, float(cand[hi]), min_ratio).reduction < target_reduction:
        return welore_plan(shapes, spectra, float(cand[hi]), min_ratio)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if welore_plan(shapes, spectra, float(cand[mid]), min_ratio).reduction >= target_reduction:
            hi = mid
        else:
            lo = mid
    a = welore_plan(shapes, spectra, float(cand[lo]), min_ratio)
    b = welore_plan(shapes, spectra, float(cand[hi]), min_ratio)
    return a if abs(a.reduction - target_reduction) < abs(b.reduction - target_reduction) else b


@register("welore")
def compress_welore(ctx: Context, budget: Budget) -> dict[str, CompressedLayer]:
    """WeLore (Jaiswal et al. 2024): global threshold on normalized spectra -> non-uniform ranks;
    low-rank factor pairs where the rank reduction reaches min_ratio, the rest dense."""
    mats = ctx.matrices
    if "welore_spectra" not in ctx.cache:
        ctx.cache["welore_spectra"] = {n: torch.linalg.svdvals(W.double()) for n, W in mats.items()}
    spectra = ctx.cache["welore_spectra"]
    shapes = {n: tuple(W.shape) for n, W in mats.items()}
    min_ratio = float(getattr(ctx.job, "min_ratio", 0.0))
    if budget.threshold is not None:
        plan = welore_plan(shapes, spectra, budget.threshold, min_ratio)
    else:
        plan = find_threshold(shapes, spectra, 1.0 - budget.ratio, min_ratio)
    ctx.cache["welore_plan"] = plan
    out = {}
    for n, W in mats.items():
        if plan.lowrank[n]:
            rec = svd_layer(n, W, plan.ranks[n], ctx.bias_params(n))
        else:
            m, k = W.shape
            rec = CompressedLayer(n, W.clone(), {}, m * k + ctx.bias_params(n), 0.0)
        rec.info.update(welore_rank=plan.ranks[n], lowrank=plan.lowrank[n], full_rank=min(W.shape))
        out[n] = rec
    return out
