"""Privacy benchmark: accuracy against epsilon over seeds, and the cost of DP (time, memory).

Table 1: FedSVD, FFA-LoRA, DP-LoRA and FedSVD with PiSSA init on the offline text task
(all-MiniLM-L6-v2 + LoRA rank 8 on query/value, 6 clients, 3 per round, Dirichlet 0.5) at epsilon
in {1, 3, 6, inf}; finite epsilons are sample-level DP-SGD (Opacus) with the noise calibrated per
client so that a client sampled in every round stays within the budget (``client.calibrate=all``);
inf is the same method without DP (plain local SGD on the same factors).
Table 2: client-level DP (DP-FedAvg) against sample-level DP-SGD on digits at the same epsilons.
Table 3: time per round and peak memory with and without DP (from the same runs).
Target check: FedSVD minus FFA-LoRA and minus DP-LoRA at epsilon 3 and 6, paired by seed (the seed
fixes the data split and the client sampling, so runs with one seed see the same clients).

Cells are mean +- std (ddof 1) over the seeds that finished, ``[n=k]`` when fewer than requested.
Every run is ``system.runner.train`` on a composed config in its own process (so peak RSS is the
run's own); seed 0 runs live in ``<out>/<task>_<method>_<eps>``, seed s > 0 in
``<out>/seed<s>/...``. Finished runs are skipped, so the sweep resumes. Both results files record
what a rerun needs (command, commit, threads, versions, CPU: benchmarks/_provenance.py) and every
run's commit. Usage::

    python benchmarks/privacy.py --seeds 0 1 2   # benchmarks/results/privacy.{md,json}
    python benchmarks/privacy.py --quick         # benchmarks/results/privacy_quick.{md,json}
    python benchmarks/privacy.py --only text --methods FedSVD-PiSSA --eps 3 6 --seeds 0 1 2
    python benchmarks/privacy.py --seeds 0 1 2 --tables-only   # tables of what finished
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import markdown, pin_threads, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

TEXT_METHODS = {
    # name: (directory key, strategy, factors clients train, adapter init)
    "FedSVD": ("FedSVD", "fedsvd", "[B]", "lora"),
    "FFA-LoRA": ("FFA-LoRA", "ffa_lora", "[B]", "lora"),
    "DP-LoRA": ("DP-LoRA", "dp_lora", "[A,B]", "lora"),
    "FedSVD (PiSSA init)": ("FedSVD-PiSSA", "fedsvd", "[B]", "pissa"),
}
DIGIT_METHODS = {"DP-FedAvg (client-level)": "DP-FedAvg", "DP-SGD (sample-level)": "DP-SGD"}
TARGET = (("FedSVD", "FedSVD (PiSSA init)"), ("FFA-LoRA", "DP-LoRA"), (3.0, 6.0))
#: what --quick changes: 2 text rounds of 1 local step on 120 reviews, 3 digits rounds (the
#: companion table benchmarks/results/privacy_quick.md, which tests/test_tables.py reruns)
QUICK = {"rounds": 2, "steps": 1, "n_samples": 120, "digits_rounds": 3}


def text_overrides(method: str, eps: float, seed: int, a: argparse.Namespace) -> list[str]:
    _, strategy, factors, adapter = TEXT_METHODS[method]
    common = [
        "experiment=" + ("privacy_lora" if math.isinf(eps) else "privacy_fedsvd"),
        f"strategy={strategy}",
        f"model.train={factors}",
        *([f"model.adapter={adapter}"] if adapter != "lora" else []),
        f"rounds={a.rounds}",
        f"data.n_samples={a.n_samples}",
        f"data.max_length={a.max_length}",
        f"client.steps={a.steps}",
        f"client.batch_size={a.batch_size}",
        f"client.lr={a.lr}",
        f"seed={seed}",
    ]
    if math.isinf(eps):
        return common  # same factors and strategy, plain local SGD
    return [
        *common,
        f"privacy.target_epsilon={eps}",
        "client.noise_multiplier=null",
        "client.calibrate=all",
        f"client.max_grad_norm={a.clip}",
    ]


def digits_overrides(method: str, eps: float, seed: int, a: argparse.Namespace) -> list[str]:
    common = [
        f"rounds={a.digits_rounds}",
        f"seed={seed}",
        "num_clients=100",
        "clients_per_round=20",
    ]
    if method == "DP-FedAvg (client-level)":
        base = ["experiment=privacy_dp_fedavg_digits", *common, "strategy.clip=0.5"]
        if math.isinf(eps):
            return [*base, "strategy.noise_multiplier=0", "privacy.target_epsilon=null"]
        return [*base, "strategy.noise_multiplier=null", f"privacy.target_epsilon={eps}"]
    if math.isinf(eps):  # plain FedAvg with local SGD on the same clients
        return [
            *common,
            "data=digits",
            "model=mlp",
            "client=sgd",
            "client.batch_size=8",
            "client.lr=0.1",
            "sampling=bernoulli",
        ]
    base = ["experiment=privacy_dpsgd_digits", *common, "client.batch_size=8", "client.lr=0.1"]
    return [
        *base,
        f"privacy.target_epsilon={eps}",
        "client.noise_multiplier=null",
        "client.calibrate=all",
        "client.max_grad_norm=1.0",
    ]


def run_dir(out: Path, task: str, key: str, eps: float, seed: int) -> Path:
    name = f"{task}_{key}_{_fmt_eps(eps)}"
    return out / name if seed == 0 else out / f"seed{seed}" / name


def run_one(overrides: list[str], run_dir: Path, tables_only: bool = False) -> dict | None:
    """One training run in a fresh process; returns its summary with the run's own numbers."""
    saved = run_dir / "overrides.json"  # what a finished run was run with (runs since --seeds)
    if (run_dir / "summary.json").exists():  # resumable sweep: skip runs that finished
        if saved.exists() and json.loads(saved.read_text()) != overrides:
            raise RuntimeError(f"{run_dir} was run with other settings; use another --out")
        return _read(run_dir)
    if tables_only:
        return None
    code = (
        "import sys; from hydra import compose, initialize_config_module\n"
        "from system.config import register; from system.runner import train\n"
        "register()\n"
        "with initialize_config_module(config_module='conf', version_base='1.3'):\n"
        "    cfg = compose('train', overrides=sys.argv[2:])\n"
        "train(cfg, run_dir=sys.argv[1])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    args = [str(run_dir), "backend=local", "progress=false", "checkpoint_every=0", *overrides]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {' '.join(overrides)}\n{proc.stderr[-3000:]}")
    saved.write_text(json.dumps(overrides))
    return _read(run_dir)


