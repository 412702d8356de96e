"""Benchmark part: matrix completion by robust alternating minimization (jobs/completion.py).

Gu, Song, Yin, Zhang, "Low Rank Matrix Completion via Robust Alternating Minimization in Nearly
Linear Time" (ICLR 2024): alternating minimization whose per-row least-squares problems are
solved approximately by a sketch-preconditioned solver, against exact alternating minimization
(batched normal equations) from the same spectral initialization, on generated rank-k matrices
(Gaussian factors) with the rows in row blocks (backend local, and 2 Ray actors).

    .venv/bin/python benchmarks/_compress_completion.py           # about 2-4 minutes on 2 cores
    .venv/bin/python benchmarks/_compress_completion.py --quick   # small sizes

`main(quick)` returns the markdown tables (used by benchmarks/compression.py when present).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flagstaff.jobs import completion as cm  # noqa: E402

SIZES = [  # (m, n, k, p, iterations, backends)
    (2000, 1500, 10, 0.05, 20, ("local", "ray")),
    (5000, 4000, 10, 0.02, 20, ("local", "ray")),
    (1000, 4000, 20, 0.3, 10, ("local",)),  # many observations per row: room for the sketch
]
QUICK = [(600, 500, 5, 0.15, 12, ("local", "ray")), (2000, 1500, 10, 0.05, 10, ("local",))]
HOSTS = 2


def _one(m: int, n: int, k: int, p: float, iters: int, backend: str) -> dict[str, Any]:
    """Both solvers from the same init on one problem; times exclude the error evaluation."""
    spec = cm.CompletionSpec(m=m, n=n, k=k, p=p, seed=0)
    t0 = time.perf_counter()
    prob = cm.prepare(spec, 4 * HOSTS, backend, HOSTS)
    try:
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        V0 = cm.init_factors(prob, seed=0)
        init = time.perf_counter() - t0
        runs = {
            s: cm.alternate(prob, V0, s, seed=0, iters=iters, tol=1e-13)
            for s in ("sketched", "exact")
        }
    finally:
        prob.mat.close()
    return {"setup": setup, "init": init, "runs": runs, "p_obs": prob.p}


def _time_to(r: dict[str, Any], target: float) -> str:
    e = np.asarray(r["error_per_iter"][1:])
    hit = np.flatnonzero(e <= target)
    return f"{r['cumulative_time'][hit[0]]:.2f}" if hit.size else "-"


def main(quick: bool = False) -> str:
    """Run the completion benchmark; return markdown tables."""
    sizes = QUICK if quick else SIZES
    results = []
    ray_started = False
    try:
        for m, n, k, p, iters, backends in sizes:
            for backend in backends:
                if backend == "ray" and not ray_started:
                    import ray

                    ray.init(
                        address="local",
                        num_cpus=HOSTS,
                        include_dashboard=False,
                        log_to_driver=False,
                    )
                    ray_started = True
                res = _one(m, n, k, p, iters, backend)
                results.append(((m, n, k, p, iters, backend), res))
                print(f"done {m}x{n} k={k} p={p} {backend}", file=sys.stderr, flush=True)
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    out = [
        "### Matrix completion: robust alternating minimization, sketched vs exact per-row solves",
        "",
        "Generated M = U* V*^T (Gaussian factors, cond 1), entries observed with probability p; "
        f"rows in {4 * HOSTS} row blocks on {HOSTS} hosts (local threads or Ray actors). Error = "
        "||P_test(M - U V^T)|| / ||P_test M|| over all unobserved entries; rate = median ratio of "
        "successive errors. Sketched: sparse sign sketch (s = 4k rows, 4 nonzeros per column) of "
        "each row's observed design, QR preconditioner, CGLS warm-started at the previous U to a "
        "0.1 reduction of the normal residual; exact: batched normal equations. The V-step is the "
        "same (normal equations summed over the blocks, solved batched on the driver). Times "
        "exclude error evaluation.",
        "",
        "| m x n | k | p | backend | solver | iters | AM time (s) | U-step time (s) | time/iter (s) "
        "| init (s) | held-out error | full error | rate | CG iters/row |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (m, n, k, p, _, backend), res in results:
        for solver in ("sketched", "exact"):
            r = res["runs"][solver]
            cg = f"{np.mean(r['inner_iterations_mean']):.1f}" if r["inner_iterations_mean"] else "-"
            out.append(
                f"| {m} x {n} | {k} | {p:g} | {backend} | {solver} | {r['iterations']} | "
                f"{r['total_time_s']:.2f} | {sum(r['u_step_time_per_iter']):.2f} | "
                f"{np.median(r['time_per_iter']):.3f} | {res['init']:.2f} | {r['final_error']:.1e} | "
                f"{r['full_error_per_iter'][-1]:.1e} | {r['rate']:.3f} | {cg} |"
            )
    out += [
        "",
        "Held-out error against iterations (local backend; iteration 0 = spectral initialization) "
        "and time to reach an error (s, cumulative AM time):",
        "",
    ]
    shown = [(key, res) for key, res in results if key[5] == "local"]
    for (m, n, k, p, iters, _), res in shown:
        marks = sorted({0, 1, 2, 3, 5, iters // 2, iters - 2, iters} & set(range(iters + 1)))
        out += [
            f"**{m} x {n}, k = {k}, p = {p:g}**",
            "",
            "| solver | " + " | ".join(f"it {t}" for t in marks) + " | t(1e-3) | t(1e-6) |",
            "|---|" + "---|" * (len(marks) + 2),
        ]
        for solver in ("sketched", "exact"):
            r = res["runs"][solver]
            e = r["error_per_iter"]
            cells = " | ".join(f"{e[t]:.1e}" if t < len(e) else "-" for t in marks)
            out.append(f"| {solver} | {cells} | {_time_to(r, 1e-3)} | {_time_to(r, 1e-6)} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes")
    args = ap.parse_args()
    t0 = time.perf_counter()
    text = main(args.quick)
    from _provenance import markdown, provenance  # what a rerun needs, above the tables

    print(markdown(provenance()))
    print(text)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
