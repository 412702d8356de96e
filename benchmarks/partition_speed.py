"""Seconds to partition a training set: Flagstaff's partitioners vs Flower Datasets' (partition=flwr).

Labels of 10 classes, 50,000 samples (CIFAR-10-sized) over 100 clients and 1,000,000 over 10,000, and a
FEMNIST-sized writer column (800,000 samples, 3,500 writers) split one client per writer, each
through ``clients.partition.partition`` as a run calls it (the Flower partitioners see the same
columns as a ``datasets.Dataset``). One thread; the best of ``--repeats`` runs.

    python benchmarks/partition_speed.py --out benchmarks/results/partition_speed   # .md and .json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import markdown, pin_threads, provenance  # noqa: E402


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(1)
    import datasets
    import flwr_datasets.partitioner as fp
    import numpy as np

    from flagstaff.clients.partition import partition

    datasets.disable_progress_bars()
    rng = np.random.default_rng(0)
    writers = rng.integers(0, 3_500, 800_000)
    rows = []
    for n, k in ((50_000, 100), (1_000_000, 10_000)):
        labels = rng.integers(0, 10, n)
        cols = {"label": labels}
        cases = [
            ("iid", "Flagstaff", dict(kind="iid")),
            ("iid", "Flower IidPartitioner", dict(kind="flwr", partitioner=fp.IidPartitioner)),
            ("Dirichlet(0.5)", "Flagstaff", dict(kind="dirichlet", alpha=0.5)),
            (
                "Dirichlet(0.5)",
                "Flower DirichletPartitioner",
                dict(
                    kind="flwr",
                    partitioner=partial(
                        fp.DirichletPartitioner,
                        partition_by="label",
                        alpha=0.5,
                        min_partition_size=1,
                    ),
                ),
            ),  # fmt: skip
        ]
        for split, who, kw in cases:
            fn = partial(partition, labels, k, columns=cols, **kw)
            rows.append((f"{split}, {n:,} samples", k, who, _time(fn, args.repeats)))
    wcols = {"label": np.zeros(len(writers), dtype=np.int64), "writer_id": writers}
    nat = dict(kind="natural", key="writer_id")
    flw = dict(kind="flwr", partitioner=partial(fp.NaturalIdPartitioner, partition_by="writer_id"))
    for who, kw in (("Flagstaff", nat), ("Flower NaturalIdPartitioner", flw)):
        s = _time(lambda kw=kw: partition(wcols["label"], 3_500, columns=wcols, **kw), args.repeats)
        rows.append(("natural, 800,000 samples", 3_500, who, s))
    lines = ["| split | clients | partitioner | seconds |", "|---|---:|---|---:|"]
    lines += [f"| {a} | {k:,} | {who} | {s:.3f} |" for a, k, who, s in rows]
    table = "\n".join(lines)
    from importlib import metadata

    prov = provenance(data_packages={n: metadata.version(n) for n in ("datasets", "flwr-datasets")})
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        keys = ("split", "clients", "partitioner", "seconds")
        blob = {"provenance": prov, "rows": [dict(zip(keys, r, strict=True)) for r in rows]}
        out.with_suffix(".json").write_text(json.dumps(blob, indent=1))
        out.with_suffix(".md").write_text(markdown(prov) + "\n" + table + "\n")


if __name__ == "__main__":
    main()
