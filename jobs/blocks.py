"""Row-block matrices: a tall A (and b) held as row blocks by hosts, local or Ray actors.

Blocks are created where they live (from .npy/.npz shards, memory-mapped files or a seeded generator
evaluated per block), so no block passes through the driver. Algorithms are written once against
`RowBlockMatrix.map` / `RowBlockMatrix.sum`, which run a module-level function on every block and
bring back only its (small) result.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GEN_CHUNK = 4096  # rows per generator chunk: the random stream is keyed by (seed, tag, chunk index)
_TAG_ROWS, _TAG_MIX, _TAG_X, _TAG_NOISE, _TAG_BASIS = 11, 12, 13, 14, 15
KINDS = ("gaussian", "coherent", "low_rank", "spiked")


class BlockError(ValueError):
    """Bad input in one block (non-finite entries, mismatched shapes): names the block."""


@dataclass(frozen=True)
class DataSpec:
    """Seeded generator of a tall test problem A (n x d), b = A x_true + noise.

    kind: gaussian (well-spread rows), coherent (heavy-tailed row scales: few rows carry most
    leverage), low_rank (rank `rank` plus dense noise), spiked (d rows w * e_j on top of Gaussian
    rows: the hard case for sparse sketches in l-infinity regression). The singular values of the
    mixing are geometric from 1 to 1/cond; `gap` > 0 sets sigma_1^2 / sigma_2^2 = gap.
    Every row depends only on (seed, global row index), never on how rows are split into blocks.
    """

    n: int
    d: int
    kind: str = "gaussian"
    cond: float = 1e3
    seed: int = 0
    noise: float = 1e-2
    rank: int = 10
    gap: float = 0.0
    spike: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"data.kind={self.kind!r}: valid choices are {', '.join(KINDS)}")
        if self.n < 1 or self.d < 1:
            raise ValueError(f"data.n and data.d must be >= 1 (got n={self.n}, d={self.d})")
        if self.cond < 1:
            raise ValueError(f"data.cond must be >= 1 (got {self.cond})")
        if self.kind == "low_rank" and not 1 <= self.rank <= self.d:
            raise ValueError(f"data.rank must be in [1, d={self.d}] (got {self.rank})")

    def sigma(self) -> np.ndarray:
        """Singular values of the column mixing (length d, or rank for low_rank)."""
        k = self.rank if self.kind == "low_rank" else self.d
        s = np.geomspace(1.0, 1.0 / self.cond, k) if k > 1 else np.ones(1)
        if self.gap > 0 and k > 1:
            s[0] = s[1] * math.sqrt(self.gap)
        return s

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def mixing(self) -> np.ndarray:
        """Right factor (k x d): diag(sigma) times an orthonormal basis (seeded, on every host)."""
        k = self.rank if self.kind == "low_rank" else self.d
        q, r = np.linalg.qr(self._rng(_TAG_BASIS).standard_normal((self.d, k)))
        q = q * np.sign(np.diag(r))
        return self.sigma()[:, None] * q.T

    def x_true(self) -> np.ndarray:
        return self._rng(_TAG_X).standard_normal(self.d)

    def rows(self, start: int, stop: int, mixing: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of A, built chunk by chunk from (seed, chunk index)."""
        if mixing is None:
            mixing = self.mixing()
        parts = []
        for c in range(start // GEN_CHUNK, (stop - 1) // GEN_CHUNK + 1):
            c0, c1 = c * GEN_CHUNK, min((c + 1) * GEN_CHUNK, self.n)
            rng = self._rng(_TAG_ROWS, c)
            g = rng.standard_normal((c1 - c0, mixing.shape[0]))
            if self.kind == "coherent":
                g *= np.abs(rng.standard_t(1.0, size=(c1 - c0, 1))) + 1e-3
            a = g @ mixing
            if self.kind == "low_rank":
                a += self.noise * rng.standard_normal((c1 - c0, self.d)) / math.sqrt(self.n)
            if self.kind == "spiked":
                idx = np.arange(c0, c1)
                hit = idx < self.d
                w = self.spike if self.spike > 0 else float(self.n)
                a[hit] = 0.0
                a[hit, idx[hit]] = w
            lo, hi = max(start, c0), min(stop, c1)
            parts.append(a[lo - c0 : hi - c0])
        return np.concatenate(parts, axis=0)

    def rhs(self, start: int, stop: int, a: np.ndarray) -> np.ndarray:
        """b rows [start, stop) = a x_true + noise * row scale * N(0, 1), keyed per chunk."""
        noise = []
        for c in range(start // GEN_CHUNK, (stop - 1) // GEN_CHUNK + 1):
            c0, c1 = c * GEN_CHUNK, min((c + 1) * GEN_CHUNK, self.n)
            z = self._rng(_TAG_NOISE, c).standard_normal(c1 - c0)
            lo, hi = max(start, c0), min(stop, c1)
            noise.append(z[lo - c0 : hi - c0])
        z = np.concatenate(noise)
        scale = np.linalg.norm(a, axis=1) / math.sqrt(self.d)
        return a @ self.x_true() + self.noise * scale * z


@dataclass
class Block:
    """One row block: A rows [offset, offset + len(A)), its b rows and per-block algorithm state."""

    index: int
    offset: int
    A: np.ndarray
    b: np.ndarray | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class BlockSpec:
    """How a host creates one block: from the generator, or from .npy/.npz shard files."""

    index: int
    offset: int
    rows: int
    data: DataSpec | None = None
    path: str | None = None
    b_path: str | None = None
    mmap: bool = True


def _load_array(path: str, mmap: bool, key: str) -> np.ndarray:
    if path.endswith(".npz"):
        with np.load(path) as z:
            name = key if key in z.files else z.files[0]
            return np.asarray(z[name])
    return np.load(path, mmap_mode="r" if mmap else None)


def check_finite(arr: np.ndarray, what: str, chunk: int = 1 << 16) -> None:
    """Raise BlockError if arr has NaN or inf (chunked so memory-mapped shards stream)."""
    for s in range(0, arr.shape[0], chunk):
        ok = np.isfinite(arr[s : s + chunk])
        if not ok.all():
            rows = ok.reshape(ok.shape[0], -1).all(axis=1)
            bad = s + int(np.argmin(rows))
            raise BlockError(f"{what}: non-finite entry in row {bad} (NaN or inf are not allowed)")


def build_block(spec: BlockSpec, mixing: np.ndarray | None = None) -> Block:
    """Create one block where it will live (generator or shard files); validates it."""
    if spec.data is not None:
        a = spec.data.rows(spec.offset, spec.offset + spec.rows, mixing)
        b = spec.data.rhs(spec.offset, spec.offset + spec.rows, a)
        return Block(spec.index, spec.offset, a, b)
    assert spec.path is not None
    what = f"block {spec.index} ({os.path.basename(spec.path)})"
    a = _load_array(spec.path, spec.mmap, "A")
    if a.ndim != 2:
        raise BlockError(f"{what}: expected a 2-D array, got shape {a.shape}")
    b = None
    if spec.b_path is not None:
        b = np.asarray(_load_array(spec.b_path, spec.mmap, "b")).reshape(-1)
    elif spec.path.endswith(".npz"):
        with np.load(spec.path) as z:
            b = np.asarray(z["b"]).reshape(-1) if "b" in z.files else None
    if b is not None and b.shape[0] != a.shape[0]:
        raise BlockError(f"{what}: b has {b.shape[0]} rows but A has {a.shape[0]}")
    check_finite(a, what)
    if b is not None:
        check_finite(b, what + " b")
    return Block(spec.index, spec.offset, a, b)


class BlockHost:
    """Holds some blocks and runs functions on them; a plain object (local) or a Ray actor."""

    def __init__(self, specs: Sequence[BlockSpec], threads: int | None = None) -> None:
        if threads:
            _set_blas_threads(threads)
        mixing: dict[DataSpec, np.ndarray] = {}
        self.blocks: list[Block] = []
        for spec in specs:
            m = None
            if spec.data is not None:
                m = mixing.setdefault(spec.data, spec.data.mixing())
            self.blocks.append(build_block(spec, m))

    def add_arrays(self, index: int, offset: int, a: np.ndarray, b: np.ndarray | None) -> None:
        self.blocks.append(Block(index, offset, a, b))

    def shapes(self) -> list[tuple[int, int, int, int, bool]]:
        return [
            (k.index, k.offset, k.A.shape[0], k.A.shape[1], k.b is not None) for k in self.blocks
        ]

    def map(self, fn: Callable[..., Any], args: tuple) -> list[tuple[int, Any]]:
        return [(k.index, fn(k, *args)) for k in self.blocks]

    def sum(self, fn: Callable[..., Any], args: tuple) -> Any:
        total = None
        for k in self.blocks:
            v = fn(k, *args)
            total = v if total is None else _add(total, v)
        return total

    def fold(self, fn: Callable[..., Any], acc: Any, args: tuple) -> Any:
        for k in self.blocks:
            acc = fn(k, acc, *args)
        return acc

    def ping(self) -> int:
        return os.getpid()


def _add(x: Any, y: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_add(a, b) for a, b in zip(x, y, strict=True))
    return x + y


def _set_blas_threads(n: int) -> None:
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass


_POOL: Any = None
_BLAS: Any = None


def _local_pool() -> Any:
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
    return _POOL


def _single_blas_threads() -> Any:
    """Context limiting BLAS to one thread while local hosts run in parallel threads."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def _actor_class(hosts: int) -> Any:
    """BlockHost as a Ray actor; one CPU each, or a fair share when hosts exceed the CPUs."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return ray.remote(num_cpus=min(1.0, cpus / hosts))(BlockHost)


def split_rows(n: int, n_blocks: int, align: int = 1) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges for n_blocks blocks (boundaries multiples of align)."""
    if n_blocks < 1 or n_blocks > n:
        raise ValueError(f"number of blocks must be in [1, n={n}] (got {n_blocks})")
    cuts = [min(n, int(round(i * n / n_blocks / align)) * align) for i in range(n_blocks + 1)]
    cuts[-1] = n
    out = [(cuts[i], cuts[i + 1]) for i in range(n_blocks) if cuts[i + 1] > cuts[i]]
    return out


class RowBlockMatrix:
    """A tall matrix A (n x d) and right-hand side b, split by rows across hosts.

    backend "local" keeps the hosts in this process; "ray" makes each host a Ray actor (Ray must be
    initialised). `map(fn, *args)` returns fn(block, *args) for every block in global block order;
    `sum(fn, *args)` adds them up (each host reduces its own blocks first). fn must be a
    module-level function so Ray can ship it by reference.
    """

    def __init__(self, hosts: list[Any], backend: str) -> None:
        self.hosts = hosts
        self.backend = backend
        shapes = sorted(s for h in self._gather("shapes") for s in h)
        self.block_index = [s[0] for s in shapes]
        self.offsets = [s[1] for s in shapes]
        self.block_rows = [s[2] for s in shapes]
        ds = {s[3] for s in shapes}
        if len(ds) != 1:
            detail = ", ".join(f"block {s[0]}: {s[2]} x {s[3]}" for s in shapes)
            raise BlockError(f"shards disagree on the number of columns ({detail})")
        has_b = {s[4] for s in shapes}
        if len(has_b) != 1:
            raise BlockError("either every shard has a right-hand side b or none has")
        expect = 0
        for s in shapes:
            if s[1] != expect:
                raise BlockError(f"block {s[0]} starts at row {s[1]}, expected {expect}")
            expect += s[2]
        self.n = expect
        self.d = ds.pop()
        self.has_b = has_b.pop()

    # construction -------------------------------------------------------------------------
    @classmethod
    def _make(
        cls, specs: list[BlockSpec], backend: str, hosts: int, threads: int | None = None
    ) -> RowBlockMatrix:
        if backend not in ("local", "ray"):
            raise ValueError(f"backend={backend!r}: valid choices are local, ray")
        hosts = max(1, min(hosts, len(specs)))
        groups = [specs[i::hosts] for i in range(hosts)]  # round-robin over hosts
        if backend == "local":
            return cls([BlockHost(g) for g in groups], "local")
        actor = _actor_class(hosts)
        handles = [actor.remote(g, threads) for g in groups]
        return cls(handles, "ray")

    @classmethod
    def generate(
        cls,
        data: DataSpec,
        n_blocks: int,
        backend: str = "local",
        hosts: int = 1,
        threads: int | None = None,
    ) -> RowBlockMatrix:
        """Blocks generated on their hosts from (data.seed, global row): no data via the driver."""
        ranges = split_rows(data.n, n_blocks)
        specs = [BlockSpec(i, r0, r1 - r0, data=data) for i, (r0, r1) in enumerate(ranges)]
        return cls._make(specs, backend, hosts, threads)

    @classmethod
    def from_files(
        cls,
        paths: Sequence[str],
        b_paths: Sequence[str] | None = None,
        backend: str = "local",
        hosts: int = 1,
        mmap: bool = True,
        threads: int | None = None,
    ) -> RowBlockMatrix:
        """One block per .npy/.npz shard (npz: arrays A and optional b); .npy shards are mmapped."""
        if not paths:
            raise ValueError("data.paths is empty: give at least one .npy/.npz shard")
        if b_paths and len(b_paths) != len(paths):
            raise BlockError(f"{len(paths)} A shards but {len(b_paths)} b shards")
        offsets, off = [], 0
        for p in paths:
            if not os.path.exists(p):
                raise FileNotFoundError(f"shard {p} does not exist")
            offsets.append(off)
            off += _shard_rows(p)
        specs = [
            BlockSpec(
                i,
                offsets[i],
                0,
                path=str(p),
                mmap=mmap,
                b_path=str(b_paths[i]) if b_paths else None,
            )
            for i, p in enumerate(paths)
        ]
        return cls._make(specs, backend, hosts, threads)

    @classmethod
    def from_arrays(
        cls,
        A: np.ndarray,
        b: np.ndarray | None = None,
        n_blocks: int = 1,
        backend: str = "local",
        hosts: int = 1,
    ) -> RowBlockMatrix:
        """Split in-memory arrays (tests and small problems; the arrays pass through the driver)."""
        A = np.asarray(A, dtype=float)
        if A.ndim != 2:
            raise ValueError(f"A must be 2-D, got shape {A.shape}")
        check_finite(A, "A")
        if b is not None:
            b = np.asarray(b, dtype=float).reshape(-1)
            if b.shape[0] != A.shape[0]:
                raise BlockError(f"b has {b.shape[0]} rows but A has {A.shape[0]}")
            check_finite(b, "b")
        ranges = split_rows(A.shape[0], n_blocks)
        hosts = max(1, min(hosts, len(ranges)))
        if backend == "local":
            hs = [BlockHost([]) for _ in range(hosts)]
            for i, (r0, r1) in enumerate(ranges):
                hs[i % hosts].add_arrays(i, r0, A[r0:r1], None if b is None else b[r0:r1])
            return cls(hs, "local")
        import ray

        actor = _actor_class(hosts)
        hs = [actor.remote([]) for _ in range(hosts)]
        ray.get(
            [
                hs[i % hosts].add_arrays.remote(i, r0, A[r0:r1], None if b is None else b[r0:r1])
                for i, (r0, r1) in enumerate(ranges)
            ]
        )
        return cls(hs, "ray")

    # execution ----------------------------------------------------------------------------
    def _gather(self, method: str, *args: Any) -> list[Any]:
        if self.backend == "local":
            if len(self.hosts) == 1 or method in ("shapes", "fold"):
                return [getattr(h, method)(*args) for h in self.hosts]
            # like actors, local hosts run concurrently: one thread each, one BLAS thread per call
            with _single_blas_threads():
                futures = [_local_pool().submit(getattr(h, method), *args) for h in self.hosts]
                return [f.result() for f in futures]
        import ray

        refs = [getattr(h, method).remote(*args) for h in self.hosts]
        return ray.get(refs)

    def map(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """fn(block, *args) for every block, in global block order."""
        out = self._gather("map", fn, self._ship_args(args))
        pairs = sorted((p for h in out for p in h), key=lambda p: p[0])
        return [v for _, v in pairs]

    def sum(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Sum over blocks of fn(block, *args) (arrays or tuples of arrays/scalars)."""
        parts = self._gather("sum", fn, self._ship_args(args))
        total = None
        for p in parts:
            if p is not None:
                total = p if total is None else _add(total, p)
        return total

    def fold(self, fn: Callable[..., Any], acc: Any, *args: Any) -> Any:
        """acc = fn(block, acc, *args) over all blocks in host order (a sequential stream)."""
        for h in self.hosts:
            if self.backend == "local":
                acc = h.fold(fn, acc, args)
            else:
                import ray

                acc = ray.get(h.fold.remote(fn, acc, args))
        return acc

    def _ship_args(self, args: tuple) -> tuple:
        if self.backend == "ray" and any(
            isinstance(a, np.ndarray) and a.nbytes > 1 << 16 for a in args
        ):
            import ray

            return ray.put(args)  # one object-store put shared by all hosts
        return args

    def close(self) -> None:
        if self.backend == "ray":
            import ray

            for h in self.hosts:
                ray.kill(h)
        self.hosts = []

    def __enter__(self) -> RowBlockMatrix:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shard_rows(path: str) -> int:
    if path.endswith(".npz"):
        with np.load(path) as z:
            name = "A" if "A" in z.files else z.files[0]
            return int(z[name].shape[0])
    return int(np.load(path, mmap_mode="r").shape[0])


# generic block functions -------------------------------------------------------------------
def block_matvec_sq(block: Block, x: np.ndarray) -> float:
    """||A_p x - b_p||^2 (the residual never leaves the host)."""
    r = block.A @ x - block.b
    return float(r @ r)


def block_frob_sq(block: Block) -> float:
    return float(np.einsum("ij,ij->", block.A, block.A))


def block_gram(block: Block) -> np.ndarray:
    return block.A.T @ block.A


def block_make_low(block: Block) -> None:
    """Keep a float32 copy of A_p on its host (mixed-precision passes read half the bytes)."""
    block.state["A_low"] = np.asarray(block.A, dtype=np.float32)


def block_drop_low(block: Block) -> None:
    block.state.pop("A_low", None)


def block_qr_r(block: Block, with_b: bool = False) -> np.ndarray:
    """R factor of the block ([A_p b_p] when with_b): the leaf step of TSQR."""
    m = np.column_stack([block.A, block.b]) if with_b else np.asarray(block.A)
    return np.linalg.qr(m, mode="r")


def tsqr_r(mat: RowBlockMatrix, with_b: bool = False) -> np.ndarray:
    """R of the tall-skinny QR of A (or [A b]): local QRs, then QR of the stacked R factors."""
    rs = mat.map(block_qr_r, with_b)
    r = np.linalg.qr(np.vstack(rs), mode="r")
    return r * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))[:, None]


