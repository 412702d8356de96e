"""Starting (or joining) Ray for a training run, in a module light enough to import before torch.

``flagstaff-train`` with ``backend=ray`` starts Ray while another thread imports torch and the
model code (both take seconds), and the workers of a Ray it starts preload those modules, so the
host actors begin with them already imported. Only ``os`` and (lazily) ``ray`` are imported here.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["PRELOAD_MODULES", "check_auth_token", "init_ray", "importing_in_background"]

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


def init_ray(cl: Mapping[str, Any]) -> bool:
    """Start a local Ray, or join ``cl["address"]``, unless Ray is already up in this process.
    Returns True when this call initialized Ray (the caller then shuts it down)."""
    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if ray.is_initialized():
        return False
    if cl.get("require_auth"):
        check_auth_token()
    ray.init(
        # no address: always a new local Ray (never silently join another job's cluster)
        address=cl.get("address") or "local",
        include_dashboard=cl.get("include_dashboard", False),
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
