"""Distance-based selection rules: Krum, Multi-Krum, Bulyan, minimum-diameter averaging (MDA).

All of them need the ``(n, n)`` pairwise distances; those come from one Gram product (one pass over
``d``), after which the selection works on ``n x n`` float64 matrices.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from strategies.aggregators.base import (
    Aggregator,
    coordinate_median,
    mean_of_rows,
    pairwise_sq_dists,
)
from strategies.aggregators.basic import _closest_mean
from strategies.aggregators.registry import register

__all__ = ["Krum", "MultiKrum", "Bulyan", "MDA", "krum_scores"]


def krum_scores(D: Tensor, f: int) -> Tensor:
    """Krum scores from squared distances ``D`` (n x n): for each i, the sum of the squared
    distances to its ``n - f - 2`` nearest other points (Blanchard et al. 2017; Flower uses the same
    count). The count is clamped to ``[1, n - 1]`` so that small remaining sets (inside Bulyan)
    still get a score; with n = 1 the score is 0.
    """
    n = D.shape[0]
    if n == 1:
        return D.new_zeros(1)
    k = min(max(n - f - 2, 1), n - 1)
    off = D.clone()
    off.fill_diagonal_(float("inf"))
    return off.topk(k, dim=1, largest=False).values.sum(dim=1)


def _krum_requirement(n: int, f: int) -> str | None:
    if n <= 2 * f + 2:
        return (
            f"needs n > 2f + 2 = {2 * f + 2} inputs; use at least {2 * f + 3} clients or "
            f"f <= {max((n - 3) // 2, 0)}"
        )
    return None


@register("krum")
class Krum(Aggregator):
    """Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017): return the input whose sum of
    squared distances to its ``n - f - 2`` nearest neighbours is smallest (ties: lowest index).
    Needs n > 2f + 2. Ignores weights.
    """

    name = "krum"

    def __init__(self, *, f: int = 0, n: int | None = None) -> None:
        super().__init__(f=f, n=n)
        self._validate_n()

    def requirement(self, n: int) -> str | None:
        return _krum_requirement(n, self.f)

    def select(self, U: Tensor) -> int:
        """Index of the input with the lowest score (the first one among exactly tied scores)."""
        return int(torch.argmin(krum_scores(pairwise_sq_dists(U), self.f)))

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        return U[self.select(U)].clone()


@register("multikrum")
class MultiKrum(Aggregator):
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): the plain average of the ``m``
    inputs with the lowest Krum scores (``n - f - 2`` neighbours). Default ``m = n - f`` (computed
    from the actual number of inputs). Needs n > 2f + 2 and 1 <= m <= n. Ignores weights.
    """

    name = "multikrum"

    def __init__(self, *, f: int = 0, n: int | None = None, m: int | None = None) -> None:
        super().__init__(f=f, n=n)
        if m is not None and (int(m) != m or m < 1):
            raise ValueError(f"multikrum: m must be a positive integer or None (= n - f), got {m}")
        self.m = None if m is None else int(m)
        self._validate_n()

    def requirement(self, n: int) -> str | None:
        msg = _krum_requirement(n, self.f)
        if msg is None and self.m is not None and self.m > n:
            return f"averages m={self.m} inputs but only {n} arrive; use m <= {n} or m=None"
        return msg

    def select(self, U: Tensor) -> Tensor:
        """Indices of the ``m`` lowest scores, in order (stable sort: ties go to the lower index,
        like Krum's argmin)."""
        m = U.shape[0] - self.f if self.m is None else self.m
        scores = krum_scores(pairwise_sq_dists(U), self.f)
        return torch.sort(scores, stable=True).indices[:m]

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        return mean_of_rows(U, self.select(U))


