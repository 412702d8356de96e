"""Starting a local Ray for a run (system/ray_start.py): the lean start skips Ray's idle dashboard
head and restores Ray's functions; the plain start is Ray's own. A local run's Ray listens on
loopback only, requires the run's token, keeps the token out of files and logs, and ends with its
driver even when the driver is killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flagstaff.system.ray_start import lean_local_start
from flagstaff.system.ray_watchdog import TAG_VAR
from tests._procs import (
    alive,
    command,
    descendants,
    environ,
    external_ip,
    is_loopback,
    listening,
    wait_gone,
)
from tests.conftest import ROOT

PRIVATE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_START = """
import json, logging, sys
import ray
import ray._private.node as node
import ray._private.services as services
logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
before = (services.start_api_server, services.get_node, node.Node.start_monitor)
from flagstaff.system.ray_start import init_ray
assert init_ray({"address": None, "lean_start": sys.argv[1] == "true"})
procs = sorted(ray._private.worker._global_node.all_processes)
restored = (services.start_api_server, services.get_node, node.Node.start_monitor) == before
answer = ray.get(ray.remote(lambda: 41 + 1).remote())
ray.shutdown()
print(json.dumps({"procs": procs, "restored": restored, "answer": answer}))
"""


@pytest.mark.parametrize("lean", [True, False])
def test_local_start_runs_tasks_with_or_without_the_dashboard_head(lean: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _START, str(lean).lower()],
        capture_output=True,
        text=True,
        timeout=120,
        env={"RAY_USAGE_STATS_ENABLED": "0", **os.environ},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["answer"] == 42 and res["restored"]
    assert {"gcs_server", "raylet", "log_monitor"} <= set(res["procs"])
    assert ("dashboard" in res["procs"]) is not lean
    assert ("monitor" in res["procs"]) is not lean  # the autoscaler's: Ray's no_monitor path
    said = [line for line in out.stderr.splitlines() if line.startswith("LOG Ray start-up:")]
    assert len(said) == 1 and ("public ray.init" in said[0]) is not lean, said


def test_lean_start_is_taken_on_the_verified_ray_version() -> None:
    """(a) The installed (pinned) Ray is a verified version: the private functions are replaced
    during the start and restored after."""
    import ray
    import ray._private.services as services

    from flagstaff.system.ray_start import LEAN_VERIFIED_RAY, lean_start_problem

    assert ray.__version__ in LEAN_VERIFIED_RAY
    assert lean_start_problem() is None
    import ray._private.node as node

    before = services.get_node, node.Node.start_monitor
    with lean_local_start(True) as lean:
        assert lean is True and services.get_node is not before[0]
        assert node.Node.start_monitor is not before[1]
    assert (services.get_node, node.Node.start_monitor) == before


@pytest.mark.parametrize("change", ["version", "signature", "missing", "monitor", "no_monitor"])
def test_lean_start_falls_back_when_rays_private_functions_may_differ(monkeypatch, change) -> None:
    """(b) Another Ray version, a private function with other parameters, or one that is gone:
    nothing is replaced (the start is the public ray.init) and the reason is named."""
    import ray
    import ray._private.node as node
    import ray._private.parameter as parameter
    import ray._private.services as services

    from flagstaff.system.ray_start import lean_start_problem

    if change == "version":
        monkeypatch.setattr(ray, "__version__", "2.99.0")
    elif change == "signature":
        monkeypatch.setattr(services, "get_node", lambda address, node: None)
    elif change == "monitor":
        monkeypatch.delattr(node.Node, "start_monitor")
    elif change == "no_monitor":  # Ray's own switch for a start without the autoscaler monitor
        monkeypatch.setattr(parameter, "RayParams", lambda **kwargs: None)
    else:
        monkeypatch.delattr(services, "_get_gcs_client_options")
    why = lean_start_problem()
    expected = {"version": "2.99.0", "signature": "get_node", "monitor": "start_monitor"}
    expected["no_monitor"] = "no_monitor"
    assert why is not None and expected.get(change, "_get_gcs_client_options") in why, why
    before = services.get_node
    with lean_local_start(True) as lean:
        assert lean is False and services.get_node is before


_FALLBACK = """
import json, logging, os, sys
import ray._private.services as services
logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
get_node = services.get_node
# as if a Ray patch release had renamed its parameters (Ray calls it positionally: it still works)
services.get_node = lambda address, node: get_node(address, node)
from flagstaff.system.ray_start import init_ray
from tests._procs import alive, descendants, listening
assert init_ray({"address": None})
import ray
node = ray._private.worker._global_node
socks = listening(alive(descendants(os.getpid())))
gcs = int(node.gcs_address.rsplit(":", 1)[1])
print(json.dumps({"procs": sorted(node.all_processes), "socks": socks, "gcs": gcs,
                  "ip": node.node_ip_address, "token": bool(os.environ.get("RAY_AUTH_TOKEN"))}),
      flush=True)
