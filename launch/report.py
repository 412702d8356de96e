"""flagstaff-report: compare runs. Reads run directories and sweep folders, groups the seeds of each
setting (its overrides minus ``seed``) and writes report.md, report.csv, report_runs.csv and
report.png next to them (system/report.py).

    flagstaff-report multirun/2026-12-06/10-00-00
    flagstaff-report outputs/a outputs/b --out cmp --format csv --metric loss

As a Hydra callback at the end of a sweep (conf/hydra/callbacks/report.yaml):

    flagstaff-train -m seed=0,1,2 client.lr=0.05,0.1 +hydra/callbacks=report
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

FORMATS = {"md": ("md",), "csv": ("csv",), "both": ("md", "csv")}


def _report(dirs: list[str], out: str | None, fmt: str, metric: str) -> int:
    """Write the report and print its table; one line and exit status 2 for input that gives
    none."""
    from flagstaff.system.report import ReportError, report

    try:
        rep = report(dirs, out=out, formats=FORMATS[fmt], metric=metric)
    except ReportError as err:
        print(f"flagstaff-report: error: {err}", file=sys.stderr)
        return 2
    for line in rep.skipped:
        print(f"flagstaff-report: {line}", file=sys.stderr)
    print(rep.markdown)
    print(f"wrote {', '.join(str(p) for p in rep.files)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="flagstaff-report",
        description="Compare Flagstaff runs: mean ± std over seeds per setting, as Markdown/CSV "
        "tables and curves.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or sweep folders")
    p.add_argument("--out", help="output folder (default: DIR, or the common parent of several)")
    p.add_argument("--format", choices=sorted(FORMATS), default="both", help="table files")
    p.add_argument("--metric", default="accuracy", help="metric for final/best and the curves")
    args = p.parse_args(argv)
    return _report(args.dirs, args.out, args.format, args.metric)


class ReportCallback(Callback):
    """Hydra callback: the report of a sweep, written into its folder when the sweep ends
    (Hydra 1.3 ``Callback.on_multirun_end``)."""

    def __init__(self, out: str | None = None, format: str = "both", metric: str = "accuracy"):
        if format not in FORMATS:
            raise ValueError(f"report callback: format={format!r}; use one of {sorted(FORMATS)}")
        self.out, self.format, self.metric = out, format, metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        _report([str(sweep)], self.out, self.format, self.metric)


if __name__ == "__main__":
    sys.exit(main())
