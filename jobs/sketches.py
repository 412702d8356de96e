"""Oblivious sketches S (s x n) applied block-locally and summed: S A = sum_p S_p A_p.

Every sketch's randomness is keyed by (seed, fixed global chunk of `chunk` rows), so a host
regenerates exactly its columns S_p from the global row indices it holds: for a given seed the
sketch does not depend on how many blocks or hosts hold the matrix.

- gaussian: i.i.d. N(0, 1/s) entries (Johnson-Lindenstrauss).
- countsketch: one +-1 per column in a uniform bucket (Clarkson, Woodruff, STOC 2013).
- sparse_sign: `nnz` entries +-1/sqrt(nnz) per column, one per section of s/nnz rows (the block
  OSNAP construction; Nelson, Nguyen, FOCS 2013; Kane, Nelson, JACM 2014).
- srht / srdct: block subsampled randomized Hadamard / DCT transform (Balabanov, Beaupere, Grigori,
  Nataf, SISC 2023): per global chunk c, sqrt(chunk/s) Omega_c R H D_c with a shared uniform row
  sample R, an orthonormal Walsh-Hadamard (srht) or DCT-II (srdct) transform H and independent
  sign diagonals D_c, Omega_c; summed over chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.sparse as sp

from flagstaff.jobs.blocks import Block, RowBlockMatrix

SKETCHES = ("gaussian", "countsketch", "sparse_sign", "srht", "srdct")
_TAG = {"gaussian": 21, "countsketch": 22, "sparse_sign": 23, "srht": 24, "srdct": 24}
_TAG_R, _TAG_OMEGA = 25, 26
PIECE = 1 << 15  # rows processed at a time on a host (bounds temporary memory)


def check_sketch_size(s: int, d: int) -> None:
    """A subspace embedding of a rank-d matrix needs at least d rows."""
    if s < d:
        raise ValueError(
            f"sketch size s={s} is smaller than d={d}: a subspace embedding needs s >= d "
            f"(use s = 4d = {4 * d} or more)"
        )


@dataclass(frozen=True)
class Sketch:
    """Sketch of kind `kind` with s rows, reproducible from (seed, global chunk)."""

    kind: str
    s: int
    seed: int = 0
    nnz: int = 8
    chunk: int = 4096

    def __post_init__(self) -> None:
        if self.kind not in SKETCHES:
            raise ValueError(f"sketch kind {self.kind!r}: valid choices are {', '.join(SKETCHES)}")
        if self.s < 1:
            raise ValueError(f"sketch size must be >= 1 (got {self.s})")
        if self.kind == "sparse_sign" and not 1 <= self.nnz <= self.s:
            raise ValueError(f"sparse_sign nnz must be in [1, s={self.s}] (got {self.nnz})")
        if self.kind in ("srht", "srdct") and self.s > self.chunk:
            raise ValueError(
                f"{self.kind}: s={self.s} exceeds the transform block chunk="
                f"{self.chunk}; raise chunk"
            )
        if self.kind == "srht" and self.chunk & (self.chunk - 1):
            raise ValueError(f"srht needs chunk a power of two (got {self.chunk})")

    @staticmethod
    def sized(kind: str, s: int, seed: int = 0, nnz: int = 8) -> Sketch:
        """A sketch whose transform chunk is large enough for s (power of two >= 4096)."""
        chunk = max(4096, 1 << math.ceil(math.log2(max(s, 1))))
        return Sketch(kind, s, seed, min(nnz, s), chunk)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _TAG[self.kind], *key])

    def apply(self, M: np.ndarray, offset: int) -> np.ndarray:
        """S[:, offset:offset+len(M)] @ M for a row block M of the global matrix."""
        M = np.asarray(M) if not isinstance(M, np.memmap) else M
        out = np.zeros((self.s, M.shape[1]) if M.ndim == 2 else self.s)
        for p0 in range(0, M.shape[0], PIECE):
            p1 = min(M.shape[0], p0 + PIECE)
            out += self._apply_piece(np.asarray(M[p0:p1], dtype=float), offset + p0)
        return out

    def _chunks(self, start: int, stop: int):
        for c in range(start // self.chunk, (stop - 1) // self.chunk + 1):
            c0 = c * self.chunk
            lo, hi = max(start, c0), min(stop, c0 + self.chunk)
            yield c, lo - c0, hi - c0, lo - start, hi - start

    def _apply_piece(self, M: np.ndarray, offset: int) -> np.ndarray:
        stop = offset + M.shape[0]
        if self.kind == "gaussian":
            out = 0.0
            for c, lo, hi, m0, m1 in self._chunks(offset, stop):
                g = self._rng(c).standard_normal((self.s, self.chunk))[:, lo:hi]
                out = out + g @ M[m0:m1]
            return out / math.sqrt(self.s)
        if self.kind in ("countsketch", "sparse_sign"):
            rows, vals = [], []
            for c, lo, hi, _, _ in self._chunks(offset, stop):
                r, v = self._sparse_columns(c)
                rows.append(r[lo:hi])
                vals.append(v[lo:hi])
            r, v = np.concatenate(rows), np.concatenate(vals)
            k = r.shape[1]
            # CSC: column j of S holds row j's k buckets, so S @ M streams M's rows in order
            indptr = np.arange(0, M.shape[0] * k + 1, k)
            S = sp.csc_matrix((v.ravel(), r.ravel(), indptr), shape=(self.s, M.shape[0]))
            return S @ M
        return self._transform_piece(M, offset, stop)

    def _sparse_columns(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Bucket indices (chunk x k) and values of the chunk's columns."""
        rng = self._rng(c)
        if self.kind == "countsketch":
            r = rng.integers(0, self.s, size=(self.chunk, 1))
            v = rng.integers(0, 2, size=(self.chunk, 1)) * 2.0 - 1.0
            return r, v
        edges = np.linspace(0, self.s, self.nnz + 1).astype(int)
        width = np.diff(edges)
        u = rng.random((self.chunk, self.nnz))
        r = edges[:-1] + np.minimum((u * width).astype(int), width - 1)
        v = (rng.integers(0, 2, size=(self.chunk, self.nnz)) * 2.0 - 1.0) / math.sqrt(self.nnz)
        return r, v

    def _transform_piece(self, M: np.ndarray, offset: int, stop: int) -> np.ndarray:
        sel = np.random.default_rng([self.seed, _TAG_R]).choice(self.chunk, self.s, replace=False)
        scale = math.sqrt(self.chunk / self.s)
        out = 0.0
        for c, lo, hi, m0, m1 in self._chunks(offset, stop):
            rng = self._rng(c)
            dsign = rng.integers(0, 2, size=self.chunk) * 2.0 - 1.0
            omega = (
                np.random.default_rng([self.seed, _TAG_OMEGA, c]).integers(0, 2, self.s) * 2.0 - 1
            )
            X = np.zeros((self.chunk,) + M.shape[1:])
            X[lo:hi] = M[m0:m1] * (dsign[lo:hi, None] if M.ndim == 2 else dsign[lo:hi])
            if self.kind == "srdct":
                Y = scipy.fft.dct(X, type=2, norm="ortho", axis=0)
            else:
                Y = fwht(X)
            Ys = Y[sel]
            out = out + scale * (omega[:, None] * Ys if M.ndim == 2 else omega * Ys)
        return out

    def dense(self, n: int) -> np.ndarray:
        """The explicit s x n matrix (small n only: tests)."""
        return self.apply(np.eye(n), 0)


def fwht(X: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform along axis 0 (length a power of two), vectorized."""
    n = X.shape[0]
    Y = X.reshape(n, -1).copy()
    h = 1
    while h < n:
        Y = Y.reshape(-1, 2, h, Y.shape[-1])
        a, b = Y[:, 0], Y[:, 1]
        Y = np.stack([a + b, a - b], axis=1).reshape(n, -1)
        h *= 2
    return (Y / math.sqrt(n)).reshape(X.shape)


def block_sketch(block: Block, sketch: Sketch, with_b: bool) -> np.ndarray:
    """S_p A_p (S_p [A_p b_p] when with_b: b is sketched on its own, never copied beside A_p)."""
    SA = sketch.apply(block.A, block.offset)
    if not with_b:
        return SA
    return np.column_stack([SA, sketch.apply(block.b, block.offset)])


def sketch_matrix(mat: RowBlockMatrix, sketch: Sketch, with_b: bool = False) -> np.ndarray:
    """S A (or S [A b]) as the sum of block-local sketches: only s x d travels per host."""
    return mat.sum(block_sketch, sketch, with_b)
