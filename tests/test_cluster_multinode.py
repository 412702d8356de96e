"""A real 3-node Ray cluster on this machine (ray.cluster_utils.Cluster): hosts spread over nodes,
same result as a single node; a node removed mid-run does not lose the run."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from flagstaff.system.runner import train
from tests.conftest import compose


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=2, resources={"worker_slot": 2}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, configure_logging=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def test_hosts_spread_over_three_nodes_and_match_single_node(cluster, tmp_path) -> None:
    over = ("experiment=smoke", "rounds=3", "clients_per_round=9", "cluster.hosts=3")
    multi = train(
        compose(*over, "backend=ray", "cluster.placement=spread"), run_dir=str(tmp_path / "multi")
    )
    assert len(set(multi["host_nodes"])) == 3
    single = train(compose(*over, "backend=local"), run_dir=str(tmp_path / "single"))
    assert torch.equal(multi["params"], single["params"])


def test_node_removed_mid_run_hosts_move_and_nothing_is_lost(cluster, tmp_path) -> None:
    c, workers = cluster
    over = (
        "experiment=smoke",
        "rounds=8",
        "clients_per_round=10",
        "cluster.hosts=2",
        "backend=ray",
        "cluster.placement=spread",
        "client.epochs=3",
        "+cluster.resources={worker_slot: 1}",
        # rounds of at least 0.5 s: the node removal (after round 2) lands while rounds remain,
        # however fast training is
        "cluster.slow_hosts=[0.5,0.5]",
    )
    # only the worker nodes offer the custom resource, so both hosts live on worker nodes
    removed = {}

    def remove_a_worker() -> None:
        metrics = tmp_path / "run" / "metrics.jsonl"
        t_end = time.time() + 120
        while time.time() < t_end:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
        victim = next(w for w in workers if w in c.worker_nodes)
        removed["node"] = victim.node_id
        c.remove_node(victim, allow_graceful=False)

    th = threading.Thread(target=remove_a_worker)
    th.start()
    res = train(compose(*over), run_dir=str(tmp_path / "run"))
    th.join()
    rows = res["metrics"]
    assert "node" in removed
    assert [r["round"] for r in rows] == list(range(1, 9))
    assert any(r.get("retried_hosts") for r in rows) or any(r["dropped_failed"] for r in rows)
