"""Evaluation on the client hosts (issue 21 item 4, system/eval.py): the test set split across the
hosts equals the single-process evaluation; natural partitions get per-client accuracies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flagstaff.system.build import build_run
from flagstaff.system.eval import EvalPart, combine, eval_shards, holdout, slice_test_set
from flagstaff.system.host import ClientHost, HostShard
from flagstaff.system.runner import train
from flagstaff.system.server import evaluate_model
from tests.conftest import compose


def _reference(cfg, params: torch.Tensor) -> dict[str, float]:
    """The single-process evaluation (``evaluate_model``) of ``params`` for the run of ``cfg``."""
    run = build_run(cfg)
    ds, fed = run.data, run.federated
    return evaluate_model(fed.model, fed.spec, params, ds.x_test, ds.y_test, ds.num_classes)


def _same(got: dict, ref: dict) -> None:
    assert got["accuracy"] == ref["accuracy"]  # integer counts: exactly equal
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # float summation order only


def test_slices_and_holdout_are_partitions() -> None:
    sl = slice_test_set(10, 3)
    assert [(s.start, s.stop) for s in sl] == [(0, 3), (3, 6), (6, 10)]
    assert [s.stop - s.start for s in slice_test_set(2, 3)] == [0, 1, 1]
    parts = [np.arange(0, 20), np.arange(20, 21), np.arange(21, 26)]
    train_p, held = holdout(parts, seed=3)
    assert [len(h) for h in held] == [2, 0, 1]  # 10%, none for a 1-sample client, one at least
    for p, t, h in zip(parts, train_p, held, strict=True):
        assert np.array_equal(np.sort(np.concatenate([t, h])), p) and not set(t) & set(h)
    again = holdout(parts, seed=3)[1]
    assert all(np.array_equal(a, b) for a, b in zip(held, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(held, holdout(parts, 4)[1], strict=True))


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_hosts_sums_equal_single_process_evaluation(hosts: int) -> None:
    """ClientHost.evaluate on each host's slice, added by ``combine``: evaluate_model's numbers."""
    cfg = compose("experiment=smoke", "model=cnn", "data.image=true")
    run = build_run(cfg)
    ds, fed = run.data, run.federated
    params = fed.spec.flatten(dict(fed.model.named_parameters())).detach()
    params = params + 0.05 * torch.randn(params.shape, generator=torch.Generator().manual_seed(0))
    owner = (np.arange(len(run.parts)) * hosts) // len(run.parts)
    evals = eval_shards(ds.x_test, ds.y_test, owner, hosts, ds.x_train, ds.y_train)
    parts = []
    for h, ev in enumerate(evals):
        ids = np.flatnonzero(owner == h)
        sizes = np.array([len(run.parts[c]) for c in ids])
        x = torch.cat([ds.x_train[run.parts[c]] for c in ids])
        y = torch.cat([ds.y_train[run.parts[c]] for c in ids])
        shard = HostShard(ids, np.cumsum(sizes) - sizes, sizes, x, y, None, ev)
        parts.append(ClientHost(h, shard, fed.host).evaluate(params))
    assert sum(p.count for p in parts) == len(ds.y_test)
    ref = evaluate_model(fed.model, fed.spec, params, ds.x_test, ds.y_test, ds.num_classes)
    _same(combine(parts, ds.num_classes), ref)


@pytest.mark.parametrize("hosts", [1, 2])
def test_local_run_evaluates_on_hosts_as_one_process_would(tmp_path, hosts: int) -> None:
    cfg = compose("experiment=smoke", "rounds=2", f"cluster.hosts={hosts}")
    res = train(cfg, run_dir=str(tmp_path))
    _same(res["metrics"][-1], _reference(cfg, res["params"]))
    assert "accuracy_client_mean" not in res["metrics"][-1]  # iid: no per-client held-out data


def test_ray_run_evaluates_on_hosts_as_one_process_would(ray_session, tmp_path) -> None:
    for hosts in (1, 2):
        cfg = compose("experiment=smoke", "rounds=2", "backend=ray", f"cluster.hosts={hosts}")
        res = train(cfg, run_dir=str(tmp_path / str(hosts)))
        _same(res["metrics"][-1], _reference(cfg, res["params"]))


def _natural(*over: str):
    # digits split by label: one client per class (partition=natural on a per-sample column)
    return compose(
        "experiment=smoke", "partition=natural", "partition.key=label", "num_clients=10",
        "rounds=2", "eval_every=2", *over,
    )  # fmt: skip


def test_natural_partition_writes_the_per_client_accuracy_distribution(tmp_path) -> None:
    cfg = _natural("cluster.hosts=2")
    res = train(cfg, run_dir=str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy_client_mean" not in rows[0] and "accuracy" not in rows[0]  # no eval round
    last = rows[-1]
    run = build_run(cfg)
    ds, fed = run.data, run.federated
    _, held = holdout(run.parts, int(cfg.seed))
    acc = np.array(
        [
            evaluate_model(fed.model, fed.spec, res["params"], ds.x_train[h], ds.y_train[h], 10)[
                "accuracy"
            ]
            for h in held
        ]
    )
    assert last["accuracy_client_mean"] == pytest.approx(acc.mean(), abs=1e-12)
    assert last["accuracy_client_p10"] == pytest.approx(np.percentile(acc, 10), abs=1e-12)
    assert last["accuracy_client_worst"] == pytest.approx(acc.min(), abs=1e-12)
    assert last["accuracy_client_worst"] <= last["accuracy_client_p10"]
    assert last["accuracy_client_p10"] <= last["accuracy_client_mean"]
    _same(last, _reference(cfg, res["params"]))


def test_held_out_samples_are_not_trained_on(tmp_path) -> None:
    """The natural partition's held-out share stays out of the hosts' training data, and the
    result does not depend on the host layout."""
    one = train(_natural("cluster.hosts=1"), run_dir=str(tmp_path / "one"))
    two = train(_natural("cluster.hosts=2"), run_dir=str(tmp_path / "two"))
    assert torch.equal(one["params"], two["params"])
    for k in ("accuracy", "accuracy_client_mean", "accuracy_client_worst"):
        assert one["metrics"][-1][k] == two["metrics"][-1][k]
    run = build_run(_natural())
    train_p, held = holdout(run.parts, 0)
    from flagstaff.system.runner import _start_local

    stepper = _start_local(run)
    try:
        shard = stepper.server.pool.hosts[0].shard
        assert np.array_equal(shard.sizes, [len(p) for p in train_p])
        assert int(shard.sizes.sum()) == sum(len(p) for p in run.parts) - sum(map(len, held))
    finally:
        stepper.close()


@pytest.mark.parametrize(
    "dp",
    [("client=dpsgd",), ("strategy=dp_fedavg", "sampling=bernoulli")],
    ids=["sample-level", "client-level"],
)
def test_dp_runs_do_not_write_per_client_accuracies(tmp_path, dp) -> None:
    """Per-client accuracies are not covered by epsilon (docs/privacy.md): not written under DP."""
    res = train(_natural(*dp, "rounds=1", "eval_every=1"), run_dir=str(tmp_path))
    last = res["metrics"][-1]
    assert "accuracy" in last and not any(k.startswith("accuracy_client") for k in last)


def test_combine_drops_clients_without_held_out_samples() -> None:
    part = EvalPart(3, 1.5, 4, np.array([0, 2]), np.array([1, 2]), np.array([2, 4]))
    empty = EvalPart(1, 0.5, 1, np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64))
    out = combine([part, empty], 10)
    assert out["accuracy"] == 4 / 5 and out["loss"] == 2.0 / 5
    assert out["accuracy_client_mean"] == 0.5 and out["accuracy_client_worst"] == 0.5
    assert "accuracy_client_mean" not in combine([empty], 10)


def test_a_host_that_takes_over_a_lost_hosts_clients_evaluates_its_slice_too() -> None:
    """A lost host's test slice and held-out samples move with its shard (``ClientHost.adopt``),
    so the survivor's sums still cover the whole test set and every client."""
    cfg = _natural()
    run = build_run(cfg)
    ds, fed = run.data, run.federated
    train_p, held = holdout(run.parts, 0)
    owner = (np.arange(10) * 2) // 10
    evals = eval_shards(ds.x_test, ds.y_test, owner, 2, ds.x_train, ds.y_train, held)
    shards = []
    for h in range(2):
        ids = np.flatnonzero(owner == h)
        sizes = np.array([len(train_p[c]) for c in ids])
        x = torch.cat([ds.x_train[train_p[c]] for c in ids])
        y = torch.cat([ds.y_train[train_p[c]] for c in ids])
        shards.append(HostShard(ids, np.cumsum(sizes) - sizes, sizes, x, y, None, evals[h]))
    params = fed.spec.flatten(dict(fed.model.named_parameters())).detach()
    both = [ClientHost(h, shards[h], fed.host).evaluate(params) for h in range(2)]
    survivor = ClientHost(0, shards[0], fed.host)
    assert survivor.adopt(shards[1]) == list(range(5, 10))
    alone = survivor.evaluate(params)
    assert alone.count == len(ds.y_test) and alone.client_ids.tolist() == list(range(10))
    assert combine([alone], 10) == pytest.approx(combine(both, 10), rel=1e-6)


def test_femnist_by_writer_scores_held_out_images_normalized(tmp_path) -> None:
    """FEMNIST's layout (uint8 images, a per-step transform, one client per writer): the held-out
    images are normalized without augmentation on the hosts, and the distribution is written."""
    from tests.test_hf_data import make_femnist

    root = make_femnist(tmp_path / "femnist", writers=6, per_writer=12)
    cfg = compose("experiment=smoke", "data=femnist", f"data.path={root}", "model=mlp",
                  "partition=natural", "num_clients=6", "clients_per_round=3", "rounds=1",
                  "cluster.hosts=2")  # fmt: skip
    res = train(cfg, run_dir=str(tmp_path / "run"))
    last = res["metrics"][-1]
    run = build_run(cfg)
    ds, fed = run.data, run.federated
    held = holdout(run.parts, 0)[1]
    acc = [
        evaluate_model(
            fed.model,
            fed.spec,
            res["params"],
            ds.transform(ds.x_train[h]),
            ds.y_train[h],
            ds.num_classes,
        )["accuracy"]
        for h in held
    ]
    assert last["accuracy_client_mean"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert last["accuracy_client_worst"] == pytest.approx(min(acc), abs=1e-12)
    _same(last, _reference(cfg, res["params"]))
