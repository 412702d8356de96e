"""CoSpaDi: exact sparsity, budget, whitening optimality and monotone alternation on small cases."""

from __future__ import annotations

import math

import pytest
import torch

from flagstaff.jobs.compress.cospadi import (
    batch_omp,
    cospadi,
    cospadi_budget,
    cospadi_fit,
    cospadi_params,
    cospadi_reconstruct,
    functional_error,
)

OUT, IN, N = 40, 24, 400


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small problems on a shared 2-core box
    yield
    torch.set_num_threads(before)


def _problem(seed: int = 0, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense weight and activations whose covariance spans 10^spread in scale (anisotropic)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(IN, IN, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -spread, IN, dtype=torch.float64)
    X = torch.randn(N, IN, generator=g, dtype=torch.float64) * scales @ Q.T
    return W, X


def _whitened_svd_error(W: torch.Tensor, X: torch.Tensor, r: int) -> float:
    """Closed form: best rank-r approximation in the ||X (.)^T||_F norm, relative."""
    L = torch.linalg.cholesky(X.T @ X)
    sv = torch.linalg.svdvals(L.T @ W.T)
    return float((sv[r:] ** 2).sum().sqrt() / sv.norm())


def test_shapes_orientation_and_exact_column_sparsity():
    W, X = _problem()
    k, s = 16, 4
    D, C = cospadi(W, X, k, s, iters=5)
    assert D.shape == (IN, k) and C.shape == (k, OUT)
    assert D.dtype == W.dtype and C.dtype == W.dtype
    nnz = (C != 0).sum(dim=0)
    assert torch.equal(nnz, torch.full((OUT,), s))
    W_hat = cospadi_reconstruct(D, C)
    assert W_hat.shape == W.shape
    assert torch.allclose(W_hat, C.T @ D.T)


def test_parameter_count_and_budget():
    # D: 8*4 = 32, values: 2*10 = 20, int16 indices against float32: 20 * 0.5 = 10
    assert cospadi_params(10, 8, 4, 2, index_bits=16) == 62
    # default: uint8 indices for k <= 256 (a quarter parameter each), uint16 beyond
    assert cospadi_params(10, 8, 4, 2) == 32 + 20 + 5
    assert cospadi_params(10, 8, 256, 2) == 8 * 256 + 20 + 5
    assert cospadi_params(10, 8, 257, 2) == 8 * 257 + 20 + 10
    assert cospadi_params(10, 8, 4, 2, index_bits=32) == 72
    assert cospadi_params(10, 8, 4, 2, index_bits=0) == 52
    assert cospadi_params(10, 8, 4, 3, index_bits=2, value_bits=16) == 32 + 30 + 4  # ceil(7.5)
    for out, in_, ratio in [(40, 24, 0.5), (384, 1536, 0.5), (1536, 384, 0.3), (64, 64, 0.8)]:
        k, s = cospadi_budget(out, in_, ratio)
        assert 1 <= s <= k and s <= in_
        assert k == math.floor(2.0 * s)
        assert cospadi_params(out, in_, k, s) <= ratio * out * in_
        # the budget is tight: one more nonzero per column (and its two atoms) would not fit
        if s < in_:
            assert cospadi_params(out, in_, 2 * (s + 1), s + 1) > ratio * out * in_
    k, s = cospadi_budget(40, 24, 0.5, k_over_s=3.0, index_bits=32)
    assert k == 3 * s and cospadi_params(40, 24, k, s, index_bits=32) <= 0.5 * 40 * 24
    with pytest.raises(ValueError):
        cospadi_budget(40, 24, 0.001)
    with pytest.raises(ValueError):
        cospadi_budget(40, 24, 1.5)


def test_fit_within_budget_end_to_end():
    W, X = _problem(1)
    k, s = cospadi_budget(OUT, IN, 0.5)
    D, C = cospadi(W, X, k, s, iters=3)
    assert torch.equal((C != 0).sum(0), torch.full((OUT,), s))
    nnz = int((C != 0).sum())
    stored = D.numel() + nnz + math.ceil(nnz * 8 / 32)  # k <= 256: uint8 indices
    assert stored == cospadi_params(OUT, IN, k, s) <= 0.5 * OUT * IN


def test_whitening_beats_plain_dictionary_on_anisotropic_activations():
    W, X = _problem(2, spread=3.0)
    k, s = 16, 4
    white = functional_error(W, cospadi_reconstruct(*cospadi(W, X, k, s, iters=8)), X)
    plain = functional_error(W, cospadi_reconstruct(*cospadi(W, None, k, s, iters=8)), X)
    assert white < 0.5 * plain


def test_no_sparsity_matches_whitened_truncated_svd():
    W, X = _problem(3)
    for k in (3, 6, 12):  # k below the rank: the weighted Eckart-Young optimum of rank k
        D, C = cospadi(W, X, k, k, iters=2)
        err = functional_error(W, cospadi_reconstruct(D, C), X)
        assert err == pytest.approx(_whitened_svd_error(W, X, k), rel=1e-6, abs=1e-9)
    # k >= rank(W): the functional error vanishes
    g = torch.Generator().manual_seed(4)
    Wlow = torch.randn(OUT, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, IN, generator=g, dtype=torch.float64
    )
    for k in (5, 8):
        D, C = cospadi(Wlow, X, k, k, iters=2)
        assert functional_error(Wlow, cospadi_reconstruct(D, C), X) < 1e-6


def test_error_history_non_increasing_and_consistent():
    W, X = _problem(5)
    for init in ("svd", "data"):
        res = cospadi_fit(W, X, 16, 3, iters=12, init=init, seed=1)
        errs = torch.tensor(res.errors)
        assert len(res.errors) == 13
        assert (errs[1:] <= errs[:-1] + 1e-12).all(), res.errors
        assert res.errors[-1] < res.errors[0]
        assert res.damping == 0.0
        # the history is the true relative functional error (whitened norm == ||X (.)^T||)
        final = functional_error(W, cospadi_reconstruct(res.D, res.C), X)
        assert final == pytest.approx(res.errors[-1], rel=1e-8)


def test_deterministic_from_seed():
    W, X = _problem(6)
    for init in ("svd", "data"):
        a = cospadi(W, X, 16, 4, iters=3, seed=7, init=init)
        b = cospadi(W, X, 16, 4, iters=3, seed=7, init=init)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = cospadi(W, X, 16, 4, iters=3, seed=8, init="data")
    d = cospadi(W, X, 16, 4, iters=3, seed=7, init="data")
    assert not torch.equal(c[0], d[0])


def test_gram_equals_activations_and_singular_gram_is_damped():
    W, X = _problem(7)
    a = cospadi_fit(W, X, 12, 3, iters=2)
    b = cospadi_fit(W, None, 12, 3, iters=2, gram=X.T @ X)
    assert torch.allclose(cospadi_reconstruct(a.D, a.C), cospadi_reconstruct(b.D, b.C), atol=1e-8)
    Xfew = X[:10]  # N < in: X^T X is singular
    res = cospadi_fit(W, Xfew, 12, 3, iters=2)
    assert res.damping > 0
    assert torch.equal((res.C != 0).sum(0), torch.full((OUT,), 3))
    assert torch.isfinite(res.D).all()


def test_float32_input_and_batch_omp_exact_recovery():
    W, X = _problem(8)
    D, C = cospadi(W.float(), X.float(), 10, 2, iters=2)
    assert D.dtype == torch.float32 and torch.equal((C != 0).sum(0), torch.full((OUT,), 2))
    # signals that are exactly 2-sparse in an orthonormal dictionary are recovered exactly
    g = torch.Generator().manual_seed(9)
    Dict, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    Ctrue = torch.zeros(20, 30, dtype=torch.float64)
    rows = torch.stack([torch.randperm(20, generator=g)[:2] for _ in range(30)], dim=1)
    Ctrue.scatter_(0, rows, 1.0 + torch.rand(2, 30, generator=g, dtype=torch.float64))
    Cest, support = batch_omp(Dict @ Ctrue, Dict, 2)
    assert support.shape == (30, 2)
    assert torch.allclose(Cest, Ctrue, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 4, "s": 5}, "exceed"),
        ({"k": 0, "s": 1}, "k must"),
        ({"k": 4, "s": 0}, "s must"),
        ({"k": 4, "s": 2, "iters": -1}, "iters"),
    ],
)
def test_bad_sizes(kwargs, match):
    W, X = _problem()
    with pytest.raises(ValueError, match=match):
        cospadi(W, X, **kwargs)


def test_bad_inputs():
    W, X = _problem()
    with pytest.raises(ValueError, match="X must be"):
        cospadi(W, X[:, :-1], 4, 2)
    with pytest.raises(ValueError, match="2-D"):
        cospadi(W[0], X, 4, 2)
    Wbad = W.clone()
    Wbad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        cospadi(Wbad, X, 4, 2)
    Xbad = X.clone()
    Xbad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        cospadi(W, Xbad, 4, 2)
    with pytest.raises(ValueError, match="all zero"):
        cospadi(W, torch.zeros_like(X), 4, 2)
    with pytest.raises(ValueError, match="either X or gram"):
        cospadi(W, X, 4, 2, gram=X.T @ X)
    with pytest.raises(ValueError, match="gram must be"):
        cospadi(W, None, 4, 2, gram=torch.eye(3, dtype=W.dtype))
    with pytest.raises(ValueError, match="init"):
        cospadi(W, X, 4, 2, init="kmeans")
    with pytest.raises(ValueError, match="shape mismatch"):
        functional_error(W, W[:, :-1], X)
