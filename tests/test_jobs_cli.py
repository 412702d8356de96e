"""Every job through the Hydra app on backend=local; config errors fail at compose time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from flagstaff.jobs.config import JOB_SCHEMAS, register_configs
from flagstaff.jobs.runner import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPRESS_SMALL = [
    "job.model.hidden=[32]",
    "job.model.epochs=5",
    "job.sweep=[]",
    "job.calib_samples=64",
]
SMALL = {
    "lstsq": ["job.data.n=6000", "job.data.d=30", "job.max_iter=200"],
    "linf_regression": ["job.data.n=4000", "job.data.d=16", "job.trials=2"],
    "constrained": ["job.data.n=4000", "job.data.d=16", "job.constraints=3"],
    "sensitivity_sampling": [
        "job.data.n=4000",
        "job.data.d=6",
        "job.ps=[2.0,1.5]",
        "job.directions=40",
    ],
    "volume_sampling": ["job.data.n=2000", "job.data.d=3", "job.trials=300"],
    "top_eigvec": ["job.data.n=8000", "job.data.d=20", "job.chunks=8"],
    "rsvd": ["job.data.n=3000", "job.data.d=80", "job.k=5", "job.data.rank=5"],
    "completion": ["job.m=600", "job.n=500", "job.k=5", "job.p=0.15", "job.iters=10"],
    **{f"compress_{m}": COMPRESS_SMALL for m in ("svd", "fwsvd", "welore", "mfac")},
    "compress_cospadi": [*COMPRESS_SMALL, "job.iters=2"],
}
FIGURES = {
    "lstsq": [
        "residual_ratio",
        "iterations",
        "rank_deficient",
        "solve_time_s",
        "sketch_time_s",
        "factor_time_s",
        "iterate_time_s",
        "excess_bound",
    ],
    "linf_regression": ["linf_error", "linf_error_countsketch", "gap"],
    "constrained": ["kkt_residual", "iterations"],
    "sensitivity_sampling": ["distortion", "cost_ratio"],
    "volume_sampling": ["bias", "bias_se", "loss_ratio"],
    "top_eigvec": ["correlation", "correlation_oja", "memory_floats"],
    "rsvd": ["frobenius_ratio", "sigma_error", "baselines", "precision", "passes_float32"],
    "completion": ["error_per_iter", "time_per_iter", "rate", "comparison"],
    **{
        f"compress_{m}": ["params_before", "params_after", "accuracy_after", "rel_error"]
        for m in ("svd", "fwsvd", "welore", "cospadi", "mfac")
    },
}
COMMON = ["backend=local", "hosts=2", "progress=false", "blas_threads=1"]


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        return compose(config_name="job", overrides=overrides)


def test_schemas_cover_every_yaml():
    names = {f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "job")) if f.endswith(".yaml")}
    assert names == set(JOB_SCHEMAS)


@pytest.mark.parametrize("name", sorted(JOB_SCHEMAS))
def test_job_runs_from_hydra_app(name, tmp_path):
    cfg = _compose([f"job={name}", *COMMON, *SMALL[name]])
    assert OmegaConf.select(cfg, "job.name") == name
    res = run(cfg, str(tmp_path))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["time_s"] > 0 and on_disk["job"] == name
    for key in FIGURES[name]:
        assert key in on_disk, key
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    if name.startswith("compress_"):  # no row-block matrix: no n, d of zeros
        assert "n" not in on_disk and "d" not in on_disk
    elif name != "completion":  # a row-block job reports its matrix's shape
        assert (on_disk["n"], on_disk["d"]) == (cfg.job.data.n, cfg.job.data.d)
    if name == "top_eigvec":
        assert on_disk["passes_over_A"] == 2
    if name == "constrained":
        for kind in cfg.job.problems:
            assert len(on_disk[kind]["inner_relative_residual"]) == len(
                on_disk[kind]["inner_target"]
            )
    if name == "lstsq":
        assert res["residual_ratio"] - 1 < 1e-10 and res["converged"]
        # the solver's own time to solution, inside the job's total, with its breakdown
        assert 0 < on_disk["solve_time_s"] <= on_disk["time_s"]
        parts = ("sketch_time_s", "factor_time_s", "cast_time_s", "iterate_time_s")
        assert sum(on_disk[k] for k in parts) <= on_disk["solve_time_s"]
        assert on_disk["excess_bound"] <= 1e-10 and on_disk["solver"] == "refine"
    if name == "constrained":
        assert res["kkt_residual"] < 1e-6
    if name == "top_eigvec":
        assert res["correlation"] > 0.9
    if name == "rsvd":  # float32 power iterations, same accuracy as the float64 baselines
        assert on_disk["precision"] == "mixed" and on_disk["passes_float32"] == cfg.job.power_iters
        assert on_disk["sigma_error"] < 1e-6 and on_disk["frobenius_ratio"] < 1 + 1e-6


def test_rank_deficient_lstsq_says_minimum_norm(tmp_path):
    cfg = _compose(
        [
            "job=lstsq",
            *COMMON,
            "job.data.n=3000",
            "job.data.d=20",
            "job.data.kind=low_rank",
            "job.data.rank=6",
            "job.data.noise=0",
            "job.plain_lsqr=false",
        ]
    )
    res = run(cfg, str(tmp_path))
    assert res["rank_deficient"] and res["rank"] == 6
    assert res["solution"].startswith("minimum-norm")
    assert res["x_relative_error"] < 1e-6


@pytest.mark.parametrize(
    "override, message",
    [
        ("job.foo=1", "job.foo"),
        ("nonsense=1", "nonsense"),
        ("job.sketch=fjlt", "countsketch"),
        ("backend=dask", "local"),
        ("job.data.kind=weird", "coherent"),
    ],
)
def test_bad_config_fails_at_compose(override, message):
    with pytest.raises(Exception) as info:
        _compose(["job=lstsq", override])
    chain, e = "", info.value
    while e is not None:
        chain += str(e) + "\n"
        e = e.__cause__
    assert message in chain, chain


def test_bad_value_fails_before_work(tmp_path):
    cfg = _compose(["job=lstsq", *COMMON, "job.oversampling=0.5"])
    with pytest.raises(ValueError, match="oversampling"):
        run(cfg, str(tmp_path))
    cfg = _compose(["job=constrained", *COMMON, "job.problems=[ridge]"])
    with pytest.raises(ValueError, match="least_squares, logistic"):
        run(cfg, str(tmp_path))
    cfg = _compose(["job=rsvd", *COMMON, "job.normalize=tsqr"])  # precision defaults to mixed
    with pytest.raises(ValueError, match="normalize=tsqr runs in float64"):
        run(cfg, str(tmp_path))
    cfg = _compose(["job=lstsq", *COMMON, "job.sketch=countsketch"])
    with pytest.raises(ValueError, match="job.sketch=countsketch.*job.solver=lsqr"):
        run(cfg, str(tmp_path))
    cfg = _compose(["job=lstsq", *COMMON, "job.excess=0"])
    with pytest.raises(ValueError, match="job.excess=0.0: must be in"):
        run(cfg, str(tmp_path))
    assert not (tmp_path / "results.json").exists()


def test_cli_entry_point(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "flagstaff.launch.job",
        "job=lstsq",
        *COMMON,
        *SMALL["lstsq"],
        f"hydra.run.dir={tmp_path}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["residual_ratio"] - 1 < 1e-10
    assert (tmp_path / ".hydra" / "config.yaml").exists()


def test_flagstaff_job_ray_is_private_and_joining_needs_a_token(tmp_path) -> None:
    """flagstaff-job starts Ray as flagstaff-train does (issue 19 item 1): every socket of the job's
    Ray listens on loopback only while the job runs, and cluster.address without a token is one
    line and exit code 2, before any work."""
    import subprocess
    import sys
    import time

    from tests._procs import alive, descendants, is_loopback, listening
    from tests.conftest import ROOT

    # a user who set nothing up for Ray (the test suite's own private-Ray settings removed)
    unset = (
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    )
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["HOME"] = str(tmp_path / "home")
    job = [
        sys.executable,
        "-m",
        "flagstaff.launch.job",
        "progress=false",
        "hosts=1",
        "blas_threads=1",
    ]
    p = subprocess.run(
        [*job, "job=lstsq", "cluster.address=192.0.2.1:6379", f"hydra.run.dir={tmp_path / 'a'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "RAY_AUTH_MODE=token" in lines[0], p.stderr
    assert not (tmp_path / "a" / "results.json").exists()
    big = ["job=lstsq", "job.data.n=100000", "job.data.d=100"]
    proc = subprocess.Popen(
        [*job, "backend=ray", *big, f"hydra.run.dir={tmp_path / 'b'}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        seen += listening(alive(descendants(proc.pid)))
        time.sleep(0.5)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert seen, "the job's Ray was never seen listening"
    assert all(is_loopback(addr) for addr, _ in seen), sorted(set(seen))
