"""Geometric median by smoothed Weiszfeld iterations (RFA)."""

from __future__ import annotations

import torch
from torch import Tensor

from flagstaff.strategies.aggregators.base import Aggregator, gram
from flagstaff.strategies.aggregators.registry import register

__all__ = ["GeometricMedian"]


@register("geomed")
class GeometricMedian(Aggregator):
    """Geometric median ``argmin_z sum_i w_i ||z - x_i||`` by smoothed Weiszfeld (Pillutla, Kakade,
    Harchaoui 2022, "Robust aggregation for federated learning", RFA).

    ``z <- sum_i b_i x_i / sum_i b_i`` with ``b_i = w_i / max(nu, ||z - x_i||)`` until the objective
    changes by at most ``tol`` (relative) or after ``max_iter`` iterations. Start (``init``):

    * ``"central"`` (default): the plain mean of the ``max(n - f, 1)`` inputs with the smallest
      sum of distances to all inputs (free, from the Gram matrix). It equals RFA's mean when f = 0;
      with f huge outliers the mean would start the iterations far away, and Weiszfeld then needs
      hundreds of iterations to come back (each outlier keeps pulling with a unit force). It is
      not a data point in general, which matters because a smoothed Weiszfeld started exactly on a
      data point with a small ``nu`` barely moves.
    * ``"mean"``: the weighted mean (RFA). ``"zero"``: the origin. ``weights`` (sample counts) are the
    ``w_i`` (uniform when None): the weighted geometric median is the natural weighted version.
    Needs n > 2f (breakdown point 1/2).

    Cost: one Gram product ``U U^T`` (one pass over d); z is kept as coefficients ``z = c^T U`` and
    every iteration works on n x n float64 matrices; the output is one (n,) x (n, d) product.
    Distances from the Gram matrix carry an absolute error of about ``eps(dtype) * ||x||^2``.
    """

    name = "geomed"
    uses_weights = True

    def __init__(
        self,
        *,
        f: int = 0,
        n: int | None = None,
        nu: float = 1e-6,
        max_iter: int = 100,
        tol: float = 1e-7,
        init: str = "central",
    ) -> None:
        super().__init__(f=f, n=n)
        if not nu > 0:
            raise ValueError(f"geomed: nu must be > 0 (smoothing), got {nu}")
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"geomed: max_iter must be an integer >= 1, got {max_iter}")
        if not tol >= 0:
            raise ValueError(f"geomed: tol must be >= 0, got {tol}")
        if init not in ("central", "mean", "zero"):
            raise ValueError(f"geomed: init must be 'central', 'mean' or 'zero', got {init!r}")
        self.nu, self.max_iter, self.tol, self.init = float(nu), int(max_iter), float(tol), init
        self._validate_n()

    def requirement(self, n: int) -> str | None:
        if n <= 2 * self.f:
            return f"needs n > 2f = {2 * self.f} inputs; use at least {2 * self.f + 1} clients"
        return None

    def coefficients(self, K: Tensor, weights: Tensor | None = None) -> Tensor:
        """Weiszfeld on the Gram matrix ``K`` (n x n, float64); returns c with ``z = c^T U``."""
        n = K.shape[0]
        alpha = (
            torch.full((n,), 1.0 / n, dtype=K.dtype)
            if weights is None
            else weights.double().cpu() / weights.double().sum().cpu()
        )
        sq = K.diagonal()

        def dists(c: Tensor) -> Tensor:
            return (sq - 2.0 * (K @ c) + c @ K @ c).clamp_min(0.0).sqrt()

        if self.init == "mean":
            c = alpha.clone()
        elif self.init == "zero":
            c = torch.zeros(n, dtype=K.dtype)
        else:
            D = (sq[:, None] + sq[None, :] - 2.0 * K).clamp_min(0.0).sqrt()
            k = max(n - self.f, 1)
            central = torch.sort(D.sum(dim=1), stable=True).indices[:k]
            c = torch.zeros(n, dtype=K.dtype)
            c[central] = 1.0 / k
        obj = float(alpha @ dists(c))
        for _ in range(self.max_iter):
            beta = alpha / dists(c).clamp_min(self.nu)
            c = beta / beta.sum()
            new = float(alpha @ dists(c))
            done = abs(obj - new) <= self.tol * max(new, 1e-300)
            obj = new
            if done:
                break
        return c

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        c = self.coefficients(gram(U).cpu(), weights)
        return c.to(device=U.device, dtype=U.dtype) @ U
