"""Starting (or joining) Ray for a training run, in a module light enough to import before torch.

``flagstaff-train`` with ``backend=ray`` starts Ray while another thread imports torch and the
model code (both take seconds), and the workers of a Ray it starts preload those modules, so the
host actors begin with them already imported. Only ``os`` and (lazily) ``ray`` are imported here.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "PRELOAD_MODULES",
    "check_auth_token",
    "importing_in_background",
    "init_ray",
    "lean_local_start",
]

#: modules every worker of a Ray that Flagstaff starts imports as soon as it starts: the host and
#: server actors then begin with torch and the model code already loaded
PRELOAD_MODULES = ("torch", "system.host", "system.server")


def check_auth_token() -> None:
    """cluster.require_auth=true: refuse to join unless Ray token authentication is configured."""
    mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    has_token = (
        bool(os.environ.get("RAY_AUTH_TOKEN"))
        or Path(
            os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")
        ).is_file()
    )
    if mode != "token" or not has_token:
        raise RuntimeError(
            "cluster.require_auth=true: set RAY_AUTH_MODE=token and the cluster's token "
            "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; `ray get-auth-token` on "
            "the head prints it) before joining"
        )


def local_ray_options(cl: Mapping[str, Any]) -> dict[str, Any]:
    """ray.init options for a Ray this process starts (none when joining a running cluster): the
    workers the raylet prestarts (one per CPU) import PRELOAD_MODULES as soon as they start, while
    ray.init is still connecting, so host actors do not pay for ray and torch start-up."""
    if cl.get("address") and cl.get("address") != "local":
        return {}
    return {"_system_config": {"preload_python_modules": list(PRELOAD_MODULES)}}


@contextmanager
def lean_local_start(enabled: bool = True) -> Iterator[bool]:
    """While a new local Ray starts without a dashboard, skip two waits on its critical path.

    1. Ray 2.55 starts its dashboard head even with ``include_dashboard=False``, loading only the
       usage-stats module (its own TODO: "Modules like job or state APIs should be loaded although
       dashboard is disabled"), and blocks until that Python process is up (about 0.7 s here) before
       it starts the raylet. Without the dashboard that process serves nothing but usage reporting,
       so it is not started (Ray's own path for installs without dashboard packages).
    2. After starting the raylet, Ray asks the GCS for the node with a call that sleeps in whole
       seconds while the raylet registers. This polls the GCS node table every 20 ms first, then
       makes Ray's call, which then returns at once.

    Both are private functions of ``ray._private.services``, replaced only during the ``ray.init``
    inside this block and restored after; if they are missing (another Ray version) nothing is
    replaced and the start is Ray's own. Yields whether the lean start is in effect.
    """
    try:
        import ray._private.services as services
        import ray._private.state as state

        originals = {name: getattr(services, name) for name in ("start_api_server", "get_node")}
        getattr(services, "_get_gcs_client_options")  # noqa: B009 - used below; check it exists
    except (ImportError, AttributeError):
        enabled = False
    if not enabled:
        yield False
        return

    def no_api_server(*args: Any, **kwargs: Any) -> tuple[None, None]:
        return None, None

    def get_node(gcs_address: str, node_id: str) -> Any:
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
    try:
        yield True
    finally:
        for name, fn in originals.items():
            setattr(services, name, fn)


def init_ray(cl: Mapping[str, Any]) -> bool:
    """Start a local Ray, or join ``cl["address"]``, unless Ray is already up in this process.
    Returns True when this call initialized Ray (the caller then shuts it down)."""
    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if ray.is_initialized():
        return False
    if cl.get("require_auth"):
        check_auth_token()
    address = cl.get("address") or "local"  # no address: always a new local Ray (never silently
    # join another job's cluster)
    dashboard = bool(cl.get("include_dashboard", False))
    lean = address == "local" and not dashboard and cl.get("lean_start", True)
    with lean_local_start(lean):
        ray.init(
            address=address,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            namespace=cl.get("namespace"),
            log_to_driver=True,
            configure_logging=False,
            **local_ray_options(cl),
        )
    return True


@contextmanager
def importing_in_background(*modules: str) -> Iterator[Callable[[], None]]:
    """Import ``modules`` in a background thread while the body runs (e.g. ray.init, which mostly
    waits for its processes); yields ``wait()``, which joins the thread and re-raises its error.
    (Ray itself must start on the calling thread: its processes die with the thread that started
    them.)"""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for name in modules:
                importlib.import_module(name)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)

    thread = threading.Thread(target=work, name="flagstaff-imports", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if errors:
            raise errors[0]

    try:
        yield wait
    finally:
        wait()