sys.stdin.readline()
"""


def test_public_fallback_start_is_still_private(tmp_path) -> None:
    """(b) With a private function's parameters renamed, init_ray starts Ray through the public ray.init: one
    log line says so, and that Ray is as private as the lean one (listens on loopback only,
    refuses a connection without the run's token)."""
    p = subprocess.Popen(
        [sys.executable, "-c", _FALLBACK],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"RAY_USAGE_STATS_ENABLED": "0", **os.environ},
    )
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert line, p.stderr.read()[-3000:]  # type: ignore[union-attr]
        res = json.loads(line)
        assert "dashboard" in res["procs"]  # Ray's own start (its dashboard head runs)
        assert is_loopback(res["ip"]) and res["token"]
        assert res["gcs"] in {port for _, port in res["socks"]}
        assert all(is_loopback(addr) for addr, _ in res["socks"]), res["socks"]
        plain = {**_user_env(tmp_path / "home"), PRIVATE: "0"}
        assert _connect(f"127.0.0.1:{res['gcs']}", plain) == "refused"
    finally:
        p.stdin.close()  # type: ignore[union-attr]
        p.wait(timeout=120)
    said = [s for s in p.stderr.read().splitlines() if s.startswith("LOG Ray start-up:")]
    assert len(said) == 1, said
    assert said[0].startswith("LOG Ray start-up: public ray.init (ray._private.services.get_node(")


def test_lean_start_falls_back_to_rays_own_when_its_functions_are_missing(monkeypatch) -> None:
    import ray._private.services as services

    monkeypatch.delattr(services, "get_node")
    with lean_local_start(True) as lean:
        assert lean is False
    assert not hasattr(services, "get_node")  # nothing replaced, nothing added


# --- a local run's Ray is private (issue 19 item 1) and ends with its driver (item 3) -----------

_PROBE = (
    "import ray, sys; ray.init(address=sys.argv[1]); print('nodes', len(ray.nodes()), flush=True)"
)


def _user_env(home: Path) -> dict[str, str]:
    """The environment of a user who set nothing up for Ray (no token anywhere, fresh HOME)."""
    unset = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", PRIVATE, TAG_VAR)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}


