"""Where one simulation round's time goes, by component (issue 22 items 1-2).

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/round_profile.py --experiment sim_w1 --backend local
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/round_profile.py --experiment sim_cnn --backend ray

It builds the run as ``flagstaff-train experiment=... backend=...`` does, runs ``--warmup`` rounds,
then ``--rounds`` rounds without evaluation (what benchmarks/simulation.py times) and prints one
markdown table whose rows sum to the measured round:

``--backend local`` (one thread does everything): the thread CPU time (``time.thread_time``) of
each component, exclusive (a component's time leaves out the components it calls), summed over the
rounds and divided by their number; CPU time, not wall time, so that other processes on a shared
machine inflate it less. The last rows give the round's thread CPU and wall time (median) and the
evaluation the round leaves out.

``--backend ray`` (a driver and host actors in parallel): wall time per round by phase on the
driver: sampling, submitting the hosts' calls, the wait (the slowest host's own ``train`` time,
reported by the host, and the rest of the wait: Ray's dispatch, (de)serialization and the return
of the reply), fetching the replies, the server step. Then each process's CPU time per round
(psutil), which says what Ray's machinery costs on each side.

Wrappers are plain function replacements installed for the measurement only.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LOCAL_PARTS = (  # (module, object, attribute, label); exclusive thread CPU of each
    ("flagstaff.system.server", "ParameterServer", "round", "server: sampling, placement, metrics"),
    ("flagstaff.system.host", "ClientHost", "train", "host: ids, row gather, reply"),
    ("flagstaff.system.host", None, "make_plan", "host: batch plan (clients.plan.make_plan)"),
    ("flagstaff.system.host", None, "reduce_reply", "host: weighted sum of the updates (float64)"),
    ("flagstaff.clients.trainer", "LocalSGD", "train", "trainer: set-up, chunks, result"),
    (
        "flagstaff.clients.trainer",
        "LocalSGD",
        "_train_chunk",
        "trainer: step loop (batch gather, losses, x0 copies)",
    ),
    ("flagstaff.clients.trainer", "ParamSpec", "flatten", "trainer: gradients -> (K, d) (cat)"),
    ("flagstaff.clients.trainer", "ParamSpec", "unflatten", "trainer: (K, d) -> parameter views"),
    ("flagstaff.clients.trainer", "LocalSGD", "_step", "trainer: SGD step"),
    ("flagstaff.clients.rules", "LocalRule", "finish", "rule: message x_K - x_t"),
    (
        "flagstaff.strategies.server_step",
        "ServerStep",
        "reduced",
        "server step (sum of host sums, FedAvg)",
    ),
)


def _wrap(owner: Any, name: str, fn: Callable[[Callable], Callable]) -> None:
    setattr(owner, name, fn(getattr(owner, name)))


def _exclusive(acc: dict[str, float], stack: list[float], label: str) -> Callable:
    """A wrapper adding a call's thread CPU, less its wrapped callees', to ``acc[label]``."""

    def deco(f: Callable) -> Callable:
        @functools.wraps(f)
        def g(*a: Any, **k: Any) -> Any:
            t = time.thread_time()
            stack.append(0.0)
            try:
                return f(*a, **k)
            finally:
                took = time.thread_time() - t
                acc[label] = acc.get(label, 0.0) + took - stack.pop()
                if stack:
                    stack[-1] += took

        return g

    return deco


def _timed(acc: dict[str, float], label: str) -> Callable:
    def deco(f: Callable) -> Callable:
        @functools.wraps(f)
        def g(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t

        return g

    return deco


def profile_local(server: Any, warmup: int, rounds: int) -> list[str]:
    import importlib

    acc: dict[str, float] = {}
    stack: list[float] = []
    for mod, obj, attr, label in LOCAL_PARTS:
        m = importlib.import_module(mod)
        _wrap(getattr(m, obj) if obj else m, attr, _exclusive(acc, stack, label))
    models = {type(h.model) for h in server.pool.hosts}
    for cls in models:
        if hasattr(cls, "loss_grad"):
            _wrap(cls, "loss_grad", _exclusive(acc, stack, "model: forward + backward (loss_grad)"))
    for r in range(warmup):
        server.round(r, evaluate=False)
    acc.clear()
    cpu, wall = [], []
    for r in range(warmup, warmup + rounds):
        w, c = time.perf_counter(), time.thread_time()
        server.round(r, evaluate=False)
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    ev = []
    for _ in range(5):
        c = time.thread_time()
        server.evaluate()
        ev.append(time.thread_time() - c)
    lines = ["| component | CPU ms per round |", "|---|---|"]
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {1e3 * v / rounds:.2f} |")
    lines.append(f"| **round (sum of the rows)** | **{1e3 * sum(acc.values()) / rounds:.2f}** |")
    lines.append(
        f"| round, median thread CPU / wall | {1e3 * np.median(cpu):.2f} / "
        f"{1e3 * np.median(wall):.2f} |"
    )
    lines.append(f"| (evaluation, not in the round) | {1e3 * np.median(ev):.2f} |")
    return lines


def profile_ray(server: Any, warmup: int, rounds: int) -> list[str]:
    import psutil
    import ray

    import flagstaff.strategies.server_step as step_mod
    import flagstaff.system.pool as pool_mod

    acc: dict[str, float] = {}
    _wrap(pool_mod.RayPool, "train", _timed(acc, "pool"))
    _wrap(ray, "wait", _timed(acc, "wait"))
    _wrap(ray, "get", _timed(acc, "get"))
    _wrap(step_mod.ServerStep, "reduced", _timed(acc, "step"))
    for r in range(warmup):
        server.round(r, evaluate=False)
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]

    def cpu() -> dict[int, tuple[str, float]]:
        out = {}
        for p in procs:
            try:
                t = p.cpu_times()
                out[p.pid] = (p.name(), t.user + t.system)
            except psutil.Error:
                pass
        return out

    acc.clear()
    c0 = cpu()
    walls, slowest = [], []
    for r in range(warmup, warmup + rounds):
        t = time.perf_counter()
        m = server.round(r, evaluate=False)
        walls.append(time.perf_counter() - t)
        slowest.append(m["host_train_s"])
    c1 = cpu()
    n = rounds
    wall = sum(walls) / n
    pool, wait, get, step = (acc[k] / n for k in ("pool", "wait", "get", "step"))
    host = sum(slowest) / n
    rows = [
        ("driver: sampling, placement, metrics", wall - pool - step),
        ("driver: submit the hosts' calls", pool - wait - get),
        ("hosts: the slowest host's train() (hosts run in parallel)", host),
        ("Ray: dispatch, (de)serialization, reply (the wait less that train())", wait - host),
        ("driver: fetch the replies (ray.get)", get),
        ("server step (sum of host sums, FedAvg)", step),
    ]
    lines = ["| component | wall ms per round |", "|---|---|"]
    lines += [f"| {k} | {1e3 * v:.2f} |" for k, v in rows]
    lines.append(
        f"| **round (mean; median {1e3 * np.median(walls):.2f})** | **{1e3 * wall:.2f}** |"
    )
    lines += ["", "| process | CPU ms per round |", "|---|---|"]
    for pid, (name, c) in sorted(
        c1.items(), key=lambda kv: -(kv[1][1] - c0.get(kv[0], ("", 0))[1])
    ):
        took = (c - c0.get(pid, (name, 0.0))[1]) / n * 1e3
        if took >= 0.05:
            lines.append(f"| {'driver' if pid == me.pid else name} ({pid}) | {took:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="sim_w1")
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--rounds", type=int, default=100, help="rounds measured")
    parser.add_argument("--warmup", type=int, default=3, help="rounds run first, not measured")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. cluster.hosts=1")
    args = parser.parse_args(argv)
    from _provenance import markdown, pin_threads, provenance

    pin_threads(1)
    import flagstaff
    from flagstaff.system.build import build_run
    from flagstaff.system.runner import start

    total = args.warmup + args.rounds
    cfg = flagstaff.compose(
        f"experiment={args.experiment}",
        f"backend={args.backend}",
        "progress=false",
        f"rounds={total}",
        *args.overrides,
    )
    run = build_run(cfg)
    prov = provenance(None if argv is None else ["benchmarks/round_profile.py", *argv])
    with ExitStack() as stack:
        server = start(run, stack).server
        fn = profile_local if args.backend == "local" else profile_ray
        lines = fn(server, args.warmup, args.rounds)
    load = os.getloadavg()
    print(markdown(prov))
    print(
        f"{args.experiment} backend={args.backend}: {args.rounds} rounds after {args.warmup}; "
        f"load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} at the end\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
