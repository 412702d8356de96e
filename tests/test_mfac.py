"""M-FAC: inverse-Fisher products and diagonal against dense solves; saliency and OBS pruning."""

from __future__ import annotations

import math

import pytest
import torch

from flagstaff.jobs.compress.mfac import (
    MFACInverse,
    MFACOptimizer,
    kept_for_budget,
    mfac_prune,
    mfac_saliency,
    sparse_storage,
)

M, D, LAM = 20, 50, 0.1
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grads(seed: int = 0, m: int = M, d: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g, dtype=F64) * torch.linspace(0.2, 3.0, d, dtype=F64)


def _fisher(G: torch.Tensor, damp: float) -> torch.Tensor:
    m, d = G.shape
    return damp * torch.eye(d, dtype=G.dtype) + G.T @ G / m


def _block_fisher(G: torch.Tensor, damp: float, block: int) -> torch.Tensor:
    m, d = G.shape
    F = torch.zeros(d, d, dtype=G.dtype)
    for a in range(0, d, block):  # dense reference only
        b = min(a + block, d)
        F[a:b, a:b] = _fisher(G[:, a:b], damp)
    return F


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_matvec_and_diag_match_dense_solve():
    G = _grads()
    F = _fisher(G, LAM)
    inv = MFACInverse(G, LAM)
    v = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert _rel(inv.matvec(v), torch.linalg.solve(F, v)) < 1e-6
    V = torch.randn(7, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    out = inv.matvec(V)
    assert out.shape == (7, D)
    assert _rel(out, torch.linalg.solve(F, V.T).T) < 1e-6
    Finv = torch.linalg.inv(F)
    assert _rel(inv.diag(), Finv.diagonal()) < 1e-6
    for j in (0, 17, D - 1):
        assert inv.diag_entry(j) == pytest.approx(float(Finv[j, j]), rel=1e-6)
    assert _rel(inv.dense(), Finv) < 1e-6


def test_chain_equals_one_shot_woodbury_and_float32_input():
    G = _grads(3, m=8, d=30)
    inv = MFACInverse(G.float(), 0.5)  # float32 gradients, float64 chain
    Gd = G.float().double()
    wood = (
        torch.eye(30, dtype=F64)
        - Gd.T @ torch.linalg.solve(8 * 0.5 * torch.eye(8, dtype=F64) + Gd @ Gd.T, Gd)
    ) / 0.5
    assert _rel(inv.dense(), wood) < 1e-10
    v = torch.randn(30)
    assert inv.matvec(v).dtype == torch.float32


@pytest.mark.parametrize("block", [10, 16, 50, 64])
def test_blockwise_equals_dense_per_block(block):
    G = _grads(4)
    F = _block_fisher(G, LAM, min(block, D))
    inv = MFACInverse(G, LAM, block=block)
    assert inv.nb == -(-D // min(block, D))
    Finv = torch.linalg.inv(F)
    assert _rel(inv.dense(), Finv) < 1e-6
    assert _rel(inv.diag(), Finv.diagonal()) < 1e-6
    V = torch.randn(3, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert _rel(inv.matvec(V), torch.linalg.solve(F, V.T).T) < 1e-6
    assert inv.diag_entry(D - 1) == pytest.approx(float(Finv[-1, -1]), rel=1e-6)


def test_saliency_known_case():
    # m = 1, g = (1, 0, 0): F = diag(lam + 1, lam, lam), [F^-1]_jj = (1/(lam+1), 1/lam, 1/lam)
    lam = 0.5
    g = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    w = torch.tensor([2.0, 3.0, -1.0], dtype=F64)
    sal = mfac_saliency(w, g, lam)
    expected = torch.tensor([4.0 * 1.5 / 2, 9.0 * 0.5 / 2, 1.0 * 0.5 / 2], dtype=F64)
    assert torch.allclose(sal, expected, rtol=1e-12)
    # shape follows w, and the general formula w^2 / (2 diag(F^-1)) against a dense inverse
    G = _grads(6, d=12)
    W = torch.randn(3, 4, dtype=F64)
    sal = mfac_saliency(W, G, LAM, block=5)
    Finv = torch.linalg.inv(_block_fisher(G, LAM, 5))
    assert sal.shape == W.shape
    assert torch.allclose(sal.reshape(-1), W.reshape(-1) ** 2 / (2 * Finv.diagonal()), rtol=1e-9)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.33, 0.5, 0.9])
@pytest.mark.parametrize("update", ["joint", "independent", "none"])
def test_pruning_reaches_exact_sparsity(sparsity, update):
    G = _grads(7)
    w = torch.randn(5, 10, generator=torch.Generator().manual_seed(8), dtype=F64)
    wp, mask = mfac_prune(w, G, sparsity, LAM, block=16, update=update)
    n_prune = int(sparsity * D + 1e-9)
    assert wp.shape == w.shape and mask.shape == w.shape and mask.dtype == torch.bool
    assert int((~mask).sum()) == n_prune
    assert int((wp == 0).sum()) == n_prune
    assert torch.equal(wp == 0, ~mask)
    # the pruned weights are the lowest-saliency ones
    sal = mfac_saliency(w, G, LAM, block=16).reshape(-1)
    if n_prune:
        assert sal[~mask.reshape(-1)].max() <= sal[mask.reshape(-1)].min()
    if update == "none":
        assert torch.equal(wp[mask], w[mask])


def _quad_increase(F: torch.Tensor, w: torch.Tensor, wp: torch.Tensor) -> float:
    dw = (wp - w).reshape(-1)
    return float(0.5 * dw @ F @ dw)


@pytest.mark.parametrize("block", [None, 10])
def test_obs_update_lowers_quadratic_loss(block):
    # a strongly correlated Fisher (few dominant gradient directions)
    g = torch.Generator().manual_seed(9)
    base = torch.randn(3, D, generator=g, dtype=F64)
    G = torch.randn(M, 3, generator=g, dtype=F64) @ base + 0.1 * torch.randn(
        M, D, generator=g, dtype=F64
    )
    F = _block_fisher(G, LAM, block or D)
    w = torch.randn(D, generator=g, dtype=F64)
    for sparsity in (0.2, 0.5, 0.8):
        n = int(sparsity * D)
        mag = w.clone()
        mag[w.abs().argsort()[:n]] = 0.0
        loss_mag = _quad_increase(F, w, mag)
        joint, mask = mfac_prune(w, G, sparsity, LAM, block)
        same_mask = torch.where(mask, w, torch.zeros_like(w))
        loss_joint = _quad_increase(F, w, joint)
        loss_nou = _quad_increase(F, w, same_mask)
        loss_ind = _quad_increase(
            F, w, mfac_prune(w, G, sparsity, LAM, block, update="independent")[0]
        )
        assert loss_joint < loss_mag
        assert loss_joint < loss_nou
        assert loss_joint <= loss_ind + 1e-12
        # the joint update is the exact constrained minimizer: compare with a dense solve
        R, Q = mask, ~mask
        dr = torch.linalg.solve(F[R][:, R], F[R][:, Q] @ w[Q])
        exact = torch.zeros_like(w)
        exact[R] = w[R] + dr
        assert torch.allclose(joint, exact, atol=1e-9)


def test_bad_inputs():
    G = _grads()
    with pytest.raises(ValueError, match="damp"):
        MFACInverse(G, 0.0)
    with pytest.raises(ValueError, match="damp"):
        MFACInverse(G, -1.0)
    with pytest.raises(ValueError, match="grads must be"):
        MFACInverse(G[0], LAM)
    with pytest.raises(ValueError, match="block"):
        MFACInverse(G, LAM, block=0)
    bad = G.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        MFACInverse(bad, LAM)
    inv = MFACInverse(G, LAM)
    with pytest.raises(ValueError, match="v must be"):
        inv.matvec(torch.ones(D + 1, dtype=F64))
    with pytest.raises(ValueError, match="v must be"):
        inv.matvec(torch.ones(2, 2, D, dtype=F64))
    w = torch.randn(D, dtype=F64)
    with pytest.raises(ValueError, match="coordinates"):
        mfac_saliency(w[:-1], G, LAM)
    for sp in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            mfac_prune(w, G, sp, LAM)
    with pytest.raises(ValueError, match="damp"):
        mfac_prune(w, G, 0.5, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        mfac_prune(w, bad, 0.5, LAM)
    wbad = w.clone()
    wbad[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        mfac_saliency(wbad, G, LAM)
    with pytest.raises(ValueError, match="update"):
        mfac_prune(w, G, 0.5, LAM, update="sequential")


def test_sliding_window_optimizer_direction_matches_dense_solve():
    d, m, lam = 12, 4, 0.3
    g = torch.Generator().manual_seed(10)
    p = torch.nn.Parameter(torch.zeros(3, 4, dtype=F64))
    opt = MFACOptimizer([p], lr=0.5, m=m, damp=lam)
    seen = []
    for _ in range(7):  # past m steps the oldest gradient leaves the window
        grad = torch.randn(3, 4, generator=g, dtype=F64)
        seen.append(grad.reshape(-1))
        before = p.detach().clone()
        p.grad = grad.clone()
        opt.step()
        window = torch.stack(seen[-m:])
        F = lam * torch.eye(d, dtype=F64) + window.T @ window / window.shape[0]
        expected = 0.5 * torch.linalg.solve(F, grad.reshape(-1))
        assert _rel((before - p.detach()).reshape(-1), expected) < 1e-10


def test_sliding_window_optimizer_trains_least_squares():
    g = torch.Generator().manual_seed(11)
    A = torch.randn(64, 10, generator=g) * torch.logspace(0, -1, 10)
    b = A @ torch.randn(10, generator=g)
    x = torch.nn.Parameter(torch.zeros(10))
    opt = MFACOptimizer([x], lr=0.05, m=8, damp=1e-2)
    first = None
    for step in range(60):
        idx = torch.randint(0, 64, (16,), generator=g)
        opt.zero_grad()
        loss = ((A[idx] @ x - b[idx]) ** 2).mean()
        loss.backward()
        opt.step()
        if step == 0:
            first = float(((A @ x.detach() - b) ** 2).mean())
    assert float(((A @ x.detach() - b) ** 2).mean()) < 0.1 * first
    with pytest.raises(ValueError, match="lr"):
        MFACOptimizer([x], lr=0.0)
    with pytest.raises(ValueError, match="m must"):
        MFACOptimizer([x], m=0)
    with pytest.raises(ValueError, match="damp"):
        MFACOptimizer([x], damp=0.0)


def test_sparse_storage_counts_the_cheaper_of_mask_and_indices():
    # d = 1000: uint16 indices (half a float32 each) or a 1000-bit mask (32 parameters)
    assert sparse_storage(1000, 10) == 10 + 5  # 10 indices: 160 bits
    assert sparse_storage(1000, 500) == 500 + 32  # the mask is cheaper
    assert sparse_storage(1000, 1000) == 1000  # dense: no positions
    assert sparse_storage(200, 7) == 7 + 2  # uint8 indices: 56 bits -> 2 parameters (rounded up)
    assert sparse_storage(100_000, 10) == 10 + 10  # uint32 indices beyond 65536 positions
    with pytest.raises(ValueError, match="nnz"):
        sparse_storage(10, 11)


@pytest.mark.parametrize("d", [7, 200, 1000, 2048, 70_000])
def test_kept_for_budget_is_the_largest_count_within_the_budget(d):
    for ratio in (0.01, 0.05, 0.3, 0.5, 0.97, 1.0):
        budget = math.floor(ratio * d + 1e-9)
        k = kept_for_budget(d, ratio)
        assert sparse_storage(d, k) <= budget
        assert k == d or sparse_storage(d, k + 1) > budget
