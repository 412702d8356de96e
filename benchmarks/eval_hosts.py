"""Seconds per evaluation round: the test set scored in the server's process vs on the client hosts.

CIFAR-10-shaped generated data (10,000 normalized 3x32x32 test images, 10 classes), ResNet-8 with
GroupNorm (conf/model/resnet8.yaml), the parameters at their seeded initialization. Rows: the
single-process evaluation (``system.server.evaluate_model``, the path before issue 21 item 4) at 1
and 2 torch threads, and the hosts' evaluation (``ClientHost.evaluate`` through the pool's
``evaluate``, system/eval.py) with 1 and 2 in-process hosts (backend=local) and 1 and 2 Ray actors
(backend=ray, one thread each). The median of ``--repeats`` rounds after one warm-up, the rows
taking turns (the load of this shared machine drifts: run one after the other, rows that do the
same arithmetic differed by 1.6x); the load average is printed with the table.

    nice -n 10 python benchmarks/eval_hosts.py --out benchmarks/results/eval_hosts   # .md and .json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import markdown, pin_threads, provenance  # noqa: E402

MODEL = {"_target_": "flagstaff.clients.models.build_model", "kind": "resnet8", "groups": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--test", type=int, default=10_000, help="test images")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(1)
    from flagstaff.system.ray_start import make_ray_private

    make_ray_private()  # before anything imports ray (system/ray_start.py)
    import numpy as np
    import torch

    from flagstaff.clients.trainer import LocalSGD, ParamSpec
    from flagstaff.system.eval import combine, eval_shards
    from flagstaff.system.host import ClientHost, HostShard
    from flagstaff.system.pool import LocalPool, RayPool
    from flagstaff.system.server import evaluate_model
    from flagstaff.system.specs import HostSpec, ModelSpec

    g = torch.Generator().manual_seed(0)
    x_test = torch.randn(args.test, 3, 32, 32, generator=g)
    y_test = torch.randint(0, 10, (args.test,), generator=g)
    x_train, y_train = x_test[:16].clone(), y_test[:16].clone()  # hosts need a client each
    spec = HostSpec(ModelSpec(MODEL, (3, 32, 32), 10, 0), LocalSGD(lr=0.05), seed=0, threads=1)
    model = spec.model.build()
    pspec = ParamSpec.of(model)
    params = pspec.flatten(dict(model.named_parameters())).detach()
    import ray

    from flagstaff.system.ray_start import shutdown_ray, start_local_ray

    def shards(hosts: int) -> list[HostShard]:
        owner = np.arange(hosts)  # one client of 16 samples per host
        evals = eval_shards(x_test, y_test, owner, hosts, x_train, y_train)
        sz = np.array([16])
        return [HostShard(np.array([h]), np.array([0]), sz, x_train, y_train, None, evals[h])
                for h in range(hosts)]  # fmt: skip

    def single(threads: int):
        def fn():
            torch.set_num_threads(threads)
            try:
                return evaluate_model(model, pspec, params, x_test, y_test, 10)
            finally:
                torch.set_num_threads(1)

        return fn

    start_local_ray(num_cpus=2, include_dashboard=False, configure_logging=False)
    load = [os.getloadavg()[0]]
    try:
        # 0.5 CPU per actor: the 1- and 2-host pools (3 actors, 1 thread each) exist together, so
        # the rows can take turns and the machine's changing load falls on all of them alike
        Host = ray.remote(ClientHost).options(num_cpus=0.5)
        cases = [("single process (evaluate_model)", 1, t, single(t)) for t in (1, 2)]
        for hosts in (1, 2):
            pool = LocalPool([ClientHost(h, s, spec) for h, s in enumerate(shards(hosts))])
            fn = lambda pool=pool: combine(pool.evaluate(params), 10)  # noqa: E731
            cases.append(("hosts, backend=local (in-process)", hosts, 1, fn))
        for hosts in (1, 2):
            actors = [Host.remote(h, ray.put(s), spec) for h, s in enumerate(shards(hosts))]
            pool = RayPool(actors)
            fn = lambda pool=pool: combine(pool.evaluate(params), 10)  # noqa: E731
            cases.append(("hosts, backend=ray (actors)", hosts, 1, fn))
        ref = cases[0][3]()
        for case in cases:  # warm-up, and every path gives the single-process accuracy
            got = case[3]()
            assert got["accuracy"] == ref["accuracy"], (case[:3], got, ref)
        times: list[list[float]] = [[] for _ in cases]
        for _ in range(args.repeats):  # round-robin over the rows
            for i, case in enumerate(cases):
                t = time.perf_counter()
                case[3]()
                times[i].append(time.perf_counter() - t)
        rows = [
            (w, h, t, sorted(ts)[len(ts) // 2])
            for (w, h, t, _), ts in zip(cases, times, strict=True)
        ]
    finally:
        shutdown_ray()
    load.append(os.getloadavg()[0])
    lines = [
        f"{args.test:,} test images, ResNet-8-GN; median of {args.repeats} rounds; load average "
        f"(1 min) {load[0]:.1f} at start, {load[1]:.1f} at end, on {os.cpu_count()} cores",
        "",
        "| evaluation | hosts | threads each | seconds per evaluation |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {w} | {h} | {t} | {s:.2f} |" for w, h, t, s in rows]
    table = "\n".join(lines)
    prov = provenance()
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        keys = ("evaluation", "hosts", "threads", "seconds")
        blob = {
            "provenance": prov,
            "load_average": load,
            "test_images": args.test,
            "rows": [dict(zip(keys, r, strict=True)) for r in rows],
        }
        out.with_suffix(".json").write_text(json.dumps(blob, indent=1))
        out.with_suffix(".md").write_text(markdown(prov) + "\n" + table + "\n")


if __name__ == "__main__":
    main()
