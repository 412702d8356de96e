"""Mathematical guarantees of the linear-algebra jobs on small cases (local backend, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sla
from threadpoolctl import threadpool_limits

from flagstaff.jobs import constrained as cons
from flagstaff.jobs import eig, sampling
from flagstaff.jobs import rsvd as rs
from flagstaff.jobs.blocks import BlockError, DataSpec, RowBlockMatrix, exact_lstsq, residual_norm
from flagstaff.jobs.lstsq import (
    lsqr,
    preconditioned_condition_number,
    sketch_and_precondition,
    sketch_and_solve,
    sketch_precondition_refine,
)
from flagstaff.jobs.sketches import SKETCHES, Sketch, fwht, sketch_matrix


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(1):  # small BLAS calls thrash with threads on a shared 2-core box
        yield


def _dense(mat: RowBlockMatrix) -> tuple[np.ndarray, np.ndarray]:
    return np.vstack(mat.map(_a)), np.concatenate(mat.map(_b))


def _a(block):
    return np.asarray(block.A)


def _b(block):
    return np.asarray(block.b)


def test_generator_does_not_depend_on_blocks():
    spec = DataSpec(n=9000, d=7, kind="coherent", cond=1e4, seed=3)
    A1, b1 = _dense(RowBlockMatrix.generate(spec, 1))
    A5, b5 = _dense(RowBlockMatrix.generate(spec, 5, hosts=3))
    assert np.array_equal(A1, A5) and np.array_equal(b1, b5)
    assert np.linalg.cond(A1) > 1e3


@pytest.mark.parametrize("kind", SKETCHES)
def test_sketch_independent_of_partitioning(kind):
    spec = DataSpec(n=10000, d=6, seed=1)
    sk = Sketch.sized(kind, 64, seed=5)
    one = sketch_matrix(RowBlockMatrix.generate(spec, 1), sk, with_b=True)
    many = sketch_matrix(RowBlockMatrix.generate(spec, 7, hosts=3), sk, with_b=True)
    np.testing.assert_allclose(many, one, rtol=1e-10, atol=1e-10)
    A, _ = _dense(RowBlockMatrix.generate(DataSpec(n=900, d=6, seed=1), 1))
    np.testing.assert_allclose(sk.dense(900) @ A, sk.apply(A, 0), atol=1e-9)


def test_fwht_is_orthonormal_hadamard():
    from scipy.linalg import hadamard

    np.testing.assert_allclose(fwht(np.eye(16)), hadamard(16) / 4.0, atol=1e-14)


@pytest.mark.parametrize("kind", SKETCHES)
def test_subspace_embedding_distortion(kind):
    """All singular values of S U (U an orthonormal basis of range(A)) lie in [1-eps, 1+eps]."""
    spec = DataSpec(n=8192, d=10, kind="coherent", cond=100.0, seed=2)
    A, _ = _dense(RowBlockMatrix.generate(spec, 1))
    U, _ = np.linalg.qr(A)
    sv = np.linalg.svd(Sketch.sized(kind, 400, seed=3).apply(U, 0), compute_uv=False)
    eps = max(sv[0] - 1, 1 - sv[-1])
    # Gaussian-like sketches concentrate at sqrt(d/s) = 0.16; CountSketch needs s ~ d^2
    assert eps < (0.35 if kind != "countsketch" else 0.6), (kind, sv[[0, -1]])


@pytest.mark.parametrize("kind", ["gaussian", "sparse_sign", "srdct"])
def test_preconditioned_condition_number(kind):
    """cond(A R^{-1}) ~ (1 + sqrt(d/s)) / (1 - sqrt(d/s)) = 3 at s = 4d, whatever cond(A) is."""
    d, s = 40, 160
    target = (1 + math.sqrt(d / s)) / (1 - math.sqrt(d / s))
    spec = DataSpec(n=8192, d=d, kind="coherent", cond=1e8, seed=4)
    A, _ = _dense(RowBlockMatrix.generate(spec, 1))
    assert np.linalg.cond(A) > 1e7
    kappas = [preconditioned_condition_number(A, Sketch.sized(kind, s, seed=t)) for t in range(3)]
    assert 0.6 * target < np.median(kappas) < 1.6 * target, kappas


def test_lstsq_sketch_and_precondition_to_1e10():
    spec = DataSpec(n=20000, d=50, kind="coherent", cond=1e6, seed=5, noise=1e-2)
    mat = RowBlockMatrix.generate(spec, 6, hosts=3)
    A, b = _dense(mat)
    x_np = np.linalg.lstsq(A, b, rcond=None)[0]
    r_np = np.linalg.norm(A @ x_np - b)
    sol = sketch_and_precondition(mat, Sketch.sized("countsketch", 200, seed=1), tol=1e-10)
    assert sol.converged and not sol.rank_deficient
    assert residual_norm(mat, sol.x) / r_np - 1 < 1e-10
    assert np.linalg.norm(sol.x - x_np) / np.linalg.norm(x_np) < 1e-6
    # the preconditioned iteration count does not depend on cond(A); plain LSQR stalls
    assert sol.iterations < 120
    plain = lsqr(mat, None, atol=1e-10, btol=1e-10, max_iter=150)
    assert not plain.converged
    # exact optimum by TSQR of [A b]
    x_ts, r_ts, rank = exact_lstsq(mat)
    assert rank == 50 and abs(r_ts / r_np - 1) < 1e-10


def _np_excess(A: np.ndarray, b: np.ndarray, x: np.ndarray) -> float:
    r_np = np.linalg.norm(A @ np.linalg.lstsq(A, b, rcond=None)[0] - b)
    return float(np.linalg.norm(A @ x - b) / r_np - 1)


@pytest.mark.parametrize("precision", ["double", "mixed"])
@pytest.mark.parametrize("cond", [1e6, 1e3])
def test_refine_reaches_excess_on_coherent_ill_conditioned(precision, cond):
    """Warm start + CG + float64 refinement: residual within 1e-10 of the optimum (numpy's
    gelsd as the reference), certified by the solver's own bound, in fewer passes over A than
    the restarted LSQR; mixed precision does part of the work in float32 and gets there too."""
    spec = DataSpec(n=20000, d=50, kind="coherent", cond=cond, seed=5, noise=1e-2)
    mat = RowBlockMatrix.generate(spec, 6, hosts=3)
    A, b = _dense(mat)
    if cond > 1e5:
        assert np.linalg.cond(A) > 1e6
    sk = Sketch.sized("sparse_sign", 200, seed=1, nnz=4)
    sol = sketch_precondition_refine(mat, sk, excess=1e-10, precision=precision)
    assert sol.converged and not sol.rank_deficient and sol.precision == precision
    assert sol.excess_bound <= 1e-10
    assert _np_excess(A, b, sol.x) < 1e-10
    x_np = np.linalg.lstsq(A, b, rcond=None)[0]
    assert np.linalg.norm(sol.x - x_np) / np.linalg.norm(x_np) < 1e-5
    if precision == "mixed":
        assert sol.passes_low > 0  # float32 products were used
        if cond < 1e5:  # u32 cond(A) small: float32 passes do most of the work
            assert sol.passes_low > 2 * sol.passes_double
    else:
        assert sol.passes_low == 0
        lsqr_its = sketch_and_precondition(mat, sk, tol=1e-10).iterations
        assert sol.passes_double < lsqr_its


@pytest.mark.parametrize(
    "kind, n, d", [("coherent", 20000, 100), ("spiked", 8000, 100), ("gaussian", 8000, 50)]
)
def test_refine_bound_holds(kind, n, d):
    """The refinement solver's stopping bound assumes sigma_min(A R^-1) >= 1 / (1 + 2 sqrt(d/s));
    every sketch it accepts meets that on coherent, spiked and Gaussian matrices
    (measured minimum: 1 / (1 + 1.3 sqrt(d/s))), and it refuses CountSketch, which does not."""
    from flagstaff.jobs.lstsq import embedding_sigma_lower

    A = DataSpec(n=n, d=d, kind=kind, cond=1e6, seed=0).rows(0, n)
    for gamma in (2, 4, 8):
        for kind_s, nnz in (("sparse_sign", 4), ("sparse_sign", 8), ("gaussian", 8)):
            for seed in range(2):
                sk = Sketch.sized(kind_s, gamma * d, seed, nnz)
                R = np.linalg.qr(sk.apply(A, 0), mode="r")
                sv = np.linalg.svd(sla.solve_triangular(R, A.T, trans="T").T, compute_uv=False)
                assert sv[-1] >= embedding_sigma_lower(gamma * d, d), (kind_s, nnz, gamma, seed)
    mat = RowBlockMatrix.from_arrays(A[:2000], np.ones(2000))
    for sk in (Sketch.sized("countsketch", 4 * d), Sketch.sized("sparse_sign", 4 * d, nnz=2)):
        with pytest.raises(ValueError, match="nnz >= 4, gaussian, srht or srdct"):
            sketch_precondition_refine(mat, sk)


def test_refine_consistent_and_rank_deficient():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((4000, 20)) * np.geomspace(1, 1e-4, 20)
    b = A @ rng.standard_normal(20)  # consistent: r* = 0, stop on ||r|| <= excess ||b||
    mat = RowBlockMatrix.from_arrays(A, b, n_blocks=3, hosts=2)
    sol = sketch_precondition_refine(mat, Sketch.sized("sparse_sign", 80, seed=2))
    assert sol.converged and np.linalg.norm(A @ sol.x - b) <= 1e-10 * np.linalg.norm(b)
    A[:, 7] = A[:, 2] + A[:, 3]  # rank deficient: LSRN's minimum-norm solution
    b = rng.standard_normal(4000)
    mat = RowBlockMatrix.from_arrays(A, b, n_blocks=3, hosts=2)
    sol = sketch_precondition_refine(mat, Sketch.sized("sparse_sign", 80, seed=2))
    assert sol.rank_deficient and sol.rank == 19
    x_min = np.linalg.pinv(A) @ b
    assert np.linalg.norm(sol.x - x_min) / np.linalg.norm(x_min) < 1e-8
    with pytest.raises(ValueError, match="precision='half'.*double, mixed"):
        sketch_precondition_refine(mat, Sketch.sized("sparse_sign", 80), precision="half")


def test_sketch_and_solve_residual_ratio():
    spec = DataSpec(n=20000, d=20, seed=6, noise=1.0)
    mat = RowBlockMatrix.generate(spec, 4, hosts=2)
    _, opt, _ = exact_lstsq(mat)
    s = 80
    ratios = [
        residual_norm(mat, sketch_and_solve(mat, Sketch.sized("gaussian", s, t)).x) / opt
        for t in range(4)
    ]
    expect = math.sqrt(1 + 20 / (s - 20 - 1))  # 1.16
    assert 1.0 <= min(ratios) and abs(np.mean(ratios) - expect) < 0.1, ratios


def test_rank_deficient_returns_min_norm():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3000, 12))
    A[:, 5] = A[:, 3] - 2 * A[:, 4]
    A[:, 9] = 0.0
    b = rng.standard_normal(3000)
    mat = RowBlockMatrix.from_arrays(A, b, n_blocks=5, hosts=2)
    sol = sketch_and_precondition(mat, Sketch.sized("sparse_sign", 48, seed=2))
    x_min = np.linalg.pinv(A) @ b
    assert sol.rank_deficient and sol.rank == 10
    assert np.linalg.norm(sol.x - x_min) / np.linalg.norm(x_min) < 1e-8
    x_ex, _, rank = exact_lstsq(mat)
    assert rank == 10 and np.allclose(x_ex, x_min, atol=1e-10)


def test_bad_inputs(tmp_path):
    A = np.ones((50, 4))
    A[7, 2] = np.nan
    with pytest.raises(BlockError, match="non-finite.*row 7"):
        RowBlockMatrix.from_arrays(A, np.ones(50))
    with pytest.raises(ValueError, match="s=3 is smaller than d=4"):
        sketch_and_precondition(
            RowBlockMatrix.from_arrays(np.eye(50)[:, :4], np.ones(50)), Sketch("countsketch", 3)
        )
    np.save(tmp_path / "a0.npy", np.ones((10, 4)))
    np.save(tmp_path / "a1.npy", np.ones((10, 5)))
    with pytest.raises(BlockError, match="disagree on the number of columns"):
        RowBlockMatrix.from_files([str(tmp_path / "a0.npy"), str(tmp_path / "a1.npy")])
    np.save(tmp_path / "b0.npy", np.ones(9))
    with pytest.raises(BlockError, match="b has 9 rows but A has 10"):
        RowBlockMatrix.from_files([str(tmp_path / "a0.npy")], [str(tmp_path / "b0.npy")])
    bad = np.ones((10, 4))
    bad[3, 1] = np.inf
    np.savez(tmp_path / "bad.npz", A=bad, b=np.ones(10))
    with pytest.raises(BlockError, match="bad.npz.*row 3"):
        RowBlockMatrix.from_files([str(tmp_path / "bad.npz")])
    with pytest.raises(ValueError, match="valid choices"):
        Sketch("fjlt", 10)


def test_memmap_shards_match_generated(tmp_path):
    spec = DataSpec(n=5000, d=8, kind="coherent", seed=7)
    A, b = _dense(RowBlockMatrix.generate(spec, 1))
    paths, bpaths = [], []
    for i, (r0, r1) in enumerate([(0, 1200), (1200, 3000), (3000, 5000)]):
        paths.append(str(tmp_path / f"A{i}.npy"))
        bpaths.append(str(tmp_path / f"b{i}.npy"))
        np.save(paths[-1], A[r0:r1])
        np.save(bpaths[-1], b[r0:r1])
    mat = RowBlockMatrix.from_files(paths, bpaths, hosts=2, mmap=True)
    assert (mat.n, mat.d) == (5000, 8)
    sk = Sketch.sized("srht", 64, seed=1)
    np.testing.assert_allclose(
        sketch_matrix(mat, sk, True), sk.apply(np.column_stack([A, b]), 0), atol=1e-9
    )


def test_volume_sampling_is_unbiased():
    spec = DataSpec(n=600, d=3, kind="coherent", cond=3.0, seed=8, noise=0.3)
    mat = RowBlockMatrix.generate(spec, 3, hosts=2)
    u = np.ones(3) / math.sqrt(3)
    mat.map(sampling.block_misspecify, u, 2.0)
    sampling.prepare_volume_sampling(mat)
    x_opt, _, _ = exact_lstsq(mat)
    T = 4000
    A, b, q = sampling.leveraged_volume_sample(mat, 5, T, seed=1)
    assert A.shape == (T, 5, 3)
    W = sampling.weighted_ls(A, b, q)
    z = (W.mean(axis=0) - x_opt) / (W.std(axis=0, ddof=1) / math.sqrt(T))
    assert np.all(np.abs(z) < 4.0), z


def test_reverse_volume_sampling_law():
    """Reverse iterative sampling from 4 rows to d = 2: P(S) proportional to det(X_S^T X_S)."""
    X = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, -1.0]])
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    dets = np.array([np.linalg.det(X[[i, j]].T @ X[[i, j]]) for i, j in pairs])
    T = 40000
    keep = sampling._reverse_volume(
        np.broadcast_to(X, (T, 4, 2)).copy(), 2, np.random.default_rng(0)
    )
    counts = np.array([np.sum((keep[:, 0] == i) & (keep[:, 1] == j)) for i, j in pairs])
    np.testing.assert_allclose(counts / T, dets / dets.sum(), atol=0.01)


@pytest.mark.parametrize("p", [1.0, 1.5, 3.0])
def test_lewis_weights_fixed_point(p):
    spec = DataSpec(n=4000, d=6, kind="coherent", cond=10.0, seed=9)
    mat = RowBlockMatrix.generate(spec, 4, hosts=2)
    total, _ = sampling.lewis_weights(mat, p, iters=60)
    w = np.concatenate(mat.map(sampling.block_get_weights))
    A, _ = _dense(mat)
    M = A.T @ (A * (w ** (1 - 2 / p))[:, None])
    tau = np.einsum("ij,ji->i", A, np.linalg.solve(M, A.T))
    np.testing.assert_allclose(w, tau ** (p / 2), rtol=1e-5, atol=1e-12)
    assert abs(total - 6) < 1e-6


def test_leverage_scores_and_sampling_distortion():
    spec = DataSpec(n=20000, d=8, kind="coherent", cond=10.0, seed=10, noise=0.1)
    mat = RowBlockMatrix.generate(spec, 4, hosts=2)
    sampling.lewis_weights(mat, 2.0)
    lev = np.concatenate(mat.map(sampling.block_get_weights))
    A, _ = _dense(mat)
    Q, _ = np.linalg.qr(A)
    np.testing.assert_allclose(lev, (Q * Q).sum(axis=1), atol=1e-12)
    smp = sampling.sensitivity_sample(mat, 2.0, 400, seed=1)
    X = np.random.default_rng(0).standard_normal((8, 100))
    assert np.abs(sampling.lp_distortion(mat, smp, X, 2.0)).max() < 0.2
    smp3 = sampling.sensitivity_sample(mat, 3.0, 400, seed=1)
    assert np.abs(sampling.lp_distortion(mat, smp3, X, 3.0)).max() < 0.3


def test_lp_regression_matches_scipy():
    from scipy.optimize import minimize

    rng = np.random.default_rng(11)
    A = rng.standard_normal((300, 4))
    b = A @ rng.standard_normal(4) + rng.standard_t(2, 300)
    mat = RowBlockMatrix.from_arrays(A, b, 3, hosts=2)
    for p in (1.5, 3.0):
        x = sampling.lp_regression(mat, p)

        def f(z, p=p):
            r = A @ z - b
            return np.sum(np.abs(r) ** p), A.T @ (p * np.abs(r) ** (p - 1) * np.sign(r))

        ref = minimize(f, np.zeros(4), jac=True, method="BFGS", options={"gtol": 1e-10}).x
        assert sampling.lp_cost(mat, x, p) <= sampling.lp_cost(mat, ref, p) * (1 + 1e-7)
    x1 = sampling.lp_regression(mat, 1.0)
    from scipy.optimize import linprog

    n, d = A.shape  # l1 regression as an LP: min sum t, -t <= Ax - b <= t
    c = np.concatenate([np.zeros(d), np.ones(n)])
    G = np.block([[A, -np.eye(n)], [-A, -np.eye(n)]])
    lp = linprog(
        c, A_ub=G, b_ub=np.concatenate([b, -b]), bounds=[(None, None)] * d + [(0, None)] * n
    )
    assert sampling.lp_cost(mat, x1, 1.0) <= lp.fun * (1 + 1e-6)


def test_top_eigvec_correlation():
    spec = DataSpec(n=30000, d=30, kind="coherent", cond=10.0, gap=4.0, seed=12)
    mat = RowBlockMatrix.generate(spec, 4, hosts=2)
    w, v1 = eig.exact_top_eigvec(mat)
    A, _ = _dense(mat)
    assert abs(abs(np.linalg.svd(A, full_matrices=False)[2][0] @ v1) - 1) < 1e-8
    res = eig.streaming_top_eigvec(mat, chunks=20, seed=1)
    assert (res.v @ v1) ** 2 > 0.95
    assert res.memory_floats < A.size / 50
    v_oja, _ = eig.oja_top_eigvec(mat, chunks=5, seed=1)
    assert abs(np.linalg.norm(v_oja) - 1) < 1e-12


@pytest.mark.parametrize(
    "precision, normalize", [("mixed", "gram"), ("double", "gram"), ("double", "tsqr")]
)
def test_rsvd_matches_svd(precision, normalize):
    """Every scheme (float32 power iterations with d-side QR, the default; float64 d-side QR;
    float64 TSQR after each application of A and A^T) matches numpy's SVD to the same
    tolerances; mixed precision runs its power iterations on the float32 copy."""
    spec = DataSpec(n=6000, d=120, kind="low_rank", rank=8, cond=10.0, noise=0.01, seed=13)
    mat = RowBlockMatrix.generate(spec, 5, hosts=2)
    A, _ = _dense(mat)
    s = np.linalg.svd(A, compute_uv=False)
    r = rs.rsvd(
        mat, 8, oversample=8, power_iters=2, seed=1, precision=precision, normalize=normalize
    )
    U = rs.gather_u(mat)
    np.testing.assert_allclose(r.s, s[:8], rtol=1e-8)
    np.testing.assert_allclose(U.T @ U, np.eye(8), atol=1e-10)
    opt = math.sqrt((s[8:] ** 2).sum())
    assert rs.lowrank_error(mat, r) / opt < 1 + 1e-6
    assert r.precision == precision and (r.passes_low == 2) == (precision == "mixed")


def test_rsvd_mixed_precision_falls_back_on_wide_spectrum():
    """sigma_k / sigma_1 = 1e-3: sigma_k^2 is below float32's resolution of sigma_1^2, so after
    one float32 pass the power iterations continue in float64 and reach the float64 accuracy."""
    spec = DataSpec(n=6000, d=120, kind="low_rank", rank=8, cond=1e3, noise=0.01, seed=13)
    mat = RowBlockMatrix.generate(spec, 5, hosts=2)
    A, _ = _dense(mat)
    s = np.linalg.svd(A, compute_uv=False)
    r = rs.rsvd(mat, 8, oversample=8, power_iters=4, seed=1, precision="mixed")
    assert r.passes_low == 1 and r.passes_double == 3 + 2
    np.testing.assert_allclose(r.s, s[:8], rtol=1e-12)
    with pytest.raises(ValueError, match="normalize='tsqr' runs in float64"):
        rs.rsvd(mat, 8, precision="mixed", normalize="tsqr")


@pytest.mark.parametrize("kind", ["least_squares", "logistic"])
def test_constrained_kkt_converges(kind):
    spec = DataSpec(n=6000, d=20, cond=10.0, seed=14, noise=0.5)
    mat = RowBlockMatrix.generate(spec, 4, hosts=2)
    C, e = cons.make_constraints(20, 4, 0)
    prob = cons.Problem(mat, kind, C, e, 1e-3 if kind == "logistic" else 0.0)
    r = cons.exact_al_sketch(prob, tol=1e-8, max_outer=40, seed=1)
    assert r.converged and r.kkt[-1] <= 1e-8
    assert r.kkt[-1] < 1e-6 * r.kkt[0]
    x_ref = cons.exact_kkt_solution(prob)
    assert np.linalg.norm(r.x - x_ref) < 1e-6 * np.linalg.norm(x_ref)
    if kind == "least_squares":  # closed form: [[A^T A / n, C^T], [C, 0]] [x; l] = [A^T b / n; e]
        A, b = _dense(mat)
        K = np.block([[A.T @ A / 6000, C.T], [C, np.zeros((4, 4))]])
        x = np.linalg.solve(K, np.concatenate([A.T @ b / 6000, e]))[:20]
        np.testing.assert_allclose(r.x, x, rtol=1e-6, atol=1e-8)


def test_constrained_reports_inner_solves_that_miss_their_target():
    """With a tiny inner iteration cap the Kaczmarz solves stop above eta_t: each step's reached
    relative residual is reported, and the misses are counted rather than hidden."""
    spec = DataSpec(n=3000, d=20, cond=10.0, seed=14, noise=0.5)
    mat = RowBlockMatrix.generate(spec, 2, hosts=1)
    C, e = cons.make_constraints(20, 4, 0)
    prob = cons.Problem(mat, "least_squares", C, e)
    r = cons.exact_al_sketch(prob, tol=1e-8, max_outer=3, max_inner=1, inner_block=2, seed=1)
    assert len(r.inner_residual) == len(r.inner_target) == len(r.inner) > 0
    K_misses = [res > t for res, t in zip(r.inner_residual, r.inner_target, strict=True)]
    assert r.inner_target_missed == sum(K_misses) > 0
    assert all(0 < res < 10 for res in r.inner_residual)  # relative residuals, not raw norms


def test_linf_dense_sketch_beats_countsketch_on_spiked():
    spec = DataSpec(n=8000, d=20, kind="spiked", cond=10.0, seed=15, noise=1.0)
    mat = RowBlockMatrix.generate(spec, 4, hosts=2)
    x_opt, opt, _ = exact_lstsq(mat)
    err = {k: [] for k in ("gaussian", "countsketch")}
    for t in range(4):
        for k in err:
            x = sketch_and_solve(mat, Sketch.sized(k, 200, seed=t)).x
            err[k].append(np.abs(x - x_opt).max())
    assert np.mean(err["countsketch"]) > 10 * np.mean(err["gaussian"])
