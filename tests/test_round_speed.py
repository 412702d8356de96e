"""The round's speed changes keep its numbers (issue 22 items 1-2): bit for bit where the old
arithmetic is kept in a cheaper form."""

from __future__ import annotations

import pytest
import torch

from flagstaff.strategies.server_step import weighted_sum


@pytest.mark.parametrize("d", [7, 513, 4810, 40_000, 300_000])
def test_blocked_weighted_sum_equals_one_float64_mv(d: int) -> None:
    """The host's float64 weighted sum, converted in column blocks, equals one whole mv of the
    float64 updates (and drops non-finite rows)."""
    g = torch.Generator().manual_seed(d)
    u = torch.randn(50, d, generator=g) * torch.rand(50, 1, generator=g).exp()
    u[7, d // 2] = float("nan")
    w = torch.randint(1, 60, (50,), generator=g).float()
    total, wsum, finite = weighted_sum(u, w)
    assert finite.tolist() == [k != 7 for k in range(50)]
    keep = torch.where(finite, w, 0.0).double()
    want = torch.mv(torch.where(finite[:, None], u, 0.0).t().double(), keep)
    assert torch.equal(total[0], want) and float(wsum[0]) == float(keep.sum())


def test_weighted_sum_with_two_threads_equals_one_float64_mv() -> None:
    """With more than one thread the whole mv stays (MKL splits a block's sums differently)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(1)
        u = torch.randn(1000, 4810, generator=g) * torch.rand(1000, 1, generator=g).exp()
        w = torch.randint(1, 60, (1000,), generator=g).float()
        total, _, _ = weighted_sum(u, w)
        assert torch.equal(total[0], torch.mv(u.t().double(), w.double()))
    finally:
        torch.set_num_threads(before)


def test_a_finite_row_whose_float32_sum_overflows_is_kept() -> None:
    """Finite entries near float32's maximum overflow a float32 row sum; the row is still a finite
    update (REV22): only rows with a NaN or inf entry are dropped."""
    U = torch.tensor([[3e38, 3e38, 0.0], [1.0, 2.0, 3.0], [1.0, float("nan"), 0.0]])
    total, wsum, finite = weighted_sum(U, torch.ones(3))
    assert finite.tolist() == [True, True, False]
    assert float(wsum) == 2.0
    assert torch.equal(total[0], U[:2].double().sum(0))
