"""Decentralized robustness benchmark: MoNNA vs peer baselines under attacks, and time per step.

Usage (from the repository root)::

    .venv/bin/python benchmarks/decentralized.py --quick
    .venv/bin/python benchmarks/decentralized.py --seeds 3 --steps 300 --alphas 1,5 --json out.json
    .venv/bin/python benchmarks/decentralized.py --only timing --sizes 8,16,32,64
    .venv/bin/python benchmarks/decentralized.py --only tuning --alphas 1 --tune-seeds 100,101,102
    .venv/bin/python benchmarks/decentralized.py --cached-only --seeds 3   # tables, no new runs

Tuning (``--only tuning``): an lr x T_half grid (``--tune-lrs``, ``--tune-thalfs``; 0 = constant)
for the no-attack D-SGD reference with momentum 0.99 on seeds the tables do not use
(``--tune-seeds``), criterion its final test accuracy; MoNNA's results under attack play no part.

Setting (``experiment=monna_digits``, the paper's MNIST setting on scikit-learn digits): n = 26
nodes, f = 5 Byzantine (ids 0-4), Dirichlet(alpha) label skew, MLP 64-64-10, batch 25, the
experiment's learning-rate schedule (lr 0.75, hyperbolic decay with T_half 300, delta 50: chosen by
``--only tuning`` below; ``--lr`` / ``--t-half`` override it for every method, the schedule is part
of every cache key), weight decay 1e-4; every run is
``system.runner.train`` on the composed config (``backend=local`` by default: in-process, the same
numbers as ``backend=ray`` for the same seed).

Methods (rows): ``MoNNA`` (NNA, beta 0.99), ``NNA (beta 0)`` (momentum ablation), ``MoCWTM``
(peer trimmed mean, beta 0.99), ``MoGM`` (peer geometric median, beta 0.99), ``SCC`` (self-centred
clipping, tau 2, beta 0.9, as in the paper's reference scripts). Reference: ``D-SGD`` (plain
averaging, beta 0.99, no attack, all 26 nodes honest).
Attacks (columns): ``alie_adaptive``, ``foe_adaptive``, ``sign_flip``, ``label_flip``, ``mimic``;
adaptive attacks line-search against each target node's own aggregation (per-target vectors).
Extra columns (``--attacks``): ``alie_broadcast`` / ``foe_broadcast``, the same attacks with
``strategy.adversary=broadcast`` (one vector for every node, line-searched against the mean of the
honest nodes' aggregates: the adversary of the MoNNA reference code).

Reported: final mean honest test accuracy and worst honest node (mean over seeds, ``+-`` std when
more than one seed), the target check (MoNNA within 5 points of D-SGD under every attack, worst
node within 2 points of the mean), and the median time per step (``round_time_s``, one exchange,
evaluation excluded) for n in ``--sizes`` with f = n // 5 under sign flip on ``--timing-backend``.
Results are cached in ``--json`` (default benchmarks/results/decentralized.json) keyed by run, so an
interrupted benchmark resumes where it stopped. Every run added since the model-space FOE
(issue 18, item 4) records ``provenance`` (commit, dirty files, torch threads and CPU capability,
torch version); the file's ``_provenance`` entry is the full record (``_provenance.py``: command,
environment, versions, CPU) of the last invocation that ran something, and the printed tables start
with it as one comment line. Torch is pinned to 1 thread (the hosts run 1 thread each anyway).

``QUICK_CELL``: one cell of the accuracy table at 10 steps and 1 seed, rerun by
tests/test_p2p.py against its committed value (``--only accuracy --steps 10 --seeds 1 --alphas 1
--methods MoNNA --attacks foe_adaptive`` computes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _provenance import markdown, pin_threads, provenance  # noqa: E402  (sibling module)

ATTACKS = ["alie_adaptive", "foe_adaptive", "sign_flip", "label_flip", "mimic"]
# extra columns (pass them in --attacks): the reference code's adversary, one vector for all nodes
EXTRA_ATTACKS: dict[str, tuple[str, ...]] = {
    "alie_broadcast": ("attack=alie_adaptive", "strategy.adversary=broadcast"),
    "foe_broadcast": ("attack=foe_adaptive", "strategy.adversary=broadcast"),
}
METHODS: dict[str, tuple[str, ...]] = {
    "MoNNA": ("strategy=monna",),
    "NNA (beta 0)": ("strategy=monna", "strategy.momentum=0.0"),
    "MoCWTM": ("strategy=monna", "strategy.rule=trimmed_mean"),
    "MoGM": ("strategy=monna", "strategy.rule=geomed", "++strategy.rule_kwargs={max_iter: 20}"),
    "SCC": (
        "strategy=monna",
        "strategy.rule=scclip",
        "strategy.momentum=0.9",
        "++strategy.rule_kwargs={tau: 2.0}",
    ),
}
REFERENCE = ("strategy=dsgd", "attack=none", "attack.f=0")
#: the cell tests/test_p2p.py reruns (10 steps, seed 0) and compares with the committed value
QUICK_CELL: dict[str, Any] = {
    "method": "MoNNA",
    "attack": "foe_adaptive",
    "alpha": 1.0,
    "seed": 0,
    "steps": 10,
}


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from flagstaff.system.config import register

    register()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def run_one(overrides: tuple[str, ...], run_dir: Path) -> dict[str, Any]:
    from flagstaff.system.runner import train

    t0 = time.perf_counter()
    res = train(compose(*overrides), run_dir=str(run_dir))
    tail = [r["train_loss"] for r in res["metrics"][-25:] if "train_loss" in r]
    prov = provenance()
    return {
        "accuracy": res["accuracy"],
        "accuracy_worst": res["accuracy_worst"],
        "consensus_distance": res["consensus_distance"],
        "train_loss_last25": statistics.fmean(tail) if tail else None,
        "step_time_s": res["round_time_median_s"],
        "wall_s": time.perf_counter() - t0,
        "provenance": {
            "commit": prov["git"]["commit"],
            "dirty_files": prov["git"]["dirty_files"],
            "torch_threads": prov["torch"]["num_threads"],
            "cpu_capability": prov["torch"].get("cpu_capability"),
            "torch": prov["versions"].get("torch"),
        },
    }


def schedule_defaults() -> tuple[float, float, int]:
    """(lr, t_half, lr_period) of ``experiment=monna_digits`` as configured (cache keys name them)."""
    c = compose("experiment=monna_digits")
    s = c.strategy
    return float(s.lr), float(s.t_half), int(s.lr_period)


def _hp(args) -> str:
    """The learning-rate schedule part of a cache key (results depend on it)."""
    return f"lr={args.lr:g}|th={args.t_half:g}"


def _run_base(backend: str, steps: int) -> tuple[str, ...]:
    """Overrides every benchmark run starts from (the order is part of the cache keys)."""
    return (
        "experiment=monna_digits",
        f"backend={backend}",
        "progress=false",
        f"rounds={steps}",
        f"eval_every={steps}",
        "checkpoint_every=0",
    )


def _sched(args) -> tuple[str, ...]:
    return (f"strategy.lr={args.lr}", f"strategy.t_half={args.t_half}")


def cell(
    method: str,
    attack: str,
    alpha: float,
    seed: int,
    steps: int,
    lr: float,
    t_half: float,
    backend: str = "local",
) -> tuple[str, tuple[str, ...]]:
    """(cache key, overrides) of one cell of the accuracy table for one seed."""
    key = f"{method}|{attack}|alpha={alpha}|seed={seed}|steps={steps}|lr={lr:g}|th={t_half:g}"
    sched = (f"strategy.lr={lr}", f"strategy.t_half={t_half}")
    att = EXTRA_ATTACKS.get(attack, (f"attack={attack}",))
    over = (
        *_run_base(backend, steps),
        *sched,
        f"partition.alpha={alpha}",
        *METHODS[method],
        *att,
        f"seed={seed}",
    )
    return key, over


class Cache:
    def __init__(self, path: Path, run: bool = True) -> None:
        self.path = path
        self.run = run  # False: report what is cached, run nothing (--cached-only)
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.used: list[str] = []  # keys of the runs the printed tables use

    def provenance_note(self) -> str:
        """One comment line: the commits the used runs ran at (older runs recorded none)."""
        runs = [self.data[k] for k in dict.fromkeys(self.used) if k in self.data]
        commits = sorted({r["provenance"]["commit"][:7] for r in runs if "provenance" in r})
        old = sum("provenance" not in r for r in runs)
        return (
            f"<!-- tables from {len(runs)} cached runs: {len(runs) - old} with provenance in the json "
            f"(commits {', '.join(commits) or '-'}), {old} from before provenance was recorded -->"
        )

    def get_or_run(self, key: str, fn) -> dict[str, Any] | None:
        self.used.append(key)
        if key not in self.data:
            if not self.run:
                return None
            self.data[key] = fn()
            self.data["_provenance"] = provenance()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1))
            r = self.data[key]
            print(
                f"  {key}: acc {r.get('accuracy', float('nan')):.4f} "
                f"worst {r.get('accuracy_worst', float('nan')):.4f} "
                f"({r.get('wall_s', 0):.0f} s)",
                flush=True,
            )
        return self.data[key]


def _fmt(vals: list[float], seeds: int | None = None) -> str:
    """Mean % (± std over seeds); ``[k]`` when only k < ``seeds`` seeds are available."""
    if not vals:
        return "-"
    m = 100 * statistics.fmean(vals)
    out = f"{m:.1f} ± {100 * statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{m:.1f}"
    if seeds is not None and len(vals) < seeds:
        out += f" [{len(vals)} seed{'s' if len(vals) > 1 else ''}]"
    return out


def accuracy_tables(args, cache: Cache, out_dir: Path) -> list[str]:
    lines: list[str] = []
    base = (*_run_base(args.backend, args.steps), *_sched(args))
    for alpha in args.alphas:
        common = (*base, f"partition.alpha={alpha}")
        ref = []
        for seed in range(args.seeds):
            key = f"dsgd|alpha={alpha}|seed={seed}|steps={args.steps}|{_hp(args)}"
            ref.append(
                cache.get_or_run(
                    key,
                    lambda k=key, s=seed, c=common: run_one(
                        (*c, *REFERENCE, f"seed={s}"), out_dir / k.replace("|", "_")
                    ),
                )
            )
        ref = [r for r in ref if r is not None]
        ref_acc = [r["accuracy"] for r in ref]
        results: dict[tuple[str, str], list[dict]] = {}
        for method in args.methods:
            for attack in args.attacks:
                for seed in range(args.seeds):
                    key, over = cell(
                        method, attack, alpha, seed, args.steps, args.lr, args.t_half, args.backend
                    )
                    r = cache.get_or_run(
                        key,
                        lambda o=over, k=key: run_one(
                            o, out_dir / k.replace("|", "_").replace(" ", "")
                        ),
                    )
                    if r is not None:
                        results.setdefault((method, attack), []).append(r)
        n = args.seeds
        lines += [
            f"\n### Dirichlet alpha = {alpha}: mean honest accuracy % (worst honest node %), "
            f"{args.steps} steps, {n} seed(s), lr {args.lr:g}, T_half {args.t_half:g}\n",
            f"D-SGD with momentum, no attack (26 honest nodes): **{_fmt(ref_acc, n)}** "
            f"(worst {_fmt([r['accuracy_worst'] for r in ref], n)})\n",
            "| method | " + " | ".join(args.attacks) + " |",
            "|---|" + "---|" * len(args.attacks),
        ]
        for method in args.methods:
            cells = []
            for attack in args.attacks:
                rs = results.get((method, attack), [])
                cells.append(
                    f"{_fmt([r['accuracy'] for r in rs], n)} "
                    f"({_fmt([r['accuracy_worst'] for r in rs])})"
                    if rs
                    else "-"
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        done = [a for a in args.attacks if results.get(("MoNNA", a))]
        if "MoNNA" in args.methods and ref_acc and done:
            ref_m = statistics.fmean(ref_acc)
            gaps, spreads = [], []
            for attack in done:
                rs = results[("MoNNA", attack)]
                gaps.append(ref_m - statistics.fmean(r["accuracy"] for r in rs))
                spreads.append(max(r["accuracy"] - r["accuracy_worst"] for r in rs))
            ok1 = max(gaps) <= 0.05
            ok2 = max(spreads) <= 0.02
            worst = done[gaps.index(max(gaps))]
            partial = "" if len(done) == len(args.attacks) else f" (only {', '.join(done)} run)"
            lines.append(
                f"\nTargets (alpha {alpha}){partial}: MoNNA within 5 points of D-SGD under every "
                f"attack: {'MET' if ok1 else 'NOT MET'} (largest gap {100 * max(gaps):.1f} points, "
                f"{worst}); worst node within 2 points of the mean: "
                f"{'MET' if ok2 else 'NOT MET'} (largest spread {100 * max(spreads):.1f} points)"
            )
    return lines


def tuning_table(args, cache: Cache, out_dir: Path) -> list[str]:
    """lr x T_half grid for D-SGD with momentum 0.99, no attack, on held-out seed(s).

    The criterion is the reference method's own final test accuracy (no attack, no robust rule),
    on seeds that the accuracy tables do not use (``--tune-seeds``, default 100), so MoNNA's numbers
    under attack play no part in the choice; the same schedule then serves every method.
    """
    lrs = [float(x) for x in str(args.tune_lrs).split(",")]
    ths = [float(x) for x in str(args.tune_thalfs).split(",")]
    seeds = [int(x) for x in str(args.tune_seeds).split(",")]
    alpha = args.alphas[0]
    base = (*_run_base(args.backend, args.steps), f"partition.alpha={alpha}", *REFERENCE)
    lines = [
        f"\n### Tuning: D-SGD with momentum 0.99, no attack, alpha {alpha:g}, {args.steps} steps, "
        f"seed(s) {','.join(map(str, seeds))}: final test accuracy % (train loss, last 25 steps)\n",
        "| lr \\ T_half | " + " | ".join("constant" if t == 0 else f"{t:g}" for t in ths) + " |",
        "|---|" + "---|" * len(ths),
    ]
    best = None
    for lr in lrs:
        cells = []
        for th in ths:
            rs = []
            for seed in seeds:
                key = f"tune|dsgd|alpha={alpha}|seed={seed}|steps={args.steps}|lr={lr:g}|th={th:g}"
                over = (*base, f"strategy.lr={lr}", f"strategy.t_half={th}", f"seed={seed}")
                r = cache.get_or_run(
                    key, lambda o=over, k=key: run_one(o, out_dir / k.replace("|", "_"))
                )
                if r is not None:
                    rs.append(r)
            if not rs:
                cells.append("-")
                continue
            acc = statistics.fmean(r["accuracy"] for r in rs)
            losses = [r["train_loss_last25"] for r in rs if r.get("train_loss_last25") is not None]
            loss = f" ({statistics.fmean(losses):.3f})" if losses else ""
            cells.append(f"{100 * acc:.1f}{loss}")
            if best is None or acc > best[0]:
                best = (acc, lr, th)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    if best is not None:
        lines.append(
            f"\nBest: lr {best[1]:g}, T_half {'constant' if best[2] == 0 else f'{best[2]:g}'} "
            f"({100 * best[0]:.1f} %)"
        )
    return lines


def timing_table(args, cache: Cache, out_dir: Path) -> list[str]:
    lines = [
        f"\n### Time per step (median, s) vs n: MoNNA, f = n // 5, sign flip, "
        f"backend={args.timing_backend}, {args.timing_steps} steps\n",
        "| n | f | s / step | wall (s) |",
        "|---|---|---|---|",
    ]
    if args.timing_backend == "ray" and cache.run:
        import ray

        if not ray.is_initialized():  # a fresh local Ray (the runner reuses it)
            ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    for n in args.sizes:
        f = n // 5
        key = f"timing|n={n}|backend={args.timing_backend}|steps={args.timing_steps}"
        over = (
            "experiment=monna_digits",
            f"backend={args.timing_backend}",
            "progress=false",
            f"num_clients={n}",
            f"clients_per_round={n}",
            f"rounds={args.timing_steps}",
            f"eval_every={args.timing_steps}",
            "checkpoint_every=0",
            "attack=sign_flip",
            f"attack.f={f}",
            "partition.alpha=5.0",
        )
        r = cache.get_or_run(key, lambda o=over, k=key: run_one(o, out_dir / k.replace("|", "_")))
        if r is None:  # --cached-only and not run (timings live in their own --json)
            lines.append(f"| {n} | {f} | - | - |")
        else:
            lines.append(f"| {n} | {f} | {r['step_time_s']:.4f} | {r['wall_s']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, alpha 1, 150 steps, MoNNA + ablation, timing on n <= 32",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--alphas", default="1,5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--only", choices=["accuracy", "timing", "tuning"], default=None)
    p.add_argument("--lr", type=float, default=None, help="gamma_0 (default: the experiment's)")
    p.add_argument("--t-half", type=float, default=None, help="T_half (default: the experiment's)")
    p.add_argument("--tune-lrs", default="0.25,0.75,2,5")
    p.add_argument("--tune-thalfs", default="50,300,0")
    p.add_argument("--tune-seeds", default="100")
    p.add_argument(
        "--cached-only", action="store_true", help="print tables from the cache, run nothing"
    )
    p.add_argument("--sizes", default="8,16,32,64")
    p.add_argument("--timing-steps", type=int, default=20)
    p.add_argument("--timing-backend", default="ray", choices=["local", "ray"])
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/decentralized.json")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/flagstaff-decentralized"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.alphas = 1, 150, "1"
        args.methods, args.sizes = "MoNNA,NNA (beta 0)", "8,16,32"
    args.alphas = [float(a) for a in str(args.alphas).split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    args.attacks = [a for a in args.attacks.split(",") if a]
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    pin_threads(1)
    cache = Cache(args.json, run=not args.cached_only)
    lr, t_half, _ = schedule_defaults()
    args.lr = lr if args.lr is None else args.lr
    args.t_half = t_half if args.t_half is None else args.t_half
    lines: list[str] = []
    if args.only == "tuning":
        lines += tuning_table(args, cache, args.out_dir)
    if args.only in (None, "accuracy"):
        lines += accuracy_tables(args, cache, args.out_dir)
    if args.only in (None, "timing"):
        lines += timing_table(args, cache, args.out_dir)
    head = [cache.provenance_note()] if args.cached_only else [markdown(provenance())]
    print("\n".join(head + lines))


if __name__ == "__main__":
    main()
