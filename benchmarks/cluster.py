"""Cluster benchmark: time per round with 1, 2 and 4 hosts on one node and on a 3-node local Ray
cluster (ray.cluster_utils), and the time to recover from a killed host.

    python benchmarks/cluster.py [--experiment sim_w1] [--rounds 10]

Each configuration runs `system.runner.train` on the same workload; per-round time is the median of
rounds 2..N of `round_time_s`. Recovery: a host is killed with `ray.kill` while a round is in flight;
the recovery time is that round's time minus the median round time (Ray restarts the actor, the
server re-sends the host's clients).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from flagstaff.system.config import register

    register()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def run(overrides: list[str], tmp: Path, name: str) -> dict:
    from flagstaff.system.runner import train

    res = train(compose(*overrides, "progress=false"), run_dir=str(tmp / name))
    times = res["round_times"]
    return {
        "median_ms": 1e3 * statistics.median(times[1:] or times),
        "accuracy": res["accuracy"],
        "nodes": len(set(res["host_nodes"] or [])),
        "round_times": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="sim_w1")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="/tmp/flagstaff-cluster-bench")
    args = ap.parse_args()
    import ray
    from _provenance import markdown, provenance  # benchmarks/ is sys.path[0]
    from ray.cluster_utils import Cluster

    print(markdown(provenance()))

    tmp = Path(args.out)
    base = [
        f"experiment={args.experiment}",
        f"rounds={args.rounds}",
        "backend=ray",
        "eval_every=1000",
    ]
    rows = []
    # one node: a plain local Ray with 4 CPUs (so 4 hosts fit; this machine has 2 cores)
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    for hosts in (1, 2, 4):
        r = run([*base, f"cluster.hosts={hosts}"], tmp, f"one-{hosts}")
        rows.append(("1 node", hosts, r))
    ray.shutdown()
    # three nodes on this machine
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False)
    for hosts in (1, 2, 4):
        r = run(
            [*base, f"cluster.hosts={hosts}", "cluster.placement=spread"], tmp, f"three-{hosts}"
        )
        rows.append(("3 nodes", hosts, r))
    # recovery from a host kill (slow host 1 by 0.5 s so the kill lands mid-round)
    recov = {}

    def killer() -> None:
        metrics = tmp / "kill" / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.01)
        time.sleep(0.2)
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["name"].startswith("flagstaff-host-1-"):
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
                recov["killed_after_round"] = 3
                return

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    killed = run(
        [*base, "cluster.hosts=2", "cluster.slow_hosts=[0,0.5]", "eval_every=1"], tmp, "kill"
    )
    th.join(timeout=5)
    ray.shutdown()
    cluster.shutdown()
    print(f"\n## Time per round, {args.experiment}, {args.rounds} rounds (median of rounds 2..N)\n")
    print("| cluster | hosts | nodes used | ms / round | final accuracy |")
    print("|---|---|---|---|---|")
    for where, hosts, r in rows:
        print(f"| {where} | {hosts} | {r['nodes']} | {r['median_ms']:.1f} | {r['accuracy']:.4f} |")
    times = killed["round_times"]
    k = recov.get("killed_after_round", 3)
    hit = times[k] if len(times) > k else float("nan")
    normal = statistics.median(times[:k] + times[k + 1 :])
    print("\n## Recovery from a killed host (2 hosts, host 1 slowed by 0.5 s/round)\n")
    print("| round with the kill (s) | median other round (s) | recovery time (s) |")
    print("|---|---|---|")
    print(f"| {hit:.2f} | {normal:.2f} | {hit - normal:.2f} |")


if __name__ == "__main__":
    main()
