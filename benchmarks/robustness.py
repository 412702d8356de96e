"""Robustness benchmark (issue 4, item 4a): final test accuracy of every aggregator under every attack.

Setting (conf/experiment/robust_*.yaml): n = 15 clients that all take part in every round, the
Byzantine clients are ids 0..f-1 with f in {0, 3} (f/n = 20%), MLP, local momentum SGD (lr 0.05,
momentum 0.9, batch 8, one local epoch; the Flag Aggregator paper's workers use momentum SGD),
clients send their model update (local model - global model) and the server applies the aggregate
with FedAvg (server lr 1). Tasks:

* ``digits-iid``: sklearn digits, IID split (the issue's target check);
* ``digits-dir1``: sklearn digits, Dirichlet(alpha = 1) label skew;
* ``mnist1d-iid``: mnist1d (generated offline; harder: an MLP reaches about 0.5 in 20 rounds).

Columns: ``f=0`` (no Byzantine client, the rule built with f = 0), then the attacks with f = 3
(``none`` = 3 designated clients that behave honestly, the rule built with f = 3: the fair
no-attack reference for the attacked columns). Cells: final test accuracy in %, mean +- std over
seeds; ``n/a``: the rule's precondition fails (e.g. Bulyan needs n >= 4f + 3 inputs and crash or
inf/NaN vectors leave 12); ``div``: every seed stopped because the aggregate became non-finite
(``k div``: k seeds did; the mean is over the others).

Runs use ``backend=local`` (in-process), evaluate only at the last round and skip the per-run
plots. Numerics are pinned before torch loads (``KERNEL_PIN``): one thread, and the AVX2 kernels
of ATen (``ATEN_CPU_CAPABILITY=avx2``) and MKL (``MKL_CBWR=AVX2``, MKL's conditional numerical
reproducibility), so any x86-64 CPU with AVX2 runs the same kernels in the same summation order
(unpinned, an AVX-512 CPU runs other kernels and the chaotic cells change: docs/robustness.md,
"Reproducibility"); ``--native-kernels`` leaves the CPU's own choice. ``robustness.json`` and
``robustness.md`` record the provenance of the run (benchmarks/_provenance.py). Each run is cached as one JSON file under ``--out/runs`` (a rerun skips finished runs);
``--jobs 2`` runs configurations in two worker processes. Prints Markdown tables and the target
check, and writes ``--out/robustness.json`` and ``--out/robustness.md``.

    python benchmarks/robustness.py                          # digits-iid, every rule x attack, 3 seeds
    python benchmarks/robustness.py --quick                  # 5 rules x 6 attacks, 1 seed
    python benchmarks/robustness.py --settings digits-dir1 mnist1d-iid --seeds 0 --jobs 2
    python benchmarks/robustness.py --aggregators flag --attacks none alie --pre nnm
    python benchmarks/robustness.py --aggregators flag --attacks none alie --extra aggregator.m=4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import markdown, provenance  # noqa: E402 (a sibling module, no torch import)

#: set before torch loads: one thread and the AVX2 kernels of ATen and MKL on every x86-64 CPU
KERNEL_PIN = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
}

AGGREGATORS = [
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multikrum",
    "geomed",
    "cclip",
    "bulyan",
    "mda",
    "meamed",
    "phocas",
    "clip",
    "arc",
    "flag",
]
ATTACKS = [
    "none",
    "sign_flip",
    "reversed",
    "label_flip",
    "alie",
    "alie_adaptive",
    "foe",
    "foe_adaptive",
    "gaussian",
    "uniform",
    "mimic",
    "inf_vector",
    "crash",
]
QUICK_AGGREGATORS = ["mean", "median", "trimmed_mean", "multikrum", "flag"]
QUICK_ATTACKS = ["none", "sign_flip", "label_flip", "alie", "foe", "alie_adaptive"]
SETTINGS = {  # name -> experiment config (conf/experiment/<name>.yaml)
    "digits-iid": "robust_digits",
    "digits-dir1": "robust_digits_dirichlet",
    "mnist1d-iid": "robust_mnist1d",
}
DEFAULT_ROUNDS = {"digits-iid": 15, "digits-dir1": 15, "mnist1d-iid": 20}
F_ATTACKED = 3
TARGET_ATTACKS = ["alie", "foe", "sign_flip", "label_flip"]  # the target check
FLAG_TOLERANCE = 3.0  # points: Flag under attack vs its own no-attack accuracy
MEAN_FAILS = 10.0  # points: the mean "visibly fails" when it loses at least this much
#: (rule, attack) cells whose seed-0 result changed when rerun with ATen/MKL dispatched to other
#: instruction sets (docs/robustness.md, "Reproducibility"): mostly attacks that get through the
#: rule and throw the model far, so training amplifies last-bit differences. ``--chaotic-seeds N``
#: reports them over seeds 0..N-1.
CHAOTIC = {
    ("mean", "uniform"),
    ("mean", "reversed"),
    ("cclip", "uniform"),
    ("flag", "label_flip"),
}


@dataclass(frozen=True)
class Run:
    """One configuration: setting, rule, attack, f, seed, rounds and extra overrides."""

    setting: str
    aggregator: str
    attack: str
    f: int
    seed: int
    rounds: int
    extra: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        """The table row: the rule, with its extra overrides when there are any."""
        return self.aggregator + (f" ({' '.join(self.extra)})" if self.extra else "")

    @property
    def column(self) -> str:
        """The table column: ``f=0`` or the attack's name (f = 3)."""
        return "f=0" if self.f == 0 else self.attack

    @property
    def name(self) -> str:
        """A file-name-safe identifier (the cache key)."""
        tag = "_".join(e.replace("=", "-").replace("/", "-") for e in self.extra)
        tag = tag.replace("[", "").replace("]", "").replace(",", "+").replace("'", "")
        return (
            f"{self.setting}_{self.aggregator}_{self.attack}_f{self.f}_s{self.seed}_r{self.rounds}"
            + (f"_{tag}" if tag else "")
        )

    def overrides(self) -> list[str]:
        """The flagstaff-train overrides of this run."""
        return [
            f"experiment={SETTINGS[self.setting]}",
            f"aggregator={self.aggregator}",
            f"attack={self.attack}",
            f"attack.f={self.f}",
            f"attack.seed={self.seed}",
            f"seed={self.seed}",
            f"rounds={self.rounds}",
            f"eval_every={self.rounds}",
            "checkpoint_every=0",
            "progress=false",
            "cluster.max_skipped_rounds=0",  # a round with no usable update is skipped, never stops
            *self.extra,
        ]