def _read(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    eps = [r.get("epsilon", 0.0) for r in rows]  # null: not finite (e.g. DP-FedAvg with z = 0)
    return {
        "accuracy": s["accuracy"],
        "best_accuracy": max((r.get("accuracy", 0.0) for r in rows), default=None),
        "epsilon": None if None in eps else max(eps, default=0.0),
        "stopped": s.get("stopped"),
        "rounds_completed": s.get("rounds_completed"),
        "startup_s": s.get("startup_s"),
        "round_time_median_s": s["round_time_median_s"],
        # the run's own time: start-up plus every round (metrics.jsonl), not the process wall time
        "run_s": (s.get("startup_s") or 0.0) + sum(r.get("round_time_s", 0.0) for r in rows),
        "peak_rss_mb": s["peak_rss_mb"],
        "run_dir": str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir),
        "commit": s.get("versions", {}).get("git_commit"),  # the code that made this run
    }


def _fmt_eps(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:g}"


def _mean_std(xs: list[float], digits: int = 3) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _seeds_txt(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _runs(results: dict, m: str, e: float, seeds: list[int]) -> list[dict]:
    return [results[(m, e, s)] for s in seeds if (m, e, s) in results]


def table(title: str, results: dict, methods: list[str], eps: list[float], seeds: list[int]) -> str:
    head = "| method | " + " | ".join(f"eps={_fmt_eps(e)}" for e in eps) + " |"
    lines = [
        f"**{title}** (final test accuracy, mean ± std over seeds {_seeds_txt(seeds)};"
        " [n=k]: only k of those seeds run; in brackets the worst-client epsilon reported by"
        " Opacus, range over seeds)",
        "",
        head,
        "|" + "---|" * (len(eps) + 1),
    ]
    for m in methods:
        cells = []
        for e in eps:
            runs = _runs(results, m, e, seeds)
            if not runs:
                cells.append("-")
                continue
            cell = _mean_std([r["accuracy"] for r in runs])
            if not math.isinf(e):  # Opacus' worst-client epsilon; depends on the split
                lo, hi = (f(r["epsilon"] for r in runs) for f in (min, max))
                cell += f" ({lo:.2f})" if f"{lo:.2f}" == f"{hi:.2f}" else f" ({lo:.2f}-{hi:.2f})"
            if len(runs) < len(seeds):
                cell += f" [n={len(runs)}]"
            if any(r["stopped"] for r in runs):
                cell += " stopped"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_check(results: dict, seeds: list[int]) -> str:
    """FedSVD minus each baseline at eps 3 and 6, paired by seed, with a paired t-test."""
    from scipy import stats  # an Opacus dependency

    lines = [
        "**Target check** (FedSVD above FFA-LoRA and DP-LoRA at eps 3 and 6): final accuracy of"
        " FedSVD minus the baseline, paired by seed (same seed = same generated data, split,"
        " sampled clients, LoRA init, Poisson batches and noise draws); se = standard error of the"
        " mean paired difference; p = two-sided paired t-test; 'above' / 'below' when p < 0.05,"
        " else 'not resolved'",
        "",
        "| eps | comparison | mean diff (se) | first higher in | p | per-seed diffs | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    cands, bases, eps_list = TARGET
    for e in eps_list:
        for c in cands:
            for b in bases:
                both = [s for s in seeds if (c, e, s) in results and (b, e, s) in results]
                if len(both) < 2:
                    continue
                d = [results[(c, e, s)]["accuracy"] - results[(b, e, s)]["accuracy"] for s in both]
                mean, se = statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))
                p = float(stats.ttest_1samp(d, 0.0).pvalue) if se > 0 else float(mean == 0)
                verdict = "not resolved" if p >= 0.05 else "above" if mean > 0 else "below"
                per = ", ".join(f"{x:+.3f}" for x in d)
                wins = f"{sum(x > 0 for x in d)}/{len(d)} seeds"
                lines.append(
                    f"| {_fmt_eps(e)} | {c} - {b} | {mean:+.3f} ({se:.3f}) | {wins} | {p:.3f}"
                    f" | {per} | {verdict} |"
                )
    return "\n".join(lines)


