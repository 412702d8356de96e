"""Sketched least squares over a RowBlockMatrix: sketch-and-solve and sketch-and-precondition.

Sketch-and-precondition follows Blendenpik (Avron, Maymounkov, Toledo, SISC 2010) and LSRN (Meng,
Saunders, Mahoney, SISC 2014): R from a QR of S A (or, when S A is rank deficient, the LSRN
preconditioner N = V_r Sigma_r^{-1} from its SVD), then LSQR (Paige, Saunders, TOMS 1982) on A N
with distributed matrix-vector products. The LSQR left vector u (length n) stays on the hosts;
each iteration moves one d-vector out and one d-vector plus a scalar back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla

from flagstaff.jobs.blocks import Block, RowBlockMatrix, block_drop_low, block_make_low
from flagstaff.jobs.sketches import Sketch, check_sketch_size, sketch_matrix

FUSE_BYTES = 1 << 20  # bytes of A per piece in the fused passes: the piece stays in L2 between
# its two products (measured on 100000 x 1000: 10.4 GB/s of A per core at 1 MB pieces, 8.3 at 4 MB)


def fuse_rows(A: np.ndarray) -> int:
    """Rows per cache-resident piece of A in a fused pass (about FUSE_BYTES, at least 16)."""
    return max(16, FUSE_BYTES // max(1, A.shape[1] * A.dtype.itemsize))


def block_lsqr_start(block: Block, x0: np.ndarray | None) -> tuple[float, np.ndarray]:
    """Store w = b_p - A_p x0 (LSQR's beta_1 u_1); return (||w||^2, A_p^T w)."""
    w = np.array(block.b, dtype=float)
    if x0 is not None:
        w -= block.A @ x0
    block.state["lsqr_w"] = w
    return float(w @ w), np.asarray(block.A.T @ w)


def block_lsqr_step(block: Block, y: np.ndarray, c: float) -> tuple[float, np.ndarray]:
    """w <- A_p y - c w (= beta u_new), return (||w||^2, A_p^T w), fused piecewise in cache."""
    w = block.state["lsqr_w"]
    A = block.A
    g = np.zeros(A.shape[1])
    ss = 0.0
    step = fuse_rows(A)
    for s0 in range(0, A.shape[0], step):
        s1 = min(A.shape[0], s0 + step)
        Ap = A[s0:s1]
        wp = Ap @ y
        wp -= c * w[s0:s1]
        w[s0:s1] = wp
        ss += float(wp @ wp)
        g += Ap.T @ wp
    return ss, g


def block_lsqr_clear(block: Block) -> None:
    block.state.pop("lsqr_w", None)


@dataclass
class LSQRResult:
    x: np.ndarray
    iterations: int
    converged: bool
    history: list[float] = field(default_factory=list)  # estimated ||A^T r|| / (||A|| ||r||)


def lsqr(
    mat: RowBlockMatrix,
    precond: np.ndarray | None = None,
    triangular: bool = True,
    atol: float = 1e-10,
    btol: float = 1e-10,
    max_iter: int = 1000,
    callback: Callable[[int, float], None] | None = None,
    x0: np.ndarray | None = None,
) -> LSQRResult:
    """LSQR (Paige, Saunders 1982) for min ||A N y - b||, x = N y, with N = R^{-1} or a d x r matrix.

    precond: None (plain LSQR), an upper-triangular R (triangular=True, N = R^{-1}) or an explicit
    d x r matrix N (triangular=False; LSRN's V_r Sigma_r^{-1} for rank-deficient A, which makes x
    the minimum-norm solution). Stops on Paige and Saunders' tests with atol/btol. With x0 it
    solves for the correction from the residual b - A x0 (one step of iterative refinement).
    """

    def apply_n(v: np.ndarray) -> np.ndarray:
        if precond is None:
            return v
        if triangular:
            return sla.solve_triangular(precond, v, lower=False)
        return precond @ v

    def apply_nt(g: np.ndarray) -> np.ndarray:
        if precond is None:
            return g
        if triangular:
            return sla.solve_triangular(precond, g, lower=False, trans="T")
        return precond.T @ g

    base = np.zeros(mat.d) if x0 is None else x0
    bb, g = mat.sum(block_lsqr_start, x0)
    beta = math.sqrt(bb)
    r_dim = mat.d if precond is None or triangular else precond.shape[1]
    y = np.zeros(r_dim)
    if beta == 0:
        return LSQRResult(base, 0, True)
    bnorm = beta
    v = apply_nt(g) / beta
    alpha = np.linalg.norm(v)
    if alpha == 0:
        return LSQRResult(base, 0, True)
    v /= alpha
    w = v.copy()
    phibar, rhobar = beta, alpha
    anorm2, ddnorm, xnorm = 0.0, 0.0, 0.0
    history: list[float] = []
    converged = False
    it = 0
    # (z, c2) track xnorm as in Paige-Saunders' LSQR
    for it in range(1, max_iter + 1):
        ss, g = mat.sum(block_lsqr_step, apply_n(v), alpha / beta)
        beta = math.sqrt(ss)
        anorm2 += alpha**2 + beta**2
        if beta > 0:
            v = apply_nt(g) / beta - beta * v
            alpha = np.linalg.norm(v)
            if alpha > 0:
                v /= alpha
        else:
            alpha = 0.0
        rho = math.hypot(rhobar, beta)
        cs, sn = rhobar / rho, beta / rho
        theta = sn * alpha
        rhobar = -cs * alpha
        phi = cs * phibar
        phibar = sn * phibar
        y += (phi / rho) * w
        ddnorm += float(np.sum((w / rho) ** 2))
        w = v - (theta / rho) * w
        xnorm = float(np.linalg.norm(y))
        anorm = math.sqrt(anorm2)
        rnorm = phibar
        arnorm = phibar * alpha * abs(cs)
        test1 = rnorm / bnorm
        test2 = arnorm / (anorm * rnorm) if rnorm > 0 else 0.0
        history.append(test2)
        if callback is not None:
            callback(it, test2)
        if test2 <= atol or test1 <= btol + atol * anorm * xnorm / bnorm or alpha == 0:
            converged = True
            break
    mat.map(block_lsqr_clear)
    return LSQRResult(base + apply_n(y), it, converged, history)


@dataclass
class SketchedSolution:
    x: np.ndarray
    rank: int
    rank_deficient: bool
    iterations: int = 0
    converged: bool = True
    sketch_time_s: float = 0.0
    factor_time_s: float = 0.0  # QR (and SVD when deficient) of the sketch, warm start
    iterate_time_s: float = 0.0  # LSQR / refinement passes
    history: list[float] = field(default_factory=list)
    # refinement solver (sketch_precondition_refine) only
    precision: str = "double"
    outer: int = 0  # float64 residual passes (refinement steps, the last one certifies)
    passes_double: int = 0  # passes over A in float64 (residual passes + float64 inner products)
    passes_low: int = 0  # passes over the float32 copy of A
    cast_time_s: float = 0.0
    excess_bound: float | None = None  # bound on ||Ax - b|| / ||Ax* - b|| - 1 at the last check


def _numerical_rank(sv: np.ndarray, shape: tuple[int, int], rtol: float | None) -> int:
    tol = (rtol if rtol is not None else max(shape) * np.finfo(float).eps) * sv.max()
    return int((sv > tol).sum()) if sv.size else 0


def sketch_and_solve(mat: RowBlockMatrix, sketch: Sketch) -> SketchedSolution:
    """x = argmin ||S(Ax - b)|| (a (1 + eps)-approximate solver; minimum norm if S A is deficient)."""
    import time

    check_sketch_size(sketch.s, mat.d)
    t0 = time.perf_counter()
    SAb = sketch_matrix(mat, sketch, with_b=True)
    t1 = time.perf_counter()
    x, _, rank, _ = np.linalg.lstsq(SAb[:, :-1], SAb[:, -1], rcond=None)
    t2 = time.perf_counter()
    return SketchedSolution(
        x, int(rank), int(rank) < mat.d, sketch_time_s=t1 - t0, factor_time_s=t2 - t1
    )


def sketch_and_precondition(
    mat: RowBlockMatrix,
    sketch: Sketch,
    tol: float = 1e-10,
    max_iter: int = 500,
    rank_rtol: float | None = None,
    callback: Callable[[int, float], None] | None = None,
    restarts: int = 1,
) -> SketchedSolution:
    """Blendenpik/LSRN: QR of S A gives R; LSQR on A R^{-1} to tol. Rank-deficient S A switches to
    N = V_r Sigma_r^{-1} from the SVD of S A, which returns the minimum-norm solution (LSRN, Thm 4).

    Plain sketch-and-precondition stalls at a forward error of about cond(A) eps ||b|| (Meier,
    Nakatsukasa, Townsend, Webb, SIMAX 2024); `restarts` >= 1 first solves to sqrt(tol), then
    restarts LSQR from the residual b - A x (iterative refinement), which removes the floor.
    """
    import time

    check_sketch_size(sketch.s, mat.d)
    t0 = time.perf_counter()
    SA = sketch_matrix(mat, sketch)
    t1 = time.perf_counter()
    P, tri, rank, deficient = _preconditioner(SA, mat.d, rank_rtol)
    t2 = time.perf_counter()
    tols = [max(tol, math.sqrt(tol))] * restarts + [tol]
    x, its, history, res = None, 0, [], None
    for t in tols:
        res = lsqr(
            mat, P, triangular=tri, atol=t, btol=t, max_iter=max_iter - its, callback=callback, x0=x
        )
        x, its = res.x, its + res.iterations
        history += res.history
        if its >= max_iter:
            break
    t3 = time.perf_counter()
    return SketchedSolution(
        x, rank, bool(deficient), its, res.converged, t1 - t0, t2 - t1, t3 - t2, history
    )


def preconditioned_condition_number(A: np.ndarray, sketch: Sketch) -> float:
    """cond(A R^{-1}) for R from QR(S A) (small dense A: tests and diagnostics)."""
    R = np.linalg.qr(sketch.apply(A, 0), mode="r")
    sv = np.linalg.svd(sla.solve_triangular(R, A.T, trans="T").T, compute_uv=False)
    return float(sv[0] / sv[-1])


# ---------------------------------------------------------------------------------------------
# Sketch-and-precondition with iterative refinement: a warm start from the sketch, CG on the
# preconditioned normal equations (products in float64, or float32 with precision="mixed"),
# a float64 residual pass per refinement step, stopped by a bound on the residual excess.

PRECISIONS = ("double", "mixed")
LOW_TOL = (
    0.05  # CG tolerance floor with float32 products: they perturb the operator by ~u32 cond(A)
)


def block_residual_grad(block: Block, x: np.ndarray) -> tuple[float, float, np.ndarray]:
    """r_p = b_p - A_p x in float64; return (||r_p||^2, ||b_p||^2, A_p^T r_p), fused piecewise."""
    A, b = block.A, block.b
    g = np.zeros(A.shape[1])
    rr = bb = 0.0
    step = fuse_rows(A)
    for s0 in range(0, A.shape[0], step):
        Ap = A[s0 : s0 + step]
        bp = np.asarray(b[s0 : s0 + step], dtype=float)
        rp = bp - Ap @ x
        rr += float(rp @ rp)
        bb += float(bp @ bp)
        g += Ap.T @ rp
    return rr, bb, g


def block_normal_matvec(block: Block, y: np.ndarray, low: bool) -> np.ndarray:
    """A_p^T (A_p y), fused piecewise in cache; with `low` on the float32 copy of A_p (products
    rounded to single precision, the sum over pieces kept in float64)."""
    A = block.state["A_low"] if low else block.A
    y = y.astype(A.dtype, copy=False)
    step = fuse_rows(A)
    g = np.zeros(A.shape[1])
    for s0 in range(0, A.shape[0], step):
        Ap = A[s0 : s0 + step]
        g += Ap.T @ (Ap @ y)
    return g


def _preconditioner(
    SA: np.ndarray, d: int, rank_rtol: float | None, R: np.ndarray | None = None
) -> tuple[np.ndarray, bool, int, bool]:
    """(P, triangular, rank, deficient): R of S A (given or computed), or LSRN's V_r / sigma_r
    when S A is rank deficient."""
    if R is None:
        R = np.linalg.qr(SA, mode="r")
    diag = np.abs(np.diag(R))
    deficient = diag.min() <= (rank_rtol or 10 * d * np.finfo(float).eps) * diag.max()
    if deficient:
        _, sv, vt = np.linalg.svd(SA, full_matrices=False)
        rank = _numerical_rank(sv, SA.shape, rank_rtol or 1e-12)
        if rank < d:
            return vt[:rank].T / sv[:rank], False, rank, True
    return R, True, d, False


def embedding_sigma_lower(s: int, d: int) -> float:
    """Lower bound assumed for sigma_min(A R^-1): 1 / (1 + 2 sqrt(d/s)).

    If S is an eps-subspace embedding of range(A), ||S A R^-1 y|| = ||y|| gives sigma_min(A R^-1)
    >= 1 / (1 + eps). Gaussian, block SRHT/SRDCT and sparse sign sketches with at least 4 nonzeros
    per column and s = gamma d have eps close to sqrt(d/s): measured sigma_min(A R^-1) on coherent,
    spiked and Gaussian matrices (d = 50 to 400, gamma = 2, 4, 8, 4 seeds each) was at least
    1 / (1 + 1.3 sqrt(d/s)) (test_refine_bound_holds); 2 leaves a margin. CountSketch and sparse
    sign sketches with fewer nonzeros collide heavy rows (cond(A R^-1) of 10 to 1e4 on spiked
    matrices), so the refinement solver does not take them.
    """
    return 1.0 / (1.0 + 2.0 * math.sqrt(d / s))


def check_refine_sketch(sketch: Sketch) -> None:
    """The stopping bound needs an eps ~ sqrt(d/s) embedding (see embedding_sigma_lower)."""
    if sketch.kind == "countsketch" or (sketch.kind == "sparse_sign" and sketch.nnz < 4):
        what = "countsketch" if sketch.kind == "countsketch" else f"sparse_sign nnz={sketch.nnz}"
        raise ValueError(
            f"sketch {what}: the refine solver's stopping bound needs a subspace embedding with "
            "distortion ~ sqrt(d/s); use sparse_sign with nnz >= 4, gaussian, srht or srdct "
            "(or solver=lsqr)"
        )


def excess_bound(rr: float, err: float) -> float:
    """Bound on ||r|| / ||r*|| - 1 from ||r||^2 = ||r*||^2 + ||A e||^2 and ||A e|| <= err."""
    opt2 = rr - err * err
    if opt2 <= 0:
        return math.inf
    return math.sqrt(rr / opt2) - 1.0


def _cg(
    apply: Callable[[np.ndarray], np.ndarray], h: np.ndarray, tol: float, max_iter: int
) -> tuple[np.ndarray, int]:
    """Conjugate gradients (Hestenes, Stiefel 1952) for M z = h, M SPD, from z = 0, until
    ||h - M z|| <= tol ||h|| (recursive residual) or max_iter; returns (z, iterations)."""
    z = np.zeros_like(h)
    r = h.copy()
    p = r.copy()
    rr = float(r @ r)
    stop = tol * tol * rr
    it = 0
    while it < max_iter and rr > stop:
        q = apply(p)
        alpha = rr / float(p @ q)
        z += alpha * p
        r -= alpha * q
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
    return z, it


def sketch_precondition_refine(
    mat: RowBlockMatrix,
    sketch: Sketch,
    excess: float = 1e-10,
    precision: str = "double",
    max_passes: int = 500,
    rank_rtol: float | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> SketchedSolution:
    """min ||Ax - b|| to a residual within `excess` of the optimum: ||Ax - b|| <= (1 + excess) ||Ax* - b||.

    One pass sketches [A b]; the QR of S [A b] gives the preconditioner R and the sketch-and-solve
    solution x0 = argmin ||S(Ax - b)|| (residual within about sqrt(d / (s - d)) of the optimum) as a
    warm start (Epperly, Meier, Nakatsukasa, "Fast randomized least-squares solvers can be just as
    accurate and stable as classical direct solvers", CPAM 2025). Then iterative refinement: a
    float64 pass computes r = b - A x and g = A^T r, and conjugate gradients on the preconditioned
    normal equations R^-T A^T A R^-1 z = R^-T g (condition number about 9 for s = 4d, as in
    Blendenpik/LSRN; one fused pass over A per iteration) give the correction x += R^-1 z.

    Stopping: r* is orthogonal to range(A), so ||r||^2 = ||r*||^2 + ||A e||^2 (e = x - x*), and
    ||A e|| <= ||R^-T A^T r|| / sigma_min(A R^-1): the float64 pass gives the numerator,
    `embedding_sigma_lower` the denominator. CG is asked for exactly the reduction that makes this
    bound on ||r|| / ||r*|| - 1 drop below `excess`; the next float64 pass checks it (or
    ||r|| <= excess ||b||: a consistent system).

    precision="mixed": the CG products read a float32 copy of A (half the bytes per pass), in the
    style of mixed-precision iterative refinement (Higham, Pranesh, SISC 2021); the float32 copy
    perturbs the preconditioned operator by about u32 cond(A), so each step gains at most about
    1 / (u32 cond(A)); a step that gains less than 2x switches the rest of the solve to float64.
    A rank-deficient S A falls back to LSRN's LSQR (minimum-norm solution), in float64.
    """
    import time

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: valid choices are {', '.join(PRECISIONS)}")
    check_refine_sketch(sketch)
    check_sketch_size(sketch.s, mat.d)
    d = mat.d
    t0 = time.perf_counter()
    SAb = sketch_matrix(mat, sketch, with_b=True)
    t1 = time.perf_counter()
    Rb = np.linalg.qr(SAb, mode="r")  # R of S A is its leading block; the last column is Q^T S b
    P, _, rank, deficient = _preconditioner(SAb[:, :d], d, rank_rtol, Rb[:d, :d])
    if deficient:  # LSRN: minimum-norm solution by LSQR on A V_r Sigma_r^-1, float64
        t2 = time.perf_counter()
        tol = max(excess, 1e-14)
        res = lsqr(mat, P, triangular=False, atol=tol, btol=tol, max_iter=max_passes)
        return SketchedSolution(
            res.x,
            rank,
            True,
            iterations=res.iterations,
            converged=res.converged,
            sketch_time_s=t1 - t0,
            factor_time_s=t2 - t1,
            iterate_time_s=time.perf_counter() - t2,
            history=res.history,
            passes_double=res.iterations + 1,
        )
    R = np.ascontiguousarray(P)
    x = sla.solve_triangular(R, Rb[:d, d], lower=False)  # sketch-and-solve: argmin ||S(Ax - b)||
    t2 = time.perf_counter()
    low = precision == "mixed"
    if low:
        mat.map(block_make_low)
    t3 = time.perf_counter()
    sigma_lo = embedding_sigma_lower(sketch.s, d)
    rate = min(0.9, math.sqrt(d / sketch.s))  # CG's rate at cond (1 + eps) / (1 - eps), eps^2 = d/s

    def normal(v: np.ndarray) -> np.ndarray:
        y = sla.solve_triangular(R, v, lower=False)
        return sla.solve_triangular(R, mat.sum(block_normal_matvec, y, low), lower=False, trans="T")

    history: list[float] = []
    outer = passes_double = passes_low = its = 0
    converged, bound, err_prev, used_low = False, math.inf, math.inf, low
    try:
        while True:
            rr, bb, g = mat.sum(block_residual_grad, x)
            outer += 1
            passes_double += 1
            h = sla.solve_triangular(R, g, lower=False, trans="T")
            err = float(np.linalg.norm(h)) / sigma_lo  # >= ||A (x - x*)||
            bound = excess_bound(rr, err)
            history.append(bound)
            if callback is not None:
                callback(passes_double + passes_low, bound)
            if bound <= excess or math.sqrt(rr) <= excess * math.sqrt(bb):
                converged = True
                break
            if passes_double + passes_low >= max_passes:
                break
            if low and err > 0.5 * err_prev:  # float32 products no longer help: finish in float64
                low = False
                mat.map(block_drop_low)
            err_prev = err
            # CG's relative residual bounds the next err / err: ask for what the stopping test
            # needs, with ||r*|| estimated from below by rr - err^2 or by the sketch's residual
            opt_lo = max(math.sqrt(max(rr - err * err, 0.0)), abs(Rb[d, d]) * sigma_lo)
            consistent = opt_lo <= excess * math.sqrt(bb)  # then aim at ||r|| <= excess ||b||
            goal = excess * math.sqrt(bb) if consistent else math.sqrt(2 * excess) * opt_lo
            need = 0.9 * goal / err
            tol = min(max(need, LOW_TOL if low else 1e-15), 0.5)
            cap = int(math.ceil(math.log(tol) / math.log(rate)))  # at the expected rate
            cap = cap + 2 if low else 2 * cap + 10  # float32 products stagnate; float64 do not
            z, k = _cg(normal, h, tol, min(cap, max_passes - passes_double - passes_low))
            its += k
            if low:
                passes_low += k
            else:
                passes_double += k
            x = x + sla.solve_triangular(R, z, lower=False)
    finally:
        if used_low:
            mat.map(block_drop_low)
    return SketchedSolution(
        x,
        d,
        False,
        iterations=its,
        converged=converged,
        sketch_time_s=t1 - t0,
        factor_time_s=t2 - t1,
        iterate_time_s=time.perf_counter() - t3,
        history=history,
        precision="mixed" if used_low else "double",
        outer=outer,
        passes_double=passes_double,
        passes_low=passes_low,
        cast_time_s=t3 - t2,
        excess_bound=bound,
    )