def plan(
    settings: Sequence[str],
    aggregators: Sequence[str],
    attacks: Sequence[str],
    seeds: Sequence[int],
    rounds: int | None,
    extra: Sequence[str] = (),
    flag_nnm: bool = False,
    chaotic_seeds: int = 0,
) -> list[Run]:
    """Every (setting, rule, column, seed): ``f=0`` with no attack, then each attack with f = 3.

    ``flag_nnm`` adds a row for the Flag Aggregator with nearest-neighbour mixing
    (``aggregator.pre=[nnm]``); cells in ``CHAOTIC`` (rule without pre-aggregation) run seeds
    ``0 .. chaotic_seeds - 1`` when that is more than ``seeds``."""
    variants = [(agg, tuple(extra)) for agg in aggregators]
    if flag_nnm:
        variants.append(("flag", (*extra, "aggregator.pre=[nnm]")))
    runs = []
    for s in settings:
        r = rounds or DEFAULT_ROUNDS[s]
        for agg, ex in variants:
            cols = [("none", 0)] + [(a, F_ATTACKED) for a in attacks]
            for attack, f in cols:
                cell_seeds = list(seeds)
                plain = not any(e.startswith("aggregator.pre") for e in ex)
                if plain and (agg, attack) in CHAOTIC and chaotic_seeds > len(seeds):
                    cell_seeds = list(range(chaotic_seeds))
                for seed in cell_seeds:
                    runs.append(Run(s, agg, attack, f, seed, r, ex))
    return runs


# ---------------------------------------------------------------------------------------------
# running (in a worker process)
# ---------------------------------------------------------------------------------------------


def pin_kernels() -> None:
    """Apply ``KERNEL_PIN`` to this process and its workers (explicit environment values win).

    ATen reads ``ATEN_CPU_CAPABILITY`` and MKL reads ``MKL_CBWR`` once, when torch loads, so this
    must run before torch is imported; if it already is, only the workers are pinned.
    """
    if "torch" in sys.modules:
        print("warning: torch is already loaded; only worker processes get the kernel pin")
    for key, value in KERNEL_PIN.items():
        os.environ.setdefault(key, value)