def cost_table(results: dict, names: list[str], e: float, seeds: list[int]) -> str:
    """Per seed with a no-DP run, not averaged: runs timed under different load differ."""
    seeds = [s for s in seeds if any((m, math.inf, s) in results for m in names)]
    per = " / ".join(map(str, seeds))
    lines = [
        "**Cost of DP** (median time per round after round 1 and peak RSS of the run's process;"
        " shared 2-core machine, so compare runs of one seed only, as rough ratios)",
        "",
        f"| run | s/round, seeds {per} | peak RSS MB, seeds {per} |",
        "|---|---|---|",
    ]
    for m in names:
        for label, eps in ((f"eps={_fmt_eps(e)}", e), ("no DP", math.inf)):
            runs = [results.get((m, eps, s)) for s in seeds]
            if any(runs):
                t = " / ".join(f"{r['round_time_median_s']:.2f}" if r else "-" for r in runs)
                mem = " / ".join(f"{r['peak_rss_mb']:.0f}" if r else "-" for r in runs)
                lines.append(f"| {m}, {label} | {t} | {mem} |")
    return "\n".join(lines)


def _method(name: str) -> str:
    """A text method by its table name or its directory key (FedSVD-PiSSA)."""
    for m, (key, *_) in TEXT_METHODS.items():
        if name in (m, key):
            return m
    raise argparse.ArgumentTypeError(f"unknown method {name!r}; valid: {list(TEXT_METHODS)}")


