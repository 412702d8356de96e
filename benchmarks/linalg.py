"""Benchmark of the linear-algebra jobs: one markdown table per job, measured side by side.

    .venv/bin/python benchmarks/linalg.py            # full run (about 5-10 minutes on 2 cores)
    .venv/bin/python benchmarks/linalg.py --quick    # small sizes, a smoke test of the script

If OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE are set in your shell (some images pin them), run this
script with them unset so OpenBLAS picks its own kernels, in this command only:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/linalg.py

Tables:
1. lstsq on coherent, ill-conditioned 200000 x 200 and 100000 x 1000 matrices: numpy.linalg.lstsq
   (LAPACK gelsd), unpreconditioned LSQR, sketch-and-solve and sketch-and-precondition (CountSketch
   and sparse sign, s = 4d; LSQR tolerance 1e-10, and 1e-8, which already bounds the residual
   excess by (cond(A R^-1) 1e-8)^2 / 2 < 1e-10), on the local backend and on Ray with 2 block
   actors: time (best of 2), residual excess over numpy's optimum, iterations.
2. Out-of-core lstsq: memory-mapped .npy shards larger than the driver's memory budget, held by
   Ray actors; driver peak RSS growth, time, residual against the TSQR optimum.
3. rsvd on 20000 x 2000 (rank 50 + noise): numpy full SVD, scikit-learn randomized_svd,
   torch.svd_lowrank and the row-block rsvd: time, Frobenius error ratio, singular-value error.
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

from jobs import rsvd as rs  # noqa: E402
from jobs.blocks import DataSpec, RowBlockMatrix, exact_lstsq, residual_norm  # noqa: E402
from jobs.lstsq import lsqr, sketch_and_precondition, sketch_and_solve  # noqa: E402
from jobs.sketches import Sketch  # noqa: E402


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    out = [
        f"### {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


REPEAT = 2  # timed rows report the best of REPEAT runs (timeit convention), baselines included


def timed(fn, repeat: int = REPEAT):
    """(best wall time over `repeat` runs, result of the last run)."""
    best, out = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


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


def bench_lstsq(n: int, d: int, plain_cap: int, ray_hosts: int) -> str:
    spec = DataSpec(n=n, d=d, kind="coherent", cond=1e6, seed=0, noise=1e-2)
    A, b = _dense_rows(spec)
    rows = []
    t_np, x_np = timed(lambda: np.linalg.lstsq(A, b, rcond=None)[0])
    opt = float(np.linalg.norm(A @ x_np - b))
    rows.append(["numpy.linalg.lstsq (gelsd)", f"{t_np:.2f}", "0 (reference)", "-", "1.00x"])
    mat = RowBlockMatrix.from_arrays(A, b, n_blocks=8, hosts=2)  # views of A, in this process
    s = 4 * d

    def add(name: str, t: float, x: np.ndarray, its: str, m: RowBlockMatrix = mat) -> None:
        r = residual_norm(m, x)
        rows.append([name, f"{t:.2f}", _excess(r, opt), its, f"{t_np / t:.2f}x"])

    t0 = time.perf_counter()  # one run: it only stops at the iteration cap
    pl = lsqr(mat, None, atol=1e-10, btol=1e-10, max_iter=plain_cap)
    its = f"{pl.iterations}" + ("" if pl.converged else " (cap, not converged)")
    add("LSQR, no preconditioner", time.perf_counter() - t0, pl.x, its)
    t, ss = timed(lambda: sketch_and_solve(mat, Sketch.sized("countsketch", s, 1)))
    add(f"sketch-and-solve, CountSketch s={s}", t, ss.x, "-")
    for kind, tol in (("countsketch", 1e-10), ("sparse_sign", 1e-10), ("sparse_sign", 1e-8)):
        t, sp = timed(
            lambda kind=kind, tol=tol: sketch_and_precondition(mat, Sketch.sized(kind, s, 1), tol)
        )
        name = f"sketch-and-precondition, {kind} s={s}, LSQR tol {tol:.0e} (local, 2 hosts)"
        add(name, t, sp.x, str(sp.iterations))
    if ray_hosts:
        rmat = RowBlockMatrix.generate(spec, 2 * ray_hosts, backend="ray", hosts=ray_hosts)
        try:
            t, sp = timed(lambda: sketch_and_precondition(rmat, Sketch.sized("sparse_sign", s, 1)))
            name = (
                f"sketch-and-precondition, sparse_sign s={s}, tol 1e-10 (Ray, {ray_hosts} actors)"
            )
            add(name, t, sp.x, str(sp.iterations), rmat)
        finally:
            rmat.close()
    title = f"lstsq: {n} x {d}, coherent, cond 1e6 (residual excess = ||Ax-b|| / optimum - 1)"
    return table(
        title, ["method", "time (s)", "residual excess", "iterations", "speedup vs numpy"], rows
    )


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
            sp = sketch_and_precondition(mat, Sketch.sized("sparse_sign", 4 * d, 1), tol=1e-10)
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
            str(sp.iterations),
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
            "sketch-and-precondition (s)",
            "iterations",
            "residual excess vs TSQR optimum",
            "TSQR optimum (s)",
        ],
        rows,
    )


def bench_rsvd(n: int, d: int, k: int, ray_hosts: int) -> str:
    import torch
    from sklearn.utils.extmath import randomized_svd

    spec = DataSpec(n=n, d=d, kind="low_rank", rank=k, cond=10.0, noise=5.0, seed=2)
    A, _ = _dense_rows(spec)
    t0 = time.perf_counter()
    U, s_all, Vt = np.linalg.svd(A, full_matrices=False)
    t_full = time.perf_counter() - t0
    opt = math.sqrt(float((s_all[k:] ** 2).sum()))
    rows = []

    def add(
        name: str,
        t: float,
        U: np.ndarray,
        s: np.ndarray,
        Vt: np.ndarray | None,
        err: float | None = None,
    ) -> None:
        if err is None:
            err = float(np.linalg.norm(A - (U * s) @ Vt))
        sig = float(np.max(np.abs(s - s_all[:k]) / s_all[:k]))
        rows.append([name, f"{t:.2f}", f"{err / opt:.5f}", f"{sig:.1e}"])

    add("numpy.linalg.svd (full)", t_full, U[:, :k], s_all[:k], Vt[:k])
    del U, Vt
    t, (U, s, Vt) = timed(lambda: randomized_svd(A, k, random_state=0))  # p=10, n_iter=auto=7
    add("sklearn randomized_svd (p=10, n_iter=auto=7)", t, U, s, Vt)
    At = torch.from_numpy(A)
    for niter in (2, 7):
        torch.manual_seed(0)
        t, (U, s, V) = timed(lambda niter=niter: torch.svd_lowrank(At, q=k + 10, niter=niter))
        name = f"torch.svd_lowrank (q={k + 10}, niter={niter})"
        add(name, t, U[:, :k].numpy(), s[:k].numpy(), V[:, :k].numpy().T)
    mat = RowBlockMatrix.from_arrays(A, None, n_blocks=4, hosts=2)
    for over, it in ((10, 7), (10, 5), (20, 4)):
        t, r = timed(lambda over=over, it=it: rs.rsvd(mat, k, over, it, seed=0))
        add(f"row-block rsvd, local 2 hosts (p={over}, q={it})", t, rs.gather_u(mat), r.s, r.vt)
    if ray_hosts:
        rmat = RowBlockMatrix.generate(spec, 2 * ray_hosts, backend="ray", hosts=ray_hosts)
        try:
            for over, it in ((10, 7), (10, 5)):
                t, r = timed(lambda over=over, it=it: rs.rsvd(rmat, k, over, it, seed=0))
                add(
                    f"row-block rsvd, Ray {ray_hosts} actors (p={over}, q={it})",
                    t,
                    None,
                    r.s,
                    None,
                    rs.lowrank_error(rmat, r),
                )
        finally:
            rmat.close()
    title = (
        f"rsvd: {n} x {d}, rank {k} + noise, k = {k} (Frobenius ratio = error / optimal "
        f"rank-{k} error; sigma error = max_i |s_i - s_i*| / s_i*)"
    )
    return table(title, ["method", "time (s)", "Frobenius ratio", "sigma error"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    args = ap.parse_args()
    from _provenance import markdown, provenance  # benchmarks/ is sys.path[0]

    print(markdown(provenance()))
    hosts = 0 if args.no_ray else 2
    if hosts:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
        f"cpus={os.cpu_count()}\n"
    )
    if args.quick:
        print(bench_lstsq(20000, 50, 100, hosts))
        print(bench_out_of_core(40000, 50, 4, 8, hosts or 1) if hosts else "")
        print(bench_rsvd(4000, 400, 10, hosts))
    else:
        print(bench_lstsq(200000, 200, 400, hosts), flush=True)
        print(bench_lstsq(100000, 1000, 150, hosts), flush=True)
        if hosts:
            print(bench_out_of_core(400000, 500, 16, 256, hosts), flush=True)
        print(bench_rsvd(20000, 2000, 50, hosts), flush=True)
    if hosts:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main()
