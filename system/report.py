"""Comparing runs: read Flagstaff run directories, group the seeds of each setting, write a table
(Markdown, CSV) and curves (matplotlib), and draw a single run's curves.png.

A run directory (system/rundir.py) holds ``metrics.jsonl``, ``summary.json`` and ``.hydra/``
(``config.yaml``, ``overrides.yaml``); a Hydra multirun directory holds numbered run folders and
``multirun.yaml``. A run's *setting* is its command-line overrides minus those that do not change
what is trained (``seed``, ``resume``, ``progress``); runs that share a setting are seeds of it, and
the table reports the mean and the sample standard deviation (ddof=1, blank for one seed) over them,
as is usual for seeds (e.g. Henderson et al., "Deep RL that matters", AAAI 2018, on reporting
variation across seeds). Peer-to-peer runs (``strategy.mode=p2p``) count steps, not rounds, and add
the worst honest node's accuracy and the consensus distance.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # pandas and matplotlib load when a table or a plot is made, not on import
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "Run",
    "Report",
    "ReportError",
    "read_metrics",
    "load_run",
    "find_runs",
    "runs_frame",
    "group_table",
    "markdown_table",
    "plot_groups",
    "run_figure",
    "plot_run",
    "report",
]

log = logging.getLogger("flagstaff")

NOT_SETTING = ("seed", "resume", "progress")  # overrides that do not change what is trained
# natural partitions: the per-client test accuracy distribution of the last evaluated round
# (system/eval.py; issue 21 item 4)
CLIENT_ACCURACY = ("accuracy_client_mean", "accuracy_client_p10", "accuracy_client_worst")
# per-run values that get a mean and a std per setting (CSV columns <name>_mean, <name>_std),
# besides <metric>_final and <metric>_best
STATS = (
    "accuracy_worst",
    *CLIENT_ACCURACY,
    "consensus_distance",
    "epsilon",
    "bytes_up",
    "bytes_down",
    "round_median_s",
    "total_s",
)
LOWER_IS_BETTER = ("loss", "distance")  # a metric whose name holds one of these: best = min


class ReportError(ValueError):
    """Input that gives no report (no such directory, no run, an unknown metric); one line."""


@dataclass(frozen=True)
class Run:
    """One run directory as read back: metric rows (one per round or step), summary, config."""

    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] | None = None  # None: no .hydra/overrides.yaml (programmatic run)

    @property
    def p2p(self) -> bool:
        """Decentralized training: its rows count steps."""
        mode = self.summary.get("mode") or (self.config.get("strategy") or {}).get("mode")
        return mode == "p2p" or any("step" in r for r in self.rows)

    @property
    def dp(self) -> bool:
        return "privacy" in self.summary or any(r.get("epsilon") is not None for r in self.rows)

    @property
    def compressed(self) -> bool:
        """Compressed client updates (``comm.kind`` other than none in .hydra/config.yaml)."""
        kind = (self.config.get("comm") or {}).get("kind")
        return kind not in (None, "none")

    @property
    def seed(self) -> int | None:
        if self.summary.get("seed") is not None:
            return int(self.summary["seed"])
        if self.config.get("seed") is not None:
            return int(self.config["seed"])
        for o in self.overrides or ():
            key, _, value = o.lstrip("+~").partition("=")
            if key == "seed" and value.lstrip("-").isdigit():
                return int(value)
        return None

    @property
    def setting(self) -> str:
        """The overrides minus seed (and resume, progress): what the seeds of one setting share.
        A run with no recorded overrides is a setting of its own, named by its directory."""
        if self.overrides is None:
            return f"({self.path})"
        kept = [o for o in self.overrides if o.lstrip("+~").partition("=")[0] not in NOT_SETTING]
        return " ".join(kept) if kept else "(defaults)"

    @property
    def group_key(self) -> tuple[str, ...]:
        """The setting as a key that does not depend on the order of the overrides."""
        if self.overrides is None:
            return (str(self.path),)
        return tuple(sorted(self.setting.split(" ")))

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(x, values) of ``key`` over the rows that have it; null (non-finite) is NaN."""
        xs, ys = [], []
        for r in self.rows:
            if key in r:
                xs.append(float(r.get("step", r.get("round", len(xs) + 1))))
                ys.append(math.nan if r[key] is None else float(r[key]))
        return xs, ys