def _worker_init() -> None:
    """Quiet, single-threaded workers that skip the per-run plots."""
    import logging
    import warnings

    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    from flagstaff.system.rundir import RunDir

    RunDir.plot_curves = lambda self, *a, **k: None  # the benchmark needs no PNGs


def run_one(run: Run, out: str) -> dict[str, Any]:
    """Train one configuration through the runner; cache and return its result row."""
    path = Path(out) / "runs" / f"{run.name}.json"
    if path.exists():
        return json.loads(path.read_text())
    import tempfile

    from hydra import compose, initialize_config_module

    from flagstaff.system.config import ConfigError, register
    from flagstaff.system.runner import train

    register()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        cfg = compose("train", overrides=run.overrides())
    row: dict[str, Any] = {**asdict(run), "column": run.column, "label": run.label}
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            res = train(cfg, run_dir=tmp)
        row.update(
            status="ok",
            accuracy=res["accuracy"],
            dropped_nonfinite=sum(m.get("dropped_nonfinite", 0) for m in res["metrics"]),
            skipped_rounds=sum(bool(m.get("skipped")) for m in res["metrics"]),
            s_per_round=res["round_time_median_s"],
        )
    except ConfigError as err:  # the rule's precondition does not hold for this attack
        row.update(status="n/a", accuracy=None, message=str(err))
    except FloatingPointError as err:  # the aggregate became non-finite: the model is gone
        row.update(status="div", accuracy=None, message=str(err))
    row["wall_s"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))
    return row


