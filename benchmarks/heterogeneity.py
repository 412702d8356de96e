"""Heterogeneity benchmark: FedSpeed and the client-drift baselines on the same non-IID runs.

Setting (issue 6): digits (8x8 images) and mnist1d (generated offline), small CNN, 100 clients, 10%
per round, Dirichlet(alpha) label skew with alpha in {0.6, 0.1}, 5 local epochs, 3 seeds. Local
optimizer as in the FedSpeed reference (conf/client/fedspeed_ref.yaml: lr 0.1 decayed 0.998 per round,
weight decay 1e-3, gradient-norm clip 10) with batch 10 (the reference's batch 50 exceeds most
clients' shards here). Reports final accuracy (mean +- std over seeds), rounds until the global model
first reaches the target accuracy, and median seconds per round; writes a Markdown table, one JSON
per run (a rerun skips runs whose JSON exists) and accuracy-vs-round plots.

    python benchmarks/heterogeneity.py --out outputs/hetero             # full setting
    python benchmarks/heterogeneity.py --quick --out outputs/hetero_q   # 1 seed, 30 rounds, digits
    python benchmarks/heterogeneity.py --datasets mnist1d --alphas 0.1 --rounds 50 --seeds 0

Under attack (issue 18, item 3: Byzantine clients corrupt their per-client extras too): ``--attacks``
adds the attack x aggregator grid (``f`` Byzantine clients, ids 0..f-1; ``none`` runs with f = 0)
and prints one row per cell; ``--before DIR`` puts the runs of the same grid made with an
earlier commit (e.g. before the extras were attacked) beside them:

    python benchmarks/heterogeneity.py --datasets digits --alphas 0.1 --rounds 30 \
        --num-clients 10 --per-round 10 --epochs 1 --strategies fedavg scaffold feddyn fedspeed \
        --attacks none sign_flip alie --aggregators mean median --f 3 --out <dir>
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _provenance import git_state, markdown, pin_threads, provenance

STRATEGIES = ["fedavg", "fedprox", "scaffold", "feddyn", "fedsam", "fedspeed", "fedavgm", "fedadam"]
TARGETS = {"digits": 0.80, "mnist1d": 0.50}  # target test accuracy for "rounds to target"
DEFAULT_SETTING = {"num_clients": 100, "clients_per_round": 10, "epochs": 5}


def run_one(
    dataset: str,
    alpha: float,
    strategy: str,
    seed: int,
    rounds: int,
    out: Path,
    extra: list[str],
    eval_every: int,
    rundirs: Path | None = None,
    setting: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One training run through the Flagstaff runner (backend=local); cached as JSON.

    The run's own directory (checkpoint ~2 MB, metrics, partition) goes under `rundirs`
    (default `<out>/rundirs`); only the small JSON summary goes under `<out>/runs`. `setting`
    changes num_clients / clients_per_round / epochs from the benchmark's 100 / 10 / 5."""
    setting = {**DEFAULT_SETTING, **(setting or {})}
    tag = "_".join(e.replace("=", "-").replace("/", "-") for e in extra)
    if setting != DEFAULT_SETTING:
        s = setting
        tag = f"n{s['num_clients']}of{s['clients_per_round']}_e{s['epochs']}" + (
            "_" + tag if tag else ""
        )
    name = f"{dataset}_a{alpha}_{strategy}{'_' + tag if tag else ''}_s{seed}_r{rounds}"
    path = out / "runs" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    from hydra import compose, initialize_config_module

    from flagstaff.system.config import register
    from flagstaff.system.runner import train

    register()
    overrides = [
        "backend=local",
        f"data={dataset}",
        "data.image=true",
        "model=cnn",
        f"num_clients={setting['num_clients']}",
        f"clients_per_round={setting['clients_per_round']}",
        "partition=dirichlet",
        f"partition.alpha={alpha}",
        "client=fedspeed_ref",
        "client.batch_size=10",
        f"client.epochs={setting['epochs']}",
        f"strategy={strategy}",
        f"rounds={rounds}",
        f"seed={seed}",
        "progress=false",
        "checkpoint_every=0",
        f"eval_every={eval_every}",
        *extra,
    ]
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    t0 = time.perf_counter()
    res = train(cfg, run_dir=str((rundirs or out / "rundirs") / name))
    rows = [r for r in res["metrics"] if "accuracy" in r]
    row = {
        "dataset": dataset,
        "alpha": alpha,
        "strategy": strategy + (f" ({' '.join(extra)})" if extra else ""),
        "seed": seed,
        "rounds": rounds,
        "curve": [[r["round"], r["accuracy"]] for r in rows],
        "final_accuracy": res["accuracy"],
        "s_per_round": res["round_time_median_s"],
        "wall_s": time.perf_counter() - t0,
        "setting": setting,
        "extra": extra,
        "name": name,
        "git": git_state(),  # the code that made this run (a rerun reuses cached runs)
        # and the machine: threads, numerics environment, versions, CPU and its kernels
        "provenance": {k: v for k, v in provenance().items() if k not in ("command", "git")},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))
    return row