@dataclass
class Report:
    """What ``report`` wrote: the table, the files, the directories it skipped (one line each)."""

    table: pd.DataFrame
    markdown: str
    files: list[Path]
    skipped: list[str]


# -- reading ---------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, one per round (the last written when a round appears twice,
    as after a resume), ordered; a line that is not a JSON object (torn by a kill) is dropped
    with a warning naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    by_x: dict[float, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            log.warning("%s:%d: dropped a torn metrics row: %.60s", path, i, line)
            continue
        by_x[row.get("step", row.get("round", i))] = row
    return [by_x[k] for k in sorted(by_x)]


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.exists() else None
    except (yaml.YAMLError, OSError) as err:
        log.warning("%s: not readable YAML (%s); ignored", path, " ".join(str(err).split())[:80])
        return None


def is_run(path: Path) -> bool:
    """A directory a Flagstaff run wrote into (it has metrics.jsonl or summary.json)."""
    return (path / "metrics.jsonl").is_file() or (path / "summary.json").is_file()


def load_run(path: str | Path) -> Run:
    """Read one run directory (a summary.json that is not JSON is ignored with a warning)."""
    path = Path(path)
    summary: dict[str, Any] = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as err:
            log.warning("%s/summary.json is not JSON (%s); ignored", path, err.msg)
    config = _load_yaml(path / ".hydra" / "config.yaml")
    overrides = _load_yaml(path / ".hydra" / "overrides.yaml")
    return Run(
        path=path,
        rows=read_metrics(path / "metrics.jsonl"),
        summary=summary if isinstance(summary, dict) else {},
        config=config if isinstance(config, dict) else {},
        overrides=tuple(str(o) for o in overrides) if isinstance(overrides, list) else None,
    )


def _natural(path: Path) -> list[Any]:
    """Sort key: multirun folders 2 before 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(dirs: Iterable[str | Path]) -> tuple[list[Run], list[str]]:
    """The runs in ``dirs``: each is a run directory or a folder holding runs at any depth (a
    multirun). Returns them in path order, once each, and one line for each folder that is not
    a run and holds none (hidden folders such as .hydra are not looked at).
    ReportError for a path that is not a directory."""
    found: dict[Path, None] = {}
    skipped: list[str] = []

    def walk(d: Path) -> bool:
        if is_run(d):
            found.setdefault(d.resolve(), None)
            return True
        subdirs = sorted(
            (p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural
        )
        has = [walk(p) for p in subdirs]
        if not any(has):
            return False
        for p, h in zip(subdirs, has, strict=True):
            if not h:
                skipped.append(
                    f"skipped {p}: not a Flagstaff run (no metrics.jsonl or summary.json)"
                )
        return True

    for d in map(Path, dirs):
        if not d.is_dir():
            raise ReportError(f"{d} is not a directory: give run directories or sweep folders")
        if not walk(d):
            skipped.append(f"skipped {d}: not a Flagstaff run and holds none")
    return [load_run(p) for p in sorted(found, key=_natural)], skipped


# -- one value per run, one row per setting --------------------------------------------------------
def _last(run: Run, key: str) -> Any:
    for r in reversed(run.rows):
        if r.get(key) is not None:
            return r[key]
    return None


def _best(values: list[float], metric: str) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return min(finite) if any(w in metric for w in LOWER_IS_BETTER) else max(finite)


def run_values(run: Run, metric: str = "accuracy") -> dict[str, Any]:
    """The table's values for one run: final (summary.json, else the last row) and best
    ``metric``, rounds completed, epsilon and its kind, bytes sent over the run, the median and
    total of the round times (training rounds: no start-up, no evaluation)."""
    s, privacy = run.summary, run.summary.get("privacy") or {}
    _, values = run.series(metric)
    _, times = run.series("round_time_s")
    times = [t for t in times if math.isfinite(t)]
    last_x = max((r.get("step", r.get("round", 0)) for r in run.rows), default=None)

    def pick(summary_key: str, row_key: str | None = None) -> Any:
        v = s.get(summary_key)
        return _last(run, row_key or summary_key) if v is None else v

    return {
        "setting": run.setting,
        "seed": run.seed,
        "run": str(run.path),
        "mode": "p2p" if run.p2p else "server",
        "final": pick(metric),
        "best": _best(values, metric),
        "rounds": s.get("rounds_completed", last_x) if not run.p2p else last_x,
        "rounds_planned": s.get("rounds", (run.config or {}).get("rounds")),
        "accuracy_worst": pick("accuracy_worst") if run.p2p else None,
        "consensus_distance": pick("consensus_distance") if run.p2p else None,
        **{k: pick(k) for k in CLIENT_ACCURACY},
        "epsilon": privacy.get("epsilon", _last(run, "epsilon")),
        "epsilon_kind": privacy.get("epsilon_kind", _last(run, "epsilon_kind")),
        "bytes_up": s.get("bytes_up_total", sum(r.get("bytes_up", 0) for r in run.rows) or None),
        "bytes_down": s.get(
            "bytes_down_total", sum(r.get("bytes_down", 0) for r in run.rows) or None
        ),
        "round_median_s": s.get("round_time_median_s", _median(times[1:] or times)),
        "total_s": sum(times) if times else None,
    }


def _median(xs: Sequence[float]) -> float | None:
    import numpy as np

    return float(np.median(xs)) if len(xs) else None


def runs_frame(runs: Sequence[Run], metric: str = "accuracy") -> pd.DataFrame:
    """One row per run (``run_values``), in the runs' order."""
    import pandas as pd

    if not any(metric in r.summary or any(metric in row for row in r.rows) for r in runs):
        keys = sorted({k for r in runs for row in r.rows for k in row})
        raise ReportError(f"--metric {metric}: no run logged it; logged keys: {', '.join(keys)}")
    frame = pd.DataFrame([run_values(r, metric) for r in runs])
    frame = frame.rename(columns={"final": f"{metric}_final", "best": f"{metric}_best"})
    frame["_key"] = [" ".join(r.group_key) for r in runs]
    frame.attrs["metric"] = metric
    return frame


def group_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (first-seen order): n runs, their seeds, mean and sample std (ddof=1)
    of each value, the rounds (or steps) completed, the epsilon kind."""
    import pandas as pd

    def joined(values: pd.Series, unique: bool = True) -> str:
        kept = [str(v) for v in values if pd.notna(v)]
        return ",".join(dict.fromkeys(kept) if unique else kept)

    def rounds(g: pd.DataFrame) -> str:
        done = joined(g["rounds"].astype("Int64"))
        planned = joined(g["rounds_planned"].astype("Int64"))
        return done if planned in ("", done) else f"{done}/{planned}"

    metric = frame.attrs.get("metric", "accuracy")
    out = []
    for _, g in frame.groupby("_key", sort=False):
        row: dict[str, Any] = {
            "setting": g["setting"].iloc[0],
            "mode": joined(g["mode"]),
            "n": len(g),
            "seeds": joined(g["seed"].astype("Int64"), unique=False),
            "rounds": rounds(g),
            "epsilon_kind": joined(g["epsilon_kind"]) or None,
        }
        for k in (f"{metric}_final", f"{metric}_best", *STATS):
            col = pd.to_numeric(g[k], errors="coerce")
            row[f"{k}_mean"] = col.mean() if col.notna().any() else None
            row[f"{k}_std"] = col.std(ddof=1) if col.notna().sum() > 1 else None
        out.append(row)
    table = pd.DataFrame(out)
    table.attrs["metric"] = metric
    return table


def _pm(mean: Any, std: Any, fmt: str, scale: float = 1.0) -> str:
    if mean is None or mean != mean:
        return ""
    s = format(mean / scale, fmt)
    return s if std is None or std != std else f"{s} ± {format(std / scale, fmt)}"


def markdown_table(table: pd.DataFrame) -> str:
    """The group table as Markdown (pandas + tabulate): mean ± std, columns that no setting has
    left out; p2p settings add worst-node accuracy and consensus distance, natural partitions the
    per-client accuracy distribution (mean, 10th percentile, worst client); the rounds column says
    steps when every run is peer-to-peer."""
    import pandas as pd

    metric = table.attrs.get("metric", "accuracy")
    modes = set(",".join(table["mode"]).split(","))
    steps = "steps" if modes == {"p2p"} else ("rounds/steps" if "p2p" in modes else "rounds")
    cols: dict[str, list[str]] = {
        "setting": list(table["setting"]),
        "n": [str(n) for n in table["n"]],
        "seeds": list(table["seeds"]),
        f"final {metric}": [],
        f"best {metric}": [],
        steps: list(table["rounds"]),
        "worst-node accuracy": [],
        "consensus distance": [],
        "client accuracy mean": [],
        "client accuracy p10": [],
        "worst-client accuracy": [],
        "epsilon": [],
        "epsilon kind": [k if isinstance(k, str) else "" for k in table["epsilon_kind"]],
        "MB up": [],
        "MB down": [],
        "round median (s)": [],
        "total (s)": [],
    }
    fmts = {
        f"final {metric}": (f"{metric}_final", ".4f", 1.0),
        f"best {metric}": (f"{metric}_best", ".4f", 1.0),
        "worst-node accuracy": ("accuracy_worst", ".4f", 1.0),
        "consensus distance": ("consensus_distance", ".3g", 1.0),
        "client accuracy mean": ("accuracy_client_mean", ".4f", 1.0),
        "client accuracy p10": ("accuracy_client_p10", ".4f", 1.0),
        "worst-client accuracy": ("accuracy_client_worst", ".4f", 1.0),
        "epsilon": ("epsilon", ".3f", 1.0),
        "MB up": ("bytes_up", ".3f", 1e6),
        "MB down": ("bytes_down", ".3f", 1e6),
        "round median (s)": ("round_median_s", ".3f", 1.0),
        "total (s)": ("total_s", ".2f", 1.0),
    }
    for name, (key, fmt, scale) in fmts.items():
        cols[name] = [
            _pm(m, s, fmt, scale)
            for m, s in zip(table[f"{key}_mean"], table[f"{key}_std"], strict=True)
        ]
    shown = {k: v for k, v in cols.items() if any(x != "" for x in v)}
    align = ["left" if k in ("setting", "seeds", "epsilon kind") else "right" for k in shown]
    return pd.DataFrame(shown).to_markdown(index=False, disable_numparse=True, colalign=align)


def provenance(runs: Sequence[Run]) -> str:
    """Where the numbers come from: the runs' commits and package versions (summary.json)."""
    commits = sorted({r.summary.get("versions", {}).get("git_commit", "?") for r in runs})
    vers: dict[str, set[str]] = {}
    for r in runs:
        for k, v in (r.summary.get("versions") or {}).items():
            if k != "git_commit":
                vers.setdefault(k, set()).add(str(v))
    pkgs = ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in vers.items())
    return f"{len(runs)} runs; commit {', '.join(c[:10] for c in commits)}; {pkgs}"


