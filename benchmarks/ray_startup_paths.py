"""Start-up cost of system/ray_start.py's two paths for a local Ray: the lean start (private Ray
functions replaced during ray.init, verified Ray versions only) and the public ``ray.init`` (what
``cluster.lean_start=false`` and the fallback run). Each start is a fresh process; the paths
alternate, ``--repeat`` each (issue 23 item 6). Prints a Markdown table with the medians.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/ray_startup_paths.py [--repeat 5]``

``--phases w1`` instead profiles a whole ``flagstaff-ray`` start-up of a workload as
``benchmarks/simulation.py`` measures it (a fresh process, launched through ``launch.train.run``,
from process start to the end of round 1 minus one steady round): the critical path as a table of
phases that sum to the effective start-up (each phase ends at a timestamp taken inside the driver,
inside Ray's start functions or inside the workers, as they preload their modules), the driver's
own work beside it, and the CPU seconds of every process of the run until round 1 begins (2 CPUs:
what competes with the critical path). Usage: ``OMP_NUM_THREADS=1 python
benchmarks/ray_startup_paths.py --phases w1 --repeat 5`` (medians over the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
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


PHASES_CHILD = r"""
import functools, json, os, sys, time
T0 = float(sys.argv[1])
marks = {}


def mark(name):
    marks.setdefault(name, time.time() - T0)


mark("interpreter")
sys.path[:0] = [sys.argv[4], sys.argv[4] + "/benchmarks"]
import simulation  # the benchmark child imports this first (numpy, _workloads)
from hydra import compose, initialize_config_module
from flagstaff.launch.train import run
from flagstaff.system.config import register
import flagstaff.system.ray_start as rs

register()
workload = simulation.get_workload(sys.argv[2])
over = simulation.flagstaff_overrides(workload, "ray") + [f"rounds={sys.argv[3]}", *sys.argv[5:]]
with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
    cfg = compose("train", overrides=over)
mark("imports + compose")
rs.PRELOAD_MODULES = ("_stamp_begin", *rs.PRELOAD_MODULES, "_stamp_end")


def wrap(owner, name, before=None, after=None):
    fn = getattr(owner, name)

    @functools.wraps(fn)  # keeps the signature lean_start_problem checks
    def wrapped(*a, **k):
        if before:
            mark(before)
        out = fn(*a, **k)
        if after:
            mark(after)
        return out

    setattr(owner, name, wrapped)


def wrap_ray():
    # timestamps inside Ray's start, once ray is imported where the code under test imports it
    # (import_ray; before it existed, at the start of init_ray)
    rs.make_ray_private()
    import ray._private.node as node
    import ray._private.services as services
    import ray._private.worker as worker

    mark("import ray")
    wrap(node.Node, "start_gcs_server", after="GCS up")
    wrap(node.Node, "start_head_processes", after="head processes (monitor)")
    wrap(node.Node, "start_ray_processes", after="log monitor + raylet launched")
    wrap(services, "get_node", before="raylet registered (waits for the dashboard agent)")
    wrap(worker, "connect", after="driver connected: ray.init returns")


if hasattr(rs, "import_ray"):
    _import_ray = rs.import_ray
    rs.import_ray = lambda cl: (_import_ray(cl), wrap_ray())[0]
else:
    _init_ray = rs.init_ray
    rs.init_ray = lambda cl: (wrap_ray(), _init_ray(cl))[1]
bg = rs.importing_in_background


def importing(*mods, **kw):
    cm = bg(*mods, **kw)

    class Joined:
        def __enter__(self):
            return cm.__enter__()

        def __exit__(self, *exc):
            out = cm.__exit__(*exc)
            mark("driver: background imports joined")
            return out

    return Joined()


rs.importing_in_background = importing
import flagstaff.system.loop as loop
import flagstaff.system.runner as runner

wrap(runner, "build_run", after="driver: data loaded + partitioned")
wrap(runner, "RayPool", before="driver: host actors created")
wrap(runner, "ParameterServer", after="driver: server built")
rounds = loop._rounds
cpu = {}


def first_round(*a, **k):
    mark("hosts up, round 1 begins")
    import psutil

    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        cpu[f"{p.pid} {cmd[:200]}"] = t.user + t.system + t.children_user + t.children_system
    return rounds(*a, **k)


