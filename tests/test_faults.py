"""Faults that must not lose a run: stragglers, lost hosts, rounds with no usable update, a killed
driver, a full disk, resource requests that cannot fit.

The fault-injection tests (``pytest -m faults``) run each fault of docs/cluster.md's fault table on
a real local Ray with 2 client hosts and assert the documented outcome.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from flagstaff.system.runner import train
from tests.conftest import ROOT, compose

#: two client hosts on a real local Ray; host 1 owns clients 5..9 of the smoke run's 10
RAY2 = ("experiment=smoke", "backend=ray", "cluster.hosts=2", "clients_per_round=10")


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _kill_host_after(ray, run: Path, rows: int, host: int, out: dict) -> threading.Thread:
    """A thread that kills client host ``host`` (as a crash would: Ray may restart it) shortly
    after ``rows`` rounds of ``run`` are logged, while the next round trains."""

    def kill() -> None:
        t_end = time.time() + 180
        while time.time() < t_end and len(_rows(run)) < rows:
            time.sleep(0.02)
        time.sleep(0.3)
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(f"flagstaff-host-{host}-"):
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                ray.kill(handle, no_restart=False)
                out["at"] = len(_rows(run))
                return

    th = threading.Thread(target=kill)
    th.start()
    return th


def _server(c: dict, stack: ExitStack):
    """The parameter server and Ray hosts of a validated config, as train() starts them."""
    from flagstaff.system.build import build_run
    from flagstaff.system.runner import start

    return start(build_run(c), stack).server


@pytest.fixture(scope="module")
def ray_custom():
    """A local Ray with a custom resource, to exercise the per-host resource request path."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        resources={"flagstaff_slot": 2},
        include_dashboard=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


def test_custom_resource_request_is_used(ray_custom, tmp_path) -> None:
    res = train(
        compose(
            "experiment=smoke",
            "backend=ray",
            "cluster.hosts=2",
            "+cluster.resources={flagstaff_slot: 1}",
        ),
        run_dir=str(tmp_path / "ok"),
    )
    assert res["hosts"] == 2 and res["accuracy"] > 0.3


def test_requests_that_cannot_fit_fail_before_work(ray_custom, tmp_path) -> None:
    with pytest.raises(RuntimeError, match="flagstaff_slot: need 3, cluster has 2"):
        train(
            compose(
                "experiment=smoke",
                "backend=ray",
                "cluster.hosts=3",
                "+cluster.resources={flagstaff_slot: 1}",
            ),
            run_dir=str(tmp_path / "x"),
        )
    with pytest.raises(RuntimeError, match="CPU: need 4"):
        train(
            compose(
                "experiment=smoke", "backend=ray", "cluster.hosts=2", "cluster.cpus_per_host=2"
            ),
            run_dir=str(tmp_path / "y"),
        )
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_gpu_request_without_gpus_is_refused_before_any_work(tmp_path) -> None:
    """Hosts that ask for GPUs where none exist are refused in one line before anything is
    written (issue 22 item 5; it used to fall back to CPU silently)."""
    from flagstaff.system.config import ConfigError

    with pytest.raises(ConfigError, match=r"cluster.gpus_per_host=0.5 asks for GPUs"):
        train(
            compose(
                "experiment=smoke", "backend=ray", "cluster.hosts=2", "cluster.gpus_per_host=0.5"
            ),
            run_dir=str(tmp_path / "run"),
        )
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.faults
def test_straggler_past_the_deadline_is_dropped_and_counted(ray_custom, tmp_path) -> None:
    over = (
        "experiment=smoke",
        "backend=ray",
        "cluster.hosts=2",
        "clients_per_round=10",
        "cluster.round_deadline_s=1.5",
        "cluster.slow_hosts=[0,4.0]",
    )
    res = train(compose(*over), run_dir=str(tmp_path))
    rows = res["metrics"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["dropped_late"] == 5 for r in rows)  # host 1 owns clients 5..9
    assert all(r["round_time_s"] < 4.0 for r in rows)  # nobody waited for the straggler
    assert res["accuracy"] > 0.3


# -- rounds with no usable update (issue 19 item 5) ---------------------------------------------