# -- plots -----------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _x_label(runs: Sequence[Run]) -> str:
    p2p = {r.p2p for r in runs}
    return "step" if p2p == {True} else ("round / step" if True in p2p else "round")


def _label(metric: str) -> str:
    return f"test {metric}" if metric in ("accuracy", "loss") else metric


def _cumulative_mb(run: Run) -> tuple[list[float], list[float], list[float]]:
    """(x, MB sent up so far, MB sent down so far) per round."""
    xs, up, down, u, d = [], [], [], 0.0, 0.0
    for r in run.rows:
        if "bytes_up" in r:
            u, d = u + r["bytes_up"] / 1e6, d + r.get("bytes_down", 0) / 1e6
            xs.append(float(r.get("round", len(xs) + 1)))
            up.append(u)
            down.append(d)
    return xs, up, down


def _panels(runs: Sequence[Run], metric: str, single: bool) -> list[str]:
    """The panels a figure of ``runs`` shows: the metric, then what the runs are about."""
    panels = [_label(metric)]
    if single and metric != "loss":
        panels.append("test loss")
    if any(r.p2p for r in runs):
        panels += ["worst-node accuracy", "consensus distance"]
    if any(r.dp for r in runs):
        panels.append("epsilon")
    if any(r.compressed for r in runs):
        panels.append("MB sent")
    return panels