loop._rounds = first_round
out = run(cfg)
print("@@PHASES@@ " + json.dumps({"marks": marks, "cpu": cpu, "round_times": out["round_times"], "startup_s": out["startup_s"], "accuracy": out["accuracy"]}))
"""

#: the critical path of a start-up, in order: each phase ends at this mark (``@`` marks come from
#: the workers: the last worker to get there)
CRITICAL = (
    ("interpreter start", "interpreter"),
    ("benchmark imports, Hydra compose", "imports + compose"),
    ("import ray (main thread)", "import ray"),
    ("ray.init: GCS start", "GCS up"),
    ("ray.init: autoscaler monitor start", "head processes (monitor)"),
    ("ray.init: log monitor + raylet launch", "log monitor + raylet launched"),
    (
        "raylet waits for its dashboard agent, registers",
        "raylet registered (waits for the dashboard agent)",
    ),
    ("ray.init: driver connects", "driver connected: ray.init returns"),
    ("workers: process, import ray, connect", "@begin"),
    ("workers: preload torch + host code", "@end"),
    ("host construction (shard, model, warm-up), server", "hosts up, round 1 begins"),
)
#: the driver's own work, in parallel with the critical path
DRIVER = (
    "driver: background imports joined",
    "driver: data loaded + partitioned",
    "driver: host actors created",
    "driver: server built",
)
#: process kinds for the CPU table: (name, what its command line contains)
KINDS = (
    ("Ray dashboard agent", "dashboard/agent.py"),
    ("Ray dashboard head", "dashboard/dashboard.py"),
    ("Ray runtime-env agent", "runtime_env/agent"),
    ("Ray autoscaler monitor", "autoscaler/_private/monitor.py"),
    ("Ray log monitor", "log_monitor.py"),
    ("Ray GCS server", "gcs_server"),
    ("raylet", "raylet/raylet"),
    ("Flagstaff's Ray watchdog", "ray_watchdog.py"),
    ("client host workers (all)", "default_worker.py"),
    ("driver (benchmark process)", "@@driver"),
)

_STAMP = "import os, time\nwith open(os.environ['FLAGSTAFF_STAMPS'], 'a') as f:\n    f.write(f'{os.getpid()} WHAT {time.time()}\\n')\n"


def _kind(cmd: str, driver_pid: int, pid: int) -> str:
    if pid == driver_pid:
        return "driver (benchmark process)"
    if cmd.startswith("ray::ClientHost") or cmd.startswith("ray::IDLE"):
        return "client host workers (all)"
    if cmd.startswith("ray::DashboardAgent"):
        return "Ray dashboard agent"
    if cmd.startswith("ray::RuntimeEnvAgent"):
        return "Ray runtime-env agent"
    return next((name for name, key in KINDS if key in cmd), "other")


def _profile_once(workload: str, rounds: int, extra: list[str]) -> dict:
    """One start-up, profiled in a fresh process (the child above)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for what in ("begin", "end"):
            Path(tmp, f"_stamp_{what}.py").write_text(_STAMP.replace("WHAT", what))
        stamps = Path(tmp, "stamps")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tmp, env.get("PYTHONPATH")]))
        env["FLAGSTAFF_STAMPS"] = str(stamps)
        t0 = time.time()
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                PHASES_CHILD,
                repr(t0),
                workload,
                str(rounds),
                str(ROOT),
                *extra,
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
            env=env,
        )
        line = [x for x in out.stdout.splitlines() if x.startswith("@@PHASES@@ ")]
        if out.returncode != 0 or not line:
            raise SystemExit(f"profiled start failed:\n{out.stderr[-3000:]}")
        res = json.loads(line[-1].split(" ", 1)[1])
        by: dict[str, list[float]] = {}
        for row in stamps.read_text().splitlines() if stamps.exists() else []:
            _, what, t = row.split()
            by.setdefault(what, []).append(float(t) - t0)
    for what, ts in by.items():
        res["marks"][f"@{what}"] = max(ts)  # the last worker
    rt = res["round_times"]
    res["first_round_extra"] = rt[0] - statistics.median(rt[1:] or rt)
    driver_pid = min(int(k.split()[0]) for k in res["cpu"])  # the child started the others
    kinds: dict[str, float] = {}
    for key, sec in res["cpu"].items():
        pid, _, cmd = key.partition(" ")
        kind = _kind(cmd, driver_pid, int(pid))
        kinds[kind] = kinds.get(kind, 0.0) + sec
    res["cpu_by_kind"] = kinds
    return res


def phases(workload: str, repeat: int, rounds: int, extra: list[str]) -> None:
    """Profile ``repeat`` start-ups; print the critical path, the driver's work and the CPU."""
    load0 = os.getloadavg()[0]
    runs = [_profile_once(workload, rounds, extra) for _ in range(repeat)]
    load1 = os.getloadavg()[0]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ray
    from _provenance import markdown, provenance

    print(markdown(provenance(load_average=[load0, load1])))
    print(
        f"workload {workload}, flagstaff-ray, {repeat} fresh starts (medians), ray {ray.__version__},"
        f" {os.cpu_count()} CPUs, OMP_NUM_THREADS=1, load average {load0:.2f} at start, "
        f"{load1:.2f} at end{', overrides ' + ' '.join(extra) if extra else ''}"
    )
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print("\n| critical-path phase | ends at (s) | phase (s) |\n|---|---|---|")
    totals = []
    rows = []
    for r in runs:
        t_prev, durs = 0.0, []
        for _, key in CRITICAL:  # a phase ends no earlier than the one before it (clipped at 0)
            t = max(t_prev, r["marks"].get(key, t_prev))
            durs.append(t - t_prev)
            t_prev = t
        durs.append(r["first_round_extra"])
        rows.append(durs)
        totals.append(t_prev + r["first_round_extra"])
    at = 0.0
    for i, (label, _) in enumerate(CRITICAL):
        d = med([row[i] for row in rows])
        at += d
        print(f"| {label} | {at:.2f} | {d:.2f} |")
    d = med([row[-1] for row in rows])
    print(f"| round 1 beyond a steady round (first-call work) | {at + d:.2f} | {d:.2f} |")
    print(
        f"| **effective start-up** (sum; median of runs {med(totals):.2f}: "
        f"{', '.join(f'{t:.2f}' for t in totals)}) | | **{at + d:.2f}** |"
    )
    print("\n| driver's own work (beside the path) | at (s) |\n|---|---|")
    for key in DRIVER:
        print(
            f"| {key.removeprefix('driver: ')} | {med([r['marks'].get(key, float('nan')) for r in runs]):.2f} |"
        )
    print("\n| process (until round 1 begins) | CPU (s) |\n|---|---|")
    kinds = sorted({k for r in runs for k in r["cpu_by_kind"]})
    cpu = {k: med([r["cpu_by_kind"].get(k, 0.0) for r in runs]) for k in kinds}
    for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} |")
    print(f"| all | {sum(cpu.values()):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="starts per path (default 5)")
    ap.add_argument("--phases", metavar="WORKLOAD", help="profile a flagstaff-ray start-up")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of a --phases run")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override")
    args = ap.parse_args()
    if args.phases:
        phases(args.phases, args.repeat, args.rounds, args.override)
        return
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
