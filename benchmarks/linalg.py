"""Benchmark of the linear-algebra jobs: one markdown table per job, measured side by side.

    .venv/bin/python benchmarks/linalg.py            # full run (about 10 minutes on 2 quiet cores)
    .venv/bin/python benchmarks/linalg.py --quick    # small sizes, a smoke test of the script
    .venv/bin/python benchmarks/linalg.py --only stream,lstsq   # some tables only

If OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE are set in your shell (some images pin them), run this
script with them unset so OpenBLAS picks its own kernels, in this command only:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/linalg.py

Tables (each timed row is the best of 2 runs, baselines included; the load average before and after
each table is printed under it, the provenance above the first):
1. stream: memory bandwidth of numpy STREAM-like kernels (copy, add, triad, read) on 1 and 2
   threads, against the bandwidth the least-squares passes achieve (bytes of A read per second).
2. lstsq on coherent, ill-conditioned 200000 x 200 and 100000 x 1000 matrices: numpy.linalg.lstsq
   (LAPACK gelsd), unpreconditioned LSQR, sketch-and-solve, the previous sketch-and-precondition
   (LSQR on A R^-1, sparse sign with 8 nonzeros, s = 4d, tolerance 1e-10, one restart) and the
   refinement solver (warm start, CG, float64 residual passes; sparse sign with 4 or 8 nonzeros,
   s = 4d or 6d, float64 or float32 products), locally with 2 hosts and on 2 Ray actors: the
   solver's own time to solution split into sketch / factorization / iterations, passes over A,
   residual excess over numpy's optimum and the solver's bound on it.
3. Out-of-core lstsq: memory-mapped .npy shards larger than the driver's memory budget, held by
   Ray actors; driver peak RSS growth, time, residual against the TSQR optimum.
4. rsvd on 20000 x 2000 (rank 50 + noise): numpy full SVD, scikit-learn randomized_svd,
   torch.svd_lowrank and the row-block rsvd (float32 power iterations with a d-side QR, the
   default; float64; the previous TSQR-per-step scheme), same k, oversampling and power iterations:
   time, Frobenius error ratio, singular-value error, speed-up against scikit-learn.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flagstaff.jobs import rsvd as rs  # noqa: E402
from flagstaff.jobs.blocks import DataSpec, RowBlockMatrix, exact_lstsq, residual_norm  # noqa: E402
from flagstaff.jobs.lstsq import (  # noqa: E402
    block_normal_matvec,
    lsqr,
    sketch_and_precondition,
    sketch_and_solve,
    sketch_precondition_refine,
)
from flagstaff.jobs.sketches import Sketch  # noqa: E402


def table(title: str, header: list[str], rows: list[list[str]], note: str = "") -> str:
    out = [
        f"### {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


REPEAT = 2  # timed rows report the best of REPEAT runs (timeit convention), baselines included
LOCAL_HOSTS = 2  # local hosts (threads, one BLAS thread each); --single-core sets 1


def timed(fn, repeat: int | None = None):
    """(best wall time over `repeat` runs, result of that run)."""
    best, out = math.inf, None
    for _ in range(repeat or REPEAT):
        t0 = time.perf_counter()
        res = fn()
        el = time.perf_counter() - t0
        if el < best:
            best, out = el, res
    return best, out


def race(cases: list[tuple[str, object]], repeat: int | None = None) -> dict[str, tuple]:
    """Best wall time and its result per case, the cases run round-robin (case 1, 2, ..., 1, 2,
    ...), so that each sees the same share of whatever else the machine is doing."""
    best: dict[str, tuple] = {key: (math.inf, None) for key, _ in cases}
    for _ in range(repeat or REPEAT):
        for key, fn in cases:
            t0 = time.perf_counter()
            res = fn()
            el = time.perf_counter() - t0
            if el < best[key][0]:
                best[key] = (el, res)
    return best


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _where() -> str:
    return f"local, {LOCAL_HOSTS} host" + ("s" if LOCAL_HOSTS > 1 else "")


def _excess(r: float, opt: float) -> str:
    return f"{r / opt - 1:.1e}"


def _dense_rows(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    mix = spec.mixing()
    A = np.empty((spec.n, spec.d))
    b = np.empty(spec.n)
    step = 1 << 15
    for s in range(0, spec.n, step):
        e = min(spec.n, s + step)
        A[s:e] = spec.rows(s, e, mix)
        b[s:e] = spec.rhs(s, e, A[s:e])
    return A, b


# ---------------------------------------------------------------------------------------------
# memory bandwidth
def _stream_kernel(name: str, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    if name == "copy":  # c = a
        np.copyto(c, a)
    elif name == "add":  # c = a + b
        np.add(a, b, out=c)
    elif name == "triad":  # a = b + s c, as two numpy passes (STREAM counts 24 bytes)
        np.multiply(c, 3.0, out=a)
        a += b
    else:  # read: a . a (BLAS dot, one array read)
        float(a @ a)


STREAM_BYTES = {"copy": 16, "add": 24, "triad": 24, "read": 8}  # per element, STREAM's counting


def stream(n: int, threads: int, name: str, repeat: int = 5) -> float:
    """GB/s of a STREAM-like kernel on arrays of n doubles, split over `threads` threads (numpy
    releases the GIL in these loops, so the threads run on separate cores)."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.random(n) for _ in range(3))
    cuts = np.linspace(0, n, threads + 1).astype(int)
    parts = [(a[i:j], b[i:j], c[i:j]) for i, j in zip(cuts[:-1], cuts[1:], strict=True)]
    best = math.inf
    for _ in range(repeat):
        ts = [threading.Thread(target=_stream_kernel, args=(name, *p)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return STREAM_BYTES[name] * n / best / 1e9


def bench_stream(n_elem: int, n: int, d: int) -> str:
    """STREAM-like kernels against the fused A^T (A y) pass of the solvers on an n x d matrix."""
    from threadpoolctl import threadpool_limits

    t_load = load()
    rows = []
    for threads in (1, 2):
        for name in ("copy", "add", "triad", "read"):
            with threadpool_limits(1):  # one core per thread (the dot is a BLAS call)
                gbs = stream(n_elem, threads, name)
            rows.append([f"numpy STREAM {name}", str(threads), f"{gbs:.1f}", "STREAM bytes"])
    spec = DataSpec(n=n, d=d, kind="coherent", cond=1e6, seed=0, noise=1e-2)
    A, b = _dense_rows(spec)
    y = np.random.default_rng(1).standard_normal(d)
    for hosts in (1, 2):
        mat = RowBlockMatrix.from_arrays(A, b, n_blocks=8, hosts=hosts)
        for low in (False, True):
            if low:
                from flagstaff.jobs.blocks import block_make_low

                mat.map(block_make_low)
            t, _ = timed(lambda mat=mat, low=low: mat.sum(block_normal_matvec, y, low), 5)
            nbytes = A.size * (4 if low else 8)
            what = "float32 copy" if low else "float64"
            rows.append(
                [
                    f"fused pass A^T (A y), {what} ({n} x {d})",
                    f"{hosts} host{'s' if hosts > 1 else ''}",
                    f"{nbytes / t / 1e9:.1f}",
                    f"bytes of A read ({t * 1e3:.0f} ms per pass)",
                ]
            )
        mat.close()
    note = f"Load average (1/5/15 min) before: {t_load}; after: {load()}."
    return table(
        f"memory bandwidth: STREAM-like kernels ({n_elem * 8 / 2**20:.0f} MB arrays) and the "
        "solver's passes",
        ["kernel", "threads", "GB/s", "counted"],
        rows,
        note,
    )


# ---------------------------------------------------------------------------------------------
# least squares
def bench_lstsq(n: int, d: int, plain_cap: int, ray_hosts: int) -> str:
    t_load = load()
    spec = DataSpec(n=n, d=d, kind="coherent", cond=1e6, seed=0, noise=1e-2)
    A, b = _dense_rows(spec)
    rows = []
    mat = RowBlockMatrix.from_arrays(A, b, n_blocks=8, hosts=LOCAL_HOSTS)  # views of A, here
    rmat = None
    if ray_hosts:
        rmat = RowBlockMatrix.generate(spec, 2 * ray_hosts, backend="ray", hosts=ray_hosts)

    def refine(nnz: int, gamma: int, precision: str, m: RowBlockMatrix = mat):
        sk = Sketch.sized("sparse_sign", gamma * d, 1, nnz)
        return sketch_precondition_refine(m, sk, 1e-10, precision)

    variants = [(4, 4, "double"), (8, 4, "double"), (4, 6, "double"), (4, 4, "mixed")]
    cases = [
        ("numpy", lambda: np.linalg.lstsq(A, b, rcond=None)[0]),
        ("ss", lambda: sketch_and_solve(mat, Sketch.sized("countsketch", 4 * d, 1))),
        ("lsqr", lambda: sketch_and_precondition(mat, Sketch.sized("sparse_sign", 4 * d, 1, 8))),
    ]
    cases += [(v, lambda v=v: refine(*v)) for v in variants]
    if rmat is not None:
        cases.append(("ray", lambda: refine(4, 4, "double", rmat)))
    try:
        res = race(cases)
        t_np, x_np = res["numpy"]
        opt = float(np.linalg.norm(A @ x_np - b))
        rows.append(
            ["numpy.linalg.lstsq (gelsd)", f"{t_np:.2f}", "-", "-", "0 (reference)", "-", "1.00x"]
        )

        def add(name: str, t: float, sol, passes: str, m: RowBlockMatrix = mat) -> None:
            r = residual_norm(m, sol.x)
            split = "-"
            if hasattr(sol, "iterate_time_s"):
                split = f"{sol.sketch_time_s:.2f} / {sol.factor_time_s:.2f} / "
                split += f"{sol.iterate_time_s + getattr(sol, 'cast_time_s', 0.0):.2f}"
            bound = getattr(sol, "excess_bound", None)
            rows.append(
                [
                    name,
                    f"{t:.2f}",
                    split,
                    passes,
                    _excess(r, opt),
                    "-" if bound is None else f"{bound:.1e}",
                    f"{t_np / t:.2f}x",
                ]
            )

        t0 = time.perf_counter()  # one run: it only stops at the iteration cap
        pl = lsqr(mat, None, atol=1e-10, btol=1e-10, max_iter=plain_cap)
        its = f"{pl.iterations}" + ("" if pl.converged else " (cap, not converged)")
        add("LSQR, no preconditioner (one run)", time.perf_counter() - t0, pl, its)
        add(f"sketch-and-solve, CountSketch s={4 * d}", *res["ss"], "1")
        t, sp = res["lsqr"]
        name = (
            "previous: sketch-and-precondition + LSQR (tol 1e-10, restart), sparse sign nnz 8, "
            f"s={4 * d}"
        )
        add(name, t, sp, f"{sp.iterations + 4}")  # sketch, start, its, restart (A x0, A^T w)
        for v in variants + (["ray"] if rmat is not None else []):
            t, sp = res[v]
            nnz, gamma, prec = (4, 4, "double") if v == "ray" else v
            default = " (default)" if v == (4, 4, "double") else ""
            where = f"Ray, {ray_hosts} actors" if v == "ray" else _where()
            name = f"refine{default}: sparse sign nnz {nnz}, s={gamma * d}, {prec} ({where})"
            passes = f"{sp.passes_double + 1}"
            if sp.passes_low:
                passes = f"{sp.passes_double + 1} + {sp.passes_low} float32"
            add(name, t, sp, passes, rmat if v == "ray" else mat)
    finally:
        if rmat is not None:
            rmat.close()
    title = f"lstsq: {n} x {d}, coherent, cond 1e6 (residual excess = ||Ax-b|| / optimum - 1)"
    note = (
        "Time: the solver's own time to solution (for numpy the lstsq call), best of "
        f"{REPEAT} runs taken round-robin; "
        "split = sketch / QR of the sketch (+ warm start) / iterations; passes = passes over A "
        "(the sketch pass included; LSQR: one per iteration, one to start, two to restart; "
        "refine: one per float64 residual check and per CG step); bound = the refinement "
        "solver's bound on the residual excess "
        f"at its stop. Load average (1/5/15 min) before: {t_load}; after: {load()}."
    )
    return table(
        title,
        [
            "method",
            "time (s)",
            "split (s)",
            "passes over A",
            "residual excess",
            "bound",
            "speed-up vs numpy",
        ],
        rows,
        note,
    )


def bench_mixed(n: int, d: int, cond: float) -> str:
    """Float32 CG products against float64 on a better-conditioned matrix (u32 cond(A) small)."""
    t_load = load()
    spec = DataSpec(n=n, d=d, kind="coherent", cond=cond, seed=0, noise=1e-2)
    A, b = _dense_rows(spec)
    mat = RowBlockMatrix.from_arrays(A, b, n_blocks=8, hosts=LOCAL_HOSTS)
    sk = Sketch.sized("sparse_sign", 4 * d, 1, 4)
    cases = [
        (p, lambda p=p: sketch_precondition_refine(mat, sk, 1e-10, p)) for p in ("double", "mixed")
    ]
    res = race(cases)
    x_np = np.linalg.lstsq(A, b, rcond=None)[0]
    opt = float(np.linalg.norm(A @ x_np - b))
    rows = []
    for p in ("double", "mixed"):
        t, sp = res[p]
        passes = f"{sp.passes_double + 1}"
        if sp.passes_low:
            passes += f" + {sp.passes_low} float32"
        split = f"{sp.sketch_time_s:.2f} / {sp.factor_time_s:.2f} / {sp.cast_time_s:.2f} / "
        split += f"{sp.iterate_time_s:.2f}"
        excess = _excess(residual_norm(mat, sp.x), opt)
        rows.append([p, f"{t:.2f}", split, passes, excess, f"{sp.excess_bound:.1e}"])
    header = [
        "precision",
        "time (s)",
        "sketch / QR / float32 copy / iterations (s)",
        "passes over A",
        "residual excess vs numpy",
        "bound",
    ]
    note = (
        f"Best of {REPEAT} runs taken round-robin ({_where()}; sparse sign nnz 4, s = 4d). "
        f"Load average (1/5/15 min) before: {t_load}; after: {load()}."
    )
    title = f"lstsq refine, float64 or float32 CG products: {n} x {d}, coherent, cond {cond:.0e}"
    return table(title, header, rows, note)


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def bench_out_of_core(n: int, d: int, shards: int, budget_mb: int, hosts: int) -> str:
    t_load = load()
    spec = DataSpec(n=n, d=d, kind="coherent", cond=1e4, seed=1, noise=1e-2)
    tmp = tempfile.mkdtemp(prefix="flagstaff_ooc_")
    try:
        paths, bpaths = [], []
        mix = spec.mixing()
        edges = [int(e) for e in np.linspace(0, n, shards + 1)]
        for i in range(shards):
            pa, pb = os.path.join(tmp, f"A{i:03d}.npy"), os.path.join(tmp, f"b{i:03d}.npy")
            Am = np.lib.format.open_memmap(pa, mode="w+", shape=(edges[i + 1] - edges[i], d))
            bm = np.lib.format.open_memmap(pb, mode="w+", shape=(edges[i + 1] - edges[i],))
            for s in range(edges[i], edges[i + 1], 8192):
                e = min(edges[i + 1], s + 8192)
                Am[s - edges[i] : e - edges[i]] = spec.rows(s, e, mix)
                bm[s - edges[i] : e - edges[i]] = spec.rhs(s, e, Am[s - edges[i] : e - edges[i]])
            Am.flush(), bm.flush()
            del Am, bm
            paths.append(pa), bpaths.append(pb)
        total_mb = sum(os.path.getsize(p) for p in paths + bpaths) / 2**20
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            mat = RowBlockMatrix.from_files(paths, bpaths, backend="ray", hosts=hosts, mmap=True)
            t_open = time.perf_counter() - t0
            t0 = time.perf_counter()
            sk = Sketch.sized("sparse_sign", 4 * d, 1, 4)
            sp = sketch_precondition_refine(mat, sk, 1e-10)
            t_solve = time.perf_counter() - t0
        r = residual_norm(mat, sp.x)
        t0 = time.perf_counter()
        _, opt, _ = exact_lstsq(mat)
        t_tsqr = time.perf_counter() - t0
        mat.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = "yes" if mem.growth_mb < budget_mb else "NO"
    rows = [
        [
            f"{n} x {d}",
            f"{shards} x .npy (mmap)",
            f"{total_mb:.0f}",
            str(budget_mb),
            f"{mem.growth_mb:.0f} ({ok})",
            f"{t_open:.2f}",
            f"{t_solve:.2f}",
            str(sp.passes_double + 1),
            _excess(r, opt),
            f"{t_tsqr:.2f}",
        ]
    ]
    return table(
        f"lstsq out of core: memory-mapped shards on {hosts} Ray actors, driver budget {budget_mb} MB",
        [
            "matrix",
            "shards",
            "shards on disk (MB)",
            "driver budget (MB)",
            "driver peak RSS growth (MB, within budget)",
            "open + check (s)",
            "refine, nnz 4, s = 4d, double (s)",
            "passes over A",
            "residual excess vs TSQR optimum",
            "TSQR optimum (s)",
        ],
        rows,
        f"One run. Load average (1/5/15 min) before: {t_load}; after: {load()}.",
    )


# ---------------------------------------------------------------------------------------------
# randomized SVD
def bench_rsvd(n: int, d: int, k: int, ray_hosts: int, power_iters: int = 7) -> str:
    import torch
    from sklearn.utils.extmath import randomized_svd

    t_load = load()
    spec = DataSpec(n=n, d=d, kind="low_rank", rank=k, cond=10.0, noise=5.0, seed=2)
    A, _ = _dense_rows(spec)
    t0 = time.perf_counter()
    U, s_all, Vt = np.linalg.svd(A, full_matrices=False)
    t_full = time.perf_counter() - t0
    opt = math.sqrt(float((s_all[k:] ** 2).sum()))
    rows = []
    t_sk = None

    def add(name: str, t: float, s: np.ndarray, err: float) -> None:
        sig = float(np.max(np.abs(s - s_all[:k]) / s_all[:k]))
        vs = "-" if t_sk is None else f"{t_sk / t:.2f}x"
        rows.append([name, f"{t:.2f}", f"{err / opt:.5f}", f"{sig:.1e}", vs])

    def dense_err(U: np.ndarray, s: np.ndarray, Vt: np.ndarray) -> float:
        return float(np.linalg.norm(A - (U * s) @ Vt))

    add(
        "numpy.linalg.svd (full, one run)",
        t_full,
        s_all[:k],
        dense_err(U[:, :k], s_all[:k], Vt[:k]),
    )
    del U, Vt
    q = power_iters
    At = torch.from_numpy(A)
    mat = RowBlockMatrix.from_arrays(A, None, n_blocks=4, hosts=LOCAL_HOSTS)
    rmat = None
    if ray_hosts:
        rmat = RowBlockMatrix.generate(spec, 2 * ray_hosts, backend="ray", hosts=ray_hosts)

    def svd_lowrank(niter: int):
        torch.manual_seed(0)
        return torch.svd_lowrank(At, q=k + 10, niter=niter)

    variants = [
        ("mixed", "gram", q, " (default)"),
        ("double", "gram", q, ""),
        ("double", "tsqr", q, ", previous scheme"),
        ("mixed", "gram", q - 2, ""),
    ]
    cases = [
        ("sklearn", lambda: randomized_svd(A, k, n_oversamples=10, n_iter=q, random_state=0)),
        ("torch2", lambda: svd_lowrank(2)),
        ("torch", lambda: svd_lowrank(q)),
    ]
    cases += [(v, lambda v=v: rs.rsvd(mat, k, 10, v[2], 0, None, v[0], v[1])) for v in variants]
    ray_variants = [("mixed", "gram"), ("double", "tsqr")] if rmat is not None else []
    cases += [
        (("ray", *v), lambda v=v: rs.rsvd(rmat, k, 10, q, 0, None, v[0], v[1]))
        for v in ray_variants
    ]
    try:
        res = race(cases)
        t_sk, (U, s, Vt) = res["sklearn"]
        name = f"scikit-learn randomized_svd (p=10, n_iter={q}, LU normalizer)"
        add(name, t_sk, s, dense_err(U, s, Vt))
        for key, niter in (("torch2", 2), ("torch", q)):
            t, (U, s, V) = res[key]
            err = dense_err(U[:, :k].numpy(), s[:k].numpy(), V[:, :k].numpy().T)
            add(f"torch.svd_lowrank (q={k + 10}, niter={niter})", t, s[:k].numpy(), err)
        # U stays on the hosts and is overwritten by the next run: rerun (same seed, same
        # result), untimed, before each error pass
        for v in variants:
            prec, norm, it, tag = v
            t, r = res[v]
            r = rs.rsvd(mat, k, 10, it, 0, None, prec, norm)
            name = f"row-block rsvd{tag}, {_where()} (p=10, q={it}, {prec}, {norm})"
            add(name, t, r.s, rs.lowrank_error(mat, r))
        for v in ray_variants:
            t, r = res[("ray", *v)]
            r = rs.rsvd(rmat, k, 10, q, 0, None, v[0], v[1])
            name = f"row-block rsvd, Ray {ray_hosts} actors (p=10, q={q}, {v[0]}, {v[1]})"
            add(name, t, r.s, rs.lowrank_error(rmat, r))
    finally:
        if rmat is not None:
            rmat.close()
    title = (
        f"rsvd: {n} x {d}, rank {k} + noise, k = {k} (Frobenius ratio = error / optimal "
        f"rank-{k} error; sigma error = max_i |s_i - s_i*| / s_i*)"
    )
    note = (
        f"Best of {REPEAT} runs taken round-robin (numpy's full SVD: one run). Same k, "
        "oversampling p and power iterations q for "
        "every randomized method. Load average (1/5/15 min) before: "
        f"{t_load}; after: {load()}."
    )
    return table(
        title,
        ["method", "time (s)", "Frobenius ratio", "sigma error", "speed-up vs scikit-learn"],
        rows,
        note,
    )


def _blas_threads() -> str:
    from threadpoolctl import threadpool_info

    return ", ".join(
        f"{i['internal_api']} {i.get('version') or ''} ({i['prefix']}): {i['num_threads']} threads"
        for i in threadpool_info()
    )


TABLES = ("stream", "lstsq", "ooc", "rsvd")


def main() -> None:
    global LOCAL_HOSTS, REPEAT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    ap.add_argument("--only", default=",".join(TABLES), help=f"tables to run, of {TABLES}")
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    ap.add_argument("--repeat", type=int, default=REPEAT, help="runs per timed row (best)")
    ap.add_argument(
        "--single-core",
        action="store_true",
        help="every BLAS call on one thread and one local host, no Ray: ratios that a loaded "
        "machine does not bias (multithreaded LAPACK/BLAS baselines thrash under load)",
    )
    args = ap.parse_args()
    REPEAT = max(1, args.repeat)
    if args.single_core:
        import torch
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        torch.set_num_threads(1)  # torch.svd_lowrank's baseline rows
        LOCAL_HOSTS = 1
        args.no_ray = True
    only = set(args.only.split(","))
    bad = only - set(TABLES)
    if bad:
        ap.error(f"--only {sorted(bad)}: valid tables are {', '.join(TABLES)}")
    from _provenance import markdown, provenance  # benchmarks/ is sys.path[0]

    prov = provenance(load_average=load(), blas=_blas_threads())
    head = [
        markdown(prov),
        f"<!-- load average (1/5/15 min) at start: {load()}; BLAS: {prov['blas']}; "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} -->",
        "",
    ]
    out = ["\n".join(head)]
    print(out[0], flush=True)
    hosts = 0 if args.no_ray else 2
    if hosts and only & {"lstsq", "ooc", "rsvd"}:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    def emit(text: str) -> None:
        print(text, flush=True)
        out.append(text)

    if args.quick:
        parts = {
            "stream": lambda: bench_stream(1 << 22, 20000, 100),
            "lstsq": lambda: (
                bench_lstsq(20000, 50, 100, hosts) + "\n" + bench_mixed(20000, 50, 1e3)
            ),
            "ooc": lambda: bench_out_of_core(40000, 50, 4, 8, hosts) if hosts else "",
            "rsvd": lambda: bench_rsvd(4000, 400, 10, hosts),
        }
    else:
        parts = {
            "stream": lambda: bench_stream(1 << 26, 100000, 1000),
            "lstsq": lambda: (
                bench_lstsq(200000, 200, 400, hosts)
                + "\n"
                + bench_lstsq(100000, 1000, 150, hosts)
                + "\n"
                + bench_mixed(100000, 1000, 1e3)
            ),
            "ooc": lambda: bench_out_of_core(400000, 500, 16, 256, hosts) if hosts else "",
            "rsvd": lambda: bench_rsvd(20000, 2000, 50, hosts),
        }
    for name in TABLES:
        if name in only:
            emit(parts[name]())
    if hosts and only & {"lstsq", "ooc", "rsvd"}:
        import ray

        ray.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out))


if __name__ == "__main__":
    main()
