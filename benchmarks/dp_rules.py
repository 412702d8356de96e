"""Local rules under sample-level DP-SGD: final accuracy and reported epsilon per strategy.

Digits, ``experiment=privacy_dpsgd_digits`` (20 clients, 10 per round, 20 rounds, MLP, batch 16,
clip 1) with ``client=dpsgd_batched``, the noise calibrated for ``privacy.target_epsilon`` (the
budget stop ends a run before any client would pass it), for FedAvg, FedProx, SCAFFOLD and FedSpeed
with alpha 0 (one private gradient per step) and its default alpha 1 (two per step, each step
accounted as one sampled-Gaussian step with sigma / sqrt(2); docs/privacy.md, "Local rules under
DP-SGD"). backend=local (bit-identical to ray), torch pinned to one thread.

    python benchmarks/dp_rules.py --seeds 0 1 2 --out outputs/bench_dp_rules --publish

prints the table (mean ± sample std over seeds) and, with ``--publish``, writes it with its
provenance to benchmarks/results/dp_rules.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import markdown, pin_threads, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name -> (folder, strategy overrides, private gradients per local step)
    "FedAvg": ("fedavg", ["strategy=fedavg"], 1),
    "FedProx (mu 0.01)": ("fedprox", ["strategy=fedprox"], 1),
    "SCAFFOLD": ("scaffold", ["strategy=scaffold"], 1),
    "FedSpeed, alpha 0": ("fedspeed_alpha0", ["strategy=fedspeed", "strategy.alpha=0.0"], 1),
    "FedSpeed, alpha 1 (default)": ("fedspeed", ["strategy=fedspeed"], 2),
}


def base(target: float) -> list[str]:
    return [
        "experiment=privacy_dpsgd_digits",
        "client=dpsgd_batched",
        "client.noise_multiplier=null",
        f"privacy.target_epsilon={target:g}",
        "backend=local",
        "progress=false",
        "cluster.threads_per_host=1",
    ]


def run(overrides: list[str], run_dir: Path) -> dict:
    """One run through the real runner (or its summary.json if it finished before)."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        from hydra import compose, initialize_config_module

        from flagstaff.system.config import register
        from flagstaff.system.runner import train

        register()
        with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        train(cfg, run_dir=str(run_dir))
    s = json.loads(summary.read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "accuracy": s["accuracy"],
        "epsilon": rows[-1]["epsilon"],
        "rounds": len(rows),
        "stopped": s.get("stopped"),
        "commit": s.get("versions", {}).get("git_commit"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--target", type=float, default=3.0)
    ap.add_argument("--out", default="outputs/bench_dp_rules")
    ap.add_argument("--publish", action="store_true", help="write benchmarks/results/dp_rules.*")
    args = ap.parse_args(argv)
    pin_threads(1)
    prov = provenance()
    cells = {}
    for name, (slug, over, _) in SETTINGS.items():
        for seed in args.seeds:
            d = Path(args.out) / slug / f"seed{seed}"
            cells[(name, seed)] = run([*base(args.target), *over, f"seed={seed}"], d)
            print(name, seed, cells[(name, seed)], flush=True)
    lines = [
        f"client=dpsgd_batched, privacy.target_epsilon={args.target:g}, seeds "
        f"{' '.join(map(str, args.seeds))}: final test accuracy and the worst client's reported "
        "epsilon (mean ± sample std over seeds); rounds run of 20 (the budget stop ends a run "
        "before any client would pass the target)",
        "",
        "| strategy | private gradients per step | final accuracy | reported epsilon | rounds |",
        "|---|---|---|---|---|",
    ]
    for name, (_, _, k) in SETTINGS.items():
        rs = [cells[(name, s)] for s in args.seeds]

        def ms(key, rs=rs):
            v = [float(r[key]) for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):.3f} ± {sd:.3f}"

        rounds = sorted({r["rounds"] for r in rs})
        lines.append(
            f"| {name} | {k} | {ms('accuracy')} | {ms('epsilon')} | "
            f"{'-'.join(map(str, (rounds[0], rounds[-1]) if len(rounds) > 1 else rounds))} |"
        )
    table = "\n".join(lines)
    print(markdown(prov))
    print(table)
    if args.publish:
        res = ROOT / "benchmarks" / "results"
        (res / "dp_rules.md").write_text(markdown(prov) + "\n\n" + table + "\n")
        blob = {
            "provenance": prov,
            "overrides": base(args.target),
            "settings": SETTINGS,
            "runs": [{"setting": n, "seed": s, **v} for (n, s), v in cells.items()],
        }
        (res / "dp_rules.json").write_text(json.dumps(blob, indent=1) + "\n")


if __name__ == "__main__":
    main()
