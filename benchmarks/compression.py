"""Compression benchmark (issue 9): all tables in one run.

Parts (each also runnable on its own):

``models``       accuracy against parameter budget for SVD, FWSVD, WeLore and CoSpaDi on a trained
                 digits MLP and on MiniLM with the offline review task (benchmarks/_compress_models.py)
``completion``   matrix completion error against iterations, and time, sketched vs exact
                 alternating minimization (benchmarks/_compress_completion.py)
``comm``         federated accuracy against bytes sent, compressed vs uncompressed updates
                 (benchmarks/_compress_comm.py)

Usage (from the repository root)::

    .venv/bin/python benchmarks/compression.py                 # every part
    .venv/bin/python benchmarks/compression.py --part comm     # one part
    .venv/bin/python benchmarks/compression.py --quick         # small sizes
    .venv/bin/python benchmarks/compression.py --out benchmarks/results/compression.md
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

PARTS = {
    "models": "_compress_models",
    "completion": "_compress_completion",
    "comm": "_compress_comm",
}


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; print (and optionally write) their markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", help=f"comma-separated subset of {list(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    parts = list(PARTS) if args.part == "all" else [p.strip() for p in args.part.split(",")]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        parser.error(f"unknown part(s) {bad}; choose from {list(PARTS)} or all")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    from _provenance import markdown, provenance

    sections = [
        f"# Compression benchmark\n\n{markdown(provenance())}\n\n{platform.platform()}, {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at start{' (quick)' if args.quick else ''}\n"
    ]
    for part in parts:
        t0 = time.perf_counter()
        text = importlib.import_module(PARTS[part]).main(quick=args.quick)
        sections.append(f"## {part} ({time.perf_counter() - t0:.0f} s)\n\n{text}\n")
        print(sections[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
