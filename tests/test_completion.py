"""Matrix completion by robust alternating minimization (jobs/completion.py; Gu, Song, Yin, Zhang,
ICLR 2024): geometric error decay with exact and sketched per-row solves, the sketched solver
against lstsq, independence of the block layout, Ray actors, the Hydra app and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
from hydra import compose, initialize_config_module
from tqdm import tqdm

from flagstaff.jobs import completion as cm
from flagstaff.jobs.blocks import BlockError
from flagstaff.jobs.config import CompletionConfig, Source, register_configs
from flagstaff.jobs.runner import run

COMMON = ["backend=local", "hosts=2", "progress=false", "blas_threads=1"]
SPEC = cm.CompletionSpec(m=600, n=500, k=5, p=0.15, seed=0)  # the spec's measured setting


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def problem():
    prob = cm.prepare(SPEC, 4, "local", 2)
    V0 = cm.init_factors(prob, seed=0)
    yield prob, V0
    prob.mat.close()


def _bar():
    return tqdm(disable=True)


@pytest.mark.parametrize("solver", ["exact", "sketched"])
def test_error_decays_geometrically(problem, solver):
    prob, V0 = problem
    assert prob.test_set == "unobserved entries" and abs(prob.p - 0.15) < 0.01
    r = cm.alternate(prob, V0, solver, seed=0, iters=20, tol=0.0)
    e = np.asarray(r["error_per_iter"])
    assert e[0] < 0.6  # the spectral initialization already correlates with M
    ratios = e[1:] / e[:-1]
    assert (ratios[e[:-1] > 1e-10] < 0.4).all(), ratios  # every step contracts, not just on average
    assert r["rate"] < 0.33, r["rate"]  # about 3.5x per iteration, as in the spec
    assert e[15] < 5e-9 and e[-1] < 1e-10, e  # 2e-9 after ~15 iterations, then further
    full = np.asarray(r["full_error_per_iter"])
    assert full[-1] < 1e-10
    if solver == "sketched":
        assert 1 <= np.mean(r["inner_iterations_mean"]) < 10


def test_sketched_matches_exact_trajectory(problem):
    """Approximate (sketch-preconditioned, warm-started) row solves keep the exact AM rate."""
    prob, V0 = problem
    ex = cm.alternate(prob, V0, "exact", iters=10)
    sk = cm.alternate(prob, V0, "sketched", iters=10, inner_tol=0.1)
    loose = cm.alternate(prob, V0, "sketched", iters=10, inner_tol=0.5, inner_max_iter=2)
    e_ex, e_sk = np.asarray(ex["error_per_iter"]), np.asarray(sk["error_per_iter"])
    assert (e_sk <= 1.5 * e_ex).all(), (e_sk, e_ex)
    assert loose["rate"] < 0.5 and loose["final_error"] < 1e-4  # very rough solves still converge


def _rows_problem(rows=300, width=60, k=6, cond=1e3, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(k, width + 1, rows)
    counts[0] = width
    pw = (np.arange(width)[None, :] < counts[:, None]).astype(float)
    scale = np.geomspace(1.0, 1.0 / cond, k)
    A = rng.standard_normal((rows, width, k)) * scale * pw[:, :, None]
    b = rng.standard_normal((rows, width)) * pw
    pidx = np.where(
        pw > 0, rng.permuted(np.tile(np.arange(500), (rows, 1)), axis=1)[:, :width], 500
    )
    return A, b, pidx, pw


def test_sketched_row_solve_matches_lstsq():
    A, b, pidx, pw = _rows_problem()
    k = A.shape[2]
    S = cm.row_sketch(7, 1, np.arange(A.shape[0]), pidx, pw, 4 * k, 4)
    for tol in (1e-4, 1e-8, 1e-12):
        x, iters = cm.sketched_rows(A, b, cm.sketch_apply(S, A), None, tol=tol, max_iter=200)
        ref = np.stack([np.linalg.lstsq(A[i], b[i], rcond=None)[0] for i in range(A.shape[0])])
        err = np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)
        # ||x - x*|| / ||x*|| <= cond(R) cond(A R^-1)^2 tol, with cond(A R^-1) small for every row
        assert err.max() < max(1e3 * tol, 1e-12), (tol, err.max())
        assert iters.max() <= 40  # preconditioned: no dependence on cond(A_i) = 1e3
    np.testing.assert_allclose(cm.exact_rows(A, b), ref, rtol=1e-8, atol=1e-10)
    # the sketch of a row depends only on (seed, iteration, global row, column)
    S2 = cm.row_sketch(7, 1, np.arange(100, A.shape[0]), pidx[100:], pw[100:], 4 * k, 4)
    np.testing.assert_array_equal(cm.sketch_apply(S2, A[100:]), cm.sketch_apply(S, A)[100:])


def _run_layout(n_blocks, hosts, backend="local"):
    prob = cm.prepare(SPEC, n_blocks, backend, hosts)
    try:
        V0 = cm.init_factors(prob, seed=3)
        r = cm.alternate(prob, V0, "sketched", seed=3, iters=6)
        return r, cm.gather_u(prob) @ r["V"].T
    finally:
        prob.mat.close()


def test_independent_of_blocks_and_hosts():
    r1, M1 = _run_layout(1, 1)
    r2, M2 = _run_layout(7, 3)
    np.testing.assert_allclose(r2["error_per_iter"], r1["error_per_iter"], rtol=1e-6)
    np.testing.assert_allclose(M2, M1, rtol=1e-7, atol=1e-9)
    assert r1["inner_iterations_mean"] == pytest.approx(r2["inner_iterations_mean"])


def test_ray_actors_match_local(ray_instance):
    r_local, M_local = _run_layout(4, 2)
    r_ray, M_ray = _run_layout(4, 2, backend="ray")
    np.testing.assert_allclose(r_ray["error_per_iter"], r_local["error_per_iter"], rtol=1e-9)
    np.testing.assert_allclose(M_ray, M_local, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="fewer than k"):  # errors raised on actors arrive intact
        cm.prepare(cm.CompletionSpec(m=200, n=100, k=10, p=0.05), 2, "ray", 2)


def _compose(overrides):
    register_configs()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        return compose(config_name="job", overrides=overrides)


def test_cli_writes_results(tmp_path):
    cfg = _compose(
        [
            "job=completion",
            *COMMON,
            "job.m=600",
            "job.n=500",
            "job.k=5",
            "job.p=0.15",
            "job.iters=12",
        ]
    )
    res = run(cfg, str(tmp_path))
    disk = json.loads((tmp_path / "results.json").read_text())
    for key in ("error_per_iter", "full_error_per_iter", "time_per_iter", "rate", "comparison"):
        assert key in disk, key
    assert (disk["m"], disk["n"], disk["k"]) == (600, 500, 5) and abs(disk["p"] - 0.15) < 0.01
    assert disk["solver"] == "sketched" and set(disk["runs"]) == {"sketched", "exact"}
    assert len(disk["time_per_iter"]) == 12 and len(disk["error_per_iter"]) == 13
    assert res["rate"] < 0.35 and disk["comparison"]["final_error_exact"] < 1e-7
    assert (tmp_path / "completion.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "override, message",
    [
        ("job.solver=cg", "sketched"),
        ("job.p=0", "job.p"),
        ("job.k=500", "rank"),
        ("job.inner_tol=2", "inner_tol"),
    ],
)
def test_bad_config(override, message, tmp_path):
    with pytest.raises(Exception) as info:
        run(
            _compose(["job=completion", *COMMON, "job.m=600", "job.n=500", override]), str(tmp_path)
        )
    chain, e = "", info.value
    while e is not None:
        chain += str(e) + "\n"
        e = e.__cause__
    assert message in chain, chain
    assert not (tmp_path / "results.json").exists()


# files -----------------------------------------------------------------------------------------
def _low_rank(m=150, n=120, k=3, p=0.4, seed=1):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
    return M, rng.random((m, n)) < p


def _job(**kw) -> CompletionConfig:
    base = dict(source=Source.files, k=3, iters=25, blocks=3, compare=False)
    return CompletionConfig(**{**base, **kw})


def test_npy_with_mask(tmp_path):
    M, mask = _low_rank()
    np.save(tmp_path / "M.npy", M)
    np.save(tmp_path / "mask.npy", mask)
    job = _job(path=str(tmp_path / "M.npy"), mask_path=str(tmp_path / "mask.npy"))
    res, _ = cm.run_completion(job, 0, "local", 2, _bar())
    assert res["test_set"] == "unobserved entries" and res["observed"] == mask.sum()
    assert res["final_error"] < 1e-8 and res["full_error_per_iter"][-1] < 1e-8
    # NaN where nothing is observed: M is not known there, so entries are held out for testing
    M2 = M.copy()
    M2[~mask] = np.nan
    np.save(tmp_path / "M2.npy", M2)
    res2, _ = cm.run_completion(
        _job(path=str(tmp_path / "M2.npy"), mask_path=job.mask_path), 0, "local", 2, _bar()
    )
    assert res2["test_set"] == "0.1 of observed entries" and res2["full_error_per_iter"] is None
    assert res2["final_error"] < 1e-6


def test_npz_triplets(tmp_path):
    M, mask = _low_rank()
    r, c = np.nonzero(mask)
    np.savez(tmp_path / "t.npz", rows=r, cols=c, vals=M[r, c], shape=np.array(M.shape))
    res, draw = cm.run_completion(
        _job(path=str(tmp_path / "t.npz"), holdout=0.05), 0, "local", 2, _bar()
    )
    assert res["source"] == "npz" and (res["m"], res["n"]) == M.shape
    assert res["test_set"] == "0.05 of observed entries" and res["final_error"] < 1e-6


def test_bad_files(tmp_path):
    M, mask = _low_rank(m=40, n=30)
    np.save(tmp_path / "M.npy", M)
    np.save(tmp_path / "mask.npy", mask)
    np.save(tmp_path / "mask_T.npy", mask.T)
    Mnan = M.copy()
    Mnan[np.nonzero(mask)[0][5], np.nonzero(mask)[1][5]] = np.nan
    np.save(tmp_path / "Mnan.npy", Mnan)
    r, c = np.nonzero(mask)
    np.savez(tmp_path / "nokeys.npz", rows=r, cols=c)
    v = M[r, c].copy()
    v[3] = np.inf
    np.savez(tmp_path / "inf.npz", rows=r, cols=c, vals=v)
    np.savez(tmp_path / "dup.npz", rows=np.r_[r, r[:1]], cols=np.r_[c, c[:1]], vals=np.r_[v, v[:1]])
    p = str(tmp_path)
    cases = [
        (
            dict(path=p + "/missing.npy", mask_path=p + "/mask.npy"),
            FileNotFoundError,
            "does not exist",
        ),
        (dict(path=p + "/M.npy", mask_path=p + "/nomask.npy"), FileNotFoundError, "nomask.npy"),
        (dict(path=p + "/M.npy"), ValueError, "mask_path"),
        (dict(path=p + "/M.npy", mask_path=p + "/mask_T.npy"), ValueError, r"shape \(30, 40\)"),
        (dict(path=p + "/Mnan.npy", mask_path=p + "/mask.npy"), BlockError, "nan"),
        (dict(path=p + "/nokeys.npz"), ValueError, "missing arrays"),
        (dict(path=p + "/inf.npz"), BlockError, "inf"),
        (dict(path=p + "/dup.npz"), ValueError, "duplicate"),
        (dict(path=p + "/M.npy", mask_path=p + "/mask.npy", k=30), ValueError, "rank"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            cm.run_completion(_job(**kw), 0, "local", 2, _bar())


def test_too_few_observations_per_row_says_what_to_do():
    with pytest.raises(ValueError, match="fewer than k=10.*raise job.p"):
        cm.prepare(cm.CompletionSpec(m=200, n=100, k=10, p=0.05), 2, "local", 2)


def test_noise_floor_and_clipped_init():
    """With noisy observations the error decays to the noise level, then stays; the paper's
    clipped initialization (init_clip) converges too."""
    prob = cm.prepare(
        cm.CompletionSpec(m=600, n=500, k=5, p=0.15, noise=1e-3, cond=10.0), 4, "local", 2
    )
    try:
        for clip in (0.0, 3.0):
            r = cm.alternate(prob, cm.init_factors(prob, seed=0, clip=clip), "sketched", iters=12)
            e = np.asarray(r["error_per_iter"])
            assert 1e-5 < e[-1] < 2e-3 and e[-1] < 1e-2 * e[0]
            assert abs(e[-1] / e[-2] - 1) < 0.05  # at the floor
    finally:
        prob.mat.close()
