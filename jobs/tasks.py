"""The seven jobs: each takes (matrix, job config, root seed, progress bar) and returns
(results dict, draw(figure)). The runner adds time_s and writes results.json and the PNG.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from flagstaff.jobs import constrained as cons
from flagstaff.jobs import eig, sampling
from flagstaff.jobs import rsvd as rs
from flagstaff.jobs.blocks import RowBlockMatrix, exact_lstsq, residual_norm, tsqr_r
from flagstaff.jobs.config import (
    ConstrainedConfig,
    LinfConfig,
    LstsqConfig,
    RsvdConfig,
    SensitivityConfig,
    TopEigConfig,
    VolumeConfig,
)
from flagstaff.jobs.lstsq import (
    lsqr,
    sketch_and_precondition,
    sketch_and_solve,
    sketch_precondition_refine,
)
from flagstaff.jobs.sketches import Sketch

Result = tuple[dict[str, Any], Any]


def _ratio(res: float, opt: float | None, bnorm: float) -> float:
    """||Ax - b|| / ||Ax* - b|| (relative to ||b|| when the optimum residual is ~0)."""
    if opt is not None and opt > 1e-14 * bnorm:
        return res / opt
    return res / bnorm


def _bnorm(mat: RowBlockMatrix) -> float:
    return math.sqrt(mat.sum(_block_bsq))


def _block_bsq(block) -> float:
    return float(block.b @ block.b)


# ---------------------------------------------------------------------------------------------
def run_lstsq(mat: RowBlockMatrix, job: LstsqConfig, seed: int, bar) -> Result:
    """The configured solver against the exact optimum (and sketch-and-solve, plain LSQR).

    `solve_time_s` is the solver's own time to solution (sketch, factorization, iterations),
    with its breakdown; the job's `time_s` also holds the baselines and the exact optimum.
    """
    s = int(math.ceil(job.oversampling * mat.d))
    sketch = Sketch.sized(job.sketch.value, s, seed, job.nnz)
    bar.reset(total=job.max_iter * (2 if job.plain_lsqr else 1))
    out: dict[str, Any] = {
        "solver": job.solver.value,
        "sketch": job.sketch.value,
        "sketch_rows": s,
        "sketch_nnz": job.nnz if job.sketch.value == "sparse_sign" else None,
    }
    opt = None
    if job.exact:
        t0 = time.perf_counter()
        x_opt, opt, rank = exact_lstsq(mat)
        out["exact_time_s"] = time.perf_counter() - t0
        out["optimal_residual"] = opt
        out["exact_rank"] = rank
    bnorm = _bnorm(mat)

    def cb(it: int, test: float) -> None:
        bar.update(1)
        bar.set_postfix(it=it, test=f"{test:.1e}")

    def cb_passes(passes: int, bound: float) -> None:
        bar.update(passes - bar.n)
        bar.set_postfix(passes=passes, excess_bound=f"{bound:.1e}")

    t0 = time.perf_counter()
    ss = sketch_and_solve(mat, sketch)
    t1 = time.perf_counter()
    out["sketch_solve"] = {
        "time_s": t1 - t0,
        "residual_ratio": _ratio(residual_norm(mat, ss.x), opt, bnorm),
    }
    t0 = time.perf_counter()
    if job.solver.value == "refine":
        sp = sketch_precondition_refine(
            mat, sketch, job.excess, job.precision.value, job.max_iter, callback=cb_passes
        )
    else:
        sp = sketch_and_precondition(mat, sketch, tol=job.tol, max_iter=job.max_iter, callback=cb)
    solve_time = time.perf_counter() - t0
    res = residual_norm(mat, sp.x)
    out.update(
        residual_ratio=_ratio(res, opt, bnorm),
        residual_excess=_ratio(res, opt, bnorm) - 1.0 if opt else None,
        iterations=sp.iterations,
        converged=sp.converged,
        solve_time_s=solve_time,
        sketch_time_s=sp.sketch_time_s,
        factor_time_s=sp.factor_time_s,
        iterate_time_s=sp.iterate_time_s,
        rank=sp.rank,
        rank_deficient=sp.rank_deficient,
        solution="minimum-norm (rank-deficient A: LSRN preconditioner N = V_r / sigma_r)"
        if sp.rank_deficient
        else "unique (full column rank)",
    )
    if job.solver.value == "refine":
        out.update(
            precision=sp.precision,
            cast_time_s=sp.cast_time_s,
            refinement_steps=sp.outer,
            passes_float64=sp.passes_double,
            passes_float32=sp.passes_low,
            excess_bound=sp.excess_bound,
        )
    if job.exact:
        out["x_relative_error"] = float(
            np.linalg.norm(sp.x - x_opt) / max(np.linalg.norm(x_opt), 1e-300)
        )
    hist_plain: list[float] = []
    if job.plain_lsqr:
        t0 = time.perf_counter()
        pl = lsqr(mat, None, atol=job.tol, btol=job.tol, max_iter=job.max_iter, callback=cb)
        out["plain_lsqr"] = {
            "time_s": time.perf_counter() - t0,
            "iterations": pl.iterations,
            "converged": pl.converged,
            "residual_ratio": _ratio(residual_norm(mat, pl.x), opt, bnorm),
        }
        hist_plain = pl.history

    def draw(fig) -> None:
        ax = fig.add_subplot(111)
        name = f"{job.solver.value} ({job.sketch.value}, s={s})"
        if job.solver.value == "refine":
            ax.semilogy(sp.history, "o-", label=f"{name}: bound on the residual excess")
            ax.axhline(job.excess, color="gray", ls=":", label="target excess")
            ax.set_xlabel("refinement step (float64 residual pass)")
            ax.set_ylabel("bound on ||Ax - b|| / ||Ax* - b|| - 1")
        else:
            ax.semilogy(sp.history, label=name)
            ax.axhline(job.tol, color="gray", ls=":", label="tolerance")
            ax.set_xlabel("LSQR iteration")
            ax.set_ylabel("||A^T r|| / (||A|| ||r||)")
        if hist_plain:
            ax2 = ax.twiny() if job.solver.value == "refine" else ax
            ax2.semilogy(hist_plain, color="C1", label="LSQR, no preconditioner (per iteration)")
            if ax2 is not ax:
                ax2.legend(loc="lower left")
        ax.set_title(f"lstsq: {mat.n} x {mat.d}")
        ax.legend()

    return out, draw


# ---------------------------------------------------------------------------------------------
def run_linf(mat: RowBlockMatrix, job: LinfConfig, seed: int, bar) -> Result:
    """l-inf forward error of dense-sketch sketch-and-solve vs CountSketch (Song-Ye-Yin-Zhang)."""
    s = job.sketch_rows or 10 * mat.d
    bar.reset(total=2 * job.trials)
    out: dict[str, Any] = {"sketch": job.sketch.value, "sketch_rows": s}
    R = tsqr_r(mat, with_b=True)
    d = mat.d
    x_opt = np.linalg.lstsq(R[:d, :d], R[:d, d], rcond=None)[0]
    opt = abs(R[d, d])
    sv = np.linalg.svd(R[:d, :d], compute_uv=False)
    scale = opt / sv[-1] / math.sqrt(d)  # ||Ax* - b|| ||A^+|| / sqrt(d)
    errs: dict[str, list[float]] = {job.sketch.value: [], "countsketch": []}
    for t in range(job.trials):
        for kind in errs:
            x = sketch_and_solve(mat, Sketch.sized(kind, s, seed + 1000 * t)).x
            errs[kind].append(float(np.abs(x - x_opt).max()))
            bar.update(1)
    dense, sparse = np.array(errs[job.sketch.value]), np.array(errs["countsketch"])
    out.update(
        linf_error=float(dense.mean()),
        linf_error_max=float(dense.max()),
        linf_error_countsketch=float(sparse.mean()),
        linf_error_countsketch_max=float(sparse.max()),
        bound_scale=scale,
        eps_effective=float(dense.max() / scale),
        eps_effective_countsketch=float(sparse.max() / scale),
        gap=float(sparse.mean() / dense.mean()),
        l2_residual_optimal=float(opt),
    )

    def draw(fig) -> None:
        ax = fig.add_subplot(111)
        ax.semilogy(dense / scale, "o-", label=f"{job.sketch.value} (dense)")
        ax.semilogy(sparse / scale, "s-", label="countsketch")
        ax.set_xlabel("trial")
        ax.set_ylabel("||x' - x*||_inf * sqrt(d) / (||Ax*-b|| ||A^+||)")
        ax.set_title(f"linf_regression: {job.data.kind.value} {mat.n} x {mat.d}, s = {s}")
        ax.legend()

    return out, draw


# ---------------------------------------------------------------------------------------------
def run_constrained(mat: RowBlockMatrix, job: ConstrainedConfig, seed: int, bar) -> Result:
    """Exact augmented Lagrangian + randomized iterative sketching on each problem."""
    C, e = cons.make_constraints(mat.d, job.constraints, seed)
    bar.reset(total=job.max_outer * len(job.problems))
    out: dict[str, Any] = {"constraints": job.constraints}
    runs = {}
    for kind in job.problems:
        prob = cons.Problem(mat, kind, C, e, job.l2 if kind == "logistic" else 0.0)
        t0 = time.perf_counter()
        r = cons.exact_al_sketch(
            prob,
            job.mu,
            job.nu,
            job.tol,
            job.max_outer,
            job.inner_block,
            job.max_inner,
            seed=seed,
            progress=bar,
        )
        el = time.perf_counter() - t0
        x_ref = cons.exact_kkt_solution(prob)
        runs[kind] = r
        out[kind] = {
            "time_s": el,
            "kkt_residual": r.kkt,
            "final_kkt_residual": r.kkt[-1],
            "outer_iterations": len(r.kkt) - 1,
            "inner_iterations": r.inner,
            # inexact Newton: ||K z + r|| / ||r|| reached per step against its target eta_t; a
            # step that hit job.max_inner above target is counted, not hidden
            "inner_relative_residual": r.inner_residual,
            "inner_target": r.inner_target,
            "inner_target_missed": r.inner_target_missed,
            "step_sizes": r.steps,
            "mu_final": r.mu[-1] if r.mu else job.mu,
            "converged": r.converged,
            "constraint_violation": float(np.linalg.norm(C @ r.x - e)),
            "x_relative_error": float(np.linalg.norm(r.x - x_ref) / np.linalg.norm(x_ref)),
        }
    out["kkt_residual"] = max(out[k]["final_kkt_residual"] for k in job.problems)
    out["iterations"] = max(out[k]["outer_iterations"] for k in job.problems)

    def draw(fig) -> None:
        ax = fig.add_subplot(111)
        for kind, r in runs.items():
            ax.semilogy(r.kkt, "o-", label=kind)
        ax.axhline(job.tol, color="gray", ls=":")
        ax.set_xlabel("outer iteration")
        ax.set_ylabel("KKT residual ||(grad_x L, c)||")
        ax.set_title("constrained: exact augmented Lagrangian + sketch-and-project")
        ax.legend()

    return out, draw


# ---------------------------------------------------------------------------------------------
def run_sensitivity(mat: RowBlockMatrix, job: SensitivityConfig, seed: int, bar) -> Result:
    """Leverage / Lewis-weight sensitivity sampling, distortion and l_p regression cost ratio."""
    d = mat.d
    m = job.samples or 20 * d
    bar.reset(total=len(job.ps))
    R = tsqr_r(mat)
    rng = np.random.default_rng([seed, 71])
    G = rng.standard_normal((d, job.directions))
    half = job.directions // 2
    import scipy.linalg as sla

    G[:, :half] = sla.solve_triangular(R, G[:, :half])  # whitened directions: hit heavy rows
    out: dict[str, Any] = {"expected_samples": m, "per_p": {}}
    dist_all = {}
    for p in job.ps:
        t0 = time.perf_counter()
        smp = sampling.sensitivity_sample(mat, p, m, seed, job.lewis_iters)
        dist = sampling.lp_distortion(mat, smp, G, p)
        x_full = sampling.lp_regression(mat, p)
        local = RowBlockMatrix.from_arrays(smp.A, smp.b)
        x_s = sampling.lp_regression(local, p)
        ratio = sampling.lp_cost(mat, x_s, p) / sampling.lp_cost(mat, x_full, p)
        dist_all[p] = dist
        out["per_p"][str(p)] = {
            "sample_rows": int(smp.A.shape[0]),
            "sensitivity_bound_total": smp.total_sensitivity_bound,
            "distortion": float(np.abs(dist).max()),
            "distortion_median": float(np.median(np.abs(dist))),
            "cost_ratio": float(ratio),
            "time_s": time.perf_counter() - t0,
        }
        bar.update(1)
        bar.set_postfix(p=p, distortion=f"{np.abs(dist).max():.3f}")
    out["distortion"] = max(v["distortion"] for v in out["per_p"].values())
    out["cost_ratio"] = max(v["cost_ratio"] for v in out["per_p"].values())

    def draw(fig) -> None:
        ax = fig.add_subplot(111)
        ax.boxplot([dist_all[p] for p in job.ps])
        ax.set_xticks(range(1, len(job.ps) + 1), [f"p={p:g}" for p in job.ps])
        ax.axhline(0, color="gray", ls=":")
        ax.set_ylabel("||SAx||_p / ||Ax||_p - 1 over random directions")
        ax.set_title(f"sensitivity_sampling: {mat.n} x {d}, m = {m}")

    return out, draw


# ---------------------------------------------------------------------------------------------
def run_volume(mat: RowBlockMatrix, job: VolumeConfig, seed: int, bar) -> Result:
    """Leveraged volume sampling vs i.i.d. leverage sampling: bias and loss of averaged estimates."""
    d = mat.d
    k = job.k or 2 * d
    bar.reset(total=3)
    if job.misspecification:
        u = np.random.default_rng([seed, 72]).standard_normal(d)
        mat.map(sampling.block_misspecify, u / np.linalg.norm(u), job.misspecification)
    R = sampling.prepare_volume_sampling(mat)
    x_opt, opt, _ = exact_lstsq(mat)
    bar.update(1)
    A, b, q = sampling.leveraged_volume_sample(mat, k, job.trials, seed)
    W_vol = sampling.weighted_ls(A, b, q)
    bar.update(1)
    A, b, q = sampling.iid_leverage_sample(mat, k, job.trials, seed)
    W_iid = sampling.weighted_ls(A, b, q)
    bar.update(1)
    xn = np.linalg.norm(x_opt)
    out: dict[str, Any] = {"k": k, "trials": job.trials}
    curves = {}
    for name, W in (("volume", W_vol), ("iid_leverage", W_iid)):
        T = W.shape[0]
        mean = W.mean(axis=0)
        se = np.sqrt(W.var(axis=0, ddof=1).sum() / T) / xn
        loss = sampling.loss_ratio_batch(R, x_opt, opt, W)
        workers = np.unique(np.geomspace(1, T, 12).astype(int))
        avg = np.cumsum(W, axis=0)[workers - 1] / workers[:, None]
        curves[name] = (workers, sampling.loss_ratio_batch(R, x_opt, opt, avg))
        out[name] = {
            "bias": float(np.linalg.norm(mean - x_opt) / xn),
            "bias_se": float(se),
            "bias_in_se": float(np.linalg.norm(mean - x_opt) / xn / se),
            "loss_ratio_median": float(np.median(loss)),
            "loss_ratio_mean": float(loss.mean()),
            "loss_ratio_averaged": float(curves[name][1][-1]),
        }
    out["bias"] = out["volume"]["bias"]
    out["bias_se"] = out["volume"]["bias_se"]
    out["loss_ratio"] = out["volume"]["loss_ratio_averaged"]

    def draw(fig) -> None:
        ax = fig.add_subplot(111)
        for name, (w, lr) in curves.items():
            ax.loglog(w, lr - 1.0, "o-", label=name)
        ax.set_xlabel("workers averaged")
        ax.set_ylabel("L(average) / L(x*) - 1")
        ax.set_title(f"volume_sampling: k = {k}, {mat.n} x {d}")
        ax.legend()

    return out, draw


# ---------------------------------------------------------------------------------------------
def run_top_eigvec(mat: RowBlockMatrix, job: TopEigConfig, seed: int, bar) -> Result:
    """Kacham-Woodruff random-order stream vs Oja vs exact."""
    bar.reset(total=job.chunks)
    w, v1 = eig.exact_top_eigvec(mat)
    t0 = time.perf_counter()
    kw = eig.streaming_top_eigvec(
        mat,
        job.chunks,
        job.block_size,
        job.samples_per_chunk,
        job.heavy_factor,
        seed,
        bar,
        v_ref=v1,
    )
    t_kw = time.perf_counter() - t0
    t0 = time.perf_counter()
    v_oja, h_oja = eig.oja_top_eigvec(mat, job.chunks, job.oja_lr, job.oja_batch, seed, v1)
    t_oja = time.perf_counter() - t0
    out = {
        "correlation": float((kw.v @ v1) ** 2),
        "correlation_oja": float((v_oja @ v1) ** 2),
        "eigengap_R": float(w[0] / w[1]),
        "heavy_rows": kw.heavy_rows,
        "max_sampled_rows_per_chunk": kw.max_sampled_rows,
        "memory_floats": kw.memory_floats,
        "memory_floats_gram": mat.d * mat.d,
        "memory_floats_matrix": mat.n * mat.d,
        "passes_over_A": eig.PASSES_OVER_A,  # a row-norm pass, then the random-order stream
        "stream_time_s": t_kw,
        "oja_time_s": t_oja,
    }

    def draw(fig) -> None:
        ax = fig.add_subplot(111)
        ax.plot(kw.history, "o-", label="Kacham-Woodruff stream")
        ax.plot(h_oja, "s-", label="Oja (mini-batch)")
        ax.axhline(1.0, color="gray", ls=":")
        ax.set_xlabel("stream chunk")
        ax.set_ylabel("<v, v1>^2")
        ax.set_title(f"top_eigvec: R = sigma1^2/sigma2^2 = {w[0] / w[1]:.2f}")
        ax.legend()

    return out, draw


# ---------------------------------------------------------------------------------------------
def compare_svd(
    A: np.ndarray, k: int, oversample: int, power_iters: int, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """numpy full SVD, scikit-learn randomized_svd and torch.svd_lowrank on a dense A, the
    randomized ones with the same k, oversampling and power iterations as the job."""
    import torch
    from sklearn.utils.extmath import randomized_svd

    res: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    res["numpy"] = {"time_s": time.perf_counter() - t0, "U": U[:, :k], "s": s[:k], "Vt": Vt[:k]}
    t0 = time.perf_counter()
    U2, s2, Vt2 = randomized_svd(
        A, k, n_oversamples=oversample, n_iter=power_iters, random_state=seed
    )
    res["sklearn"] = {"time_s": time.perf_counter() - t0, "U": U2, "s": s2, "Vt": Vt2}
    At = torch.from_numpy(A)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    U3, s3, V3 = torch.svd_lowrank(At, q=k + oversample, niter=power_iters)
    res["torch"] = {
        "time_s": time.perf_counter() - t0,
        "U": U3[:, :k].numpy(),
        "s": s3[:k].numpy(),
        "Vt": V3[:, :k].numpy().T,
    }
    fro_opt = math.sqrt(max(float((s[k:] ** 2).sum()), 1e-300))
    for r in res.values():
        E = A - (r["U"] * r["s"]) @ r["Vt"]
        r["frobenius_ratio"] = float(np.linalg.norm(E) / fro_opt)
        r["sigma_error"] = float((np.abs(r["s"] - s[:k]) / s[:k]).max())
    res["_sigma"] = {"s": s}
    return res


def run_rsvd(mat: RowBlockMatrix, job: RsvdConfig, seed: int, bar) -> Result:
    """Randomized SVD over the row blocks vs numpy / scikit-learn / torch."""
    bar.reset(total=job.power_iters)
    t0 = time.perf_counter()
    r = rs.rsvd(
        mat,
        job.k,
        job.oversample,
        job.power_iters,
        seed,
        bar,
        precision=job.precision.value,
        normalize=job.normalize.value,
    )
    el = time.perf_counter() - t0
    err = rs.lowrank_error(mat, r)
    out: dict[str, Any] = {
        "k": job.k,
        "rsvd_time_s": el,
        "precision": r.precision,
        "normalize": job.normalize.value,
        "passes_float32": r.passes_low,
        "passes_float64": r.passes_double,
        "singular_values": r.s,
        "frobenius_error": err,
    }
    sig = None
    if job.compare and mat.n * mat.d <= 50_000_000:
        A = np.vstack(mat.map(_block_dense))  # gathered for the baselines only
        cmp = compare_svd(A, job.k, job.oversample, job.power_iters, seed)
        sig = cmp.pop("_sigma")["s"]
        fro_opt = math.sqrt(max(float((sig[job.k :] ** 2).sum()), 1e-300))
        out["frobenius_ratio"] = err / fro_opt
        out["sigma_error"] = float((np.abs(r.s - sig[: job.k]) / sig[: job.k]).max())
        out["baselines"] = {
            name: {
                kk: v for kk, v in c.items() if kk in ("time_s", "frobenius_ratio", "sigma_error")
            }
            for name, c in cmp.items()
        }

    def draw(fig) -> None:
        ax = fig.add_subplot(111)
        if sig is not None:
            ax.semilogy(
                np.arange(1, min(len(sig), 3 * job.k) + 1),
                sig[: 3 * job.k],
                "k.-",
                label="exact (numpy)",
            )
        ax.semilogy(np.arange(1, job.k + 1), r.s, "o", mfc="none", label="rsvd (row blocks)")
        ax.set_xlabel("index")
        ax.set_ylabel("singular value")
        ax.set_title(f"rsvd: {mat.n} x {mat.d}, k = {job.k}, q = {job.power_iters}")
        ax.legend()

    return out, draw


def _block_dense(block) -> np.ndarray:
    return np.asarray(block.A)
