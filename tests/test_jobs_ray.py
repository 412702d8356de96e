"""The same jobs on real Ray actors (one Ray instance for the module, 2 CPUs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray  # a hard dependency: these tests always run
from hydra import compose, initialize_config_module  # noqa: E402

from flagstaff.jobs.blocks import DataSpec, RowBlockMatrix, residual_norm  # noqa: E402
from flagstaff.jobs.config import register_configs  # noqa: E402
from flagstaff.jobs.lstsq import sketch_and_precondition  # noqa: E402
from flagstaff.jobs.runner import run  # noqa: E402
from flagstaff.jobs.sketches import Sketch, sketch_matrix  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_blocks_equal_local_and_sketch_independent(tmp_path):
    spec = DataSpec(n=12000, d=12, kind="coherent", cond=1e4, seed=3)
    local = RowBlockMatrix.generate(spec, 1)
    remote = RowBlockMatrix.generate(spec, 6, backend="ray", hosts=2)
    try:
        # S [A b] summed over 6 blocks there, over 1 here: each entry is a length-n sum of
        # S_ik M_kj, and any order of summation is within gamma_n (|S| |M|)_ij of the exact sum
        # (gamma_n = n u / (1 - n u), Higham, Accuracy and Stability, eq. 3.5), so the two agree
        # to 2 gamma_n (|S| |M|)_ij; srdct's transform rounds less (log2 n levels, not n). A fixed
        # 1e-9 failed once at 1.28e-9: the entries of S [A b] are large (cond(A) = 1e4)
        M = np.column_stack([spec.rows(0, spec.n), spec.rhs(0, spec.n, spec.rows(0, spec.n))])
        u = np.finfo(np.float64).eps / 2
        gamma = spec.n * u / (1 - spec.n * u)
        for kind in ("countsketch", "srdct"):
            sk = Sketch.sized(kind, 48, seed=2)
            bound = 2 * gamma * (np.abs(sk.dense(spec.n)) @ np.abs(M))
            diff = np.abs(sketch_matrix(remote, sk, True) - sketch_matrix(local, sk, True))
            assert (diff <= bound).all(), (kind, float((diff / bound).max()))
        sol = sketch_and_precondition(remote, Sketch.sized("countsketch", 48, seed=1))
        ref = sketch_and_precondition(local, Sketch.sized("countsketch", 48, seed=1))
        # 1 block here, 6 blocks there: sums in different orders, so x agrees to the solver's
        # forward error (cond(A) = 7e4), not to the last bit; the residuals agree to 1e-12
        np.testing.assert_allclose(sol.x, ref.x, rtol=1e-7, atol=1e-12)
        assert abs(residual_norm(remote, sol.x) / residual_norm(local, ref.x) - 1) < 1e-12
    finally:
        remote.close()


def test_ray_memmap_shards(tmp_path):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3000, 5))
    b = rng.standard_normal(3000)
    paths, bpaths = [], []
    for i, (r0, r1) in enumerate([(0, 1000), (1000, 3000)]):
        paths.append(str(tmp_path / f"A{i}.npy"))
        bpaths.append(str(tmp_path / f"b{i}.npy"))
        np.save(paths[-1], A[r0:r1])
        np.save(bpaths[-1], b[r0:r1])
    mat = RowBlockMatrix.from_files(paths, bpaths, backend="ray", hosts=2)
    try:
        sol = sketch_and_precondition(mat, Sketch.sized("sparse_sign", 20, seed=0))
        np.testing.assert_allclose(sol.x, np.linalg.lstsq(A, b, rcond=None)[0], atol=1e-9)
    finally:
        mat.close()


@pytest.mark.parametrize(
    "name, extra",
    [
        ("lstsq", ["job.data.n=6000", "job.data.d=30", "job.plain_lsqr=false"]),
        (
            "rsvd",
            ["job.data.n=3000", "job.data.d=60", "job.k=5", "job.data.rank=5", "job.compare=false"],
        ),
    ],
)
def test_job_end_to_end_on_ray(name, extra, tmp_path):
    register_configs()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        cfg = compose(
            config_name="job",
            overrides=[f"job={name}", "backend=ray", "hosts=2", "progress=false", *extra],
        )
    res = run(cfg, str(tmp_path))
    assert ray.is_initialized()  # the module's Ray instance is reused, not shut down
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["backend"] == "ray" and on_disk["hosts"] == 2
    if name == "lstsq":
        assert res["residual_ratio"] - 1 < 1e-10
    else:
        assert len(res["singular_values"]) == 5 and res["frobenius_error"] > 0
