"""Distance-based selection rules: Krum, Multi-Krum, Bulyan, minimum-diameter averaging (MDA).

All of them need the ``(n, n)`` pairwise distances; those come from one Gram product (one pass over
``d``), after which the selection works on ``n x n`` float64 matrices.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from flagstaff.strategies.aggregators.base import (
    Aggregator,
    coordinate_median,
    gram,
    mean_of_rows,
    pairwise_sq_dists,
)
from flagstaff.strategies.aggregators.basic import _closest_mean
from flagstaff.strategies.aggregators.registry import register

__all__ = ["Krum", "MultiKrum", "Bulyan", "MDA", "krum_scores", "krum_order"]


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


def _scores_and_slack(D: Tensor, sq: Tensor, f: int, unit: float) -> tuple[Tensor, Tensor]:
    """Krum scores (as :func:`krum_scores`) and a bound on each score's rounding error: ``unit``
    times the sum, over the ``k`` distances it adds, of ``||x_i||^2 + ||x_j||^2`` (a distance
    from the Gram matrix, ``K_ii + K_jj - 2 K_ij``, loses precision relative to the norms)."""
    n = D.shape[0]
    if n == 1:
        return D.new_zeros(1), D.new_zeros(1)
    k = min(max(n - f - 2, 1), n - 1)
    off = D.clone()
    off.fill_diagonal_(float("inf"))
    vals, idx = off.topk(k, dim=1, largest=False)
    return vals.sum(dim=1), unit * (k * sq + sq[idx].sum(dim=1))


def _rounding_unit(U: Tensor) -> float:
    """``4 sqrt(d) eps``, eps of the Gram product's dtype: a generous bound (measured, REV18B:
    equal-in-exact-arithmetic scores differ by 2 to 14 eps times the norm sum, d = 30 to 3e5); it
    only decides which scores are recomputed directly (:func:`_direct_scores`)."""
    dtype = U.dtype if U.element_size() >= 4 else torch.float32
    return 4.0 * torch.finfo(dtype).eps * math.sqrt(U.shape[1])


def _direct_scores(U: Tensor, cand: list[int], among: list[int], f: int) -> Tensor:
    """``(len(cand), 2)``: the Krum scores of the rows ``cand`` among the rows ``among`` and
    their sums of squared distances to all of ``among`` (the tie-break), from float64
    differences (``torch.cdist`` without the Gram product: no cancellation, error about eps64 of
    the score; float32 inputs differ exactly in float64). O(len(cand) len(among) d) time, in
    chunks of coordinates so that the float64 copies stay small (about 32 MB)."""
    rows_c = torch.as_tensor(cand, device=U.device)
    rows_a = torch.as_tensor(among, device=U.device)
    step = max(1, 2**22 // len(among))
    D = torch.zeros(len(cand), len(among), dtype=torch.float64, device=U.device)
    for lo in range(0, U.shape[1], step):  # a loop over chunks of coordinates, not over d
        X = U[rows_c, lo : lo + step].double()
        V = U[rows_a, lo : lo + step].double()
        D += torch.cdist(X, V, compute_mode="donot_use_mm_for_euclid_dist").pow_(2)
    if len(among) == 1:
        return D.new_zeros(len(cand), 2)
    total = D.sum(dim=1)
    pos = {j: p for p, j in enumerate(among)}
    for r, i in enumerate(cand):
        D[r, pos[i]] = math.inf
    k = min(max(len(among) - f - 2, 1), len(among) - 1)
    return torch.stack([D.topk(k, dim=1, largest=False).values.sum(dim=1), total], dim=1).cpu()


def _tie_order(
    scores: Tensor, slack: Tensor, m: int, direct: Callable[[list[int]], Tensor], d: int
) -> list[int]:
    """The ``m`` lowest Krum scores, in order; among tied scores the input with the smallest sum
    of squared distances to all the others first, then the lowest index.

    A tie is equality in exact arithmetic. Scores within their rounding bound of the lowest
    remaining one (``s_i - s_min <= slack_i + slack_min``) are recomputed directly
    (``direct(candidates)``: float64 differences); among them, those within ``16 log2(d) eps64``
    (relative) of the smallest count as tied, and the same for the sums. The sums break the
    ties that are generic, not rare: with one neighbour (n = f + 3, and Bulyan's last picks for
    f <= 2) two mutual nearest neighbours always score the same, and taking the lower index
    made the result depend on the order of the inputs. A loop over m <= n picks on (n,) vectors."""
    remaining = torch.ones(scores.shape[0], dtype=torch.bool)
    rtol = 16.0 * math.log2(max(d, 2)) * torch.finfo(torch.float64).eps
    exact: dict[int, tuple[float, float]] = {}
    order: list[int] = []

    def lowest(cand: list[int], j: int) -> list[int]:
        low = min(exact[i][j] for i in cand)
        return [i for i in cand if exact[i][j] - low <= rtol * max(abs(low), abs(exact[i][j]))]

    for _ in range(m):
        masked = torch.where(remaining, scores, torch.full_like(scores, math.inf))
        b = int(torch.argmin(masked))
        cand = (remaining & (scores - scores[b] <= slack + slack[b])).nonzero().flatten().tolist()
        if len(cand) > 1:
            todo = [i for i in cand if i not in exact]
            if todo:
                exact.update(zip(todo, map(tuple, direct(todo).tolist()), strict=True))
            cand = lowest(lowest(cand, 0), 1)
        order.append(cand[0])  # candidates are in increasing index order
        remaining[cand[0]] = False
    return order


def krum_order(U: Tensor, f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` inputs with the lowest Krum scores, in order; ties go to the smallest
    sum of squared distances to all inputs, then to the lowest index.

    A tie is equality in exact arithmetic: exactly equal rows get bit-identical scores
    (:func:`pairwise_sq_dists`); distinct rows whose scores are equal in exact arithmetic (e.g.
    symmetric configurations) differ by rounding that depends on the BLAS kernel, so scores
    within their rounding bound are recomputed from float64 differences and compared with a
    float64 tolerance (:func:`_tie_order`).
    """
    K = gram(U)
    n = U.shape[0]
    scores, slack = _scores_and_slack(
        pairwise_sq_dists(U, K), K.diagonal().clone(), f, _rounding_unit(U)
    )
    return _tie_order(
        scores, slack, m, lambda cand: _direct_scores(U, cand, list(range(n)), f), U.shape[1]
    )


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
    squared distances to its ``n - f - 2`` nearest neighbours is smallest (ties, i.e. scores equal
    in exact arithmetic: the smallest sum of squared distances to all inputs, then the lowest
    index, :func:`krum_order`).
    Needs n > 2f + 2. Ignores weights.
    """

    name = "krum"

    def __init__(self, *, f: int = 0, n: int | None = None) -> None:
        super().__init__(f=f, n=n)
        self._validate_n()

    def requirement(self, n: int) -> str | None:
        return _krum_requirement(n, self.f)

    def select(self, U: Tensor) -> int:
        """Index of the input with the lowest score (ties: :func:`krum_order`)."""
        return krum_order(U, self.f, 1)[0]

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
        """Indices of the ``m`` lowest scores, in order (ties as in Krum: :func:`krum_order`)."""
        m = U.shape[0] - self.f if self.m is None else self.m
        return torch.tensor(krum_order(U, self.f, m), dtype=torch.long)

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
        K = gram(U)
        D, sq, unit = pairwise_sq_dists(U, K), K.diagonal().clone(), _rounding_unit(U)
        remaining = list(range(n))
        chosen: list[int] = []
        for _ in range(n - 2 * f):  # a loop over n, on n x n matrices
            sub = D[remaining][:, remaining]
            scores, slack = _scores_and_slack(sub, sq[remaining], f, unit)
            among = list(remaining)

            def direct(cand: list[int], among: list[int] = among) -> Tensor:
                return _direct_scores(U, [among[c] for c in cand], among, f)

            winner = remaining[_tie_order(scores, slack, 1, direct, U.shape[1])[0]]
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
    ``n - f`` inputs whose diameter (largest pairwise distance) is smallest. Needs n > 2f.
    Ignores weights.

    Ties are generic here, not rare: a subset's diameter is one pair's distance, so all subsets
    that keep the same farthest pair tie exactly (e.g. n = 5, f = 1 whenever the two farthest
    pairs are disjoint). They are broken by the smallest sum of squared pairwise distances within
    the subset (then by the first subset in lexicographic order of the excluded indices, which
    only matters for duplicate rows), so the result does not depend on the order of the inputs.
    ByzFL 0.0.11 and the reference code keep the first minimizer in lexicographic order of the
    kept indices, which does (REV18B: up to 1.07 apart on Gaussian inputs, n = 5, f = 1).

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
        best_val, best_ex = (math.inf, math.inf), None
        while True:  # a loop over chunks of subsets (at most max_subsets), not over d
            block = list(itertools.islice(subsets, chunk))
            if not block:
                break
            ex = torch.tensor(block, dtype=torch.long)
            keep = torch.ones(ex.shape[0], n, dtype=D.dtype)
            keep.scatter_(1, ex, 0.0)
            inside = keep[:, :, None] * keep[:, None, :] * D
            diam = inside.amax(dim=(1, 2))
            # among the smallest diameters (exact ties: the same entry of D), the smallest sum
            spread = torch.where(diam == diam.min(), inside.sum(dim=(1, 2)), math.inf)
            idx = int(torch.argmin(spread))  # first minimum within the chunk
            val = (float(diam[idx]), float(spread[idx]))
            if val < best_val:
                best_val, best_ex = val, block[idx]
        return mean_of_rows(U, [i for i in range(n) if i not in best_ex])
