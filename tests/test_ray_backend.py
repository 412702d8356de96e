"""End to end on a real local Ray: 2 client-host actors + the parameter server (in the driver, or
an actor with cluster.server=actor)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from flagstaff.system.runner import server_placement, train
from tests.conftest import compose


def test_ray_two_hosts_equals_local(ray_session, tmp_path) -> None:
    over = ("experiment=smoke", "rounds=4", "clients_per_round=6", "cluster.hosts=2")
    ray_res = train(compose(*over, "backend=ray"), run_dir=str(tmp_path / "ray"))
    local_res = train(compose(*over, "backend=local"), run_dir=str(tmp_path / "local"))
    assert torch.equal(ray_res["params"], local_res["params"])
    assert ray_res["accuracy"] == local_res["accuracy"] > 0.3
    assert (tmp_path / "ray" / "checkpoint.pt").exists()
    actor = train(
        compose(*over, "backend=ray", "cluster.server=actor"), run_dir=str(tmp_path / "a")
    )
    assert torch.equal(actor["params"], local_res["params"])  # same numbers wherever it runs


def test_server_placement_rule() -> None:
    assert server_placement({"address": None, "server": "auto"}) == "driver"
    assert server_placement({"address": "auto", "server": "auto"}) == "driver"
    assert server_placement({"address": "ray://head:10001", "server": "auto"}) == "actor"
    assert server_placement({"address": "ray://head:10001", "server": "driver"}) == "driver"
    assert server_placement({"address": None, "server": "actor"}) == "actor"


@pytest.mark.faults
def test_host_killed_mid_run_is_restarted_and_nothing_is_lost(ray_session, tmp_path) -> None:
    """ray.kill a host while the run goes on: Ray restarts it, its clients are retried."""
    # host 1 takes >= 1 s per round, so a kill shortly after a round ends lands mid-round
    over = (
        "experiment=smoke",
        "rounds=6",
        "clients_per_round=10",
        "cluster.hosts=2",
        "backend=ray",
        "cluster.slow_hosts=[0,1.0]",
    )
    killed = {}

    def killer() -> None:
        metrics = tmp_path / "run" / "metrics.jsonl"
        t_end = time.time() + 120
        while time.time() < t_end:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                time.sleep(0.3)
                break
            time.sleep(0.02)
        for actor in ray_session.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("flagstaff-host-1"):
                handle = ray_session.get_actor(actor["name"], namespace=actor["namespace"])
                ray_session.kill(handle, no_restart=False)
                killed["at"] = len(metrics.read_text().splitlines())
                return

    th = threading.Thread(target=killer)
    th.start()
    res = train(compose(*over), run_dir=str(tmp_path / "run"))
    th.join()
    assert "at" in killed, "the test did not find the host actor to kill"
    rows = res["metrics"]
    assert [r["round"] for r in rows] == list(range(1, 7))
    assert any(r.get("retried_hosts") == [1] for r in rows)
    assert all(r["dropped_failed"] == 0 for r in rows)
    # retried clients redo the same seeded work: the result equals an undisturbed run
    clean = train(compose(*over[:4], "backend=local"), run_dir=str(tmp_path / "clean"))
    assert torch.equal(res["params"], clean["params"])
