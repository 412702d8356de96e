"""Top eigenvector of A^T A from a random-order row stream (Kacham, Woodruff, NeurIPS 2024).

What it is: a two-pass algorithm. A first pass reads every row's squared norm (||A||_F^2 fixes the
heavy-row threshold and the light rows' sampling rate, which the analysis assumes known); the second
pass is the random-order stream, in which every row is read once (heavy rows, a sparse subset, are
fetched by index after the first pass). It is not a one-pass streaming algorithm over an unknown
stream; ``PASSES_OVER_A`` records this and results.json reports it.

The rows arrive in uniformly random order, cut into T chunks (row i goes to chunk t_i, uniform and
keyed by (seed, global row), so the stream does not depend on the partitioning). Heavy rows,
||a_i||^2 >= h ||A||_F^2 / (d log2 d), are kept exactly; light rows are norm-sampled (kept with
probability p_i = min(1, m T ||a_i||^2 / F_light), rescaled by 1/sqrt(p_i)); each chunk gives an
unbiased estimate M_t = T L_t^T L_t + H^T H of A^T A and one block power step Z <- orth(M_t Z).
Memory: the heavy rows, one chunk's sample and Z. Oja's rule (mini-batch) runs on the same stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flagstaff.jobs.blocks import Block, RowBlockMatrix, row_uniforms

_TAG_CHUNK, _TAG_SAMPLE, _TAG_ORDER = 41, 42, 43

#: full reads of A per estimate: the row-norm pass, then the stream (Kacham-Woodruff and Oja alike)
PASSES_OVER_A = 2


def _stream_keys(block: Block, seed: int, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    if "eig_chunk" not in block.state:
        u = row_uniforms(seed, _TAG_CHUNK, block.offset, block.rows)
        block.state["eig_chunk"] = np.minimum((u * chunks).astype(int), chunks - 1)
        block.state["eig_order"] = row_uniforms(seed, _TAG_ORDER, block.offset, block.rows)
    return block.state["eig_chunk"], block.state["eig_order"]


def block_norm_stats(block: Block) -> np.ndarray:
    sq = np.einsum("ij,ij->i", block.A, block.A)
    block.state["eig_sq"] = sq
    return np.array([sq.sum(), sq.max(initial=0.0)])


def block_heavy(block: Block, tau: float) -> np.ndarray:
    return np.asarray(block.A[block.state["eig_sq"] >= tau])


def block_light_sq(block: Block, tau: float) -> float:
    sq = block.state["eig_sq"]
    return float(sq[sq < tau].sum())


def block_chunk_sample(
    block: Block, t: int, seed: int, chunks: int, tau: float, rate: float
) -> np.ndarray:
    """Norm-sampled, rescaled light rows of this block that fall in stream chunk t."""
    ch, _ = _stream_keys(block, seed, chunks)
    sq = block.state["eig_sq"]
    sel = (ch == t) & (sq < tau)
    p = np.minimum(1.0, rate * sq[sel])
    u = row_uniforms(seed, _TAG_SAMPLE, block.offset, block.rows)[sel]
    keep = u < p
    return np.asarray(block.A[sel][keep]) / np.sqrt(p[keep])[:, None]


def block_oja(
    block: Block,
    state: tuple[np.ndarray, int],
    t: int,
    seed: int,
    chunks: int,
    lr: float,
    batch: int,
    row_sq: float,
) -> tuple[np.ndarray, int]:
    """Mini-batch Oja v <- normalize(v + eta_s A_B^T A_B v) over this block's rows of chunk t,
    in the stream's random order."""
    v, step = state
    ch, order = _stream_keys(block, seed, chunks)
    idx = np.flatnonzero(ch == t)
    idx = idx[np.argsort(order[idx])]
    A = block.A
    for s0 in range(0, idx.size, batch):
        Ab = np.asarray(A[idx[s0 : s0 + batch]])
        eta = lr / (max(float(np.einsum("ij,ij->", Ab, Ab)), row_sq) * math.sqrt(step + 1))
        v = v + eta * (Ab.T @ (Ab @ v))
        v /= np.linalg.norm(v)
        step += 1
    return v, step


@dataclass
class StreamEigResult:
    v: np.ndarray
    heavy_rows: int
    max_sampled_rows: int
    memory_floats: int
    history: list[float] = field(default_factory=list)  # Rayleigh quotient per chunk


def streaming_top_eigvec(
    mat: RowBlockMatrix,
    chunks: int = 20,
    block_size: int = 2,
    samples_per_chunk: int = 0,
    heavy_factor: float = 1.0,
    seed: int = 0,
    progress: Any = None,
    v_ref: np.ndarray | None = None,
) -> StreamEigResult:
    """Kacham-Woodruff random-order stream estimate of the top eigenvector of A^T A (two passes
    over A: row norms, then the stream; see the module docstring)."""
    d = mat.d
    m = samples_per_chunk or 8 * d
    stats = mat.map(block_norm_stats)
    frob = float(sum(s[0] for s in stats))
    tau = heavy_factor * frob / (d * max(1.0, math.log2(d)))
    H = np.vstack(mat.map(block_heavy, tau) + [np.zeros((0, d))])
    light = mat.sum(block_light_sq, tau)
    rate = m * chunks / light if light > 0 else 0.0
    Z, _ = np.linalg.qr(np.random.default_rng([seed, 44]).standard_normal((d, block_size)))
    hist, max_rows = [], 0
    for t in range(chunks):
        L = np.vstack(mat.map(block_chunk_sample, t, seed, chunks, tau, rate) + [np.zeros((0, d))])
        max_rows = max(max_rows, L.shape[0])
        MZ = chunks * (L.T @ (L @ Z)) + H.T @ (H @ Z)
        # Rayleigh-Ritz on the block, then orthonormalize for the next chunk
        evals, evecs = np.linalg.eigh(Z.T @ MZ)
        Z, _ = np.linalg.qr(MZ @ evecs[:, ::-1])
        if v_ref is not None:
            hist.append(float((Z[:, 0] @ v_ref) ** 2))
        if progress is not None:
            progress.update(1)
    v = Z[:, 0] / np.linalg.norm(Z[:, 0])
    memory = (H.shape[0] + max_rows) * d + d * block_size
    return StreamEigResult(v, int(H.shape[0]), int(max_rows), int(memory), hist)


def oja_top_eigvec(
    mat: RowBlockMatrix,
    chunks: int = 20,
    lr: float = 1.0,
    batch: int = 64,
    seed: int = 0,
    v_ref: np.ndarray | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Oja's rule, mini-batch, on the same stream (after the same row-norm pass, which sets the
    step normalisation: two passes over A).

    Step lr / (max(||A_B||_F^2, mean ||a||^2) sqrt(s)) (normalised by the batch's mass).
    """
    stats = mat.map(block_norm_stats)
    row_sq = float(sum(s[0] for s in stats)) / mat.n
    v = np.random.default_rng([seed, 45]).standard_normal(mat.d)
    state = (v / np.linalg.norm(v), 0)
    hist = []
    for t in range(chunks):
        state = mat.fold(block_oja, state, t, seed, chunks, lr, batch, row_sq)
        if v_ref is not None:
            hist.append(float((state[0] @ v_ref) ** 2))
    return state[0], hist


def exact_top_eigvec(mat: RowBlockMatrix) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and top eigenvector of A^T A from the summed Gram matrix."""
    G = mat.sum(lambda_gram)
    w, V = np.linalg.eigh(G)
    return w[::-1], V[:, -1]


def lambda_gram(block: Block) -> np.ndarray:
    return block.A.T @ block.A
