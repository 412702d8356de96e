"""Starting (or joining) Ray for a training run, in a module light enough to import before torch.

``flagstaff-train`` with ``backend=ray`` starts Ray while another thread imports torch and the
model code (both take seconds), and the workers of a Ray it starts preload those modules, so the
host actors begin with them already imported. Only the standard library and (lazily) ``ray`` are
imported here.

A Ray started here is private to its run (docs/cluster.md, Security): Ray's single-machine mode puts
every one of its servers on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's setting for
Windows and macOS, which also refuses worker nodes), token authentication is on with a fresh token
per run (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``; Ray's token authentication,
docs.ray.io/en/latest/ray-security/token-auth.html), and a watchdog (system/ray_watchdog.py) ends
every process of that Ray when the driver ends, however it ends. Ray reads both settings once per
process, when it is imported, so they are set before the first ``import ray``. Joining a cluster
(``cluster.address``) requires a token unless ``cluster.require_auth=false``.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flagstaff.system.ray_watchdog import TAG_VAR

__all__ = [
    "PRELOAD_MODULES",
    "PRIVATE_PROCESS_ENV",
    "check_auth_token",
    "check_cluster_auth",
    "import_ray",
    "importing_in_background",
    "init_ray",
    "lean_local_start",
    "lean_start_problem",
    "make_ray_private",
    "private_temp_dir",
    "shutdown_ray",
    "start_local_ray",
]

log = logging.getLogger("flagstaff")

#: modules every worker of a Ray that Flagstaff starts imports as soon as it starts: the host and
#: server actors then begin with torch and the model code already loaded
PRELOAD_MODULES = ("torch", "flagstaff.system.host", "flagstaff.system.server")

#: what Ray reads once per process, at ``import ray``: every server of a Ray started here listens on
#: 127.0.0.1 only (Ray's single-machine mode), and every connection must carry the token
PRIVATE_PROCESS_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}

# the local Ray this process started last: its watchdog and the environment to restore after it
_current: dict[str, Any] = {}


def _token_configured() -> bool:
    """Whether Ray token authentication is set up in this environment (mode and a token)."""
    if os.environ.get("RAY_AUTH_MODE", "disabled").lower() != "token":
        return False
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()


def check_auth_token(address: str | None = None) -> None:
    """Refuse to join a Ray cluster unless Ray token authentication is configured: one line that
    says what to set (or how to opt out)."""
    if _token_configured():
        return
    from flagstaff.system.config import ConfigError

    where = f"cluster.address={address}" if address else "cluster.require_auth=true"
    raise ConfigError(
        f"{where}: Ray token authentication is not set up; set RAY_AUTH_MODE=token and the "
        "cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; `ray "
        "get-auth-token` on the head prints it), or pass cluster.require_auth=false to join a "
        "cluster without authentication"
    )


def check_cluster_auth(cl: Mapping[str, Any]) -> None:
    """Joining ``cl["address"]`` needs token authentication unless ``cl["require_auth"]`` is
    explicitly false (then a warning: anyone who reaches the cluster's ports can run code on it).
    A local Ray (no address) always has its own token."""
    address = cl.get("address")
    if not address or address == "local":
        return
    if cl.get("require_auth") is False:
        log.warning(
            "cluster.require_auth=false: joining %s without token authentication; anyone who "
            "can reach its ports can run code on it (docs/cluster.md, Security)",
            address,
        )
        return
    check_auth_token(address)


def make_ray_private() -> None:
    """Put PRIVATE_PROCESS_ENV into this process's environment, so that a Ray started later is
    private (loopback only, token required). Ray reads it when it is imported: call this before
    the first ``import ray`` (``init_ray`` does it for a local run; the test suite's conftest at
    start-up)."""
    os.environ.update(PRIVATE_PROCESS_ENV)


def _why_not_private() -> str | None:
    """None when a Ray started now in this process is private; else which setting Ray read
    before ``make_ray_private`` set it."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:  # a Ray without token authentication
        return "RAY_AUTH_MODE=token (this Ray version has no token authentication)"
    import ray._private.ray_constants as ray_constants

    if getattr(ray_constants, "ENABLE_RAY_CLUSTER", False):
        return "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        return "RAY_AUTH_MODE=token"
    return None


def private_temp_dir() -> str | None:
    """Where a local Ray keeps its session files (Unix sockets, port files, logs): ``ray/`` in
    a directory only this user can enter, ``<tmp>/flagstaff-ray-<uid>`` (mode 700; a fresh
    ``mkdtemp`` when that name is taken by another user or not a plain directory). Ray makes its
    own temp directory world-writable (``/tmp/ray`` by default), so there another local user could
    read the run's logs, plant files in its session and replace the raylet's socket; the token
    guards Ray's TCP ports, not its files. None where there are no uids (Windows)."""
    if not hasattr(os, "getuid"):
        return None
    try:  # where Ray itself would put /tmp/ray (RAY_TMPDIR; /tmp on macOS, short socket paths)
        from ray._common.utils import get_default_system_temp_dir as system_temp_dir
    except ImportError:
        system_temp_dir = tempfile.gettempdir
    base = Path(system_temp_dir()) / f"flagstaff-ray-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(base)
        ours = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
        if ours and st.st_mode & 0o077:
            os.chmod(base, 0o700)
    except OSError:
        ours = False
    if not ours:
        base = Path(tempfile.mkdtemp(prefix="flagstaff-ray-", dir=base.parent))
    return str(base / "ray")


def _start_watchdog(tag: str) -> subprocess.Popen | None:
    """system/ray_watchdog.py in its own session, reading a pipe from this process: when the
    pipe closes (this process ends, or ``_release``) it ends every process of the Ray tagged
    ``tag``."""
    if not os.path.isdir("/proc"):  # it finds the Ray processes through /proc (Linux)
        return None
    env = {k: v for k, v in os.environ.items() if k not in (TAG_VAR, "RAY_AUTH_TOKEN")}
    script = str(Path(__file__).with_name("ray_watchdog.py"))
    return subprocess.Popen(
        [sys.executable, "-I", script, tag],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # a signal to the driver's process group does not reach it
    )


def _release() -> None:
    """End what is left of the local Ray started last (close its watchdog's pipe and wait for
    it) and restore the environment from before it."""
    watchdog = _current.pop("watchdog", None)
    saved = _current.pop("saved", None)
    if watchdog is not None:
        watchdog.stdin.close()
        try:
            watchdog.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("the Ray watchdog (pid %d) is still ending processes", watchdog.pid)
    if saved is not None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()  # the token comes from env again


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init`` a new local Ray private to this run: its servers listen on 127.0.0.1 only,
    every connection needs a fresh random token (kept in this process's environment until
    ``shutdown_ray``, never written to a file or a log), its session files are in a directory
    only this user can enter (``private_temp_dir``), and a watchdog ends all of its processes
    when this process ends or ``shutdown_ray`` is called. ``init_kwargs`` go to ``ray.init``."""
    make_ray_private()
    import ray
    from ray._raylet import AuthenticationTokenLoader

    why = _why_not_private()
    if why is not None:
        raise RuntimeError(
            f"Ray was imported before Flagstaff could set {why}, so a local Ray started now would "
            "not be private; call system.ray_start.make_ray_private() before importing ray, or "
            "start Ray yourself (ray.init) and Flagstaff uses it"
        )
    _release()  # the previous local Ray's leftovers, if its caller used a plain ray.shutdown()
    tag = secrets.token_hex(8)
    if init_kwargs.get("_temp_dir") is None:
        init_kwargs["_temp_dir"] = private_temp_dir()
    _current["saved"] = {"RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN")}
    _current["watchdog"] = _start_watchdog(tag)
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    AuthenticationTokenLoader.instance().reset_cache()
    os.environ[TAG_VAR] = tag  # inherited by what ray.init starts (and their workers) only
    try:
        context = ray.init(address="local", dashboard_host="127.0.0.1", **init_kwargs)
    except BaseException:
        _release()
        raise
    finally:
        os.environ.pop(TAG_VAR, None)
    watchdog = _current["watchdog"]
    if watchdog is not None:  # its agents are found through their files in the session directory
        try:
            watchdog.stdin.write(f"session {context.address_info['session_dir']}\n".encode())
            watchdog.stdin.flush()
        except (BrokenPipeError, KeyError):
            log.warning("the Ray watchdog is not running: Ray's agents may outlive this run")
    node_ip = str(context.address_info.get("node_ip_address", ""))
    if not (node_ip.startswith("127.") or node_ip == "::1"):  # checked, whatever the Ray version
        shutdown_ray()
        raise RuntimeError(
            f"the local Ray started on {node_ip}, not on loopback; set "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray"
        )


def shutdown_ray() -> None:
    """``ray.shutdown()``, then end whatever is left of a local Ray this process started and
    restore the environment from before it."""
    import ray

    ray.shutdown()
    _release()


def local_ray_options(cl: Mapping[str, Any]) -> dict[str, Any]:
    """ray.init options for a Ray this process starts (none when joining a running cluster): the
    workers the raylet prestarts (one per CPU) import PRELOAD_MODULES as soon as they start, while
    ray.init is still connecting, so host actors do not pay for ray and torch start-up; and they
    keep the driver's CPU priority (``worker_niceness`` 0, a relative ``nice``: never above the
    user's own priority). Ray's default, +15, keeps CPU for its daemons over busy workers; here the
    workers are the run's client hosts, and at +15 every other process of a shared machine went
    first while they imported torch (the start-up's critical path) and trained."""
    if cl.get("address") and cl.get("address") != "local":
        return {}
    return {
        "_system_config": {"preload_python_modules": list(PRELOAD_MODULES), "worker_niceness": 0}
    }


#: Ray versions whose private start-up functions ``lean_local_start`` was verified against
#: (tests/test_ray_start.py); with any other version a local Ray starts through the public
#: ``ray.init`` alone, with the same security settings (loopback, token, watchdog)
LEAN_VERIFIED_RAY = ("2.55.1",)

#: the private functions the lean start replaces or calls, with the parameters it relies on
_LEAN_SIGNATURES = {
    "start_api_server": ("include_dashboard", "raise_on_failure", "host", "gcs_address"),
    "get_node": ("gcs_address", "node_id"),
    "_get_gcs_client_options": ("gcs_server_address",),
}


def lean_start_problem() -> str | None:
    """None when this Ray's private start-up functions are the ones ``lean_local_start`` was
    verified against (version in LEAN_VERIFIED_RAY, names and parameters as expected); else why
    not, in a few words."""
    import inspect

    try:
        import ray
        import ray._private.node as node
        import ray._private.parameter as parameter
        import ray._private.services as services
        import ray._private.state as state
    except ImportError as err:
        return f"cannot import {err.name}"
    if ray.__version__ not in LEAN_VERIFIED_RAY:
        return f"ray {ray.__version__} is not one of the verified {', '.join(LEAN_VERIFIED_RAY)}"
    if not hasattr(state, "GlobalState"):
        return "ray._private.state.GlobalState is missing"
    if not callable(getattr(node.Node, "start_monitor", None)):
        return "ray._private.node.Node.start_monitor is missing"
    try:  # Ray's own switch for a node without the autoscaler monitor (`ray start --no-monitor`)
        monitor_switch = "no_monitor" in inspect.signature(parameter.RayParams).parameters
    except (TypeError, ValueError):
        monitor_switch = False
    if not monitor_switch:
        return "ray._private.parameter.RayParams has no no_monitor"
    for name, expected in _LEAN_SIGNATURES.items():
        fn = getattr(services, name, None)
        if not callable(fn):
            return f"ray._private.services.{name} is missing"
        try:
            params = tuple(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            return f"ray._private.services.{name} has no readable signature"
        if params[: len(expected)] != expected:
            return f"ray._private.services.{name}{params} differs from {expected}"
    return None


@contextmanager
def lean_local_start(
    enabled: bool = True, on_launch: Callable[[], None] | None = None
) -> Iterator[bool]:
    """While a new local Ray starts without a dashboard, skip two waits on its critical path.

    1. Ray 2.55 starts its dashboard head even with ``include_dashboard=False``, loading only the
       usage-stats module (its own TODO: "Modules like job or state APIs should be loaded although
       dashboard is disabled"), and blocks until that Python process is up (about 0.7 s here) before
       it starts the raylet. Without the dashboard that process serves nothing but usage reporting,
       so it is not started (Ray's own path for installs without dashboard packages).
    2. After starting the raylet, Ray asks the GCS for the node with a call that sleeps in whole
       seconds while the raylet registers. This polls the GCS node table every 20 ms first, then
       makes Ray's call, which then returns at once.
    3. The autoscaler monitor is not started (what Ray's own ``no_monitor`` setting, ``ray start
       --no-monitor``, does): a Python process (about 0.5 s of CPU at start-up, 2 CPUs) whose
       launch, with a GCS call, sits on the start's critical path, and whose work (autoscaling,
       ``ray status`` reports) a run's private single-node Ray does not use; a run checks its
       hosts fit the node itself, before any work (system/build.py ``check_resources``).

    They are private functions of ``ray._private.services`` and ``Node.start_monitor``, replaced
    only during the ``ray.init`` inside this block and restored after; unless this Ray is a
    verified version whose functions have the expected names and parameters
    (``lean_start_problem``), nothing is replaced and the start is Ray's own public ``ray.init``.
    Yields whether the lean start is in effect.
    ``on_launch`` is called once every process of the new Ray is launched (its raylet among them),
    when the start begins waiting for the raylet to register.
    """
    if not enabled or lean_start_problem() is not None:
        yield False
        return
    import ray._private.node as node
    import ray._private.services as services
    import ray._private.state as state

    originals = {name: getattr(services, name) for name in ("start_api_server", "get_node")}
    start_monitor = node.Node.start_monitor

    def no_monitor(self: Any) -> None:  # as RayParams(no_monitor=True): Node never calls it
        return None

    def no_api_server(*args: Any, **kwargs: Any) -> tuple[None, None]:
        return None, None

    def get_node(gcs_address: str, node_id: str) -> Any:
        if on_launch is not None:
            on_launch()
        table = state.GlobalState()
        table._initialize_global_state(services._get_gcs_client_options(gcs_address))
        deadline = time.monotonic() + 30.0
        try:
            while time.monotonic() < deadline:
                if any(n.get("NodeID") == node_id for n in table.node_table()):
                    break
                time.sleep(0.02)
        finally:
            table.disconnect()
        return originals["get_node"](gcs_address, node_id)

    services.start_api_server, services.get_node = no_api_server, get_node
    node.Node.start_monitor = no_monitor
    try:
        yield True
    finally:
        for name, fn in originals.items():
            setattr(services, name, fn)
        node.Node.start_monitor = start_monitor


def import_ray(cl: Mapping[str, Any]) -> None:
    """Import ray on this thread, made private first where ``init_ray`` starts a local Ray.

    ``launch.train`` calls it before ``importing_in_background``: an import holds the GIL, so
    ray's own import and the Python half of ``ray.init`` (which launches the GCS and the raylet)
    would otherwise take turns with torch's import in the other thread, and every Ray process
    would start later (the GCS by about 1.5 s on 2 CPUs: docs/cluster.md, start-up).
    """
    address = cl.get("address")
    if not address or address == "local":
        make_ray_private()
    import ray  # noqa: F401
    import ray._private.services  # noqa: F401 - what lean_local_start checks and replaces
    import ray._private.state  # noqa: F401


def init_ray(cl: Mapping[str, Any], on_launch: Callable[[], None] | None = None) -> bool:
    """Start a private local Ray (``start_local_ray``), or join ``cl["address"]`` (with token
    authentication unless ``cl["require_auth"]`` is false), unless Ray is already up in this
    process. Returns True when this call initialized Ray (the caller then calls
    ``shutdown_ray``). ``on_launch`` is called once, as soon as the rest of the start is waiting
    (the lean start: its processes are launched and the raylet registers; otherwise when this
    returns or raises)."""
    try:
        return _init_ray(cl, on_launch)
    finally:
        if on_launch is not None:
            on_launch()


def _init_ray(cl: Mapping[str, Any], on_launch: Callable[[], None] | None) -> bool:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    address = cl.get("address") or "local"  # no address: always a new local Ray (never silently
    # join another job's cluster)
    dashboard = bool(cl.get("include_dashboard", False))
    options = dict(
        include_dashboard=dashboard,
        namespace=cl.get("namespace"),
        log_to_driver=True,
        configure_logging=False,
    )
    if address != "local":
        check_cluster_auth(cl)
        import ray

        ray.init(address=address, dashboard_host="127.0.0.1", **options)
        return True
    wanted = not dashboard and cl.get("lean_start", True)
    make_ray_private()  # before ray is imported (below, and by lean_local_start)
    with lean_local_start(wanted, on_launch) as lean:
        why = None if lean or not wanted else lean_start_problem()
        start_local_ray(**options, **local_ray_options(cl))
    if lean:
        log.info(
            "Ray start-up: lean (no idle dashboard head, no autoscaler monitor; node "
            "registration polled)"
        )
    else:
        log.info(
            "Ray start-up: public ray.init (%s)",
            why or ("dashboard on" if dashboard else "cluster.lean_start=false"),
        )
    return True


@contextmanager
def importing_in_background(
    *modules: str, after: threading.Event | None = None
) -> Iterator[Callable[[], None]]:
    """Import ``modules`` in a background thread while the body runs (e.g. ray.init, which mostly
    waits for its processes), beginning once ``after`` is set (e.g. by ``init_ray``'s
    ``on_launch``: an import holds the GIL, so it would slow the Python half of the start, which
    launches Ray's processes); yields ``wait()``, which lets the imports begin if they have not,
    joins the thread and re-raises its error. (Ray itself must start on the calling thread: its
    processes die with the thread that started them.)"""
    errors: list[BaseException] = []
    after = after if after is not None else threading.Event()
    if not modules:
        after.set()

    def work() -> None:
        try:
            after.wait()
            for name in modules:
                importlib.import_module(name)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)

    thread = threading.Thread(target=work, name="flagstaff-imports", daemon=True)
    thread.start()

    def wait() -> None:
        after.set()
        thread.join()
        if errors:
            raise errors[0]

    try:
        yield wait
    finally:
        wait()
