"""Federated accuracy against bytes sent, compressed vs uncompressed updates (issue 9, part 5).

Setting: sklearn digits, 100 IID clients, 20 sampled per round, MLP 64-64-10 (one hidden layer of
64; d = 4810 parameters), 1 local epoch of SGD (lr 0.1, batch 8), FedAvg (server lr 1), ``backend=
local``. Codecs (system/codecs.py, docs/communication.md): uncompressed (``comm=none``), PowerSGD
rank 1/2/4 (Vogels et al. 2019) and the seeded rand-k sketch (ratio 0.1 and 0.05), each with and
without error feedback; and the coordinate-wise median aggregator with and without compression.
``bytes_up`` per round is the sum over the round's clients of the payload each sends (float32
factors + uncompressed biases), read from metrics.jsonl; ``bytes_down`` is 20 x d x 4 bytes for every
row (the codecs compress only the upload). Accuracy: final test accuracy, mean +- std over seeds.
The target (issue 9): within 1 point of uncompressed FedAvg with at least 10x fewer bytes up.

    python benchmarks/_compress_comm.py            # 300 rounds, 3 seeds; writes results/compress_comm.md
    python benchmarks/_compress_comm.py --quick    # 60 rounds, 1 seed, prints only
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BASE = (
    "backend=local",
    "data=digits",
    "partition=iid",
    "model=mlp",
    "model.hidden=[64]",
    "num_clients=100",
    "clients_per_round=20",
    "client=sgd",
    "client.lr=0.1",
    "client.batch_size=8",
    "client.epochs=1",
    "strategy=fedavg",
    "progress=false",
    "checkpoint_every=0",
)

#: (label, aggregator, comm overrides)
RUNS: list[tuple[str, str, tuple[str, ...]]] = [
    ("uncompressed (FedAvg)", "mean", ()),
    *[
        (
            f"PowerSGD rank {r}{' + EF' if ef else ''}",
            "mean",
            ("comm=powersgd", f"comm.rank={r}", f"comm.error_feedback={str(ef).lower()}"),
        )
        for r in (1, 2, 4)
        for ef in (True, False)
    ],
    *[
        (
            f"sketch ratio {q}{' + EF' if ef else ''}",
            "mean",
            ("comm=sketch", f"comm.ratio={q}", f"comm.error_feedback={str(ef).lower()}"),
        )
        for q in (0.1, 0.05)
        for ef in (True, False)
    ],
    ("uncompressed", "median", ()),
    ("PowerSGD rank 2 + EF", "median", ("comm=powersgd", "comm.rank=2")),
    ("PowerSGD rank 1 + EF", "median", ("comm=powersgd", "comm.rank=1")),
    (
        "sketch ratio 0.05",
        "median",
        ("comm=sketch", "comm.ratio=0.05", "comm.error_feedback=false"),
    ),
]


def run_one(over: tuple[str, ...]) -> dict[str, Any]:
    """One training run in this process; the metric rows and the final accuracy."""
    from hydra import compose, initialize_config_module

    from flagstaff.system.config import register
    from flagstaff.system.runner import train

    register()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        cfg = compose("train", overrides=list(over))
    with TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(cfg, run_dir=tmp)
        wall = time.perf_counter() - t0
    rows = res["metrics"]
    return {
        "accuracy": res["accuracy"],
        "curve": {r["round"]: r["accuracy"] for r in rows if "accuracy" in r},
        "bytes_up": rows[-1]["bytes_up"],
        "bytes_down": rows[-1]["bytes_down"],
        "wall_s": wall,
    }


def _fmt(xs: list[float]) -> str:
    pct = [100 * x for x in xs]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} +- {statistics.stdev(pct):.1f}"


def _reach(rs: list[dict[str, Any]], target: float, per_round: int) -> str:
    """Rounds (evaluated every 10) and MB uploaded until the test accuracy first reaches
    ``target``: mean over the seeds that reach it ("k/n seeds" when not all do)."""
    hit = [min((t for t, a in r["curve"].items() if a >= target), default=None) for r in rs]
    ok = [t for t in hit if t is not None]
    if not ok:
        return "never | -"
    note = "" if len(ok) == len(hit) else f" ({len(ok)}/{len(hit)} seeds)"
    t = statistics.mean(ok)
    return f"{t:.0f}{note} | {t * per_round / 1e6:.2f}"


def main(quick: bool = False) -> str:
    """Run every configuration; return Markdown tables and the target check."""
    from flagstaff.system.rundir import RunDir

    RunDir.plot_curves = lambda self, *a, **k: None  # no PNGs needed
    logging.getLogger("flagstaff").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    rounds, seeds = (60, [0]) if quick else (300, [0, 1, 2])
    mid, target = rounds // 3, 0.95 if not quick else 0.9
    every = "eval_every=10"
    t_all = time.perf_counter()
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for label, agg, comm in RUNS:
        for s in seeds:
            over = (*BASE, f"rounds={rounds}", every, f"aggregator={agg}", f"seed={s}", *comm)
            results.setdefault((label, agg), []).append(run_one(over))
    ref_bytes = results[("uncompressed (FedAvg)", "mean")][0]["bytes_up"]
    ref_acc = statistics.mean(r["accuracy"] for r in results[("uncompressed (FedAvg)", "mean")])
    med_acc = statistics.mean(r["accuracy"] for r in results[("uncompressed", "median")])
    lines = [
        f"Digits, 100 IID clients, 20 per round, MLP 64-64-10 (d = 4810), SGD lr 0.1 batch 8, "
        f"1 local epoch, {rounds} rounds, seeds {seeds}; accuracy in % (mean +- std over seeds), "
        "evaluated every 10 rounds; 'vs uncompressed' compares with the same aggregator "
        "uncompressed. "
        f"bytes_down per round is {results[('uncompressed (FedAvg)', 'mean')][0]['bytes_down']:,} "
        "for every row (20 clients x d x 4 bytes; only the upload is compressed).",
        "",
        f"| aggregator | communication | bytes_up / round | fewer bytes | accuracy @ {mid} | "
        f"final accuracy | vs uncompressed (points) | rounds to {100 * target:.0f}% | "
        f"MB up to {100 * target:.0f}% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    met = []
    for (label, agg), rs in results.items():
        b = rs[0]["bytes_up"]
        acc = [r["accuracy"] for r in rs]
        base = ref_acc if agg == "mean" else med_acc
        delta = 100 * (statistics.mean(acc) - base)
        ratio = ref_bytes / b
        lines.append(
            f"| {agg} | {label} | {b:,} | {ratio:.1f}x | {_fmt([r['curve'][mid] for r in rs])} | "
            f"{_fmt(acc)} | {delta:+.1f} | {_reach(rs, target, b)} |"
        )
        if agg == "mean" and label != "uncompressed (FedAvg)" and ratio >= 10 and delta >= -1:
            met.append(f"{label} ({ratio:.1f}x fewer bytes up, {delta:+.1f} points)")
    lines += [
        "",
        "Target (issue 9): within 1 point of uncompressed FedAvg with at least 10x fewer bytes up "
        "per round: " + ("**met** by " + "; ".join(met) if met else "**not met**") + ".",
        "",
        f"Total time {time.perf_counter() - t_all:.0f} s for {len(RUNS) * len(seeds)} runs "
        "(backend=local, 2-core machine shared with other jobs).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="60 rounds, 1 seed, written to compress_comm_quick.md (what tests/test_tables.py reruns)",
    )
    args = ap.parse_args()
    md = main(quick=args.quick)
    print(md)
    from _provenance import markdown, provenance

    name = "compress_comm_quick.md" if args.quick else "compress_comm.md"
    out = ROOT / "benchmarks" / "results" / name
    head = "# Compressed communication (benchmarks/_compress_comm.py)\n\n"
    out.write_text(head + markdown(provenance()) + "\n\n" + md + "\n")
    print(f"\nwrote {out}")