_KEYS = {
    "test loss": "loss",
    "worst-node accuracy": "accuracy_worst",
    "consensus distance": "consensus_distance",
    "epsilon": "epsilon",
}


def _figure(panels: list[str], legend: int = 0) -> tuple[Figure, list[Any]]:
    """A grid of panels (3 per row, 2 for 4 panels); ``legend``: lines of legend to leave room for below."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    cols = 2 if len(panels) == 4 else min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(4.3 * cols, 3.3 * rows + 0.4 * legend),
        squeeze=False,
        layout="constrained",
    )
    flat = list(axes.flat)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    for ax in flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, flat[: len(panels)]


def _save(fig: Figure, out: Path, x: str, panels: list[str]) -> Path:
    """Write the figure with what it shows in the PNG's text (read back by tests and tools)."""
    info = json.dumps({"x": x, "panels": panels})
    fig.savefig(out, dpi=110, metadata={"flagstaff": info})
    _pyplot().close(fig)
    return out


def run_figure(run: Run, metric: str = "accuracy") -> tuple[Figure, str, list[str]]:
    """A single run's curves: ``metric`` and test loss per round (per step for peer-to-peer
    runs), plus worst-node accuracy and consensus distance (p2p), epsilon (DP), cumulative MB
    sent up and down (compressed updates). Returns the figure, the x label and the panels."""
    panels = _panels([run], metric, single=True)
    x = _x_label([run])
    fig, axes = _figure(panels)
    for ax, name in zip(axes, panels, strict=True):
        if name == "MB sent":
            xs, up, down = _cumulative_mb(run)
            ax.plot(xs, up, marker=".", label="up (clients to server)")
            ax.plot(xs, down, marker=".", linestyle="--", label="down (server to clients)")
            ax.legend(fontsize=8)
            name = "MB sent (cumulative)"
        else:
            xs, ys = run.series(_KEYS.get(name, metric))
            ax.plot(xs, ys, marker=".", color="tab:red" if name == "test loss" else None)
            if name == "epsilon" and run.dp:
                kind = (run.summary.get("privacy") or {}).get("epsilon_kind") or _last(
                    run, "epsilon_kind"
                )
                name = f"epsilon ({kind})" if kind else name
        if name == "consensus distance":
            ax.set_yscale("log")
        ax.set(xlabel=x, ylabel=name, title=name)
        ax.grid(alpha=0.3)
    return fig, x, panels