def run_commits(rows: list[dict[str, Any]]) -> str:
    """One HTML comment line naming the commits that made ``rows`` (a rerun reuses cached runs,
    so the invocation's own commit need not be theirs)."""
    counts: dict[str, int] = {}
    for r in rows:
        git = r.get("git") or {}
        key = (git.get("commit") or "")[:12] + (" (dirty)" if git.get("dirty") else "")
        counts[key or "not recorded"] = counts.get(key or "not recorded", 0) + 1
    made = ", ".join(f"{k} ({n} runs)" for k, n in sorted(counts.items()))
    return f"<!-- runs made at commit: {made}; each run's in <out>/runs/*.json -->"


def rounds_to(curve: list[list[float]], target: float) -> int | None:
    return next((int(r) for r, a in curve if a >= target), None)


def table(rows: list[dict[str, Any]], targets: dict[str, float]) -> str:
    """Markdown table grouped by (dataset, alpha, strategy), aggregated over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["alpha"], r["strategy"]), []).append(r)
    lines = [
        "| dataset | Dir alpha | strategy | seeds | rounds | final acc (mean +- std) "
        "| rounds to target (seeds reaching it) | s/round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (ds, alpha, strat), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        accs = [r["final_accuracy"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        hit = [rounds_to(r["curve"], targets[ds]) for r in rs]
        reached = [h for h in hit if h is not None]
        rt = (
            f"{statistics.mean(reached):.0f} ({len(reached)}/{len(rs)})"
            if reached
            else f"- (0/{len(rs)})"
        )
        spr = statistics.median(r["s_per_round"] for r in rs)
        lines.append(
            f"| {ds} | {alpha} | {strat} | {len(rs)} | {rs[0]['rounds']} | "
            f"{100 * statistics.mean(accs):.2f} +- {100 * sd:.2f} | {rt} | {spr:.3f} |"
        )
    return "\n".join(lines)


def attack_overrides(attack: str, f: int, aggregator: str) -> list[str]:
    """The overrides of one attack cell (``none``: no Byzantine client, f = 0)."""
    return [
        f"attack={attack}",
        f"attack.f={0 if attack == 'none' else f}",
        f"aggregator={aggregator}",
    ]


def _cell(extra: list[str]) -> tuple[str, int, str]:
    kv = dict(e.split("=", 1) for e in extra)
    return kv.get("attack", "none"), int(kv.get("attack.f", 0)), kv.get("aggregator", "mean")


def attack_table(rows: list[dict[str, Any]], before: dict[str, dict[str, Any]] | None) -> str:
    """Markdown table of final accuracy per (dataset, alpha, strategy, aggregator, attack), mean
    +- std over seeds, with the same runs of an earlier commit (``before``: run name -> row) beside
    it when given."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        attack, f, agg = _cell(r["extra"])
        base = r["strategy"].split(" (")[0]
        groups.setdefault((r["dataset"], r["alpha"], base, agg, attack, f), []).append(r)

    def stat(accs: list[float]) -> str:
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return f"{100 * statistics.mean(accs):.2f} +- {100 * sd:.2f}"

    head = "| dataset | Dir alpha | strategy | aggregator | attack | f | "
    if before is None:
        lines = [head + "final acc (mean +- std) | per seed |", "|---|---|---|---|---|---|---|---|"]
    else:
        lines = [
            head + "before: honest extras | after: attacked extras | change (pt) "
            "| per seed, before -> after |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for key, rs in groups.items():
        ds, alpha, strat, agg, attack, f = key
        rs = sorted(rs, key=lambda r: r["seed"])
        accs = [r["final_accuracy"] for r in rs]
        cells = f"| {ds} | {alpha} | {strat} | {agg} | {attack} | {f} | "
        if before is None:
            seeds = " / ".join(f"{100 * a:.1f}" for a in accs)
            lines.append(cells + f"{stat(accs)} | {seeds} |")
            continue
        old = [before.get(r["name"]) for r in rs]
        if any(o is None for o in old):
            lines.append(cells + f"- | {stat(accs)} | - | - |")
            continue
        olds = [o["final_accuracy"] for o in old]
        change = 100 * (statistics.mean(accs) - statistics.mean(olds))
        seeds = " / ".join(
            f"{100 * a:.1f} -> {100 * b:.1f}" for a, b in zip(olds, accs, strict=True)
        )
        lines.append(cells + f"{stat(olds)} | {stat(accs)} | {change:+.2f} | {seeds} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path, targets: dict[str, float]) -> list[Path]:
    """One accuracy-vs-round figure per (dataset, alpha); mean over seeds per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for ds, alpha in sorted({(r["dataset"], r["alpha"]) for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        by: dict[str, list] = {}
        for r in rows:
            if r["dataset"] == ds and r["alpha"] == alpha:
                by.setdefault(r["strategy"], []).append(r["curve"])
        for strat, curves in sorted(by.items()):
            n = min(len(c) for c in curves)
            xs = [c[0] for c in curves[0][:n]]
            ys = [statistics.mean(c[i][1] for c in curves) for i in range(n)]
            ax.plot(xs, ys, label=strat, lw=2.2 if strat.startswith("fedspeed") else 1.2)
        ax.axhline(targets[ds], color="grey", ls=":", lw=1)
        ax.set(xlabel="round", ylabel="test accuracy", title=f"{ds}, Dirichlet {alpha}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"accuracy_{ds}_a{alpha}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.6, 0.1])
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="digits only, 1 seed, 30 rounds")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STRATEGY:OVERRIDE",
        help="extra Hydra override for one strategy, e.g. fedspeed:strategy.lamb=0.01 (repeatable; "
        "adds a separate row, e.g. for a tuning grid)",
    )
    ap.add_argument("--target", action="append", default=[], metavar="DATASET=ACC")
    ap.add_argument(
        "--attacks",
        nargs="+",
        default=None,
        help="attack grid (conf/attack names; none = f 0): every strategy x aggregator x attack",
    )
    ap.add_argument("--aggregators", nargs="+", default=["mean"], help="with --attacks")
    ap.add_argument("--f", type=int, default=3, help="Byzantine clients (ids 0..f-1), --attacks")
    ap.add_argument("--num-clients", type=int, default=DEFAULT_SETTING["num_clients"])
    ap.add_argument("--per-round", type=int, default=DEFAULT_SETTING["clients_per_round"])
    ap.add_argument("--epochs", type=int, default=DEFAULT_SETTING["epochs"])
    ap.add_argument(
        "--before",
        default=None,
        help="--out directory of the same --attacks grid run with an earlier commit: its final "
        "accuracies go beside these",
    )
    ap.add_argument("--out", default="outputs/heterogeneity")
    ap.add_argument(
        "--rundirs",
        default=None,
        help="where the runs' own directories (checkpoints, ~2 MB each) go; default <out>/rundirs "
        "(pass a path under outputs/ when --out is inside the repo)",
    )
    args = ap.parse_args(argv)
    pin_threads(1)  # sums in a fixed order on any machine (the hosts run 1 thread each anyway)
    prov = provenance()
    if args.quick:
        args.datasets, args.seeds, args.rounds = ["digits"], [0], min(args.rounds, 30)
    targets = dict(TARGETS)
    for t in args.target:
        k, v = t.split("=")
        targets[k] = float(v)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = {
        "num_clients": args.num_clients,
        "clients_per_round": args.per_round,
        "epochs": args.epochs,
    }
    variants: list[tuple[str, list[str]]] = [(s, []) for s in args.strategies]
    if args.attacks:
        variants = [
            (s, attack_overrides(a, args.f, g))
            for s in args.strategies
            for g in args.aggregators
            for a in args.attacks
        ]
    for spec in args.set:
        strat, over = spec.split(":", 1)
        variants.append((strat, over.split(",")))
    rundirs, ev = (Path(args.rundirs) if args.rundirs else None), args.eval_every
    rows = []
    total = len(args.datasets) * len(args.alphas) * len(variants) * len(args.seeds)
    i = 0
    for ds in args.datasets:
        for alpha in args.alphas:
            for strat, extra in variants:
                for seed in args.seeds:
                    i += 1
                    row = run_one(
                        ds, alpha, strat, seed, args.rounds, out, extra, ev, rundirs, setting
                    )
                    rows.append(row)
                    print(
                        f"[{i}/{total}] {ds} a={alpha} {row['strategy']} seed={seed}: "
                        f"acc={row['final_accuracy']:.4f} {row['s_per_round']:.3f} s/round",
                        file=sys.stderr,
                        flush=True,
                    )
    (out / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
    header = markdown(prov) + "\n" + run_commits(rows) + "\n"
    if args.attacks:
        before = None
        if args.before:
            bdir = Path(args.before)
            before = {p.stem: json.loads(p.read_text()) for p in (bdir / "runs").glob("*.json")}
            if (bdir / "provenance.json").exists():
                bprov = json.loads((bdir / "provenance.json").read_text())
                header += "before: " + markdown(bprov) + "\n"
        md = attack_table(rows, before)
        header += (
            f"{args.num_clients} clients, {args.per_round} per round, {args.epochs} local epoch(s), "
            f"batch 10, {args.rounds} rounds, f = {args.f} Byzantine clients (ids 0..{args.f - 1}), "
            f"seeds {args.seeds}\n\n"
        )
    else:
        md = table(rows, targets)
        header += (
            f"targets: "
            f"{', '.join(f'{k} {v:.2f}' for k, v in targets.items() if k in args.datasets)}; "
            f"{args.num_clients} clients, {args.per_round} per round, {args.epochs} local epochs, "
            f"batch 10, seeds {args.seeds}\n\n"
        )
    (out / "table.md").write_text(header + md + "\n")
    if not args.attacks:
        for p in plot(rows, out, targets):
            print(f"plot: {p}", file=sys.stderr)
    print(header + md)
    if not math.isfinite(sum(r["final_accuracy"] or 0.0 for r in rows)):
        sys.exit("a run ended with a non-finite accuracy")


if __name__ == "__main__":
    main()