@pytest.mark.faults
@pytest.mark.parametrize(
    "reduce",
    [True, pytest.param(False, marks=pytest.mark.slow)],  # same stop; per-client replies path
    ids=["host_reduce", "per_client"],
)
def test_every_client_late_stops_the_run_with_a_checkpoint(ray_custom, tmp_path, reduce) -> None:
    """No host replies before the deadline: each round is skipped (a line and a metrics field),
    and 3 such rounds in a row stop the run with an error naming the late clients and the fix."""
    over = (
        *RAY2,
        "rounds=8",
        "cluster.round_deadline_s=1",
        "cluster.slow_hosts=[3,3]",
        f"cluster.host_reduce={str(reduce).lower()}",
    )
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="3 rounds in a row") as err:
        train(compose(*over), run_dir=str(run))
    msg = str(err.value)
    assert (
        "late" in msg
        and "cluster.round_deadline_s" in msg
        and "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in msg
    )
    rows = _rows(run)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all("round_deadline_s" in r["skipped"] and r["dropped_late"] == 10 for r in rows)
    assert all(r["skipped_clients"] == {"late": list(range(10))} for r in rows)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["round"] == 3  # nothing is lost: the run resumes from where it stopped
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "no usable update"


def test_nonfinite_updates_stop_the_cli_with_a_clear_error(tmp_path) -> None:
    """client.lr=nan: every update is non-finite; the CLI says so per round and stops non-zero."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "flagstaff.launch.train",
        "experiment=smoke",
        "rounds=6",
        "client.lr=nan",
    ]
    p = subprocess.run(
        [*cmd, f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode != 0 and "done:" not in p.stdout
    for r in (1, 2, 3):
        assert f"round {r} skipped" in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "non-finite" in last and "client.lr" in last and "Traceback" not in p.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["round"] == 3


def test_skipped_rounds_do_not_stop_when_the_limit_is_off(tmp_path) -> None:
    over = ("experiment=smoke", "rounds=4", "client.lr=nan", "cluster.max_skipped_rounds=0")
    res = train(compose(*over), run_dir=str(tmp_path))
    assert [bool(r.get("skipped")) for r in res["metrics"]] == [True] * 4
    assert "non-finite" in res["metrics"][0]["skipped"]


# -- a host lost for good (issue 19 item 4) -------------------------------------------------------


@pytest.mark.faults
def test_host_lost_for_good_run_completes_on_the_survivor(ray_custom, tmp_path) -> None:
    """max_restarts=0: the killed host never comes back; its clients move to the surviving host
    (their shards are in the object store) and train in the same round: nothing is lost."""
    over = (*RAY2, "rounds=6", "cluster.slow_hosts=[0,1.0]", "cluster.max_restarts=0")
    run = tmp_path / "run"
    killed: dict = {}
    th = _kill_host_after(ray_custom, run, 2, 1, killed)
    res = train(compose(*over), run_dir=str(run))
    th.join()
    assert "at" in killed, "the test did not find the host actor to kill"
    rows = res["metrics"]
    assert [r["round"] for r in rows] == list(range(1, 7))
    assert [r.get("lost_hosts") for r in rows].count([1]) == 1
    assert all(r["dropped_failed"] == 0 and r["clients"] == 10 for r in rows)
    assert res["lost_hosts"] == [1] and res["lost_state_clients"] == []  # FedAvg keeps no state
    assert torch.load(run / "checkpoint.pt", weights_only=True)["round"] == 6
    undisturbed = ("experiment=smoke", "cluster.hosts=2", "clients_per_round=10", "rounds=6")
    clean = train(compose(*undisturbed, "backend=local"), run_dir=str(tmp_path / "clean"))
    assert torch.equal(res["params"], clean["params"])


@pytest.mark.faults
def test_host_lost_before_a_checkpoint_names_the_lost_client_state(ray_custom) -> None:
    """The checkpoint step gathers per-client state from the hosts; a dead host's state is gone:
    the checkpoint is written anyway and names exactly which clients' state was lost."""
    from flagstaff.system.build import validate

    c = validate(compose(*RAY2, "strategy=scaffold", "cluster.max_restarts=0"))
    with ExitStack() as stack:
        server = _server(c, stack)
        server.round(0)
        before = server.state_dict()["clients"]
        ray_custom.kill(server.pool.actors[1])
        state = server.state_dict()["clients"]  # must not fail
        assert state["client_ids"].tolist() == list(range(10))
        assert torch.equal(state["c_i"][:5], before["c_i"][:5])
        assert not state["c_i"][5:].any() and before["c_i"][5:].any()  # host 1's c_i: lost
        report = server.faults()
        assert report["lost_hosts"] == [1] and report["lost_state_clients"] == [5, 6, 7, 8, 9]
        assert report["lost_state"] == ["c_i"]
        m = server.round(1)  # the survivor trains all 10 clients
        assert m["lost_hosts"] == [1] and m["lost_state_clients"] == [5, 6, 7, 8, 9]
        assert m["clients"] == 10 and m["dropped_failed"] == 0 and not m.get("skipped")