def plot_run(path: str | Path, rows: list[dict[str, Any]] | None = None) -> Path | None:
    """Write ``path``/curves.png for one run (``rows``: its metric rows, else metrics.jsonl);
    None when no row has been evaluated yet."""
    run = load_run(path)
    if rows is not None:
        run = Run(run.path, list(rows), run.summary, run.config, run.overrides)
    if not any("loss" in r for r in run.rows):
        return None
    fig, x, panels = run_figure(run)
    return _save(fig, run.path / "curves.png", x, panels)


def curves_frame(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame:
    """Long table of the runs' curves: setting key, run, key, x, value (NaN rows dropped)."""
    import pandas as pd

    parts = []
    for i, r in enumerate(runs):
        for k in keys:
            if k == "MB sent":
                xs, ys, _ = _cumulative_mb(r)
            else:
                xs, ys = r.series(k)
            if xs:
                parts.append(
                    pd.DataFrame(
                        {"group": " ".join(r.group_key), "run": i, "key": k, "x": xs, "value": ys}
                    )
                )
    if not parts:
        return pd.DataFrame(columns=["group", "run", "key", "x", "value"])
    return pd.concat(parts, ignore_index=True).dropna(subset=["value"])


def plot_groups(runs: Sequence[Run], out: Path, metric: str = "accuracy") -> Path:
    """One figure of the settings' curves: per setting the mean over its seeds with a shaded
    band of one sample std (ddof=1); panels as in ``run_figure`` (without the loss)."""
    panels = _panels(runs, metric, single=False)
    keys = [_KEYS.get(p, "MB sent" if p == "MB sent" else metric) for p in panels]
    data = curves_frame(runs, keys)
    stats = data.groupby(["key", "group", "x"])["value"].agg(["mean", "std"]).sort_index()
    labels = {" ".join(r.group_key): r.setting for r in runs}
    x = _x_label(runs)
    fig, axes = _figure(panels, legend=len(labels))
    colors = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name, key in zip(axes, panels, keys, strict=True):
        for j, group in enumerate(labels):
            if (key, group) not in stats.index.droplevel("x"):
                continue
            s = stats.loc[(key, group)].sort_index()
            c = colors[j % len(colors)]
            ax.plot(s.index, s["mean"], marker=".", color=c, label=labels[group])
            band = s["std"].fillna(0.0)
            ax.fill_between(s.index, s["mean"] - band, s["mean"] + band, color=c, alpha=0.2)
        if name == "consensus distance":
            ax.set_yscale("log")
        title = "MB sent up (cumulative)" if name == "MB sent" else name
        kinds = {(r.summary.get("privacy") or {}).get("epsilon_kind") for r in runs if r.dp}
        if name == "epsilon" and len(kinds) == 1 and None not in kinds:
            title = f"epsilon ({kinds.pop()})"
        ax.set(xlabel=x, ylabel=title, title=title)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    return _save(fig, out, x, panels)


# -- the whole report ------------------------------------------------------------------------------
def default_out(dirs: Sequence[str | Path]) -> Path:
    """Where the report goes without --out: the given directory, or the common parent of several."""
    return Path(os.path.commonpath([str(Path(d).resolve()) for d in dirs]))


def report(
    dirs: Sequence[str | Path],
    out: str | Path | None = None,
    formats: Sequence[str] = ("md", "csv"),
    metric: str = "accuracy",
) -> Report:
    """Read the runs under ``dirs``, group them by setting and write into ``out`` (default:
    ``default_out(dirs)``): report.md (the table and where its numbers come from), report.csv
    (one row per setting: <value>_mean, <value>_std), report_runs.csv (one row per run) and
    report.png (the curves). ReportError when there is nothing to report."""
    runs, skipped = find_runs(dirs)
    if not runs:
        where = ", ".join(str(d) for d in dirs)
        raise ReportError(
            f"no Flagstaff run under {where} (a run has metrics.jsonl or summary.json)"
        )
    frame = runs_frame(runs, metric)
    table = group_table(frame)
    md = markdown_table(table)
    dest = Path(out) if out is not None else default_out(dirs)
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    if "md" in formats:
        note = (
            f"mean ± sample std (ddof=1) over the seeds of each setting; {provenance(runs)}.\n"
            f"Made by: flagstaff-report {' '.join(str(d) for d in dirs)}\n"
        )
        (dest / "report.md").write_text(md + "\n\n" + note)
        files.append(dest / "report.md")
    if "csv" in formats:
        table.to_csv(dest / "report.csv", index=False)
        frame.drop(columns="_key").to_csv(dest / "report_runs.csv", index=False)
        files += [dest / "report.csv", dest / "report_runs.csv"]
    files.append(plot_groups(runs, dest / "report.png", metric))
    return Report(table=table, markdown=md, files=files, skipped=skipped)
