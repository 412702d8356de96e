"""Low-rank matrix completion by robust alternating minimization with sketched per-row solves.

Gu, Song, Yin, Zhang, "Low Rank Matrix Completion via Robust Alternating Minimization in Nearly
Linear Time" (ICLR 2024). The rows of the m x n matrix M (and their observed entries Omega) live in
row blocks held by hosts (Ray actors, or in-process objects with backend=local) wrapped in a
`RowBlockMatrix`, so `.map` / `.sum` run the block functions below where the rows are. The factor U
(m x k) stays on the hosts; only V (n x k), the V-step normal equations (n x k x k, n x k) and
scalars travel.

- init: top-k right singular vectors of (1/p) P_Omega(M) by a randomized range finder with power
  iterations over the row blocks (optionally the paper's clipping of large rows for incoherence).
- U-step: per-row least squares min_u sum_{j in Omega_i} (M_ij - u^T v_j)^2, batched over the rows
  of a block: exactly (batched normal equations) or, as in the paper, approximately with a
  sketch-preconditioned solver (sparse sign sketch of each row's observed design, QR of the sketch
  as right preconditioner, preconditioned CGLS warm-started at the previous U).
- V-step: per-column least squares; its normal equations sum_i u_i u_i^T and sum_i M_ij u_i over
  observed (i, j) are a data-parallel sum over the blocks, solved batched on the driver.

All randomness is keyed by global row (generator chunks of `CHUNK` rows, or a counter-based hash of
(seed, tag, row, column)), so results do not depend on how many blocks or hosts hold the rows.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from flagstaff.jobs.blocks import BlockError, BlockHost, RowBlockMatrix, split_rows

CHUNK = 256  # rows per generator chunk: the stream is keyed by (seed, tag, chunk index)
_TAG_ROWS, _TAG_V, _TAG_HOLD, _TAG_SKETCH, _TAG_INIT = 41, 42, 43, 44, 45
DEFAULT_HOLDOUT = 0.1  # fraction of observed entries held out when M is not known elsewhere


# counter-based hashing ------------------------------------------------------------------------
_C1, _C2, _C3 = (
    np.uint64(0x9E3779B97F4A7C15),
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (vectorized, wrapping uint64 arithmetic)."""
    x = x + _C1
    x = (x ^ (x >> np.uint64(30))) * _C2
    x = (x ^ (x >> np.uint64(27))) * _C3
    return x ^ (x >> np.uint64(31))


def hash_keys(*keys: Any) -> np.ndarray:
    """A 64-bit hash of broadcast integer keys, e.g. (seed, tag, row, column)."""
    with np.errstate(over="ignore"):
        h = np.zeros((), dtype=np.uint64)
        for key in keys:
            h = _mix(h ^ np.asarray(key).astype(np.uint64))
    return h


def hash_uniform(*keys: Any) -> np.ndarray:
    """Uniform(0, 1) from hash_keys (53 bits)."""
    return (hash_keys(*keys) >> np.uint64(11)).astype(np.float64) * 2.0**-53


