"""Driver recipe for `flagstaff-job`: setup (Ray, blocks), run one job, write results and a plot."""

from __future__ import annotations

import inspect
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from flagstaff.jobs.blocks import DataSpec, RowBlockMatrix
from flagstaff.jobs.config import Backend, DataConfig, JobAppConfig, JobConfig, Source, validate


def data_spec(d: DataConfig) -> DataSpec:
    return DataSpec(
        n=d.n,
        d=d.d,
        kind=d.kind.value,
        cond=d.cond,
        seed=d.seed,
        noise=d.noise,
        rank=d.rank,
        gap=d.gap,
        spike=d.spike,
    )


def make_matrix(d: DataConfig, backend: str, hosts: int) -> RowBlockMatrix:
    """Create the row blocks on their hosts (generated there, or loaded from shards there)."""
    if d.source == Source.files:
        return RowBlockMatrix.from_files(d.paths, d.b_paths or None, backend, hosts, d.mmap)
    n_blocks = min(d.blocks or 4 * hosts, d.n)
    return RowBlockMatrix.generate(data_spec(d), n_blocks, backend, hosts)


Job = Callable[..., tuple[dict[str, Any], Callable[[Any], None]]]


def _jobs() -> dict[str, Job]:
    """Jobs over a row-block matrix ``A, b``: ``fn(mat, job, seed, bar) -> (results, draw)``."""
    from flagstaff.jobs import tasks

    return {
        "lstsq": tasks.run_lstsq,
        "linf_regression": tasks.run_linf,
        "constrained": tasks.run_constrained,
        "sensitivity_sampling": tasks.run_sensitivity,
        "volume_sampling": tasks.run_volume,
        "top_eigvec": tasks.run_top_eigvec,
        "rsvd": tasks.run_rsvd,
    }


def _standalone_jobs() -> dict[str, Job]:
    """Jobs that bring their own inputs (a checkpoint, a matrix to complete):
    ``fn(job, seed, backend, hosts, bar) -> (results, draw)``; they start their own actors.
    A job that writes files of its own (a compressed checkpoint) also takes ``out_dir``."""
    from flagstaff.jobs import completion
    from flagstaff.jobs.compress import run as compress

    return {
        "compress_svd": compress.run_svd,
        "compress_fwsvd": compress.run_fwsvd,
        "compress_welore": compress.run_welore,
        "compress_cospadi": compress.run_cospadi,
        "compress_mfac": compress.run_mfac,
        "completion": completion.run_completion,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return x


def run(cfg: DictConfig, out_dir: str) -> dict[str, Any]:
    """Run the configured job; returns the results also written to out_dir/results.json."""
    from tqdm import tqdm

    app: JobAppConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    job: JobConfig = app.job
    jobs, standalone = _jobs(), _standalone_jobs()
    if job.name not in jobs and job.name not in standalone:
        valid = ", ".join([*jobs, *standalone])
        raise ValueError(f"job.name={job.name!r}: valid choices are {valid}")
    validate(job, app.hosts)
    hosts = app.hosts or os.cpu_count() or 1
    backend = app.backend.value
    started_ray = False
    if app.backend == Backend.ray:
        from flagstaff.system.ray_start import init_ray

        # a local Ray private to this job (loopback, a fresh token, ends with this process), or
        # the cluster at cluster.address with token authentication: as flagstaff-train does
        started_ray = init_ray(
            {"address": app.cluster.address, "require_auth": app.cluster.require_auth}
        )
    os.makedirs(out_dir, exist_ok=True)
    if app.blas_threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(app.blas_threads)
    bar = tqdm(desc=job.name, disable=not app.progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    mat = None
    try:
        if job.name in standalone:
            fn = standalone[job.name]
            extra = {"out_dir": out_dir} if "out_dir" in inspect.signature(fn).parameters else {}
            results, draw = fn(job, app.seed, backend, hosts, bar, **extra)
        else:
            mat = make_matrix(job.data, backend, hosts)
            results, draw = jobs[job.name](mat, job, app.seed, bar)
    finally:
        bar.close()
        if mat is not None:
            n, d = mat.n, mat.d
            mat.close()
        if started_ray:
            from flagstaff.system.ray_start import shutdown_ray

            shutdown_ray()
    sizes = {"n": n, "d": d} if mat is not None else {}  # a standalone job reports its own
    results = {
        "job": job.name,
        "time_s": time.perf_counter() - t0,
        **sizes,
        **results,
        "backend": backend,
        "hosts": hosts,
        "seed": app.seed,
        "versions": _versions(),
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(_jsonable(results), f, indent=2)
    _plot(draw, os.path.join(out_dir, f"{job.name}.png"))
    print(f"results: {os.path.join(out_dir, 'results.json')}")
    return results


def _plot(draw: Callable[[Any], None], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(7, 4.5))
    draw(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "scipy", "torch", "ray", "scikit-learn", "hydra-core"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
