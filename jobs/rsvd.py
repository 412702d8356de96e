"""Randomized SVD over row blocks (Halko, Martinsson, Tropp, SIAM Review 2011, Alg. 4.3/4.4 + 5.1).

Subspace (power) iteration on the d-side: Z <- orth(A^T A Z), q = k + oversample columns, each
step one fused pass over the blocks (A_p^T (A_p Z) per cache-sized piece, summed) and a QR of the
d x q result on the driver ("gram" normalization). After the power iterations the range basis
Q = orth(A Z) is built in float64 by a TSQR reduction (local QR per block, QR of the stacked R
factors; Demmel, Grigori, Hoemmen, Langou 2012), B = Q^T A (q x d, summed over blocks), SVD of B,
and U = Q U_B is kept on the hosts. Only q x q, d x q and q x d matrices reach the driver.

After p power iterations Q spans (A A^T)^p A Omega, the same polynomial as Alg. 4.4 (and as
scikit-learn's randomized_svd with n_iter = p). Normalizing only the d x q block once per A^T A
step is the cheapest stable choice when the wanted singular values lie within 1 / sqrt(u) of
sigma_1 (u the unit roundoff of the passes: HMT Sec. 4.5 and Remark 4.3 on loss of accuracy from
squaring); normalize="tsqr" orthonormalizes after every application of A and of A^T instead
(HMT Alg. 4.4, the previous scheme here), for spectra wider than that.

precision="mixed" runs the power-iteration passes on a float32 copy of A (GEMM at about 2.5x the
float64 rate here and half the bytes) and builds Q, B and the SVD in float64: rounding in the early
passes only perturbs the subspace that the later ones keep contracting, and the final float64 range
and Rayleigh-Ritz step gives float64 singular values of the float32-found subspace. A pass whose
d-side QR shows a wanted direction within 1e3 u32 of sigma_1^2 finishes the iterations in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flagstaff.jobs.blocks import Block, RowBlockMatrix, block_drop_low, block_make_low

PRECISIONS = ("mixed", "double")
NORMALIZE = ("gram", "tsqr")
PIECE_BYTES = 4 << 20  # bytes of A per piece of a fused A^T (A Z) pass
LOW_RESOLUTION = 1e3 * float(np.finfo(np.float32).eps)  # smallest sigma_k^2 / sigma_1^2 in float32


def block_gram_product(block: Block, Z: np.ndarray, low: bool) -> np.ndarray:
    """A_p^T (A_p Z), fused piecewise (each piece of A_p read once); with `low` on the float32
    copy of A_p, the sum over pieces in float64."""
    A = block.state["A_low"] if low else block.A
    Zc = Z.astype(A.dtype, copy=False)
    step = max(16, PIECE_BYTES // max(1, A.shape[1] * A.dtype.itemsize))
    W = np.zeros((A.shape[1], Z.shape[1]))
    for s0 in range(0, A.shape[0], step):
        Ap = A[s0 : s0 + step]
        W += Ap.T @ (Ap @ Zc)
    return W


def block_range(block: Block, Z: np.ndarray) -> np.ndarray:
    """Y_p = A_p Z, local QR: keep Q1_p, return R_p (the TSQR leaf)."""
    q1, r = np.linalg.qr(block.A @ Z)
    block.state["rsvd_q1"] = q1
    return r


def block_finish_q(block: Block, Q2: np.ndarray, starts: dict[int, int]) -> np.ndarray:
    """Q_p = Q1_p Q2[rows of R_p]; return A_p^T Q_p (d x q) for the next step."""
    q1 = block.state.pop("rsvd_q1")
    s = starts[block.index]
    Q = q1 @ Q2[s : s + q1.shape[1]]
    block.state["rsvd_q"] = Q
    return block.A.T @ Q


def block_set_u(block: Block, Ub: np.ndarray) -> None:
    block.state["rsvd_u"] = block.state.pop("rsvd_q") @ Ub


def block_get_u(block: Block) -> np.ndarray:
    return block.state["rsvd_u"]


def block_lowrank_err(block: Block, s: np.ndarray, vt: np.ndarray) -> float:
    """||A_p - U_p diag(s) V^T||_F^2."""
    E = block.A - (block.state["rsvd_u"] * s) @ vt
    return float(np.einsum("ij,ij->", E, E))


def tsqr_orthonormalize(mat: RowBlockMatrix, Z: np.ndarray) -> np.ndarray:
    """Q of A Z by TSQR, left on the hosts; returns A^T Q (d x q), summed over blocks."""
    rs = mat.map(block_range, Z)
    starts, pos = {}, 0
    for idx, r in zip(mat.block_index, rs, strict=True):
        starts[idx] = pos
        pos += r.shape[0]
    Q2, _ = np.linalg.qr(np.vstack(rs))
    return mat.sum(block_finish_q, Q2, starts)


@dataclass
class RSVDResult:
    s: np.ndarray  # k singular values
    vt: np.ndarray  # k x d
    power_iters: int
    precision: str = "double"
    passes_low: int = 0  # power-iteration passes on the float32 copy
    passes_double: int = 0  # passes over A in float64 (power iterations, range, projection)


def rsvd(
    mat: RowBlockMatrix,
    k: int,
    oversample: int = 10,
    power_iters: int = 4,
    seed: int = 0,
    progress: Any = None,
    precision: str = "mixed",
    normalize: str = "gram",
) -> RSVDResult:
    """Rank-k randomized SVD of the row-block matrix; U stays on the hosts (see gather_u)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: valid choices are {', '.join(PRECISIONS)}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r}: valid choices are {', '.join(NORMALIZE)}")
    q = min(k + oversample, mat.d)
    Z = np.random.default_rng([seed, 31]).standard_normal((mat.d, q))
    if normalize == "tsqr":  # orthonormalize after every application of A and of A^T
        if precision != "double":
            raise ValueError("normalize='tsqr' runs in float64: use precision='double'")
        W = tsqr_orthonormalize(mat, Z)  # W = A^T Q
        for _ in range(power_iters):
            Z, _ = np.linalg.qr(W)
            W = tsqr_orthonormalize(mat, Z)
            if progress is not None:
                progress.update(1)
        return _finish(mat, W, k, power_iters, "double", 0, 2 * power_iters + 2)
    low = precision == "mixed" and power_iters > 0
    used_low, passes_low, passes_double = low, 0, 0
    if low:
        mat.map(block_make_low)
    try:
        for _ in range(power_iters):
            Z, R = np.linalg.qr(Z)
            if (
                low and passes_low
            ):  # |R_ii| ~ sigma_i^2 of the last pass: still resolved in float32?
                d = np.abs(np.diag(R))
                if d[: min(k, q)].min() < LOW_RESOLUTION * d.max():
                    low = False
                    mat.map(block_drop_low)
            Z = mat.sum(block_gram_product, Z, low)  # A^T A Z, one fused pass
            passes_low += low
            passes_double += not low
            if progress is not None:
                progress.update(1)
    finally:
        if used_low:
            mat.map(block_drop_low)
    Z, _ = np.linalg.qr(Z)
    W = tsqr_orthonormalize(mat, Z)  # A^T Q with Q = orth(A Z), float64
    prec = "mixed" if used_low else "double"
    return _finish(mat, W, k, power_iters, prec, passes_low, passes_double + 2)


def _finish(
    mat: RowBlockMatrix, W: np.ndarray, k: int, power_iters: int, prec: str, low: int, dbl: int
) -> RSVDResult:
    """B = Q^T A = W^T, its SVD; U = Q U_B left on the hosts."""
    ub, s, vt = np.linalg.svd(W.T, full_matrices=False)
    mat.map(block_set_u, ub[:, :k])
    return RSVDResult(s[:k], vt[:k], power_iters, prec, low, dbl)


def gather_u(mat: RowBlockMatrix) -> np.ndarray:
    """The n x k left factor (small n only: tests, comparisons)."""
    return np.vstack(mat.map(block_get_u))


def lowrank_error(mat: RowBlockMatrix, res: RSVDResult) -> float:
    """||A - U diag(s) V^T||_F with one distributed pass."""
    return float(np.sqrt(mat.sum(block_lowrank_err, res.s, res.vt)))
