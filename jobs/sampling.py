"""Row sampling over row blocks: leverage scores, l_p Lewis weights and sensitivities, l_p regression
on the sample (Woodruff, Yasuda, ICML 2023; Cohen, Peng, STOC 2015), and leveraged volume sampling
for unbiased weighted least squares (Derezinski, Warmuth, Hsu, NeurIPS 2018; JMLR 2022).

Distributed pattern (two rounds): a global conditioning basis R (TSQR of the, possibly reweighted,
blocks; only d x d factors travel), then block-local scores and block-local independent sampling;
only the sampled rows reach the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg as sla

from flagstaff.jobs.blocks import Block, RowBlockMatrix, row_uniforms

_TAG_KEEP, _TAG_VOL = 51, 52


# ---------------------------------------------------------------------------------------------
# leverage scores and Lewis weights
def block_weighted_r(block: Block, p: float) -> np.ndarray:
    """R of W_p^{1/2 - 1/p} A_p (TSQR leaf); W_p = current Lewis weights (1 at the start)."""
    w = block.state.get("lewis_w")
    A = np.asarray(block.A)
    if w is not None and p != 2:
        A = A * (w ** (0.5 - 1.0 / p))[:, None]
    return np.linalg.qr(A, mode="r")


def block_lewis_update(block: Block, R: np.ndarray, p: float) -> float:
    """w_i <- (a_i^T (A^T W^{1-2/p} A)^{-1} a_i)^{p/2} = ||R^{-T} a_i||^p; returns sum w."""
    T = sla.solve_triangular(R, np.asarray(block.A).T, trans="T")
    tau = np.einsum("ij,ij->j", T, T)
    w = tau ** (p / 2.0)
    block.state["lewis_w"] = w
    return float(w.sum())


def _tsqr(mat: RowBlockMatrix, p: float) -> np.ndarray:
    return np.linalg.qr(np.vstack(mat.map(block_weighted_r, p)), mode="r")


def lewis_weights(
    mat: RowBlockMatrix, p: float, iters: int = 30, tol: float = 1e-10, progress: Any = None
) -> tuple[float, int]:
    """l_p Lewis weights by the Cohen-Peng fixed point (a contraction for p < 4), kept on the
    hosts as block.state['lewis_w']; p = 2 gives the leverage scores in one step.
    Returns (sum of weights, iterations); the sum is d for full-rank A.
    """
    mat.map(_clear_weights)
    total, it = 0.0, 0
    for it in range(1, (1 if p == 2 else iters) + 1):
        R = _tsqr(mat, p)
        new = mat.sum(block_lewis_update, R, p)
        if progress is not None:
            progress.update(1)
        if abs(new - total) <= tol * max(new, 1.0) and it > 1:
            total = new
            break
        total = new
    return total, it


def _clear_weights(block: Block) -> None:
    block.state.pop("lewis_w", None)


def block_get_weights(block: Block) -> np.ndarray:
    return block.state["lewis_w"]


def sensitivity_bound_factor(p: float, d: int) -> float:
    """s_i <= d^{max(0, p/2 - 1)} w_i (Lewis weights bound the l_p sensitivities for p > 2)."""
    return float(d) ** max(0.0, p / 2.0 - 1.0)


def block_sample(block: Block, p: float, scale: float, seed: int) -> tuple[np.ndarray, ...]:
    """Keep row i with probability q_i = min(1, scale * w_i), rescaled by q_i^{-1/p}."""
    w = block.state["lewis_w"]
    q = np.minimum(1.0, scale * w)
    keep = row_uniforms(seed, _TAG_KEEP, block.offset, block.rows) < q
    f = q[keep] ** (-1.0 / p)
    A = np.asarray(block.A[keep]) * f[:, None]
    b = np.asarray(block.b[keep]) * f if block.b is not None else np.zeros(0)
    return A, b, np.flatnonzero(keep) + block.offset


@dataclass
class Sample:
    A: np.ndarray
    b: np.ndarray
    rows: np.ndarray
    expected_size: float
    total_sensitivity_bound: float


def sensitivity_sample(
    mat: RowBlockMatrix, p: float, m: int, seed: int = 0, iters: int = 30, progress: Any = None
) -> Sample:
    """Independent l_p sensitivity sampling with m rows in expectation (Woodruff-Yasuda)."""
    total, _ = lewis_weights(mat, p, iters, progress=progress)
    factor = sensitivity_bound_factor(p, mat.d)
    S = factor * total
    scale = m * factor / S
    parts = mat.map(block_sample, p, scale, seed)
    A = np.vstack([x[0] for x in parts])
    b = np.concatenate([x[1] for x in parts])
    rows = np.concatenate([x[2] for x in parts])
    return Sample(A, b, rows, float(m), S)


# ---------------------------------------------------------------------------------------------
# l_p norms and l_p regression
def block_lp_norms(block: Block, X: np.ndarray, p: float) -> np.ndarray:
    """sum_i |a_i^T x_j|^p for each column x_j of X."""
    return (np.abs(block.A @ X) ** p).sum(axis=0)


def lp_distortion(mat: RowBlockMatrix, sample: Sample, X: np.ndarray, p: float) -> np.ndarray:
    """||S A x||_p / ||A x||_p - 1 for each direction (column of X)."""
    full = mat.sum(block_lp_norms, X, p)
    samp = (np.abs(sample.A @ X) ** p).sum(axis=0)
    return (samp / full) ** (1.0 / p) - 1.0


def block_lp_newton(block: Block, x: np.ndarray, p: float, eps: float) -> tuple:
    """Smoothed l_p objective sum (r^2 + eps^2)^{p/2}, its gradient and Hessian on the block."""
    r = block.A @ x - block.b
    t = r * r + eps * eps
    f = float((t ** (p / 2)).sum())
    g1 = p * r * t ** (p / 2 - 1)
    h1 = p * t ** (p / 2 - 2) * ((p - 1) * r * r + eps * eps)
    return f, block.A.T @ g1, (block.A * h1[:, None]).T @ block.A


def block_lp_cost(block: Block, x: np.ndarray, p: float) -> float:
    return float((np.abs(block.A @ x - block.b) ** p).sum())


def lp_cost(mat: RowBlockMatrix, x: np.ndarray, p: float) -> float:
    """||A x - b||_p."""
    return mat.sum(block_lp_cost, x, p) ** (1.0 / p)


def lp_regression(
    mat: RowBlockMatrix,
    p: float,
    x0: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> np.ndarray:
    """min_x ||A x - b||_p by damped Newton on the smoothed objective (r^2 + eps^2)^{p/2},
    with eps driven to ~0 by homotopy for p < 2 (eps = 0 for p >= 2, where it is smooth).
    One distributed pass per Newton step returns (f, gradient, d x d Hessian).
    """
    from flagstaff.jobs.blocks import exact_lstsq

    x = exact_lstsq(mat)[0] if x0 is None else x0.copy()
    scale = lp_cost(mat, x, p) / max(mat.n, 1) ** (1 / p)
    eps = scale if p < 2 else 0.0
    for _ in range(max_iter):
        f, g, H = mat.sum(block_lp_newton, x, p, eps)
        H = H + 1e-12 * np.trace(H) / mat.d * np.eye(mat.d)
        dx = -np.linalg.solve(H, g)
        dec = float(-g @ dx)
        a = 1.0
        while a > 1e-10:
            f_new = mat.sum(block_lp_newton_f, x + a * dx, p, eps)
            if f_new <= f - 1e-4 * a * dec:
                break
            a *= 0.5
        x = x + a * dx
        final = p >= 2 or eps <= 1e-9 * scale
        if dec <= (tol if final else 1e-4) * f:
            if final:
                break
            eps *= 0.1  # homotopy: a coarse solve per smoothing level, a tight one at the end
    return x


def block_lp_newton_f(block: Block, x: np.ndarray, p: float, eps: float) -> float:
    r = block.A @ x - block.b
    return float(((r * r + eps * eps) ** (p / 2)).sum())


# ---------------------------------------------------------------------------------------------
# leveraged volume sampling
def block_whiten(block: Block, R: np.ndarray) -> float:
    """Whitened rows z_i = R^{-T} a_i (so sum z z^T = I); leverage l_i = ||z_i||^2; returns sum."""
    Z = sla.solve_triangular(R, np.asarray(block.A).T, trans="T").T
    block.state["vol_z"] = Z
    block.state["vol_lev"] = np.einsum("ij,ij->i", Z, Z)
    return float(block.state["vol_lev"].sum())


def block_lev_sum(block: Block) -> float:
    return float(block.state["vol_lev"].sum())


def block_draw(block: Block, counts: np.ndarray, seed: int, round_: int) -> tuple:
    """counts[t] i.i.d. draws per trial t from this block with probability prop. to leverage."""
    lev = block.state["vol_lev"]
    cdf = np.cumsum(lev)
    total = int(counts.sum())
    rng = np.random.default_rng([seed, _TAG_VOL, round_, block.index])
    idx = np.searchsorted(cdf, rng.random(total) * cdf[-1], side="right")
    idx = np.minimum(idx, lev.size - 1)
    trial = np.repeat(np.arange(counts.size), counts)
    return (
        trial,
        block.state["vol_z"][idx],
        np.asarray(block.A[idx]),
        np.asarray(block.b[idx]),
        lev[idx],
    )


def _draw(
    mat: RowBlockMatrix, trials: int, size: int, seed: int, round_: int
) -> tuple[np.ndarray, ...]:
    """For each trial, `size` i.i.d. rows from q_i = l_i / d; returns stacked (T, size, .) arrays."""
    sums = np.array(mat.map(block_lev_sum))
    rng = np.random.default_rng([seed, _TAG_VOL, round_])
    counts = rng.multinomial(size, sums / sums.sum(), size=trials)  # T x P
    parts = _draw_blocks(mat, counts, seed, round_)
    trial = np.concatenate([x[0] for x in parts])
    order = np.argsort(trial, kind="stable")
    Z = np.concatenate([x[1] for x in parts])[order].reshape(trials, size, -1)
    A = np.concatenate([x[2] for x in parts])[order].reshape(trials, size, -1)
    b = np.concatenate([x[3] for x in parts])[order].reshape(trials, size)
    lev = np.concatenate([x[4] for x in parts])[order].reshape(trials, size)
    q = lev / sums.sum()
    return Z, A, b, q


def block_draw_indexed(block: Block, counts: np.ndarray, seed: int, round_: int) -> tuple:
    return block_draw(block, counts[:, block.index], seed, round_)


def _draw_blocks(mat: RowBlockMatrix, counts: np.ndarray, seed: int, round_: int) -> list:
    return mat.map(block_draw_indexed, counts, seed, round_)


def leveraged_volume_sample(
    mat: RowBlockMatrix, k: int, trials: int, seed: int = 0, oversize: int | None = None
) -> tuple[np.ndarray, ...]:
    """`trials` independent leveraged volume samples of size k (Derezinski, Warmuth, Hsu 2018).

    Determinantal rejection sampling: draw s >= k rows i.i.d. from q_i = l_i / d and accept with
    probability det((1/s) sum_j z_j z_j^T / q_j) <= 1 (z whitened rows, AM-GM), which gives
    P(pi) proportional to det(sum_j z_j z_j^T / q_j) prod_j q_j; then reverse iterative volume
    sampling from s down to k on the rescaled rows z_j / sqrt(q_j) (remove j with probability
    (1 - h_j) / (t - d), h_j its leverage within the current sample). Needs the whitening done
    (see prepare_volume_sampling). Returns (A_S, b_S, q_S) stacked over trials: T x k.
    """
    d = mat.d
    s = max(k, oversize or 4 * d * d)
    acc_A, acc_b, acc_q, acc_z = [], [], [], []
    need, round_ = trials, 0
    while need > 0 and round_ < 200:
        Z, A, b, q = _draw(mat, need, s, seed, round_)
        M = np.einsum("tsi,tsj->tij", Z / q[..., None], Z) / s
        sign, logdet = np.linalg.slogdet(M)
        prob = np.where(sign > 0, np.exp(np.minimum(logdet, 0.0)), 0.0)
        u = np.random.default_rng([seed, _TAG_VOL, round_, 7]).random(need)
        ok = u < prob
        acc_A.append(A[ok]), acc_b.append(b[ok]), acc_q.append(q[ok]), acc_z.append(Z[ok])
        need -= int(ok.sum())
        round_ += 1
    if need > 0:
        raise RuntimeError("determinantal rejection sampling did not accept enough samples")
    A, b, q, Z = (np.concatenate(x)[:trials] for x in (acc_A, acc_b, acc_q, acc_z))
    keep = _reverse_volume(Z / np.sqrt(q)[..., None], k, np.random.default_rng([seed, 53]))
    take = lambda X: np.take_along_axis(X, keep if X.ndim == 2 else keep[..., None], axis=1)  # noqa: E731
    return take(A), take(b), take(q)


def _reverse_volume(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Reverse iterative volume sampling, batched over trials: X (T, s, d) -> kept indices (T, k)."""
    T, s, d = X.shape
    alive = np.ones((T, s), dtype=bool)
    Minv = np.linalg.inv(np.einsum("tsi,tsj->tij", X, X))
    for _ in range(s - k):
        h = np.einsum("tsi,tij,tsj->ts", X, Minv, X)
        w = np.where(alive, np.clip(1.0 - h, 0.0, None), 0.0)
        w /= w.sum(axis=1, keepdims=True)
        j = (w.cumsum(axis=1) < rng.random((T, 1))).sum(axis=1)
        j = np.minimum(j, s - 1)
        alive[np.arange(T), j] = False
        x = X[np.arange(T), j]  # T x d
        mx = np.einsum("tij,tj->ti", Minv, x)
        denom = 1.0 - np.einsum("ti,ti->t", x, mx)
        Minv = Minv + np.einsum("ti,tj->tij", mx, mx) / denom[:, None, None]
    return np.sort(np.argsort(~alive, axis=1, kind="stable")[:, :k], axis=1)


