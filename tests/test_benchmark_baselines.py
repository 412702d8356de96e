"""Baselines of the simulation benchmark (benchmarks/simulation.py): plain loop and Flower.

The fast tests run the plain loop in-process on a tiny workload; the ``slow`` test (run with
``-m slow``) runs ``plain`` and ``flower`` in their own subprocesses, as the benchmark does.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
# opacus installs a top-level `benchmarks` package that shadows ours: import the benchmark
# modules by their file names from the benchmarks directory (as the script itself does).
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import simulation  # noqa: E402
from _workloads import TINY, W2, Workload, make_shards, sample_clients  # noqa: E402

CHANCE = 0.1  # ten digit classes


def _check_sane(result: simulation.Result, rounds: int) -> None:
    assert result.status == "ok", result.note
    assert len(result.round_times) == rounds
    assert all(t > 0 for t in result.round_times)
    assert result.median_round_s is not None and result.median_round_s > 0
    assert result.first_round_start_s is not None and result.first_round_start_s >= 0
    # effective start-up = end of round 1 - median round: in-process (t0 = the call) it can dip
    # below 0 when round 1 happens to be faster than the median on a loaded machine
    assert result.startup_s is not None and result.startup_s > -result.median_round_s
    assert result.accuracy is not None and CHANCE < result.accuracy <= 1.0


def test_plain_in_process_tiny() -> None:
    workload = dataclasses.replace(TINY, rounds=2)
    result = simulation.run_plain(workload)
    _check_sane(result, rounds=2)
    assert result.impl == "plain" and result.workload == "tiny"
    assert set(simulation.RUNNERS) == {
        "flower",
        "plain",
        "flagstaff-local",
        "flagstaff-ray-seq",
        "flagstaff-ray",
    }


def test_workload_definitions_are_deterministic() -> None:
    assert Workload.from_json(W2.to_json()) == W2
    labels = np.zeros(1437, dtype=np.int64)
    a, b = make_shards(W2, labels), make_shards(W2, labels)
    assert len(a) == W2.num_clients and all(len(s) == W2.samples_per_client for s in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    picked = sample_clients(W2, 3)
    assert len(set(picked.tolist())) == W2.clients_per_round
    assert np.array_equal(picked, sample_clients(W2, 3))
    assert not np.array_equal(picked, sample_clients(W2, 4))
    assert np.array_equal(sample_clients(TINY, 1), np.arange(TINY.num_clients))


def test_table_lists_failures_on_one_line() -> None:
    ok = simulation.Result("plain", "tiny", round_times=[0.2, 0.1, 0.1], first_round_start_s=1.0)
    ok.accuracy, ok.peak_rss_mb, ok.peak_pss_mb = 0.5, 100.0, 60.0
    missing = simulation.Result("flagstaff-ray", "tiny", "unavailable", "unavailable: a\nb | c")
    table = simulation.format_table([ok, missing])
    rows = table.splitlines()
    assert (
        len(rows) == 4 and "| plain | 100.0 | 1.1 | 1.0 | 0.5000 | 100 | 60 | - | 1.00x |" in rows
    )
    assert rows[3].startswith("| flagstaff-ray | unavailable: a b / c |")


@pytest.mark.slow
def test_plain_and_flower_isolated_tiny(tmp_path: Path) -> None:
    workload = dataclasses.replace(TINY, rounds=2)
    results = {
        impl: simulation.run_isolated(impl, workload, timeout=600, log_dir=tmp_path)
        for impl in ("plain", "flower")
    }
    for result in results.values():
        _check_sane(result, rounds=2)
        assert result.peak_rss_mb is not None and result.peak_rss_mb > 50
    # same data, shards, shuffling and initial model: the same global model up to float rounding
    assert abs(results["plain"].accuracy - results["flower"].accuracy) <= 0.02
    assert results["flower"].details["processes_seen"] > 1  # Ray processes were measured
