"""Start-up cost of system/ray_start.py's two paths for a local Ray: the lean start (private Ray
functions replaced during ray.init, verified Ray versions only) and the public ``ray.init`` (what
``cluster.lean_start=false`` and the fallback run). Each start is a fresh process; the paths
alternate, ``--repeat`` each (issue 23 item 6). Prints a Markdown table with the medians.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/ray_startup_paths.py [--repeat 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from flagstaff.system.ray_start import init_ray, shutdown_ray
init_ray({"address": None, "lean_start": sys.argv[1] == "lean"})
import ray
t1 = time.perf_counter()
ray.get(ray.remote(lambda: 1).remote())
t2 = time.perf_counter()
shutdown_ray()
print(json.dumps({"init": t1 - t0, "first_task": t2 - t0}))
"""


def _start(path: str) -> dict[str, float]:
    """One fresh process: init_ray on ``path`` ("lean" or "public"), then one task."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, path], cwd=ROOT, capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise SystemExit(f"{path} start failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="starts per path (default 5)")
    args = ap.parse_args()
    import ray

    load0 = os.getloadavg()[0]
    runs: dict[str, list[dict[str, float]]] = {"lean": [], "public": []}
    for _ in range(args.repeat):
        for path in runs:
            runs[path].append(_start(path))
    load1 = os.getloadavg()[0]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _provenance import markdown, provenance

    print(markdown(provenance(load_average=[load0, load1])))
    print(
        f"ray {ray.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS=1, load average "
        f"{load0:.2f} at start, {load1:.2f} at end"
    )
    print("| path | init_ray median (s) | to first task median (s) | init_ray runs (s) |")
    print("|---|---|---|---|")
    for path, rs in runs.items():
        init = statistics.median(r["init"] for r in rs)
        first = statistics.median(r["first_task"] for r in rs)
        each = ", ".join(f"{r['init']:.2f}" for r in rs)
        print(f"| {path} | {init:.2f} | {first:.2f} | {each} |")


if __name__ == "__main__":
    main()
