"""The convolutional simulation workloads (benchmarks/_workloads.py) are the same task everywhere:
the plain loop and Flower read the data, shards and initial model that Flagstaff's experiment
(``experiment=sim_resnet8`` / ``sim_cnn``) builds."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH_DIR) not in sys.path:  # opacus ships a `benchmarks` package that shadows ours
    sys.path.insert(0, str(BENCH_DIR))

import simulation  # noqa: E402
from _workloads import CNN, RESNET8, build_model, load_task, sample_clients  # noqa: E402

from flagstaff.system.specs import build_from  # noqa: E402
from tests.conftest import compose  # noqa: E402


@pytest.mark.parametrize("workload", [RESNET8, CNN], ids=lambda w: w.name)
def test_workload_is_the_experiment(workload) -> None:
    cfg = compose(*simulation.flagstaff_overrides(workload, "local"))
    ds = build_from(cfg.data)
    task = load_task(workload)
    assert torch.equal(ds.x_train, task.x_train) and torch.equal(ds.y_train, task.y_train)
    assert torch.equal(ds.x_test, task.x_test) and torch.equal(ds.y_test, task.y_test)
    parts = build_from(cfg.partition, labels=ds.y_train.numpy(), num_clients=cfg.num_clients)
    assert all(np.array_equal(a, b) for a, b in zip(parts, task.shards, strict=True))
    flagstaff = build_from(cfg.model, input_shape=ds.input_shape, num_classes=ds.num_classes)
    ours = build_model(workload, task.input_shape, task.num_classes)
    for (n, a), (_, b) in zip(flagstaff.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    c = cfg.client
    assert (c.lr, c.batch_size, c.epochs) == (workload.lr, workload.batch_size, 1)
    assert (cfg.num_clients, cfg.clients_per_round) == (
        workload.num_clients,
        workload.clients_per_round,
    )
    from flagstaff.system.server import sample_clients as flagstaff_sample

    for r in range(workload.rounds):  # the same clients in every round (Flagstaff counts from 0)
        want = flagstaff_sample(cfg.num_clients, cfg.clients_per_round, cfg.seed, r)
        assert np.array_equal(sample_clients(workload, r + 1), want)


def test_resnet8_workload_shape() -> None:
    task = load_task(RESNET8)
    assert task.input_shape == (3, 32, 32) and task.num_classes == 10
    assert [len(s) for s in task.shards] == [50] * 20  # 20 clients of 50 samples


@pytest.mark.slow
def test_resnet8_plain_and_flagstaff_local_learn_the_task() -> None:
    short = dataclasses.replace(RESNET8, rounds=3)
    plain = simulation.run_plain(short)
    ours = simulation.run_flagstaff(short, "local")
    assert plain.status == ours.status == "ok"
    assert plain.accuracy > 0.2 and ours.accuracy > 0.2  # chance: 0.1