def options(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, with ``--quick``'s sizes (``QUICK``) applied."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=["text", "digits", "all"], default="all")
    p.add_argument("--methods", nargs="+", type=_method, default=list(TEXT_METHODS))
    p.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 6.0, math.inf])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    p.add_argument("--rounds", type=int, default=6, help="text task rounds")
    p.add_argument("--steps", type=int, default=3, help="local DP-SGD steps per round (text)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--clip", type=float, default=2.0)
    p.add_argument("--n-samples", type=int, default=480)
    p.add_argument("--max-length", type=int, default=16)
    p.add_argument("--digits-rounds", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench_privacy"))
    p.add_argument(
        "--results",
        default=None,
        help="results path without suffix (default benchmarks/results/privacy, with --quick "
        "benchmarks/results/privacy_quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help="2 rounds, 1 step, 120 samples; 3 digits rounds"
    )
    p.add_argument("--tables-only", action="store_true", help="tables of the finished runs only")
    a = p.parse_args(argv)
    if a.quick:
        vars(a).update(QUICK)
    return a


def main(argv: list[str] | None = None) -> None:
    a = options(argv)
    pin_threads(1)  # the runs' own processes inherit it (the runner pins its hosts to 1 as well)
    prov = provenance(None if argv is None else ["benchmarks/privacy.py", *argv])
    out = Path(a.out)
    name = "privacy_quick" if a.quick else "privacy"
    res = Path(a.results) if a.results else ROOT / "benchmarks" / "results" / name
    if a.quick:  # own run directories, so quick runs never mix with (or overwrite) the real ones
        out = out / "quick"
    text_methods = [m for m in TEXT_METHODS if m in a.methods]
    todo = []
    if a.only in ("text", "all"):
        todo += [("text", m, TEXT_METHODS[m][0], text_overrides) for m in text_methods]
    if a.only in ("digits", "all"):
        todo += [("digits", m, key, digits_overrides) for m, key in DIGIT_METHODS.items()]
    results: dict = {}
    for seed in a.seeds:  # seed-major, so an interrupted sweep leaves whole seeds
        for task, m, key, overrides in todo:
            for e in a.eps:
                r = run_one(
                    overrides(m, e, seed, a), run_dir(out, task, key, e, seed), a.tables_only
                )
                if r is not None:
                    results[(m, e, seed)] = {"task": task, "method": m, "seed": seed, **r}
                    print(
                        f"{task} {m} eps={_fmt_eps(e)} seed={seed}: acc={r['accuracy']:.3f}",
                        flush=True,
                    )
    blocks = []
    if a.only in ("text", "all"):
        title = "Text task, MiniLM + LoRA r=8"
        blocks += [table(title, results, text_methods, a.eps, a.seeds)]
        blocks += [target_check(results, a.seeds)]
    if a.only in ("digits", "all"):
        title = "Digits, MLP, 100 clients, 20 per round"
        blocks += [table(title, results, list(DIGIT_METHODS), a.eps, a.seeds)]
    finite = [e for e in a.eps if not math.isinf(e)]
    if finite and math.inf in a.eps:
        names = [m for m in ("FedSVD", "DP-LoRA") if m in text_methods and a.only != "digits"]
        names += list(DIGIT_METHODS) if a.only != "text" else []
        blocks.append(cost_table(results, names, max(finite), a.seeds))
    text = "\n\n".join(blocks)
    print("\n" + text)
    res.parent.mkdir(parents=True, exist_ok=True)
    commits = sorted({str(r.get("commit"))[:12] for r in results.values()})
    head = f"<!-- runs made at commit(s) {', '.join(commits)} (each run's in the .json) -->"
    res.with_suffix(".md").write_text(f"{markdown(prov)}\n{head}\n\n{text}\n")
    runs = [{"target_epsilon": _fmt_eps(e), **r} for (_, e, _), r in results.items()]
    opts = {**vars(a), "eps": [_fmt_eps(e) for e in a.eps]}
    blob = {"provenance": prov, "options": opts, "runs": runs}
    res.with_suffix(".json").write_text(json.dumps(blob, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
