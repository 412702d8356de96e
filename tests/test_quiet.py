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
        [sys.executable, "-m", "flagstaff.launch.train", *args],
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


def test_flower_logs_leave_the_console_of_a_quiet_run() -> None:
    """backend=flower: Flower's own console handler (every round's INFO records, ~60 lines for two
    rounds, and run_simulation's deprecation notice) is removed in the driver, so the records reach
    train.log through the root logger only; in a worker they are dropped (Ray would forward them).
    verbose=true keeps Flower's handler."""
    import logging

    from flagstaff.system.flower_backend import _DEPRECATION, quiet_flower

    flwr_log = logging.getLogger("flwr")
    saved = (list(flwr_log.handlers), list(flwr_log.filters), flwr_log.propagate)

    def console(lg: logging.Logger) -> list[logging.Handler]:
        return [
            h
            for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]

    try:
        if not console(flwr_log):  # an earlier backend=flower run in this process removed it
            from flwr.common.logger import console_handler

            flwr_log.addHandler(console_handler)
        assert console(flwr_log)
        quiet_flower(verbose=True)
        assert console(flwr_log)  # verbose: unchanged (only the deprecation notice is dropped)
        record = logging.LogRecord("flwr", logging.WARNING, "", 0, f"The {_DEPRECATION}", (), None)
        assert not flwr_log.filter(record)
        quiet_flower(verbose=False)
        assert not console(flwr_log) and flwr_log.propagate
        quiet_flower(verbose=False, worker=True)
        assert not flwr_log.propagate and flwr_log.handlers  # a NullHandler: no lastResort print
    finally:
        flwr_log.handlers[:], flwr_log.filters[:] = saved[0], saved[1]
        flwr_log.propagate = saved[2]


def test_default_ray_run_prints_only_the_bar_and_the_final_line(tmp_path) -> None:
    """backend=ray: the driver's Ray prints nothing of its own either (its core worker used to log
    "Actor ... has constructor arguments in the object store and max_restarts > 0" for every host:
    the hosts now fetch their shards by a reference they get inside a plain argument)."""
    p = _train("experiment=smoke", "backend=ray", "progress=true", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"done: accuracy=\S+ rounds=3/3 run_dir={tmp_path}", lines[0]
    )
    pieces = [s for s in re.split(r"[\r\n]", p.stderr) if s.strip()]
    assert pieces and all(BAR.match(s) for s in pieces), [s for s in pieces if not BAR.match(s)]
