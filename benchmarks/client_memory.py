"""What one client costs in memory at scale (issue 22 item 4; docs/cluster.md "Scale").

Usage (from the repository root)::

    .venv/bin/python benchmarks/client_memory.py [--clients 100000]

Builds ``experiment=sim_w4`` (digits, clients of 40 samples drawn with replacement, MLP 64-64-10,
d = 4,810 parameters) and measures with ``tracemalloc`` the bytes per client of each structure that
grows with the number of clients: the driver's partition (one index array per client) and the run
directory's ``partition.json``, a host's
shard (``HostShard.index`` and per-client offsets/sizes/ids), a host's client table, the per-client
state store before any client trains and per client that trained (SCAFFOLD/FedDyn/FedSpeed: one
d-vector each), and the batched DP-SGD accountant history per client that trained. Numpy arrays are
traced; torch tensors are counted from their sizes.
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _traced(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the bytes it left allocated (tracemalloc)."""
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    out = fn()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return out, sum(s.size_diff for s in after.compare_to(before, "filename"))


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of bytes per client."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100_000)
    args = parser.parse_args(argv)
    import json

    import numpy as np
    from _provenance import markdown, provenance
    from conftest import compose

    from flagstaff.clients.dp import private_partition
    from flagstaff.clients.partition import summarize, with_replacement
    from flagstaff.system.build import build_run
    from flagstaff.system.client_state import ClientStateStore
    from flagstaff.system.host import ClientHost
    from flagstaff.system.runner import _shards

    n = args.clients
    print(markdown(provenance(None if argv is None else ["benchmarks/client_memory.py", *argv])))
    run = build_run(compose("experiment=sim_w4", "backend=local", f"num_clients={n}"))
    d = run.federated.spec.numel
    labels = run.data.y_train.numpy()
    rows: list[tuple[str, str, float]] = []
    parts, b = _traced(lambda: with_replacement(labels, n, 40, 0))
    rows.append(("driver", "partition: one index array per client (40 x int64)", b / n))
    summary = private_partition(summarize(parts, labels, run.data.num_classes), run.kinds)
    text = json.dumps(summary, indent=2)  # as RunDir.write_json writes partition.json
    rows.append(("run directory", "partition.json (on disk)", len(text.encode()) / n))
    (_, shards), b = _traced(lambda: _shards(parts, run.data, 1, run.federated.adversary))
    rows.append(("host", "shard: 40 x int32 row indices + offset, size, id", b / n))
    _, b = _traced(lambda: ClientHost(0, shards[0], run.federated.host))
    rows.append(("host", "client table (id -> position) of a FedAvg host", b / n))
    store, b = _traced(lambda: ClientStateStore(["c_i"], n, d))
    rows.append(("host", "state store, clients that never trained", b / n))
    k = min(n, 5_000)
    vals = {"c_i": __import__("torch").ones(k, d)}
    store.scatter(np.arange(k), vals)
    held = sum(t.numel() * t.element_size() for t in store.values())
    rows.append(("host", f"state store, per client that trained (d={d}, 1 vector)", held / k))
    dp = build_run(compose("experiment=sim_w4", "client=dpsgd_batched", f"num_clients={n}"))
    trainer = dp.federated.trainer

    def account() -> None:
        for c in range(k):  # 3 rounds each, same noise and rate: Opacus merges them into one entry
            for _ in range(3):
                trainer._account(c, 1.0, 0.2, 5)

    _, b = _traced(account)
    rows.append(("host", "batched DP-SGD accountant, per client that trained", b / k))
    print(f"\n## Bytes per client, {n} clients (experiment=sim_w4, d={d})\n")
    print("| where | what | bytes per client |\n|---|---|---|")
    for where, what, per in rows:
        print(f"| {where} | {what} | {per:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