@register("bulyan")
class Bulyan(Aggregator):
    """Bulyan over Krum (El Mhamdi, Guerraoui, Rouault, ICML 2018). Needs n >= 4f + 3.

    1. Selection: ``theta = n - 2f`` inputs, taking each time the Krum winner of the remaining set
       (remaining size r, ``r - f - 2`` neighbours, clamped to at least 1; distances are computed
       once).
    2. Per coordinate, the mean of the ``beta = theta - 2f`` selected values closest to the
       coordinate-wise median of the selected set (even-theta median: mean of the two middles).

    Ignores weights.
    """

    name = "bulyan"

    def __init__(self, *, f: int = 0, n: int | None = None) -> None:
        super().__init__(f=f, n=n)
        self._validate_n()

    def requirement(self, n: int) -> str | None:
        if n < 4 * self.f + 3:
            return (
                f"needs n >= 4f + 3 = {4 * self.f + 3} inputs; use at least {4 * self.f + 3} "
                f"clients or f <= {max((n - 3) // 4, 0)}"
            )
        return None

    def select(self, U: Tensor) -> Tensor:
        """Indices (in selection order) of the ``n - 2f`` inputs picked by iterated Krum."""
        n, f = U.shape[0], self.f
        D = pairwise_sq_dists(U)
        remaining = list(range(n))
        chosen: list[int] = []
        for _ in range(n - 2 * f):  # a loop over n, on n x n matrices
            sub = D[remaining][:, remaining]
            winner = remaining[int(torch.argmin(krum_scores(sub, f)))]
            chosen.append(winner)
            remaining.remove(winner)
        return torch.tensor(chosen, device=U.device)

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        f = self.f
        chosen = self.select(U)
        if f == 0:
            return mean_of_rows(U, chosen)
        V = U.T[:, chosen.to(U.device)].contiguous()  # (d, theta) selected, one copy
        beta = V.shape[1] - 2 * f
        return _closest_mean(V, coordinate_median(V, transposed=True), beta)


@register("mda")
class MDA(Aggregator):
    """Minimum-diameter averaging (El Mhamdi, Guerraoui, Rouault 2020, "Distributed momentum for
    Byzantine-resilient learning"; Rousseeuw's minimum-volume idea): average the subset of
    ``n - f`` inputs whose diameter (largest pairwise distance) is smallest (ties: first subset in
    lexicographic order of the excluded indices). Needs n > 2f. Ignores weights.

    Exhaustive over all C(n, f) subsets (vectorized in chunks on n x n matrices), so it is meant
    for small n or f: more than ``max_subsets`` subsets raise ``ValueError``.
    """

    name = "mda"

    def __init__(self, *, f: int = 0, n: int | None = None, max_subsets: int = 1_000_000) -> None:
        super().__init__(f=f, n=n)
        if max_subsets < 1:
            raise ValueError(f"mda: max_subsets must be >= 1, got {max_subsets}")
        self.max_subsets = int(max_subsets)
        self._validate_n()

    def requirement(self, n: int) -> str | None:
        if n <= 2 * self.f:
            return f"needs n > 2f = {2 * self.f} inputs; use at least {2 * self.f + 1} clients"
        count = math.comb(n, self.f)
        if count > self.max_subsets:
            return (
                f"MDA searches all C(n, f) = C({n}, {self.f}) = {count:.3g} subsets, above "
                f"max_subsets={self.max_subsets:.3g}; lower f, raise max_subsets, or use a "
                "polynomial rule (krum, multikrum, bulyan, geomed)"
            )
        return None

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        n, f = U.shape[0], self.f
        if f == 0:
            return mean_of_rows(U)
        D = pairwise_sq_dists(U)  # squared diameters order subsets like diameters
        subsets = itertools.combinations(range(n), f)  # excluded indices, lexicographic
        chunk = max(1, 2**22 // (n * n))
        best_val, best_ex = math.inf, None
        while True:  # a loop over chunks of subsets (at most max_subsets), not over d
            block = list(itertools.islice(subsets, chunk))
            if not block:
                break
            ex = torch.tensor(block, dtype=torch.long)
            keep = torch.ones(ex.shape[0], n, dtype=D.dtype)
            keep.scatter_(1, ex, 0.0)
            diam = (keep[:, :, None] * keep[:, None, :] * D).amax(dim=(1, 2))
            idx = int(torch.argmin(diam))  # first minimum within the chunk
            if float(diam[idx]) < best_val:
                best_val, best_ex = float(diam[idx]), block[idx]
        return mean_of_rows(U, [i for i in range(n) if i not in best_ex])
