"""Launch files: the Ray cluster YAML, the Slurm script's Ray commands, token authentication."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests._procs import command, descendants, wait_gone
from tests.conftest import ROOT

BIN = str(Path(sys.executable).parent)


def test_cluster_yaml_is_valid_for_ray_up() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "launch" / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert (
        types["gpu_worker"]["resources"]["GPU"] >= 1
        and "GPU" not in types["cpu_worker"]["resources"]
    )
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts
    assert any("constraints.txt" in c for c in cfg["setup_commands"])


def test_slurm_script_parses() -> None:
    for name in ("slurm.sbatch", "ray_env.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "launch" / name)], check=True)


def test_joining_a_cluster_needs_a_token_unless_require_auth_is_false(
    monkeypatch, tmp_path, caplog
) -> None:
    from flagstaff.system.config import ConfigError
    from flagstaff.system.ray_start import check_cluster_auth

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    check_cluster_auth({"address": None})  # a local Ray has its own token
    for cl in ({"address": "auto"}, {"address": "head:6379", "require_auth": True}):
        with pytest.raises(ConfigError, match="cluster.require_auth=false"):
            check_cluster_auth(cl)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN"):
        check_cluster_auth({"address": "auto"})
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    check_cluster_auth({"address": "auto"})
    monkeypatch.delenv("RAY_AUTH_MODE")
    with caplog.at_level("WARNING", logger="flagstaff"):
        check_cluster_auth({"address": "auto", "require_auth": False})
    assert "without token authentication" in caplog.text


def test_cluster_address_without_token_exits_with_one_line(tmp_path) -> None:
    """flagstaff-train cluster.address=... with no token set up: exit 2 with one line that says
    what to set, before any work (no traceback, nothing trained)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "flagstaff.launch.train",
            "experiment=smoke",
            "backend=ray",
            "cluster.address=127.0.0.1:9",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env={**env, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[-1].startswith("error: cluster.address=127.0.0.1:9: Ray token authentication")
    assert "cluster.require_auth=false" in lines[-1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _sh(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script],
        env=env,
        cwd=env["WORKDIR"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _refused(probe: str, env: dict[str, str], timeout: float = 60) -> bool:
    """True once the GCS answers the client with an authentication error (Ray retries ~20 s)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", probe],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        for line in proc.stdout:  # type: ignore[union-attr]
            if "InvalidAuthToken" in line:
                return True
            if line.startswith("nodes") or time.monotonic() > deadline:
                return False
        return False
    finally:
        proc.kill()
        proc.wait()


def test_slurm_ray_commands_start_an_authenticated_cluster(tmp_path) -> None:
    """Run launch/ray_env.sh's start_head/start_worker on this machine, as the Slurm job would:
    a client without the job's token is refused; flagstaff-train with it trains on the cluster;
    stop_ray then leaves no process of the two starts behind (GCS, raylets, dashboard and its
    modules, monitors, the Ray Client server, agents, workers)."""
    job = str(50000 + os.getpid() % 9000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        SLURM_JOB_ID=job,
        WORKDIR=str(tmp_path),
        RAY_PYTHON_BIN=BIN,
        FLAGSTAFF_RAY_TMP=f"/tmp/ray-fs-test-{job}",
        FLAGSTAFF_TOKEN_DIR=str(tmp_path / "tokens"),
        PATH=f"{BIN}:{env['PATH']}",
    )
    src = f"set -e; source {ROOT}/launch/ray_env.sh; "
    worker_ports = (
        "FLAGSTAFF_NODE_MANAGER_PORT=$((FLAGSTAFF_RAY_PORT+101)) "
        "FLAGSTAFF_OBJECT_MANAGER_PORT=$((FLAGSTAFF_RAY_PORT+102)) "
        "FLAGSTAFF_MIN_WORKER_PORT=$((FLAGSTAFF_RAY_PORT+110)) "
        "FLAGSTAFF_MAX_WORKER_PORT=$((FLAGSTAFF_RAY_PORT+130))"
    )
    started: dict[int, int] = {}
    try:
        head = _sh(src + "start_head 127.0.0.1 1 0", env)
        assert head.returncode == 0, head.stderr[-2000:]
        # a second node on the same machine needs its own node ports
        worker = _sh(src + f"export {worker_ports}; start_worker 127.0.0.1 1 0", env)
        assert worker.returncode == 0, worker.stderr[-2000:]
        addr = f"127.0.0.1:{int(job) % 500 * 20 + 20000}"
        probe = f"import ray; ray.init(address='{addr}'); print('nodes', len(ray.nodes()))"
        wrong = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
        assert _refused(probe, wrong)
        ok = _sh(src + f'{sys.executable} -c "{probe}"', env)
        assert ok.returncode == 0 and "nodes 2" in ok.stdout, ok.stderr[-2000:]
        train = _sh(
            src + f"{sys.executable} -m launch.train experiment=smoke backend=ray "
            f"cluster=ray_cluster cluster.address={addr} cluster.require_auth=true "
            f"cluster.hosts=2 hydra.run.dir={tmp_path / 'run'}",
            {**env, "WORKDIR": str(ROOT)},
            timeout=300,
        )
        assert train.returncode == 0, train.stderr[-3000:]
        summary = yaml.safe_load((tmp_path / "run" / "summary.json").read_text())
        assert len(set(summary["host_nodes"])) == 2  # one host on each node
        started = _started_by(env["FLAGSTAFF_RAY_TMP"], addr.split(":")[1])
        names = " ".join(command(p) for p in started)
        assert names.count("raylet") >= 2 and "ray.util.client.server" in names, names
    finally:
        stop = _sh(src + "stop_ray", env)
    assert stop.returncode == 0, stop.stderr[-2000:]
    left = wait_gone(started, timeout_s=5)
    assert not left, [command(p)[:120] for p in left]


def _started_by(temp_dir: str, gcs_port: str) -> dict[int, int]:
    """The processes a `ray start` with this temp dir and GCS port started: those that name the
    temp dir or the GCS address (the Ray Client server) on their command line, and everything
    below them (agents, dashboard modules, workers)."""
    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and any(k in command(int(name)) for k in (temp_dir, f":{gcs_port} ")):
            found.update(descendants(int(name)))
    return found


def test_hydra_submitit_launcher_composes() -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "flagstaff.launch.train",
            "--cfg",
            "hydra",
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.nodes=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "submitit" in p.stdout and "nodes: 2" in p.stdout


def test_ray_env_refuses_a_temp_dir_another_user_could_redirect(tmp_path) -> None:
    """$FLAGSTAFF_RAY_TMP has a predictable name (/tmp/ray-flagstaff-<job id>): a symlink there
    (planted by anyone, /tmp is shared) is refused in one line before any `ray start`, instead of
    being followed (Ray's sockets, logs and port files would go wherever its owner points it)."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "ray-flagstaff-777"
    link.symlink_to(target)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        SLURM_JOB_ID="777",
        WORKDIR=str(tmp_path),
        RAY_PYTHON_BIN=BIN,
        FLAGSTAFF_RAY_TMP=str(link),
        FLAGSTAFF_TOKEN_DIR=str(tmp_path / "tokens"),
    )
    out = _sh(f"source {ROOT}/launch/ray_env.sh && echo sourced", env)
    assert out.returncode == 2 and "sourced" not in out.stdout, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: FLAGSTAFF_RAY_TMP={link} is a symlink or another user's; set FLAGSTAFF_RAY_TMP "
        "to a new directory of yours"
    ]
