"""Ties that only exact arithmetic sees (issue 18 item 7, REV18B): Krum, Multi-Krum and Bulyan must
give the lowest index among inputs whose scores are equal in exact arithmetic, also when the inputs
are distinct (not duplicates) and their floating-point scores differ by rounding; MDA must not
depend on the order of its inputs, although its minimum diameter is attained by many subsets.

Oracle: brute force. The n cyclic shifts of one vector (by d/n coordinates) are distinct points
whose pairwise-distance multisets are identical (the cyclic group acts transitively and
||v - R^j v|| = ||v - R^-j v||), so every Krum score is exactly equal: the lowest index must win.
Computed in floating point, the equal sums of squares are added in different orders and differ in
the last bits (before the fix Krum picked a non-zero index in 40 of 50 float32 draws with n = 5).
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from flagstaff.strategies.aggregators import MDA, Bulyan, Krum, MultiKrum


def _rotations(n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64).to(dtype) + 3.0
    return torch.stack([torch.roll(v, k * (d // n)) for k in range(n)])


def _exact_scores(U: torch.Tensor, f: int, rows: list[int]) -> list[tuple[Fraction, Fraction]]:
    """Krum scores of the rows ``rows`` among themselves and their sums of squared distances to
    all of them (the documented tie-break), in exact rational arithmetic."""
    X = [[Fraction(float(x)) for x in U[i].tolist()] for i in rows]
    r = len(rows)
    D = [
        [sum((a - b) ** 2 for a, b in zip(X[i], X[j], strict=True)) for j in range(r)]
        for i in range(r)
    ]
    k = min(max(r - f - 2, 1), r - 1)
    return [(sum(sorted(D[i][j] for j in range(r) if j != i)[:k]), sum(D[i])) for i in range(r)]


def _exact_order(U: torch.Tensor, f: int, m: int) -> list[int]:
    sc = _exact_scores(U, f, list(range(U.shape[0])))
    return sorted(range(U.shape[0]), key=lambda i: (sc[i], i))[:m]


def _exact_bulyan(U: torch.Tensor, f: int) -> list[int]:
    remaining, chosen = list(range(U.shape[0])), []
    for _ in range(U.shape[0] - 2 * f):
        sc = _exact_scores(U, f, remaining)
        chosen.append(remaining.pop(min(range(len(sc)), key=lambda i: (sc[i], i))))  # noqa: B023
    return chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [5, 9])
def test_krum_multikrum_bulyan_exact_ties_of_distinct_rows_go_to_lowest_index(n, dtype):
    f, fb = (n - 3) // 2, (n - 3) // 4
    for seed in range(3):
        U = _rotations(n, 3 * n, dtype, seed)
        assert Krum(f=f).select(U) == 0, f"seed {seed}"  # all scores (and sums) tie exactly
        assert torch.equal(Krum(f=f)(U), U[0])
        assert MultiKrum(f=f).select(U).tolist() == _exact_order(U, f, n - f), f"seed {seed}"
        assert Bulyan(f=fb).select(U).tolist() == _exact_bulyan(U, fb), f"seed {seed}"


def test_krum_tie_tolerance_does_not_merge_an_outlier_into_the_honest_ties():
    # the slack of a score follows the norms of the rows it sums, so a huge Byzantine row does
    # not make a clearly worse (lower-index) near-honest row count as tied with the best one
    g = torch.Generator().manual_seed(3)
    H = torch.randn(9, 50, generator=g, dtype=torch.float64)
    near = H.mean(dim=0) + 3.0 * torch.randn(50, generator=g, dtype=torch.float64)
    U = torch.cat([near[None], H, 1e6 * torch.ones(2, 50, dtype=torch.float64)])
    f = 3
    D = torch.cdist(U, U).pow(2)
    k = U.shape[0] - f - 2
    scores = (
        (D + torch.diag(torch.full((U.shape[0],), float("inf"))))
        .topk(k, dim=1, largest=False)
        .values.sum(dim=1)
    )
    assert Krum(f=f).select(U) == int(scores.argmin()) != 0


@pytest.mark.parametrize("n,f", [(5, 1), (7, 2)])
def test_mda_is_permutation_invariant(n, f):
    # the diameter of a subset is one pair's distance, so generic inputs have many minimizing
    # subsets (all that keep the same farthest pair); the tie must not be broken by position
    g = torch.Generator().manual_seed(n * 10 + f)
    for _ in range(8):
        U = torch.randn(n, 4, generator=g, dtype=torch.float64)
        ref = MDA(f=f)(U)
        for _ in range(3):
            p = torch.randperm(n, generator=g)
            torch.testing.assert_close(MDA(f=f)(U[p]), ref, rtol=0, atol=1e-12)


def test_mda_matches_brute_force_definition():
    # among the subsets of minimum diameter, the one with the smallest sum of squared pairwise
    # distances (the documented tie-break)
    g = torch.Generator().manual_seed(1)
    for n, f in [(5, 1), (6, 2), (8, 3)]:
        U = torch.randn(n, 3, generator=g, dtype=torch.float64)
        D = torch.cdist(U, U).pow(2)

        def key(S, D=D):
            idx = torch.tensor(S)
            sub = D[idx][:, idx]
            return (float(sub.max()), float(sub.sum()))

        best = min(itertools.combinations(range(n), n - f), key=key)
        torch.testing.assert_close(MDA(f=f)(U), U[list(best)].mean(dim=0))


@pytest.mark.parametrize("n,f", [(3, 0), (7, 1), (11, 2)])
def test_krum_multikrum_bulyan_are_permutation_invariant(n, f):
    # with one neighbour (Krum at n = f + 3; Bulyan's last picks of iterated Krum for f <= 2)
    # two mutual nearest neighbours score exactly the same on generic inputs; before the fix the
    # lower index won, so Bulyan's output moved by up to 0.95 when the inputs were permuted
    g = torch.Generator().manual_seed(n + f)
    for _ in range(4):
        U = torch.randn(n, 6, generator=g, dtype=torch.float64)
        rules = [Krum(f=f), MultiKrum(f=f)] + ([Bulyan(f=f)] if n >= 4 * f + 3 else [])
        for rule in rules:
            ref = rule(U)
            for _ in range(3):
                p = torch.randperm(n, generator=g)
                torch.testing.assert_close(rule(U[p]), ref, rtol=0, atol=1e-12)