def iid_leverage_sample(
    mat: RowBlockMatrix, k: int, trials: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k i.i.d. rows from q_i = l_i / d per trial (the biased baseline)."""
    _, A, b, q = _draw(mat, trials, k, seed + 1_000_003, 0)
    return A, b, q


def prepare_volume_sampling(mat: RowBlockMatrix) -> np.ndarray:
    """TSQR R of A and whitened rows / leverage scores on the hosts; returns R."""
    R = np.linalg.qr(np.vstack(mat.map(block_weighted_r, 2.0)), mode="r")
    mat.map(block_whiten, R)
    return R


def weighted_ls(A: np.ndarray, b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per trial: argmin_w sum_i (a_i^T w - b_i)^2 / q_i (minimum norm if the sample is deficient)."""
    s = 1.0 / np.sqrt(q)
    out = np.empty((A.shape[0], A.shape[2]))
    for t in range(A.shape[0]):
        out[t] = np.linalg.lstsq(A[t] * s[t][:, None], b[t] * s[t], rcond=None)[0]
    return out


def block_misspecify(block: Block, u: np.ndarray, strength: float) -> None:
    """b_i += strength * |a_i^T u|: a response that is not linear in a (model misspecification)."""
    block.b = np.asarray(block.b) + strength * np.abs(block.A @ u)


def loss_ratio_batch(
    R_full: np.ndarray, x_star: np.ndarray, opt_resid: float, W: np.ndarray
) -> np.ndarray:
    """L(w) / L(x*) for each row w of W, using L(w) = L* + ||R (w - x*)||^2 (exact identity)."""
    D = (W - x_star) @ R_full.T
    return 1.0 + np.einsum("ij,ij->i", D, D) / opt_resid**2