# problem specification ------------------------------------------------------------------------
@dataclass(frozen=True)
class CompletionSpec:
    """A completion problem: generated (M = U* V*^T, Omega ~ Bernoulli(p)) or from files.

    Generated: U* rows i.i.d. N(0, I_k) (keyed by row chunk), V* = Q diag(sigma) with Q a seeded
    orthonormal n x k basis and sigma geometric from 1 to 1/cond; entries observed with
    probability p; `noise` adds N(0, (noise * rms(M))^2) to the observed values.
    Files: `path` is an .npy M (with `mask_path`, an .npy of the same shape, nonzero = observed)
    or an .npz with integer `rows`, `cols` and float `vals` (optional `shape`).
    """

    m: int
    n: int
    k: int
    p: float = 0.05
    cond: float = 1.0
    noise: float = 0.0
    seed: int = 0
    source: str = "generated"  # generated | npy | npz
    path: str = ""
    mask_path: str = ""

    def sigma(self) -> np.ndarray:
        return np.geomspace(1.0, 1.0 / self.cond, self.k) if self.k > 1 else np.ones(1)

    def v_true(self) -> np.ndarray:
        """V* (n x k) = Q diag(sigma), the same on every host."""
        g = np.random.default_rng([self.seed, _TAG_V]).standard_normal((self.n, self.k))
        q, r = np.linalg.qr(g)
        return q * np.sign(np.diag(r)) * self.sigma()

    def generate(self, r0: int, r1: int, vt: np.ndarray) -> tuple[np.ndarray, ...]:
        """Rows [r0, r1): clean M rows, observed mask and observed values (keyed per chunk)."""
        full, mask, obs = [], [], []
        rms = math.sqrt(float((self.sigma() ** 2).sum()) / self.n)
        for c in range(r0 // CHUNK, (r1 - 1) // CHUNK + 1):
            c0, c1 = c * CHUNK, min((c + 1) * CHUNK, self.m)
            lo, hi = max(r0, c0) - c0, min(r1, c1) - c0
            rng = np.random.default_rng([self.seed, _TAG_ROWS, c])
            u = rng.standard_normal((c1 - c0, self.k))[lo:hi]
            w = (rng.random((c1 - c0, self.n)) < self.p)[lo:hi]
            f = u @ vt.T
            full.append(f)
            mask.append(w)
            if self.noise > 0:
                z = rng.standard_normal((c1 - c0, self.n))[lo:hi]
                f = f + self.noise * rms * z
            obs.append(f)
        return np.vstack(full), np.vstack(mask), np.vstack(obs)


def inspect_files(path: str, mask_path: str) -> tuple[str, int, int]:
    """Check the input files on the driver (headers; indices for .npz); returns (source, m, n)."""
    if not path:
        raise ValueError(
            "job.source=files needs job.path (an .npy matrix with job.mask_path, or "
            "an .npz with rows, cols, vals)"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"job.path={path} does not exist")
    if path.endswith(".npy"):
        if not mask_path:
            raise ValueError(
                f"job.path={path} is a dense .npy matrix: give job.mask_path (an .npy of the same "
                "shape, nonzero = observed), or give an .npz with rows, cols, vals triplets"
            )
        if not os.path.exists(mask_path):
            raise FileNotFoundError(f"job.mask_path={mask_path} does not exist")
        a = np.load(path, mmap_mode="r")
        w = np.load(mask_path, mmap_mode="r")
        if a.ndim != 2:
            raise ValueError(f"job.path={path}: expected a 2-D matrix, got shape {a.shape}")
        if w.shape != a.shape:
            raise ValueError(
                f"job.mask_path={mask_path} has shape {w.shape} but the matrix {path} has "
                f"shape {a.shape}: they must match"
            )
        return "npy", int(a.shape[0]), int(a.shape[1])
    if path.endswith(".npz"):
        with np.load(path) as z:
            missing = [key for key in ("rows", "cols", "vals") if key not in z.files]
            if missing:
                raise ValueError(
                    f"job.path={path}: missing arrays {missing} (found {z.files}); an .npz needs "
                    "rows, cols, vals (and optionally shape)"
                )
            rows, cols, vals = z["rows"], z["cols"], z["vals"]
            shape = tuple(int(s) for s in z["shape"]) if "shape" in z.files else None
        if not (rows.shape == cols.shape == vals.shape and rows.ndim == 1):
            raise ValueError(
                f"job.path={path}: rows, cols, vals must be 1-D of equal length (got shapes "
                f"{rows.shape}, {cols.shape}, {vals.shape})"
            )
        for name, arr in (("rows", rows), ("cols", cols)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"job.path={path}: {name} must be integers, got {arr.dtype}")
            if arr.size and arr.min() < 0:
                raise ValueError(f"job.path={path}: negative index in {name}")
        if rows.size == 0:
            raise ValueError(f"job.path={path}: no observed entries")
        m, n = shape if shape is not None else (int(rows.max()) + 1, int(cols.max()) + 1)
        if rows.max() >= m or cols.max() >= n:
            raise ValueError(
                f"job.path={path}: an index ({int(rows.max())}, {int(cols.max())}) is outside "
                f"shape ({m}, {n})"
            )
        keys = rows.astype(np.int64) * n + cols
        if np.unique(keys).size != keys.size:
            raise ValueError(f"job.path={path}: duplicate (row, col) entries")
        return "npz", m, n
    raise ValueError(f"job.path={path}: expected .npy (with job.mask_path) or .npz triplets")


# blocks ---------------------------------------------------------------------------------------
class CBlock:
    """Rows [offset, offset + rows) of M: observed entries, test entries, the factor rows U."""

    def __init__(self, index: int, offset: int, rows: int, n: int) -> None:
        self.index, self.offset, self.rows, self.n = index, offset, rows, n
        self.oi = self.oj = np.zeros(0, dtype=np.int64)  # observed entries (local row, column)
        self.ov = np.zeros(0)
        self.full: np.ndarray | None = None  # clean M rows when known
        self.unknown_unobserved = False  # some unobserved entries are not finite (not known)
        self.test_mask: np.ndarray | None = None
        self.ti = self.tj = np.zeros(0, dtype=np.int64)
        self.tv = np.zeros(0)
        self.U = self.U0 = np.zeros((rows, 0))

    def set_observed(self, oi: np.ndarray, oj: np.ndarray, ov: np.ndarray) -> None:
        order = np.lexsort((oj, oi))
        self.oi, self.oj, self.ov = oi[order], oj[order], np.asarray(ov, dtype=float)[order]


def _load_block(spec: CompletionSpec, r0: int, r1: int, cache: dict[str, Any]) -> CBlock:
    """Create rows [r0, r1) where they will live; non-finite observed values are errors."""
    blk = CBlock(-1, r0, r1 - r0, spec.n)
    what = f"rows [{r0}, {r1})"
    if spec.source == "generated":
        if "vt" not in cache:
            cache["vt"] = spec.v_true()
        full, mask, obs = spec.generate(r0, r1, cache["vt"])
        oi, oj = np.nonzero(mask)
        blk.set_observed(oi, oj, obs[oi, oj])
        blk.full = full
        return blk
    if spec.source == "npy":
        a = np.asarray(np.load(spec.path, mmap_mode="r")[r0:r1], dtype=float)
        w = np.asarray(np.load(spec.mask_path, mmap_mode="r")[r0:r1]) != 0
        oi, oj = np.nonzero(w)
        ov = a[oi, oj]
        bad = ~np.isfinite(ov)
        if bad.any():
            e = int(np.argmax(bad))
            raise BlockError(
                f"{spec.path}: observed entry ({r0 + int(oi[e])}, {int(oj[e])}) is {ov[e]} "
                "(NaN or inf are not allowed where the mask marks an observation)"
            )
        blk.set_observed(oi, oj, ov)
        if np.isfinite(a).all():
            blk.full = a
        else:
            blk.unknown_unobserved = True
        return blk
    if "npz" not in cache:
        with np.load(spec.path) as z:
            cache["npz"] = (np.asarray(z["rows"]), np.asarray(z["cols"]), np.asarray(z["vals"]))
    rows, cols, vals = cache["npz"]
    sel = (rows >= r0) & (rows < r1)
    ov = np.asarray(vals[sel], dtype=float)
    bad = ~np.isfinite(ov)
    if bad.any():
        e = int(np.argmax(bad))
        raise BlockError(
            f"{spec.path} ({what}): entry ({int(rows[sel][e])}, {int(cols[sel][e])}) is {ov[e]} "
            "(NaN or inf are not allowed)"
        )
    blk.set_observed(rows[sel].astype(np.int64) - r0, cols[sel].astype(np.int64), ov)
    blk.unknown_unobserved = True
    return blk


class CompletionHost(BlockHost):
    """Holds some completion row blocks; a plain object (local) or a Ray actor.

    Reuses BlockHost's `map` / `sum` / `fold`, so a list of hosts is wrapped in a RowBlockMatrix
    (n = m rows, d = n columns of M). Blocks are built by `load()` (not the constructor) so that
    bad input raises the original error through `ray.get`.
    """

    def __init__(
        self,
        spec: CompletionSpec,
        ranges: Sequence[tuple[int, int, int]],
        threads: int | None = None,
    ) -> None:
        super().__init__([], threads)
        self.spec = spec
        self.ranges = list(ranges)

    def load(self) -> int:
        cache: dict[str, Any] = {}
        self.blocks = []
        for index, r0, r1 in self.ranges:
            blk = _load_block(self.spec, r0, r1, cache)
            blk.index = index
            self.blocks.append(blk)  # type: ignore[arg-type]
        return len(self.blocks)

    def shapes(self) -> list[tuple[int, int, int, int, bool]]:
        return [(k.index, k.offset, k.rows, k.n, False) for k in self.blocks]  # type: ignore[attr-defined]


def make_blocks(spec: CompletionSpec, n_blocks: int, backend: str, hosts: int) -> RowBlockMatrix:
    """Create the row blocks on their hosts (generated or loaded there)."""
    if backend not in ("local", "ray"):
        raise ValueError(f"backend={backend!r}: valid choices are local, ray")
    ranges = [(i, r0, r1) for i, (r0, r1) in enumerate(split_rows(spec.m, n_blocks))]
    hosts = max(1, min(hosts, len(ranges)))
    groups = [ranges[i::hosts] for i in range(hosts)]  # round-robin, as RowBlockMatrix does
    if backend == "local":
        hs = [CompletionHost(spec, g) for g in groups]
        for h in hs:
            h.load()
        return RowBlockMatrix(hs, "local")
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    actor = ray.remote(num_cpus=min(1.0, cpus / hosts))(CompletionHost)
    hs = [actor.remote(spec, g) for g in groups]
    try:
        ray.get([h.load.remote() for h in hs])
    except Exception:
        for h in hs:
            ray.kill(h)
        raise
    return RowBlockMatrix(hs, "ray")


# block functions (module level so Ray ships them by reference) --------------------------------
def _block_info(blk: CBlock) -> tuple[bool, bool]:
    return blk.full is not None, blk.unknown_unobserved


def _prepare(blk: CBlock, holdout: float, seed: int, known: bool) -> None:
    """Split observed entries into train / test and build the padded per-row arrays and CSR."""
    gi = blk.offset + blk.oi
    test = hash_uniform(seed, _TAG_HOLD, gi, blk.oj) < holdout if holdout > 0 else None
    if not known:
        blk.full = None
    if test is None:
        tr = slice(None)
        if blk.full is not None:
            blk.test_mask = np.ones((blk.rows, blk.n), dtype=bool)
            blk.test_mask[blk.oi, blk.oj] = False  # test set: every unobserved entry
    else:
        tr = ~test
        blk.ti, blk.tj, blk.tv = blk.oi[test], blk.oj[test], blk.ov[test]
        if blk.full is not None:
            blk.tv = blk.full[blk.ti, blk.tj]  # compare with the clean M
    i, j, v = blk.oi[tr], blk.oj[tr], blk.ov[tr]
    blk.csr = sp.csr_matrix((v, (i, j)), shape=(blk.rows, blk.n))
    blk.csr_t = blk.csr.T.tocsr()
    blk.pattern_t = sp.csr_matrix((np.ones_like(v), (j, i)), shape=(blk.n, blk.rows))
    counts = np.bincount(i, minlength=blk.rows)
    width = max(int(counts.max()) if counts.size else 1, 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(i.size) - starts[i]
    blk.pidx = np.full((blk.rows, width), blk.n, dtype=np.int64)  # padding -> a zero row of V
    blk.pval = np.zeros((blk.rows, width))
    blk.pw = np.zeros((blk.rows, width))
    blk.pidx[i, pos], blk.pval[i, pos], blk.pw[i, pos] = j, v, 1.0
    blk.row_counts = counts
    del blk.oi, blk.oj, blk.ov


def _counts(blk: CBlock, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(train entries per column (n,), [train entries, test entries, rows with < k train entries,
    the first such global row or -1, fewest train entries in a row])."""
    c = blk.row_counts
    short = np.flatnonzero(c < k)
    first = blk.offset + int(short[0]) if short.size else -1
    ntest = int(blk.test_mask.sum()) if blk.test_mask is not None else int(blk.ti.size)
    col = np.asarray(blk.pattern_t.sum(axis=1)).ravel()
    return col, np.array([c.sum(), ntest, short.size, first, int(c.min()) if c.size else 0])


def _norms(blk: CBlock) -> np.ndarray:
    """[||P_test M||^2, ||M||^2 (0 when not known)] for this block."""
    full = float(np.einsum("ij,ij->", blk.full, blk.full)) if blk.full is not None else 0.0
    if blk.test_mask is not None:
        assert blk.full is not None
        test = float((blk.full[blk.test_mask] ** 2).sum())
    else:
        test = float(blk.tv @ blk.tv)
    return np.array([test, full])


def _err_sq(blk: CBlock, V: np.ndarray) -> np.ndarray:
    """[||P_test(M - U V^T)||^2, ||M - U V^T||^2] for this block (the residual stays here)."""
    full = test = 0.0
    if blk.full is not None:
        E = blk.full - blk.U @ V.T
        E *= E
        full = float(E.sum())
        if blk.test_mask is not None:
            test = float(E[blk.test_mask].sum())
    if blk.test_mask is None:
        r = blk.tv - np.einsum("ek,ek->e", blk.U[blk.ti], V[blk.tj])
        test = float(r @ r)
    return np.array([test, full])


def _init_power(blk: CBlock, G: np.ndarray, p: float) -> np.ndarray:
    """A_b^T (A_b G) with A = (1/p) P_Omega(M): one range-finder step on the right factor."""
    return blk.csr_t @ (blk.csr @ G) / (p * p)


def _init_gram(blk: CBlock, Q: np.ndarray, p: float) -> np.ndarray:
    Y = blk.csr @ Q / p
    return Y.T @ Y


def _init_u(blk: CBlock, V0: np.ndarray, p: float) -> None:
    blk.U0 = blk.csr @ V0 / p


def _reset_u(blk: CBlock) -> None:
    blk.U = blk.U0.copy()


def _get_u(blk: CBlock) -> np.ndarray:
    return blk.U


def _v_normal(blk: CBlock) -> tuple[np.ndarray, np.ndarray]:
    """V-step normal equations of this block: sum_i u_i u_i^T (n, k*k) and sum_i M_ij u_i (n, k)."""
    U = blk.U
    uu = (U[:, :, None] * U[:, None, :]).reshape(U.shape[0], -1)
    return blk.pattern_t @ uu, blk.csr_t @ U


def _u_step(
    blk: CBlock,
    V: np.ndarray,
    solver: str,
    seed: int,
    it: int,
    s: int,
    nnz: int,
    tol: float,
    max_iter: int,
) -> np.ndarray:
    """Per-row least squares for this block's rows given V; returns [sum, max] inner iterations."""
    Vz = np.vstack([V, np.zeros((1, V.shape[1]))])
    A = np.take(Vz, blk.pidx, axis=0)  # (rows, L, k): each row's observed design, zero-padded
    if solver == "exact":
        blk.U = exact_rows(A, blk.pval)
        return np.array([0.0, 0.0])
    grow = blk.offset + np.arange(blk.rows)
    if getattr(blk, "keys", None) is None:
        blk.keys = entry_keys(grow, blk.pidx)
    S = row_sketch(seed, it, grow, blk.pidx, blk.pw, s, nnz, blk.keys)
    blk.U, iters = sketched_rows(A, blk.pval, sketch_apply(S, A), blk.U, tol, max_iter)
    return np.array([float(iters.sum()), float(iters.max(initial=0))])


# batched per-row solvers ----------------------------------------------------------------------
def exact_rows(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact per-row least squares: batched normal equations (A_i^T A_i) x_i = A_i^T b_i."""
    At = np.ascontiguousarray(A.transpose(0, 2, 1))  # batched BLAS needs contiguous operands
    G = At @ A
    r = At @ b[:, :, None]
    try:
        return np.linalg.solve(G, r)[:, :, 0]
    except np.linalg.LinAlgError:  # a singular row: minimum-norm solution for every row
        return (np.linalg.pinv(G) @ r)[:, :, 0]


def row_sketch(
    seed: int,
    it: int,
    grow: np.ndarray,
    pidx: np.ndarray,
    pw: np.ndarray,
    s: int,
    nnz: int,
    base: np.ndarray | None = None,
) -> sp.csc_matrix:
    """Sparse sign sketches S_i (s x L) of every row's observed entries, as one block-diagonal
    sparse matrix (rows s) x (rows L).

    Block construction (OSNAP): each observed entry (i, j) gets one +-1/sqrt(nnz) in each of nnz
    row groups of size s / nnz (at most 2^14), chosen by a hash of (seed, it, i, j); padding
    entries get none. base = entry_keys(grow, pidx) may be passed in (it does not change).
    """
    rows, width = pidx.shape
    g = s // nnz
    if base is None:
        base = entry_keys(grow, pidx)
    idx = np.int32 if rows * max(s, width) * nnz < 2**31 else np.int64
    bucket = np.empty((rows, width, nnz), dtype=idx)
    sign = np.empty((rows, width, nnz))
    scale = (pw / math.sqrt(nnz))[:, :, None]
    for q in range(0, nnz, 4):  # one 64-bit hash gives 4 x (14-bit bucket, sign bit)
        with np.errstate(over="ignore"):
            h = _mix(base ^ hash_keys(seed, _TAG_SKETCH, it, q))
        t = np.arange(q, min(q + 4, nnz))
        h = (h >> np.uint64(1)).astype(np.int64)[:, :, None]
        bucket[:, :, q : q + t.size] = t * g + ((h >> (14 * (t - q))) & 0x3FFF) % g
        sign[:, :, q : q + t.size] = (2.0 * ((h >> (56 + t - q)) & 1) - 1.0) * scale
    indices = (np.arange(rows, dtype=idx)[:, None, None] * s + bucket).ravel()
    indptr = np.arange(0, rows * width * nnz + 1, nnz, dtype=idx)
    return sp.csc_matrix((sign.ravel(), indices, indptr), shape=(rows * s, rows * width))


def entry_keys(grow: np.ndarray, pidx: np.ndarray) -> np.ndarray:
    """hash(global row, column) of every padded entry: the per-entry part of the sketch key."""
    return hash_keys(grow[:, None], pidx)


def sketch_apply(S: sp.csc_matrix, A: np.ndarray) -> np.ndarray:
    """S_i A_i for every row i: (rows, s, k) from the block-diagonal sketch of row_sketch."""
    rows, width, k = A.shape
    return np.asarray(S @ A.reshape(rows * width, k)).reshape(rows, -1, k)


def sketched_rows(
    A: np.ndarray,
    b: np.ndarray,
    SA: np.ndarray,
    x0: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Sketch-preconditioned CGLS for min ||A_i x - b_i|| on every row i at once.

    SA holds the sketches S_i A_i (rows, s, k). R_i from the QR of S_i A_i preconditions A_i R_i^-1 (well conditioned when S_i embeds the
    column space of A_i); CGLS on it from x0 stops per row when the preconditioned normal residual
    ||R_i^-T A_i^T (b_i - A_i x)|| falls below tol times its value at x0 (or to the roundoff
    level 64 eps ||R_i^-T A_i^T b_i||). Returns x and the iterations used per row. (Gu, Song, Yin, Zhang, ICLR 2024, the sketching-based solver.)
    """
    rows, _, k = A.shape
    R = np.linalg.qr(SA, mode="r")
    d = np.abs(np.diagonal(R, axis1=1, axis2=2))
    bad = ~(d.min(axis=1) > 1e-10 * d.max(axis=1))
    if bad.any():  # the sketch lost rank on a few rows: precondition those with QR of A_i itself
        R[bad] = np.linalg.qr(A[bad], mode="r")
        d = np.abs(np.diagonal(R, axis1=1, axis2=2))
        still = ~(d.min(axis=1) > 1e-13 * d.max(axis=1))
        R[still] += 1e-13 * d.max(axis=1)[still, None, None] * np.eye(k)
    Ri = np.linalg.inv(R)
    RiT = np.ascontiguousarray(Ri.transpose(0, 2, 1))
    At = np.ascontiguousarray(A.transpose(0, 2, 1))  # batched BLAS needs contiguous operands
    x = np.zeros((rows, k)) if x0 is None or x0.shape != (rows, k) else x0.copy()
    r = b - (A @ x[:, :, None])[:, :, 0]
    g2 = RiT @ (At @ np.stack([r, b], axis=2))  # one pass over A for R^-T A^T [r b]
    g, gb = g2[:, :, 0], g2[:, :, 1]  # gb = R^-T A^T b: the scale of the roundoff floor
    gamma = np.einsum("ij,ij->i", g, g)
    stop = np.maximum(
        tol * tol * gamma, (64 * np.finfo(float).eps) ** 2 * np.einsum("ij,ij->i", gb, gb)
    )
    active = gamma > stop
    p = g.copy()
    iters = np.zeros(rows, dtype=np.int64)
    for _ in range(max_iter):
        if not active.any():
            break
        w = (Ri @ p[:, :, None])[:, :, 0]
        q = (A @ w[:, :, None])[:, :, 0]
        qq = np.einsum("ij,ij->i", q, q)
        alpha = np.where(active & (qq > 0), gamma / np.where(qq > 0, qq, 1.0), 0.0)
        x += alpha[:, None] * w
        r -= alpha[:, None] * q
        g = (RiT @ (At @ r[:, :, None]))[:, :, 0]
        gnew = np.einsum("ij,ij->i", g, g)
        beta = np.where(active, gnew / np.where(gamma > 0, gamma, 1.0), 0.0)
        p = g + beta[:, None] * p
        iters += active
        gamma = np.where(active, gnew, gamma)
        active &= gnew > stop
    return x, iters


# driver ---------------------------------------------------------------------------------------
@dataclass
class Problem:
    """A prepared completion problem over row blocks and its global facts."""

    mat: RowBlockMatrix
    m: int
    n: int
    k: int
    p: float  # observed fraction used for the (1/p) rescaling (train entries / (m n))
    observed: int
    test_entries: int
    test_set: str
    known: bool
    test_norm: float
    full_norm: float | None


def prepare(
    spec: CompletionSpec,
    n_blocks: int,
    backend: str,
    hosts: int,
    holdout: float = 0.0,
) -> Problem:
    """Build the blocks, choose the test set, check that every row and column is determined."""
    if not 1 <= spec.k < min(spec.m, spec.n):
        raise ValueError(
            f"job.k={spec.k}: the rank must be in [1, min(m, n) - 1] = [1, "
            f"{min(spec.m, spec.n) - 1}] for a {spec.m} x {spec.n} matrix"
        )
    mat = make_blocks(spec, min(n_blocks, spec.m), backend, hosts)
    try:
        info = mat.map(_block_info)
        known = all(f for f, _ in info) and not any(u for _, u in info)
        if holdout == 0 and not known:
            holdout = DEFAULT_HOLDOUT
        mat.map(_prepare, holdout, spec.seed, known)
        per_block = mat.map(_counts, spec.k)
        col = sum(v[0] for v in per_block)
        c = sum(v[1] for v in per_block)
        short = [int(v[1][3]) for v in per_block if v[1][3] >= 0]
        k, m, n = spec.k, spec.m, spec.n
        hint = (
            f"raise job.p (the theory needs p of order k log(n) / n; here "
            f"2 k ln(max(m, n)) / min(m, n) = {min(1.0, 2 * k * math.log(max(m, n)) / min(m, n)):.3g}),"
            f" lower job.k, or drop those rows/columns from the input"
        )
        if c[2] > 0:
            raise ValueError(
                f"{int(c[2])} of {m} rows have fewer than k={k} observed (training) entries "
                f"(e.g. row {short[0]}): each row's least-squares problem needs at least k; {hint}"
            )
        bad_cols = np.flatnonzero(col < k)
        if bad_cols.size:
            raise ValueError(
                f"{bad_cols.size} of {n} columns have fewer than k={k} observed (training) "
                f"entries (e.g. column {int(bad_cols[0])} has {int(col[bad_cols[0]])}): each "
                f"column's least-squares problem needs at least k; {hint}"
            )
        norms = mat.sum(_norms)
    except Exception:
        mat.close()
        raise
    observed = int(c[0])
    test_set = "unobserved entries" if holdout == 0 else f"{holdout:g} of observed entries"
    return Problem(
        mat=mat,
        m=m,
        n=n,
        k=k,
        p=observed / (m * n),
        observed=observed,
        test_entries=int(c[1]),
        test_set=test_set,
        known=known,
        test_norm=math.sqrt(norms[0]),
        full_norm=math.sqrt(norms[1]) if known else None,
    )


def init_factors(
    prob: Problem, seed: int, oversample: int = 10, power_iters: int = 4, clip: float = 0.0
) -> np.ndarray:
    """Top-k right singular vectors V0 of (1/p) P_Omega(M) by a range finder over the blocks.

    Also sets U0 = (1/p) P_Omega(M) V0 on every block (the warm start of the first U-step).
    clip > 0: rows of V0 with norm > clip sqrt(k/n) are zeroed and V0 re-orthonormalized (the
    paper's clipping step that makes the initial factor incoherent).
    """
    mat, k, n, p = prob.mat, prob.k, prob.n, prob.p
    ell = min(n, k + oversample)
    Q = np.random.default_rng([seed, _TAG_INIT]).standard_normal((n, ell))
    for _ in range(power_iters + 1):
        Q = np.linalg.qr(mat.sum(_init_power, Q, p))[0]
    w, W = np.linalg.eigh(mat.sum(_init_gram, Q, p))
    V0 = Q @ W[:, ::-1][:, :k]
    if clip > 0:
        big = np.linalg.norm(V0, axis=1) > clip * math.sqrt(k / n)
        V0[big] = 0.0
        V0 = np.linalg.qr(V0)[0]
    mat.map(_init_u, V0, p)
    return V0


def _rate(err: Sequence[float]) -> float:
    """Median ratio e_t / e_{t-1} over the steps before the error reaches its floor."""
    e = np.asarray(err, dtype=float)
    if e.size < 2:
        return float("nan")
    floor = max(float(e.min()), 1e-300)
    ratios = e[1:] / np.maximum(e[:-1], 1e-300)
    keep = e[:-1] > 100 * floor
    return float(np.median(ratios[keep] if keep.any() else ratios))


def alternate(
    prob: Problem,
    V0: np.ndarray,
    solver: str = "sketched",
    seed: int = 0,
    iters: int = 15,
    tol: float = 0.0,
    sketch_factor: float = 4.0,
    sketch_nnz: int = 4,
    inner_tol: float = 0.1,
    inner_max_iter: int = 30,
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Alternating minimization from (U0, V0): U-step on the blocks, V-step summed + solved here.

    Stops after `iters` iterations or when the held-out error is below `tol`. Times exclude the
    error evaluation.
    """
    mat, k = prob.mat, prob.k
    nnz = max(1, min(sketch_nnz, k))
    s = nnz * max(1, math.ceil(sketch_factor * k / nnz))
    mat.map(_reset_u)
    V = V0

    def errors() -> tuple[float, float | None]:
        e = mat.sum(_err_sq, V)
        full = math.sqrt(e[1]) / prob.full_norm if prob.known and prob.full_norm else None
        return math.sqrt(e[0]) / max(prob.test_norm, 1e-300), full

    e0, f0 = errors()
    err, full, times, u_times, inner, inner_max = [e0], [f0], [], [], [], []
    for it in range(1, iters + 1):
        t0 = time.perf_counter()
        stats = mat.map(_u_step, V, solver, seed, it, s, nnz, inner_tol, inner_max_iter)
        u_times.append(time.perf_counter() - t0)
        Gf, rhs = mat.sum(_v_normal)
        G = Gf.reshape(prob.n, k, k)
        try:
            V = np.linalg.solve(G, rhs[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            V = (np.linalg.pinv(G) @ rhs[:, :, None])[:, :, 0]
        times.append(time.perf_counter() - t0)
        inner.append(sum(x[0] for x in stats) / prob.m)
        inner_max.append(max(x[1] for x in stats))
        e, f = errors()
        err.append(e)
        full.append(f)
        if callback is not None:
            callback(it, e)
        if e < tol:
            break
    return {
        "solver": solver,
        "error_per_iter": err,
        "full_error_per_iter": full if prob.known else None,
        "time_per_iter": times,
        "u_step_time_per_iter": u_times,
        "cumulative_time": list(np.cumsum(times)),
        "total_time_s": float(sum(times)),
        "rate": _rate(err),
        "iterations": len(times),
        "final_error": err[-1],
        "inner_iterations_mean": inner if solver == "sketched" else None,
        "inner_iterations_max": inner_max if solver == "sketched" else None,
        "sketch_rows": s if solver == "sketched" else None,
        "V": V,
    }


def gather_u(prob: Problem) -> np.ndarray:
    """U (m x k) gathered from the blocks (tests and small problems)."""
    return np.vstack(prob.mat.map(_get_u))


# job ------------------------------------------------------------------------------------------
def spec_from_config(job: Any) -> CompletionSpec:
    """CompletionSpec from a CompletionConfig (files are inspected here, on the driver)."""
    source = getattr(job.source, "value", job.source)
    if source == "files":
        kind, m, n = inspect_files(job.path, job.mask_path)
        return CompletionSpec(
            m=m,
            n=n,
            k=job.k,
            seed=job.data_seed,
            source=kind,
            path=job.path,
            mask_path=job.mask_path,
        )
    return CompletionSpec(
        m=job.m, n=job.n, k=job.k, p=job.p, cond=job.cond, noise=job.noise, seed=job.data_seed
    )


def run_completion(job: Any, seed: int, backend: str, hosts: int, bar: Any) -> tuple[dict, Any]:
    """`flagstaff-job job=completion`: robust AM with sketched per-row solves vs exact AM."""
    spec = spec_from_config(job)
    n_blocks = job.blocks or 4 * hosts
    t0 = time.perf_counter()
    prob = prepare(spec, n_blocks, backend, hosts, job.holdout)
    try:
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        V0 = init_factors(prob, seed, job.oversample, job.power_iters, job.init_clip)
        init_s = time.perf_counter() - t0
        main = getattr(job.solver, "value", job.solver)
        other = "exact" if main == "sketched" else "sketched"
        order = [main, other] if job.compare else [main]
        bar.reset(total=job.iters * len(order))

        def cb(it: int, e: float) -> None:
            bar.update(1)
            bar.set_postfix(it=it, err=f"{e:.1e}")

        runs = {}
        for name in order:
            runs[name] = alternate(
                prob,
                V0,
                name,
                seed,
                job.iters,
                job.tol,
                job.sketch_factor,
                job.sketch_nnz,
                job.inner_tol,
                job.inner_max_iter,
                cb,
            )
            runs[name].pop("V")
    finally:
        prob.mat.close()
    res = runs[main]
    out: dict[str, Any] = {
        "m": prob.m,
        "n": prob.n,
        "k": prob.k,
        "p": prob.p,
        "p_nominal": spec.p if spec.source == "generated" else None,
        "observed": prob.observed,
        "test_set": prob.test_set,
        "test_entries": prob.test_entries,
        "source": spec.source,
        "blocks": min(n_blocks, prob.m),
        "solver": main,
        "error_per_iter": res["error_per_iter"],
        "full_error_per_iter": res["full_error_per_iter"],
        "time_per_iter": res["time_per_iter"],
        "rate": res["rate"],
        "final_error": res["final_error"],
        "iterations": res["iterations"],
        "setup_time_s": setup_s,
        "init_time_s": init_s,
        "runs": runs,
    }
    if job.compare:
        sk, ex = runs["sketched"], runs["exact"]
        out["comparison"] = {
            "time_sketched_s": sk["total_time_s"],
            "time_exact_s": ex["total_time_s"],
            "time_ratio_sketched_over_exact": sk["total_time_s"] / max(ex["total_time_s"], 1e-12),
            "final_error_sketched": sk["final_error"],
            "final_error_exact": ex["final_error"],
            "rate_sketched": sk["rate"],
            "rate_exact": ex["rate"],
            "iterations_sketched": sk["iterations"],
            "iterations_exact": ex["iterations"],
        }

    def draw(fig: Any) -> None:
        ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
        for name, r in runs.items():
            e = np.maximum(np.asarray(r["error_per_iter"]), 1e-300)
            ax1.semilogy(np.arange(e.size), e, "o-", ms=3, label=f"{name} solves")
            ax2.semilogy(np.concatenate([[0.0], r["cumulative_time"]]), e, "o-", ms=3, label=name)
        ax1.set_xlabel("iteration")
        ax1.set_ylabel(f"relative error on {prob.test_set}")
        ax1.set_title(f"completion {prob.m} x {prob.n}, k={prob.k}, p={prob.p:.3g}")
        ax1.legend()
        ax2.set_xlabel("time (s, excluding error evaluation)")
        ax2.set_ylabel("relative held-out error")
        ax2.legend()

    return out, draw
