"""The compress_* jobs of `flagstaff-job`: load, compress the target layers, evaluate, save.

Each job is ``fn(job, seed, backend, hosts, bar, out_dir) -> (results, draw)`` (see
jobs/runner.py). Results hold ``params_before``/``params_after`` (whole model),
``accuracy_before``/``accuracy_after`` (test split), per-layer ``rel_error`` and ``ranks``, the
sweep of budgets drawn in the plot, and where the compressed checkpoint went
(``compressed.pt``, reloaded by :func:`jobs.compress.core.load_compressed`).

Also registers the CoSpaDi and M-FAC methods: adapters around ``jobs.compress.cospadi`` and
``jobs.compress.mfac`` (imported on first use).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch

from flagstaff.jobs.compress.core import (
    Budget,
    CompressedLayer,
    Context,
    apply_compression,
    batch_gradients,
    count_params,
    find_layers,
    get_method,
    layer_params,
    load_model,
    register,
    relative_error,
    save_compressed,
)

__all__ = ["run_compress", "run_svd", "run_fwsvd", "run_welore", "run_cospadi", "run_mfac"]


# -- CoSpaDi and M-FAC adapters ----------------------------------------------------------------


@register("cospadi")
def compress_cospadi(ctx: Context, budget: Budget) -> dict[str, CompressedLayer]:
    """CoSpaDi (Shopkhoev et al. 2025, arXiv 2509.22075): whitened sparse dictionary learning
    against the functional error on each layer's calibration inputs; ``W ~ C^T D^T`` as two
    layers (x -> x D -> (x D) C), with k atoms and s nonzeros per code column."""
    from flagstaff.jobs.compress import cospadi as cs

    inputs = ctx.inputs()
    out = {}
    for name, W in ctx.matrices.items():
        m, n = W.shape
        k, s = int(getattr(ctx.job, "atoms", 0)), int(getattr(ctx.job, "nonzeros", 0))
        if budget.rank > 0:
            k, s = budget.rank_of(name, W), 0
        if k == 0 or s == 0:
            kb, sb = cs.cospadi_budget(m, n, budget.ratio)
            k, s = k or kb, s or min(sb, k or kb)
        s = min(s, k)
        ctx.progress(f"cospadi {name}")
        D, C = cs.cospadi(W, inputs[name], k, s, int(getattr(ctx.job, "iters", 10)), ctx.seed)
        W_hat = cs.cospadi_reconstruct(D, C)
        out[name] = CompressedLayer(
            name=name,
            weight_hat=W_hat.to(W.dtype),
            factors={"U": C.T.float(), "V": D.T.float()},
            params=cs.cospadi_params(m, n, k, s) + ctx.bias_params(name),
            rel_error=relative_error(W, W_hat),
            info={"atoms": k, "nonzeros": s, "rank": k},
        )
    return out


@register("mfac")
def compress_mfac(ctx: Context, budget: Budget) -> dict[str, CompressedLayer]:
    """One-shot M-FAC pruning (Frantar, Kurtic, Alistarh, NeurIPS 2021): OBS saliency
    w_j^2 / (2 [F^-1]_jj) with the matrix-free inverse empirical Fisher of mini-batch gradients
    of each layer, OBS update of the kept weights. Each layer keeps as many weights as fit in
    ratio * d parameters once their positions are stored (a bitmask or indices, the cheaper)."""
    from flagstaff.jobs.compress import mfac as mf

    if "grads" not in ctx.cache:
        ctx.progress("gradients")
        batch = int(getattr(ctx.job, "grad_batch", 8))
        ctx.cache["grads"] = batch_gradients(
            ctx.model, list(ctx.layers), ctx.x_calib, ctx.y_calib, batch
        )
    grads = ctx.cache["grads"]
    damp, block = float(getattr(ctx.job, "damp", 1e-4)), int(getattr(ctx.job, "block", 0))
    if budget.rank > 0:
        raise ValueError("compress_mfac prunes to a sparsity: set job.ratio, not job.rank")
    out = {}
    for name, W in ctx.matrices.items():
        keep = mf.kept_for_budget(W.numel(), budget.ratio)
        if keep == 0:
            raise ValueError(
                f"job.ratio={budget.ratio}: layer {name!r} ({W.numel()} weights) cannot keep a "
                "single weight once the positions of the kept weights are stored; raise job.ratio"
            )
        sparsity = (W.numel() - keep) / W.numel()
        w_new, mask = mf.mfac_prune(W, grads[name], sparsity, damp, block or None)
        nnz = int(mask.sum())
        out[name] = CompressedLayer(
            name=name,
            weight_hat=w_new,
            factors={"mask": mask},
            params=mf.sparse_storage(W.numel(), nnz) + ctx.bias_params(name),
            rel_error=relative_error(W, w_new),
            info={"nonzeros": nnz, "sparsity": 1.0 - nnz / W.numel()},
        )
    return out


# -- the job -----------------------------------------------------------------------------------


def _budget(method: str, job: Any, ratio: float | None = None) -> Budget:
    """The configured budget (ratio None) or a sweep point (a ratio, no fixed rank)."""
    if ratio is not None:
        return Budget(ratio=ratio)
    if method == "welore":
        if job.threshold is not None:
            return Budget(threshold=float(job.threshold))
        if job.target_reduction is not None:
            return Budget(ratio=1.0 - float(job.target_reduction))
    return Budget(ratio=float(job.ratio), rank=int(job.rank))


def _calibration(ds: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training samples in a seeded random order."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    idx = torch.randperm(len(ds.y_train), generator=g)[: min(n, len(ds.y_train))]
    return ds.x_train[idx], ds.y_train[idx]


def _evaluate(model, ds) -> float:
    from flagstaff.jobs.compress.core import accuracy

    return accuracy(model, ds.x_test, ds.y_test)


def run_compress(
    method: str,
    job: Any,
    seed: int,
    backend: str = "local",
    hosts: int = 1,
    bar: Any = None,
    out_dir: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """Compress the target layers of ``job.checkpoint`` with ``method``; evaluate; save."""
    compress = get_method(method)
    sweep = [float(r) for r in job.sweep]
    if bar is not None:
        bar.reset(total=3 + len(sweep))

    def step(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg)

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    loaded = load_model(job, seed)
    model, ds = loaded.model, loaded.data
    layers = find_layers(model, list(job.targets))
    x_cal, y_cal = _calibration(ds, int(job.calib_samples), seed)
    ctx = Context(model, layers, x_cal, y_cal, job, seed, backend, max(1, hosts), progress=step)
    if bar is not None:
        bar.update(1)
    acc_before = _evaluate(model, ds)
    params_before = count_params(model)
    dense_targets = sum(layer_params(m) for m in layers.values())
    load_s = time.perf_counter() - t0

    def evaluate_budget(budget: Budget) -> tuple[dict[str, CompressedLayer], Any, dict, int]:
        recs = compress(ctx, budget)
        compressed = copy.deepcopy(model)
        structure = apply_compression(compressed, recs)
        after = params_before - dense_targets + sum(r.params for r in recs.values())
        return recs, compressed, structure, after

    t1 = time.perf_counter()
    recs, compressed, structure, params_after = evaluate_budget(_budget(method, job))
    compress_s = time.perf_counter() - t1
    main_plan = ctx.cache.get("welore_plan")
    acc_after = _evaluate(compressed, ds)
    if bar is not None:
        bar.update(1)
    points = []
    for ratio in sweep:
        step(f"sweep {ratio}")
        r_recs, r_model, _, r_after = evaluate_budget(_budget(method, job, ratio))
        points.append({"ratio": ratio, "params": r_after, "accuracy": _evaluate(r_model, ds)})
        if bar is not None:
            bar.update(1)
    ckpt = None
    if job.save and out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        ckpt = os.path.join(out_dir, "compressed.pt")
        save_compressed(ckpt, compressed, structure, loaded, {"method": method})
    if bar is not None:
        bar.update(1)
    results: dict[str, Any] = {
        "method": method,
        "source": loaded.source,
        "params_before": params_before,
        "params_after": params_after,
        "params_in_modules": count_params(compressed),
        "target_params_before": dense_targets,
        "target_params_after": params_after - (params_before - dense_targets),
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "rel_error": {n: r.rel_error for n, r in recs.items()},
        "ranks": {n: r.info["rank"] if r.kind == "lowrank" else "dense" for n, r in recs.items()},
        "layers": {n: {**r.info, "params": r.params} for n, r in recs.items()},
        "structure": structure,
        "sweep": points,
        "checkpoint": ckpt,
        "load_s": load_s,
        "compress_s": compress_s,
    }
    if "fisher_info" in ctx.cache:
        results["fisher"] = ctx.cache["fisher_info"]
    if main_plan is not None and method == "welore":
        main_budget = _budget(method, job)
        results["welore"] = {
            "threshold": main_plan.threshold,
            "achieved_reduction": main_plan.reduction,
            "target_reduction": None
            if main_budget.threshold is not None
            else 1 - main_budget.ratio,
            "lowrank_layers": [n for n, v in main_plan.lowrank.items() if v],
        }

    def draw(fig) -> None:
        ax = fig.add_subplot(1, 1, 1)
        if points:
            pts = sorted(points, key=lambda p: p["params"])
            ax.plot(
                [p["params"] for p in pts],
                [p["accuracy"] for p in pts],
                marker="o",
                label=f"{method}, ratios " + ", ".join(f"{p['ratio']:g}" for p in pts),
            )
        ax.scatter([params_before], [acc_before], marker="*", s=140, color="k", label="original")
        ax.scatter(
            [params_after], [acc_after], marker="D", s=60, color="tab:red", label="saved model"
        )
        ax.set(
            xlabel="parameters (whole model)",
            ylabel="test accuracy",
            title=f"compress_{method}: {len(recs)} layers",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    return results, draw


def run_svd(job, seed, backend, hosts, bar, out_dir=None):
    """compress_svd: truncated SVD (Eckart-Young) of the target layers."""
    return run_compress("svd", job, seed, backend, hosts, bar, out_dir)


def run_fwsvd(job, seed, backend, hosts, bar, out_dir=None):
    """compress_fwsvd: Fisher-weighted SVD (Hsu et al., ICLR 2022), Fisher sums on the hosts."""
    return run_compress("fwsvd", job, seed, backend, hosts, bar, out_dir)


def run_welore(job, seed, backend, hosts, bar, out_dir=None):
    """compress_welore: WeLore's global threshold (Jaiswal et al. 2024)."""
    return run_compress("welore", job, seed, backend, hosts, bar, out_dir)


def run_cospadi(job, seed, backend, hosts, bar, out_dir=None):
    """compress_cospadi: calibration-guided sparse dictionaries (Shopkhoev et al. 2025)."""
    return run_compress("cospadi", job, seed, backend, hosts, bar, out_dir)


def run_mfac(job, seed, backend, hosts, bar, out_dir=None):
    """compress_mfac: one-shot M-FAC OBS pruning (Frantar, Kurtic, Alistarh, NeurIPS 2021)."""
    return run_compress("mfac", job, seed, backend, hosts, bar, out_dir)