def run_all(runs: Sequence[Run], out: Path, jobs: int) -> list[dict[str, Any]]:
    """Run (or load) every configuration, ``jobs`` at a time; prints one line per run."""
    todo = [r for r in runs if not (out / "runs" / f"{r.name}.json").exists()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} cached, {len(todo)} to do, jobs={jobs}")
    t0 = time.perf_counter()
    done = 0

    def report(row: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        acc = row["accuracy"]
        acc_s = f"{acc:.3f}" if acc is not None else row["status"]
        print(
            f"[{done}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {row['setting']} "
            f"{row['label']} {row['column']} s{row['seed']}: {acc_s} ({row['wall_s']:.1f}s)",
            flush=True,
        )

    if jobs <= 1:
        _worker_init()
        for r in todo:
            report(run_one(r, str(out)))
    else:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as ex:
            for row in ex.map(run_one, todo, [str(out)] * len(todo)):
                report(row)
    rows = []
    for r in runs:  # label and column from the plan (older cache files lack the label)
        row = json.loads((out / "runs" / f"{r.name}.json").read_text())
        rows.append({**row, "label": r.label, "column": r.column})
    return rows


# ---------------------------------------------------------------------------------------------
# tables and the target check
# ---------------------------------------------------------------------------------------------


def summarize(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(setting, row label, column) -> mean, std (in %), seeds, diverged count, status."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["label"], r["column"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        accs = [100 * r["accuracy"] for r in rs if r["status"] == "ok"]
        out[key] = {
            "mean": statistics.mean(accs) if accs else None,
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seeds": len(rs),
            "div": sum(r["status"] == "div" for r in rs),
            "na": all(r["status"] == "n/a" for r in rs),
        }
    return out


def _cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return ""
    if s["na"]:
        return "n/a"
    if s["mean"] is None:
        return "div"
    text = f"{s['mean']:.1f} ± {s['std']:.1f}"
    if s["seeds"] > 3:
        text += f" ({s['seeds']} seeds)"
    return text + (f" ({s['div']} div)" if s["div"] else "")


def table(summary: dict[tuple[str, str, str], dict[str, Any]], setting: str) -> str:
    """Markdown: rules as rows, ``f=0`` then the f = 3 attacks as columns."""
    aggs = [a for a in AGGREGATORS if any(k[:2] == (setting, a) for k in summary)]
    aggs += sorted({k[1] for k in summary if k[0] == setting} - set(aggs))
    cols = ["f=0"] + [a for a in ATTACKS if any(k[0] == setting and k[2] == a for k in summary)]
    cols += sorted({k[2] for k in summary if k[0] == setting} - set(cols))
    head = ["rule"] + [c if c == "f=0" else f"{c} (f=3)" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in aggs:
        cells = [_cell(summary.get((setting, a, c))) for c in cols]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_check(summary: dict[tuple[str, str, str], dict[str, Any]], setting: str) -> list[str]:
    """The issue's targets on ``setting``: Flag within 3 points of its no-attack accuracy under
    ALIE, FOE, sign flip and label flip (f/n = 20%); the mean loses >= 10 points under >= 2."""
    lines = []

    def acc(rule: str, col: str) -> float | None:
        s = summary.get((setting, rule, col))
        return None if s is None or s["na"] else (s["mean"] if s["mean"] is not None else 10.0)

    ref_mean = acc("mean", "none")
    flags = sorted({k[1] for k in summary if k[0] == setting and k[1].startswith("flag")})
    if ref_mean is None or acc("flag", "none") is None:
        return [f"target check needs flag and mean with attack none (f=3) on {setting}"]
    mean_fails = []
    extra_attacks = ["alie_adaptive", "foe_adaptive", "reversed", "uniform"]
    for a in TARGET_ATTACKS + extra_attacks:
        ma = acc("mean", a)
        if ma is not None:
            drop_m = ref_mean - ma
            if a in TARGET_ATTACKS and drop_m >= MEAN_FAILS:
                mean_fails.append(a)
            fails = ", fails" if drop_m >= MEAN_FAILS else ""
            lines.append(f"- {a}: mean {ma:.1f} (drop {drop_m:+.1f} from {ref_mean:.1f}{fails})")
    for label in flags:
        ref, ok, parts = acc(label, "none"), True, []
        for a in TARGET_ATTACKS + extra_attacks:
            fa = acc(label, a)
            if fa is None or ref is None:
                continue
            if a in TARGET_ATTACKS:
                ok &= ref - fa <= FLAG_TOLERANCE
            parts.append(f"{a} {ref - fa:+.1f}")
        lines.append(f"- {label}: drop from its no-attack {ref:.1f}: {', '.join(parts)}")
        lines.append(
            f"- {label} within {FLAG_TOLERANCE:g} points under {', '.join(TARGET_ATTACKS)}: "
            f"{'yes' if ok else 'NO'}"
        )
    lines.append(
        f"- mean loses >= {MEAN_FAILS:g} points under {len(mean_fails)} of "
        f"{', '.join(TARGET_ATTACKS)} ({', '.join(mean_fails) or 'none'}): "
        f"{'yes' if len(mean_fails) >= 2 else 'NO'}"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-iid"], choices=sorted(SETTINGS))
    p.add_argument("--aggregators", nargs="+", default=None, metavar="RULE")
    p.add_argument("--attacks", nargs="+", default=None, metavar="ATTACK")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="default: 15 digits, 20 mnist1d")
    p.add_argument("--quick", action="store_true", help="5 rules x 6 attacks, 1 seed")
    p.add_argument("--pre", nargs="+", default=None, help="pre-aggregations, e.g. --pre nnm")
    p.add_argument("--extra", nargs="+", default=[], help="more overrides, e.g. aggregator.m=4")
    p.add_argument(
        "--flag-nnm", action="store_true", help="add a row: Flag with aggregator.pre=[nnm]"
    )
    p.add_argument(
        "--chaotic-seeds",
        type=int,
        default=0,
        help="run the CHAOTIC cells over seeds 0..N-1 (docs/robustness.md, Reproducibility)",
    )
    p.add_argument(
        "--publish",
        action="store_true",
        help="merge these cells into benchmarks/results/robustness.{json,md} (replacing the "
        "same cells), with this run's provenance",
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes (1 or 2)")
    p.add_argument(
        "--native-kernels",
        action="store_true",
        help="do not pin ATen/MKL to their AVX2 kernels (results then depend on the CPU)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "robustness")
    args = p.parse_args(argv)
    if not 1 <= args.jobs <= 2:
        p.error("--jobs must be 1 or 2 (the benchmark machine has 2 cores)")
    aggs = args.aggregators or (QUICK_AGGREGATORS if args.quick else AGGREGATORS)
    attacks = args.attacks or (QUICK_ATTACKS if args.quick else ATTACKS)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    extra = list(args.extra)
    if args.pre:
        extra.append(f"aggregator.pre=[{','.join(args.pre)}]")
    if not args.native_kernels:
        pin_kernels()
    os.chdir(ROOT)  # the runner and Hydra resolve relative paths against the repository
    runs = plan(
        args.settings, aggs, attacks, seeds, args.rounds, extra, args.flag_nnm, args.chaotic_seeds
    )
    rows = run_all(runs, args.out, args.jobs)
    summary = summarize(rows)
    md = []
    for s in args.settings:
        r = rounds_of(rows, s)
        md += [
            f"### {s}: final test accuracy (%), n = 15, f = 3 unless f=0, {r} rounds, "
            f"mean ± std over seeds {sorted({x['seed'] for x in rows})}"
            + (f", overrides {' '.join(extra)}" if extra else ""),
            "",
            table(summary, s),
            "",
            *target_check(summary, s),
            "",
        ]
    prov = provenance(None if argv is None else ["benchmarks/robustness.py", *argv])
    text = "\n".join([markdown(prov), *md])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robustness.md").write_text(text)
    blob = {
        "provenance": prov,
        "settings": args.settings,
        "extra": extra,
        "rows": rows,
        "summary": [
            {"setting": k[0], "aggregator": k[1], "column": k[2], **v} for k, v in summary.items()
        ],
    }
    (args.out / "robustness.json").write_text(json.dumps(blob, indent=1))
    if args.publish:
        publish(rows, prov, args.settings, ROOT / "benchmarks" / "results")
    total = sum(r.get("wall_s", 0.0) for r in rows)
    print(f"\nwrote {args.out / 'robustness.md'} and robustness.json; {total / 60:.1f} run-minutes")
    return 0


def publish(
    rows: Sequence[dict[str, Any]], prov: dict[str, Any], settings: Sequence[str], results: Path
) -> None:
    """Merge this invocation's cells into ``results/robustness.json`` and rewrite
    ``robustness.md``: a cell (setting, row, column) measured now replaces all its earlier seeds;
    every row names the invocation (command and provenance) that produced it."""
    path = results / "robustness.json"
    blob = json.loads(path.read_text()) if path.exists() else {}
    for s in settings:
        blob.setdefault(s, {"invocations": [], "rows": []})
    for part in blob.values():
        if "invocations" not in part:  # first format: one command for every row, no provenance
            part["invocations"] = [{"command": part.pop("command", "?"), "provenance": None}]
            for r in part["rows"]:
                r["invocation"] = 0
        for key in ("settings", "extra", "summary"):
            part.pop(key, None)
    for s in settings:
        part = blob[s]
        new = [r for r in rows if r["setting"] == s]
        cells = {(r["label"], r["column"]) for r in new}
        kept = [r for r in part["rows"] if (r["label"], r["column"]) not in cells]
        part["invocations"].append({"command": prov["command"], "provenance": prov})
        idx = len(part["invocations"]) - 1
        part["rows"] = kept + [{**r, "invocation": idx} for r in new]
        used = sorted({r["invocation"] for r in part["rows"]})
        renum = {old: i for i, old in enumerate(used)}
        part["invocations"] = [part["invocations"][i] for i in used]
        for r in part["rows"]:
            r["invocation"] = renum[r["invocation"]]
    path.write_text(json.dumps(blob, indent=1))
    md = []
    for s, part in blob.items():
        summary = summarize(part["rows"])
        seeds = sorted({r["seed"] for r in part["rows"]})
        md += [
            f"### {s}: final test accuracy (%), n = 15, f = 3 unless f=0, "
            f"{rounds_of(part['rows'], s)} rounds, mean ± std over seeds "
            f"{seeds[:3]} (more where a cell says so)",
            "",
            *[
                f"<!-- cells of rows {sorted({r['label'] for r in part['rows'] if r['invocation'] == i})}"
                f" from: {markdown(inv['provenance'])[5:-4] if inv['provenance'] else inv['command']}"
                " -->"
                for i, inv in enumerate(part["invocations"])
            ],
            "",
            table(summary, s),
            "",
            *target_check(summary, s),
            "",
        ]
    (results / "robustness.md").write_text("\n".join(md))
    print(f"published {sorted(settings)} into {path} and robustness.md")


def rounds_of(rows: Sequence[dict[str, Any]], setting: str) -> str:
    """The round count(s) used for ``setting`` (one value unless runs were mixed)."""
    vals = sorted({r["rounds"] for r in rows if r["setting"] == setting})
    return "/".join(map(str, vals)) if vals else "?"


if __name__ == "__main__":
    sys.exit(main())
