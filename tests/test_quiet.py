"""Quiet by default (issue 23 item 4): a run prints its progress bar and its final line; log lines
and library warnings go to the run directory's train.log unless verbose=true."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT

# tqdm's bar as system/loop.py draws it: "rounds:  33%|███▎      | 1/3 [00:09<00:18, ...]"
BAR = re.compile(r"^rounds: +\d+%\|.*\| \d+/\d+ \[[^\]]*\]\s*$")
# sample-level DP with a large noise: Opacus warns at every accountant query ("Optimal order is
# the largest alpha"); those warnings used to break up the bar on stderr
NOISY = ["experiment=smoke", "backend=local", "progress=true", "client=dpsgd"]
NOISY += ["client.noise_multiplier=50"]


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_default_run_prints_only_the_bar_and_the_final_line(tmp_path) -> None:
    p = _train(*NOISY, f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"done: accuracy=\S+ rounds=3/3 run_dir={tmp_path}", lines[0]
    )
    pieces = [s for s in re.split(r"[\r\n]", p.stderr) if s.strip()]
    assert pieces and all(BAR.match(s) for s in pieces), [s for s in pieces if not BAR.match(s)]
    assert "Optimal order is the largest alpha" in (tmp_path / "train.log").read_text()


def test_verbose_puts_warnings_on_the_console_too(tmp_path) -> None:
    p = _train(*NOISY, "progress=false", "verbose=true", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    assert "Optimal order is the largest alpha" in p.stdout + p.stderr
    assert "Optimal order is the largest alpha" in (tmp_path / "train.log").read_text()
