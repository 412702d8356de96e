"""Starting a local Ray for a run (system/ray_start.py): the lean start skips Ray's idle dashboard
head and restores Ray's functions; the plain start is Ray's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from system.ray_start import lean_local_start

_START = """
import json, sys
import ray
import ray._private.services as services
before = (services.start_api_server, services.get_node)
from system.ray_start import init_ray
assert init_ray({"address": None, "lean_start": sys.argv[1] == "true"})
procs = sorted(ray._private.worker._global_node.all_processes)
restored = (services.start_api_server, services.get_node) == before
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
    assert {"gcs_server", "raylet"} <= set(res["procs"])
    assert ("dashboard" in res["procs"]) is not lean


def test_lean_start_falls_back_to_rays_own_when_its_functions_are_missing(monkeypatch) -> None:
    import ray._private.services as services

    monkeypatch.delattr(services, "get_node")
    with lean_local_start(True) as lean:
        assert lean is False
    assert not hasattr(services, "get_node")  # nothing replaced, nothing added
