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

from jobs.blocks import Block, RowBlockMatrix
from jobs.sketches import Sketch, check_sketch_size, sketch_matrix

FUSE_ROWS = 512  # rows per cache-resident piece in the fused LSQR step


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
    for s0 in range(0, A.shape[0], FUSE_ROWS):
        s1 = min(A.shape[0], s0 + FUSE_ROWS)
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
    factor_time_s: float = 0.0
    solve_time_s: float = 0.0
    history: list[float] = field(default_factory=list)


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
    R = np.linalg.qr(SA, mode="r")
    diag = np.abs(np.diag(R))
    deficient = diag.min() <= (rank_rtol or 10 * mat.d * np.finfo(float).eps) * diag.max()
    if deficient:
        _, sv, vt = np.linalg.svd(SA, full_matrices=False)
        rank = _numerical_rank(sv, SA.shape, rank_rtol or 1e-12)
        deficient = rank < mat.d
    if deficient:
        P, tri = vt[:rank].T / sv[:rank], False
    else:
        P, tri, rank = R, True, mat.d
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
