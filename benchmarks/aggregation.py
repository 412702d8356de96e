"""Aggregation speed and memory vs n and d (issue 4, item 4b); prints a markdown table.

    python benchmarks/aggregation.py --quick          # n = 15, 30, 60 at d = 1e5, 1e6
    python benchmarks/aggregation.py                  # adds d = 1.1e7 (ResNet-18 size)
    python benchmarks/aggregation.py --n 15 --d 1.1e7 --max-seconds 120
    python benchmarks/aggregation.py --target         # Flag (Gram) / Multi-Krum at n=15, d=1.1e7

Rules: Flag Aggregator (Gram and SVD routes, default settings: m = ceil(n/2), lam = 0,
max_iter = 1; the published table was measured with the earlier default of 10), Multi-Krum, coordinate-wise median, geometric median, Bulyan; f = n // 5, lowered
to the largest valid value for Bulyan (n >= 4f + 3). Inputs are float32 Gaussian (n, d).

Method. Every (rule, n, d) runs in its own subprocess, so one configuration's memory cannot hide
another's. Time: wall clock of ``agg(U)``, median over ``--repeats`` runs (fewer when the runs
exceed ``--max-seconds`` in total; the count is shown). Memory: extra peak resident memory over the
process's memory with U allocated (after a small untimed warm-up call): the kernel's high-water mark (VmHWM) is reset just before the
first call (``/proc/self/clear_refs``) and read after the runs; on systems without that, the
column shows "n/a". CPU: process CPU time of one call (all threads), median over the runs; on a
shared machine it is steadier than the wall clock. tracemalloc would miss torch's allocations, hence RSS. Threads: torch's
default (all cores). Configurations whose estimated memory exceeds ``--mem-gb`` or whose
estimated time (extrapolated linearly in d from the same rule at a smaller d) exceeds
``--max-seconds`` are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = ["flag-gram", "flag-svd", "multikrum", "median", "geomed", "bulyan"]


def f_for(rule: str, n: int) -> int:
    f = n // 5
    if rule == "bulyan":
        f = min(f, (n - 3) // 4)
    return f


def make(rule: str, n: int):
    from flagstaff.strategies.aggregators import build

    f = f_for(rule, n)
    if rule == "flag-gram":
        return build("flag", f=f, n=n, method="gram")
    if rule == "flag-svd":
        return build("flag", f=f, n=n, method="svd")
    return build(rule, f=f, n=n)


def est_bytes(rule: str, n: int, d: int) -> float:
    """Rough peak bytes (inputs included) used to skip configurations that cannot fit."""
    x = 4.0 * n * d
    extra = {
        "flag-gram": 0.1,
        "multikrum": 0.1,
        "geomed": 0.1,
        "flag-svd": 4.0,  # unit copy, W, its SVD factors
        "median": 5.0,  # transposed copy, sorted values and int64 indices
        "bulyan": 6.0,
    }[rule]
    return x * (1.0 + extra)


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def worker(rule: str, n: int, d: int, repeats: int, max_seconds: float) -> dict:
    import torch

    torch.manual_seed(0)
    U = torch.randn(n, d, dtype=torch.float32)
    agg = make(rule, n)
    agg(U[:, :1000].clone())  # warm-up on a small slice: kernels and allocator, not timed
    base = _rss_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        hwm_ok = True
    except OSError:
        hwm_ok = False
    times: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = agg(U)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del out
        if time.perf_counter() - start > max_seconds:
            break
    peak = _rss_bytes("VmHWM") if hwm_ok else None
    extra = None if peak is None or base is None else max(peak - base, 0)
    return {
        "time": statistics.median(times),
        "cpu": statistics.median(cpu),
        "runs": len(times),
        "extra_bytes": extra,
    }


def compare(n: int, d: int, repeats: int) -> dict:
    """Flag (Gram route) vs Multi-Krum on the same inputs, calls interleaved so that load from
    other processes hits both alike; returns the medians and the median of per-pair ratios."""
    import torch

    torch.manual_seed(0)
    U = torch.randn(n, d, dtype=torch.float32)
    flag, mk = make("flag-gram", n), make("multikrum", n)
    flag(U[:, :1000].clone()), mk(U[:, :1000].clone())
    tf, tm = [], []
    for _ in range(repeats):
        for agg, ts in ((flag, tf), (mk, tm)):
            t0 = time.perf_counter()
            agg(U)
            ts.append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(tf, tm, strict=True)]
    return {
        "flag": statistics.median(tf),
        "multikrum": statistics.median(tm),
        "ratio": statistics.median(ratios),
    }


def run_config(rule: str, n: int, d: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", rule, str(n), str(d), str(args.repeats)]
    cmd += ["--max-seconds", str(args.max_seconds)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=4 * args.max_seconds + 120
        )
    except subprocess.TimeoutExpired:
        return {"skip": f"timed out after {4 * args.max_seconds + 120:.0f} s"}
    if proc.returncode != 0:
        return {"skip": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_d(d: int) -> str:
    exp = int(math.floor(math.log10(d)))
    mant = d / 10**exp
    return f"{mant:g}e{exp}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[15, 30, 60])
    p.add_argument("--d", type=float, nargs="+", default=[1e5, 1e6, 1.1e7])
    p.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    p.add_argument("--quick", action="store_true", help="only d <= 1e6")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=60.0, help="time budget per config")
    p.add_argument("--mem-gb", type=float, default=None, help="skip configs estimated above this")
    p.add_argument(
        "--target",
        action="store_true",
        help="only the issue's target: Flag (Gram) vs Multi-Krum at n=15, d=1.1e7, interleaved",
    )
    p.add_argument(
        "--worker", nargs=4, metavar=("RULE", "N", "D", "REPEATS"), help=argparse.SUPPRESS
    )
    args = p.parse_args()

    if args.worker:
        rule, n, d, repeats = args.worker
        res = worker(rule, int(n), int(d), int(repeats), args.max_seconds)
        print(json.dumps(res))
        return

    from _provenance import markdown, provenance  # benchmarks/ is sys.path[0]

    print(markdown(provenance()))
    if args.target:
        n, d = args.n[0], int(max(args.d))
        res = compare(n, d, max(args.repeats, 5))
        print(
            f"n={n} d={fmt_d(d)}: flag-gram {res['flag']:.3f} s, multikrum {res['multikrum']:.3f} s"
        )
        print(f"median ratio flag/multikrum = {res['ratio']:.2f} (target <= 1.5)")
        return

    import psutil

    mem_gb = args.mem_gb or 0.7 * psutil.virtual_memory().available / 2**30
    ds = sorted(int(d) for d in args.d if not (args.quick and d > 1e6))
    print(
        f"# aggregation benchmark: float32 inputs, {os.cpu_count()} cores, budget {mem_gb:.1f} GB"
    )
    print("| n | d | f | rule | wall (s) | CPU (s) | runs | extra peak RSS (MB) | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    seen: dict[tuple[str, int], tuple[int, float]] = {}
    for n in args.n:
        for d in ds:
            for rule in args.rules:
                f = f_for(rule, n)
                note = ""
                if est_bytes(rule, n, d) / 2**30 > mem_gb:
                    note = f"skipped: needs about {est_bytes(rule, n, d) / 2**30:.1f} GB"
                elif (rule, n) in seen:
                    d0, t0 = seen[(rule, n)]
                    if t0 * d / d0 > args.max_seconds:
                        note = f"skipped: estimated {t0 * d / d0:.0f} s > --max-seconds"
                if note:
                    print(
                        f"| {n} | {fmt_d(d)} | {f} | {rule} | - | - | - | - | {note} |", flush=True
                    )
                    continue
                res = run_config(rule, n, d, args)
                if "skip" in res:
                    print(f"| {n} | {fmt_d(d)} | {f} | {rule} | - | - | - | - | {res['skip']} |")
                    continue
                seen[(rule, n)] = (d, res["time"])
                mb = "n/a" if res["extra_bytes"] is None else f"{res['extra_bytes'] / 2**20:.0f}"
                print(
                    f"| {n} | {fmt_d(d)} | {f} | {rule} | {res['time']:.3f} | {res['cpu']:.2f} "
                    f"| {res['runs']} "
                    f"| {mb} | |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