@pytest.mark.faults
@pytest.mark.slow
def test_host_lost_with_privacy_accountants_drops_its_clients_for_good(ray_custom, caplog) -> None:
    """DP-SGD clients whose accountants died with their host cannot train again without
    under-counting epsilon: they are dropped, with a line per round, and stay out after resume."""
    from flagstaff.system.build import validate

    over = (*RAY2, "client=dpsgd_batched", "cluster.max_restarts=0")
    c = validate(compose(*over))
    caplog.set_level(logging.WARNING)
    with ExitStack() as stack:
        server = _server(c, stack)
        server.round(0)
        ray_custom.kill(server.pool.actors[1])
        for r in (1, 2):
            m = server.round(r)
            assert m["dropped_failed"] == 5 and not m.get("skipped")
            assert f"round {r + 1}: clients [5, 6, 7, 8, 9] dropped" in caplog.text
        state = server.state_dict()
        assert state["faults"]["out_of_run"] == [5, 6, 7, 8, 9]
    with ExitStack() as stack:  # a resumed run keeps them out
        server = _server(c, stack)
        server.load_state_dict(state)
        assert server.round(3)["dropped_failed"] == 5


def _local_hosts(*over: str):
    """The two in-process client hosts (and server) of a validated backend=local config."""
    from flagstaff.system.build import validate

    c = validate(compose("experiment=smoke", "cluster.hosts=2", "clients_per_round=10", *over))
    with ExitStack() as stack:
        server = _server(c, stack)
        return server, server.pool.hosts


def test_a_host_takes_over_a_lost_hosts_clients_and_trains_them_the_same() -> None:
    """ClientHost.adopt: the clients of another host's shard train on this host exactly as they
    did there; their per-client state starts from zero; a second adopt is a no-op."""
    server, (h0, h1) = _local_hosts("strategy=scaffold")
    assert h0.state_kinds() == ["c_i"]
    params, bcast = server.params, server.strategy.broadcast(server.params, server.state)
    there = h1.train(params, [5, 7, 9], 0, bcast)
    assert h0.adopt(h1.shard) == [5, 6, 7, 8, 9] and h0.adopt(h1.shard) == []
    assert not h0.state_dict()["c_i"][5:].any()
    here = h0.train(params, [5, 7, 9], 0, bcast)
    assert torch.equal(here.updates, there.updates)
    assert h0.train(params, [1, 8], 0, bcast).client_ids.tolist() == [1, 8]


def test_private_clients_do_not_move_and_plain_ones_keep_no_state() -> None:
    _, (h0, h1) = _local_hosts()
    assert h0.state_kinds() == []  # FedAvg with SGD: nothing per client is lost with a host
    _, (d0, d1) = _local_hosts("client=dpsgd_batched")
    assert d0.state_kinds() == ["privacy accountant"]
    with pytest.raises(ValueError, match="accountants cannot move"):
        d0.adopt(d1.shard)


# -- a killed driver, a full disk (issue 19 item 10) ----------------------------------------------