def _flagstaff_train(out: Path, *overrides: str) -> subprocess.Popen:
    """``flagstaff-train experiment=smoke backend=ray ...`` as a user runs it; stdout and stderr
    go to out/stdout, out/stderr, the run directory is out/run."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "flagstaff.launch.train", "experiment=smoke", "backend=ray"]
    cmd += ["cluster.hosts=1", "progress=false", f"hydra.run.dir={out / 'run'}", *overrides]
    with open(out / "stdout", "wb") as so, open(out / "stderr", "wb") as se:
        return subprocess.Popen(cmd, cwd=ROOT, env=_user_env(out / "home"), stdout=so, stderr=se)


def _ray_of(proc: subprocess.Popen, out: Path, until_round: int, timeout_s: float = 300) -> dict:
    """Wait until the run has written ``until_round`` rounds (0: until its GCS is up); return its
    process tree and its GCS's port and token (read from the GCS's environment)."""
    deadline = time.monotonic() + timeout_s
    metrics = out / "run" / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, (out / "stderr").read_text()[-3000:]
        tree = descendants(proc.pid)
        gcs = [p for p in tree if "gcs_server" in command(p)]
        rows = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        ports = listening(gcs)  # the GCS port (Ray picks a free one)
        if ports and rows >= until_round:
            token = environ(gcs[0]).get("RAY_AUTH_TOKEN")
            return {"tree": tree, "port": ports[0][1], "token": token}
        time.sleep(0.1)
    raise AssertionError(f"no round {until_round} in {timeout_s} s")


def _connect(address: str, env: dict[str, str], timeout_s: float = 120) -> str:
    """Try ray.init(address) from another process: 'connected', 'refused' (Ray's authentication
    error) or the tail of its output."""
    p = subprocess.Popen(
        [sys.executable, "-c", _PROBE, address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        for line in p.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("nodes"):
                return "connected"
            if "InvalidAuthToken" in line or "AuthenticationError" in line:
                return "refused"
            if time.monotonic() > deadline:
                break
        return "".join(lines[-20:])
    finally:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """A default local run (flagstaff-train, backend=ray) with slow rounds, after its first round."""
    out = tmp_path_factory.mktemp("live")
    proc = _flagstaff_train(out, "rounds=60", "cluster.slow_hosts=[1]")
    try:
        yield {"proc": proc, "out": out, **_ray_of(proc, out, until_round=1)}
    finally:
        proc.kill()
        proc.wait()


def test_local_run_listens_on_loopback_only(live_run) -> None:
    """No process of the run's Ray listens on a non-loopback address: from another machine (or
    this one's external address) there is nothing to connect to."""
    socks = listening(alive(descendants(live_run["proc"].pid)))
    assert live_run["port"] in {port for _, port in socks}
    assert all(is_loopback(addr) for addr, _ in socks), socks
    ext = external_ip()
    for _, port in socks if ext else []:
        with pytest.raises(OSError):  # refused: nothing listens there
            socket.create_connection((ext, port), timeout=5).close()