def exact_lstsq(mat: RowBlockMatrix) -> tuple[np.ndarray, float, int]:
    """Minimum-norm least-squares solution, optimal residual norm and rank, via TSQR of [A b].

    The residual of min ||Ax - b|| is |R[d, d]| of the R factor of [A b]; only (d+1)^2 numbers
    travel per block.
    """
    r = tsqr_r(mat, with_b=True)
    d = mat.d
    r11, r12 = r[:d, :d], r[:d, d]
    res_extra = abs(r[d, d]) if r.shape[0] > d else 0.0
    x, _, rank, sv = np.linalg.lstsq(r11, r12, rcond=None)
    tol = sv.max() * max(r11.shape) * np.finfo(float).eps if sv.size else 0.0
    rank = int((sv > tol).sum())
    resid = math.hypot(res_extra, np.linalg.norm(r12 - r11 @ x))
    return x, resid, rank


def residual_norm(mat: RowBlockMatrix, x: np.ndarray) -> float:
    """||Ax - b|| with one distributed pass."""
    return math.sqrt(mat.sum(block_matvec_sq, x))


def row_uniforms(seed: int, tag: int, offset: int, rows: int) -> np.ndarray:
    """Uniform(0, 1) per global row [offset, offset + rows), keyed by (seed, tag, chunk)."""
    parts = []
    for c in range(offset // GEN_CHUNK, (offset + rows - 1) // GEN_CHUNK + 1):
        c0 = c * GEN_CHUNK
        u = np.random.default_rng([seed, tag, c]).random(GEN_CHUNK)
        lo, hi = max(offset, c0), min(offset + rows, c0 + GEN_CHUNK)
        parts.append(u[lo - c0 : hi - c0])
    return np.concatenate(parts) if parts else np.zeros(0)