@pytest.mark.faults
@pytest.mark.parametrize(
    "every",
    [1, pytest.param(50, marks=pytest.mark.slow)],  # the default suite keeps one driver kill
    ids=["after_first_checkpoint", "before_first_checkpoint"],
)
def test_killed_driver_resumes_to_identical_parameters(tmp_path, every) -> None:
    """SIGKILL the driver of a 2-host Ray run mid-run; rerun with resume=true: the same final
    parameters as an undisturbed run, and every round once in metrics.jsonl."""
    over = [*RAY2, "rounds=12", f"checkpoint_every={every}", "client.epochs=3"]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "flagstaff.launch.train", *over, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(_rows(run)) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= len(_rows(run)) < 12, "the kill must land mid-run"
    p = subprocess.run(cmd + ["resume=true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] >= (3 if every == 1 else 0)
    assert [r["round"] for r in _rows(run)] == list(range(1, 13))
    resumed = torch.load(run / "checkpoint.pt", weights_only=True)["params"]
    undisturbed = [o for o in over if o != "backend=ray"]  # local == ray, bit for bit (tested)
    clean = train(compose(*undisturbed, "backend=local"), run_dir=str(tmp_path / "clean"))
    assert torch.equal(resumed, clean["params"])


def _namespace_prefix() -> list[str]:
    """How to get a private mount namespace here (to mount a small tmpfs), or skip."""
    if shutil.which("unshare") is None:
        pytest.skip("disk-full test needs unshare(1) to mount a private tmpfs")
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-Urm"]
    probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/mnt"])
    if probe.returncode != 0:
        pytest.skip("cannot mount a private tmpfs here (no user namespaces)")
    return prefix


@pytest.mark.faults
@pytest.mark.slow
def test_disk_full_says_so_and_keeps_the_last_checkpoint(tmp_path) -> None:
    """A real full disk: the run directory is on a 4 MiB tmpfs (private mount namespace) that a
    filler fills once the first checkpoint is written; the run stops with a clear message and the
    checkpoint it had is intact and loadable."""
    prefix = _namespace_prefix()
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    over = " ".join([*RAY2, "rounds=12", "checkpoint_every=2", "cluster.slow_hosts=[0.5,0.5]"])
    script = f"""
mount -t tmpfs -o size=4m tmpfs {mnt} || exit 90
{sys.executable} -m launch.train {over} hydra.run.dir={mnt}/run >{out}.stdout 2>{out}.stderr &
pid=$!
for i in $(seq 2400); do [ -f {mnt}/run/checkpoint.pt ] && break; sleep 0.05; done
dd if=/dev/zero of={mnt}/fill bs=4k 2>/dev/null
wait $pid; rc=$?
rm -f {mnt}/fill; cp -r {mnt}/run {out}; exit $rc
"""
    p = subprocess.run([*prefix, "sh", "-c", script], cwd=ROOT, timeout=400)
    stderr = Path(f"{out}.stderr").read_text()
    assert p.returncode not in (0, 90), stderr[-3000:]
    # the run's own message (a raw OSError says "No space left on device")
    assert re.search(r"no space left on (?!device)", stderr, re.I), stderr[-3000:]
    assert "intact" in stderr
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["round"] >= 2 and ck["round"] % 2 == 0


# -- a node that never comes back (last in this module: it replaces the module's Ray) -------------


@pytest.fixture
def two_worker_nodes():
    """A real 3-node Ray on this machine: a head without a worker slot and two worker nodes with
    one slot each, so a host whose node is removed has nowhere to restart."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, resources={"worker_slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False)
    yield ray, cluster, workers
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.faults
@pytest.mark.slow
def test_node_that_never_comes_back_run_completes(two_worker_nodes, tmp_path) -> None:
    """Host 1's node is removed and no other node can hold it: Ray cannot restart it, so after
    cluster.restart_timeout_s its clients move to host 0 and the round goes on: nothing is lost."""
    ray, cluster, workers = two_worker_nodes
    over = (
        *RAY2,
        "rounds=6",
        "+cluster.resources={worker_slot: 1}",
        "cluster.restart_timeout_s=3",
        "cluster.slow_hosts=[0.5,0.5]",
    )
    run, removed = tmp_path / "run", {}

    def remove_host_1_node() -> None:
        t_end = time.time() + 180
        while time.time() < t_end and len(_rows(run)) < 2:
            time.sleep(0.02)
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("flagstaff-host-1-"):
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                node = ray.get(handle.node_id.remote())
                victim = next(w for w in workers if w.node_id == node)
                cluster.remove_node(victim, allow_graceful=False)
                removed["at"] = len(_rows(run))
                return

    th = threading.Thread(target=remove_host_1_node)
    th.start()
    res = train(compose(*over), run_dir=str(run))
    th.join()
    assert "at" in removed, "the test did not find host 1's node"
    rows = res["metrics"]
    assert [r["round"] for r in rows] == list(range(1, 7))
    assert [r.get("lost_hosts") for r in rows].count([1]) == 1
    assert all(r["dropped_failed"] == 0 and r["clients"] == 10 for r in rows)
    undisturbed = ("experiment=smoke", "cluster.hosts=2", "clients_per_round=10", "rounds=6")
    clean = train(compose(*undisturbed, "backend=local"), run_dir=str(tmp_path / "clean"))
    assert torch.equal(res["params"], clean["params"])