def test_local_run_refuses_connections_without_its_token(live_run, tmp_path) -> None:
    """Over loopback, a process without the run's token (none, or a wrong one) is refused by the
    GCS; with the token it connects (the token is what guards the run)."""
    assert live_run["token"], "the run's Ray has no token: token authentication is off"
    address = f"127.0.0.1:{live_run['port']}"
    # without this setting ray.init would rewrite 127.0.0.1 to the external address (and find
    # nothing there); a local attacker sets it too
    plain = {**_user_env(tmp_path / "home"), PRIVATE: "0"}
    assert _connect(address, plain) == "refused"
    wrong = {**plain, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    assert _connect(address, wrong) == "refused"
    right = {**plain, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": live_run["token"]}
    assert _connect(address, right) == "connected"


def test_local_runs_session_files_are_private_to_its_user(live_run) -> None:
    """The run's Ray session directory (its Unix sockets, port files and logs) lies below a
    directory that only this user can enter (before: /tmp/ray/session_*, world-writable, so another
    local user could read the logs, plant files and move the raylet's socket: tried as uid 65534)."""
    gcs = [p for p in alive(descendants(live_run["proc"].pid)) if "gcs_server" in command(p)]
    log_dir = next(a for a in command(gcs[0]).split() if a.startswith("--log_dir="))
    session = Path(log_dir.partition("=")[2]).parent
    assert (session / "sockets").is_dir(), session
    guards = [
        d
        for d in session.parents
        if d.stat().st_uid == os.getuid() and not d.stat().st_mode & 0o077
    ]
    assert guards, f"every directory above {session} can be entered by other users"


def test_killed_driver_leaves_no_process_of_its_ray(live_run) -> None:
    """SIGKILL the driver mid-run: every process of its Ray (GCS, raylet, dashboard and
    runtime-env agents, workers, the host actor) ends within 30 s (Ray alone leaves its agents up
    for a minute or more)."""
    proc = live_run["proc"]
    tree = descendants(proc.pid)
    assert any("raylet" in command(p) for p in tree) and len(tree) >= 5, tree
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = wait_gone(tree, timeout_s=30)
    assert not left, [command(p)[:120] for p in left]


def test_flower_backend_runs_on_the_runs_private_ray(tmp_path) -> None:
    """backend=flower: Flower's simulation engine runs on the run's own Ray, started private
    (loopback only, a fresh token; Flower would otherwise start its own, open one), and the
    Ray ends with the driver."""
    out = tmp_path / "flower"
    proc = _flagstaff_train(out, "backend=flower", "rounds=200", "cluster.cpus_per_host=1")
    try:
        ray = _ray_of(proc, out, until_round=1)
        socks = listening(alive(descendants(proc.pid)))
        assert ray["port"] in {port for _, port in socks}
        assert all(is_loopback(addr) for addr, _ in socks), socks
        assert ray["token"]  # the GCS was started with the run's token
        tree = descendants(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not wait_gone(tree, timeout_s=30)


def test_run_keeps_its_token_out_of_its_files_and_output(tmp_path) -> None:
    """A complete local run works and its token appears in no file of the run directory
    (.hydra/, summary.json, metrics.jsonl, ...) nor in what it printed; no token file is written
    into HOME."""
    proc = _flagstaff_train(tmp_path, "rounds=2")
    try:
        token = _ray_of(proc, tmp_path, until_round=0)["token"]
        assert proc.wait(timeout=300) == 0, (tmp_path / "stderr").read_text()[-3000:]
    finally:
        proc.kill()
    assert token and len(token) >= 32
    run = tmp_path / "run"
    files = [f for f in run.rglob("*") if f.is_file()]
    assert {"summary.json", "metrics.jsonl", "config.yaml"} <= {f.name for f in files}
    for f in [*files, tmp_path / "stdout", tmp_path / "stderr"]:
        assert token.encode() not in f.read_bytes(), f
    assert not (tmp_path / "home" / ".ray").exists()


def test_watchdog_ends_the_tagged_and_the_ray_processes_of_a_session_only(tmp_path) -> None:
    """system/ray_watchdog.py: a process with the run's tag, or named ray... with a file open in
    the session directory, is ended; one with another tag, or a non-Ray process reading the
    session's logs (a user's tail), is not."""
    from flagstaff.system.ray_watchdog import end_members, members

    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    log = session / "logs" / "agent.log"
    log.touch()
    base = {k: v for k, v in os.environ.items() if k != TAG_VAR}

    def spawn(argv0: str, env: dict[str, str], hold: bool = False) -> subprocess.Popen:
        redirect = f' 3<"{log}"' if hold else ""
        return subprocess.Popen(["bash", "-c", f'exec -a "{argv0}" sleep 60{redirect}'], env=env)

    ours = [
        spawn("sleep", {**base, TAG_VAR: "run-a"}),
        spawn("ray::DashboardAgent", base, hold=True),
    ]
    theirs = [spawn("sleep", {**base, TAG_VAR: "run-b"}), spawn("tail", base, hold=True)]
    try:
        time.sleep(0.5)  # bash has exec'd sleep
        found = members("run-a", [str(session)])
        assert {p.pid for p in ours} <= set(found) and not {p.pid for p in theirs} & set(found)
        assert end_members("run-a", [str(session)], grace_s=0.5) >= 2
        assert all(p.wait(timeout=10) is not None for p in ours)
        assert all(p.poll() is None for p in theirs)
    finally:
        for p in ours + theirs:
            p.kill()
            p.wait()


def test_a_ray_imported_before_flagstaff_could_make_it_private_is_refused(tmp_path) -> None:
    """Code that imports ray first and then asks init_ray for a local Ray gets one clear error
    (the settings are read at import), not a Ray open to the network."""
    script = "import ray\nfrom system.ray_start import init_ray\ninit_ray({})\n"
    p = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=_user_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert "call system.ray_start.make_ray_private() before importing ray" in p.stderr


def test_private_temp_dir_never_uses_a_name_planted_by_someone_else(tmp_path, monkeypatch) -> None:
    """<Ray's temp base>/flagstaff-ray-<uid> is predictable: a symlink planted there is not
    followed; the local Ray gets a fresh directory of mode 700 beside it instead."""
    from flagstaff.system.ray_start import private_temp_dir

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    (tmp_path / f"flagstaff-ray-{os.getuid()}").symlink_to(elsewhere)
    got = Path(private_temp_dir())
    assert got.name == "ray" and got.parent.parent == tmp_path and elsewhere not in got.parents
    assert got.parent.stat().st_mode & 0o777 == 0o700 and not got.parent.is_symlink()
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "fresh"))
    (tmp_path / "fresh").mkdir()
    assert private_temp_dir() == str(tmp_path / "fresh" / f"flagstaff-ray-{os.getuid()}" / "ray")


#: what a client host never uses: the config system, the other frameworks, the datasets' loaders
_NOT_IN_WORKERS = {"hydra", "omegaconf", "antlr4", "flwr", "opacus", "sklearn", "transformers"}
_NOT_IN_WORKERS |= {"datasets", "matplotlib", "pandas", "mnist1d"}


def test_workers_preload_nothing_a_host_does_not_use() -> None:
    """Every worker of a local Ray imports PRELOAD_MODULES while the run starts, on the start-up's
    critical path (2 CPUs: Ray's processes, the driver and each worker compete): Hydra and
    OmegaConf (about 0.2 s of CPU per worker), Flower, Opacus, scikit-learn ... are not among
    what they bring."""
    code = (
        "import importlib, sys\n"
        "from flagstaff.system.ray_start import PRELOAD_MODULES\n"
        "for m in PRELOAD_MODULES: importlib.import_module(m)\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch" in out.stdout.split()
    assert not _NOT_IN_WORKERS & set(out.stdout.split())


_ORDER = """
import json, sys, threading
from importlib.abc import MetaPathFinder

import psutil

seen = {}


class Probe(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            kids = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
            seen.update(
                ray="ray" in sys.modules,
                raylet=any("raylet/raylet" in k for k in kids),
                main=threading.current_thread() is threading.main_thread(),
            )


sys.meta_path.insert(0, Probe())
import flagstaff
from flagstaff.launch.train import run

cfg = flagstaff.compose("experiment=smoke", "backend=ray", "rounds=1", "cluster.hosts=1")
assert not seen, "torch imported before run"
out = run(cfg)
print(json.dumps({**seen, "rounds": out["rounds_completed"]}))
"""


def test_background_imports_begin_once_rays_processes_are_launched(tmp_path) -> None:
    """launch.train.run imports ray, then starts Ray up to the raylet's launch on the main thread,
    and only then imports torch and the training code in the background (while the raylet waits
    for its agents and the workers start). An import holds the GIL: started together, the two
    took turns and Ray's processes started seconds later on a loaded 2-CPU machine
    (docs/cluster.md, start-up)."""
    out = subprocess.run(
        [sys.executable, "-c", _ORDER],
        cwd=tmp_path,  # the run directory (outputs/run) goes here
        env=_user_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"ray": True, "raylet": True, "main": False, "rounds": 1}, seen


_NICE = """
import json, os
from flagstaff.system.ray_start import init_ray, shutdown_ray
init_ray({"address": None})
import ray
worker = ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())
shutdown_ray()
print(json.dumps({"driver": os.getpriority(os.PRIO_PROCESS, 0), "worker": worker}))
"""


def test_workers_of_a_local_ray_run_at_the_drivers_priority(tmp_path) -> None:
    """Ray renices its workers by +15 (worker_niceness) to keep CPU for its own daemons; on a
    local Ray the workers are the run's client hosts, so at +15 every other process of a shared
    machine went first while they imported torch at start-up (and trained): they keep the
    priority the user started the run with."""
    out = subprocess.run(
        [sys.executable, "-c", _NICE],
        cwd=ROOT,
        env=_user_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["worker"] == seen["driver"], seen
