"""flagstaff-report: real runs (backend=local) read back, grouped by setting, tabled and plotted."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, compose


def _panels(png: Path) -> dict:
    """What a curves figure shows, as system/report.py records it in the PNG's text chunk."""
    return json.loads(Image.open(png).text["flagstaff"])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real Hydra multirun: 2 seeds x 2 learning rates, with the report callback."""
    out = tmp_path_factory.mktemp("sweep") / "multirun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "flagstaff.launch.train", "-m", "experiment=smoke", "rounds=2"]
        + ["seed=0,1", "client.lr=0.05,0.1", "hydra/callbacks=report", f"hydra.sweep.dir={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Callback" not in p.stderr, p.stderr[-3000:]  # Hydra warns when a callback raises
    return out


def _by_lr(sweep: Path) -> dict[str, list[dict]]:
    """The runs' summary.json values, grouped by the learning rate in their overrides."""
    groups: dict[str, list[dict]] = {}
    for d in sorted(p for p in sweep.iterdir() if (p / "summary.json").exists()):
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        lr = next(o for o in overrides if o.startswith("client.lr="))
        groups.setdefault(lr, []).append(json.loads((d / "summary.json").read_text()))
    return groups


def test_groups_seeds_of_a_setting(sweep: Path) -> None:
    from flagstaff.system.report import find_runs, group_table, runs_frame

    runs, skipped = find_runs([sweep])
    assert len(runs) == 4 and skipped == []
    table = group_table(runs_frame(runs, "accuracy"))
    assert len(table) == 2
    expected = _by_lr(sweep)
    for _, row in table.iterrows():
        lr = next(o for o in row["setting"].split() if o.startswith("client.lr="))
        assert "seed" not in row["setting"] and "experiment=smoke" in row["setting"]
        vals = np.array([s["accuracy"] for s in expected[lr]])
        assert row["n"] == 2 and row["seeds"] == "0,1"
        assert row["accuracy_final_mean"] == pytest.approx(np.mean(vals), rel=1e-12)
        assert row["accuracy_final_std"] == pytest.approx(np.std(vals, ddof=1), rel=1e-12)
        bytes_up = np.array([s["bytes_up_total"] for s in expected[lr]])
        assert row["bytes_up_mean"] == pytest.approx(np.mean(bytes_up))
        assert row["rounds"] == "2"


def test_best_is_the_max_over_rounds(sweep: Path) -> None:
    from flagstaff.system.report import find_runs, runs_frame

    runs, _ = find_runs([sweep])
    frame = runs_frame(runs, "accuracy")
    for run, (_, row) in zip(runs, frame.iterrows(), strict=True):
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        assert row["accuracy_best"] == max(r["accuracy"] for r in rows)


def test_callback_writes_report_into_the_sweep(sweep: Path) -> None:
    md = (sweep / "report.md").read_text()
    assert md.count("| experiment=smoke") == 2
    assert {"report.csv", "report_runs.csv", "report.png"} <= {p.name for p in sweep.iterdir()}
    info = _panels(sweep / "report.png")
    assert info["x"] == "round" and info["panels"][0] == "test accuracy"


def test_cli_csv_out_and_skips_non_runs(sweep: Path, tmp_path: Path, capsys) -> None:
    from flagstaff.launch.report import main

    root = tmp_path / "runs"
    shutil.copytree(sweep, root / "sweep")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--format", "csv"]) == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and str(root / "notes") in skipped[0]
    assert not (out / "report.md").exists() and (out / "report.png").exists()
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = _by_lr(sweep)
    assert len(rows) == 2
    for row in rows:
        lr = next(o for o in row["setting"].split() if o.startswith("client.lr="))
        vals = [s["accuracy"] for s in expected[lr]]
        assert float(row["accuracy_final_mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
        assert float(row["accuracy_final_std"]) == pytest.approx(np.std(vals, ddof=1), rel=1e-12)


def test_torn_last_metrics_line_is_tolerated(sweep: Path, tmp_path: Path, caplog) -> None:
    from flagstaff.system.report import find_runs, runs_frame

    run = tmp_path / "run"
    shutil.copytree(sweep / "0", run)
    (run / "summary.json").unlink()  # a run killed mid-round: no summary, a torn last row
    intact = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(intact + '{"round": 3, "accuracy": 0.9')
    runs, skipped = find_runs([run])
    assert len(runs) == 1 and not skipped
    assert "metrics.jsonl:3" in caplog.text
    row = runs_frame(runs, "accuracy").iloc[0]
    last = json.loads(intact.splitlines()[-1])
    assert row["accuracy_final"] == last["accuracy"] and row["rounds"] == 2


def test_cli_refuses_a_missing_dir_and_no_runs(tmp_path: Path, capsys) -> None:
    from flagstaff.launch.report import main

    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nope") in err[0]
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no Flagstaff run" in capsys.readouterr().err


def _train(tmp_path: Path, name: str, *overrides: str) -> Path:
    from flagstaff.system.runner import train

    run_dir = tmp_path / name
    train(compose("experiment=smoke", "rounds=2", *overrides), run_dir=str(run_dir))
    return run_dir


def test_dp_run_plots_and_tables_epsilon(tmp_path: Path) -> None:
    from flagstaff.system.report import find_runs, group_table, markdown_table, runs_frame

    run_dir = _train(tmp_path, "dp", "client=dpsgd")
    info = _panels(run_dir / "curves.png")  # written by the run itself (RunDir.plot_curves)
    assert info["x"] == "round" and "epsilon" in info["panels"]
    runs, _ = find_runs([run_dir])
    table = group_table(runs_frame(runs, "accuracy"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert table.iloc[0]["epsilon_mean"] == summary["privacy"]["epsilon"]
    assert table.iloc[0]["epsilon_kind"] == "sample-level"
    assert "epsilon" in markdown_table(table)


def test_p2p_run_axis_says_step(tmp_path: Path) -> None:
    from flagstaff.system.report import find_runs, group_table, markdown_table, runs_frame

    run_dir = _train(tmp_path, "p2p", "strategy=monna")
    info = _panels(run_dir / "curves.png")
    assert info["x"] == "step"
    assert {"worst-node accuracy", "consensus distance"} <= set(info["panels"])
    runs, _ = find_runs([run_dir])
    table = group_table(runs_frame(runs, "accuracy"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert table.iloc[0]["accuracy_worst_mean"] == summary["accuracy_worst"]
    assert table.iloc[0]["consensus_distance_mean"] == summary["consensus_distance"]
    header = [c.strip() for c in markdown_table(table).splitlines()[0].strip("|").split("|")]
    assert {"steps", "worst-node accuracy", "consensus distance"} <= set(header)
    assert "rounds" not in header


def test_compressed_run_plots_bytes(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from flagstaff.system.rundir import RunDir

    cfg = compose("experiment=smoke", "rounds=2", "comm=powersgd")
    from flagstaff.system.runner import train

    run_dir = tmp_path / "comp"
    train(cfg, run_dir=str(run_dir))
    # the composed config where flagstaff-train records it (a programmatic run has no .hydra/)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    RunDir(run_dir).plot_curves()
    assert "MB sent" in _panels(run_dir / "curves.png")["panels"]


def test_natural_partition_run_tables_the_client_accuracy_distribution(tmp_path: Path) -> None:
    """A run on a natural partition logs the per-client accuracy distribution (system/eval.py);
    the report tables its last values (mean, 10th percentile, worst client) next to the metric."""
    from flagstaff.system.report import find_runs, group_table, markdown_table, runs_frame

    run_dir = _train(
        tmp_path, "natural", "partition=natural", "partition.key=label", "num_clients=10"
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "accuracy_client_mean" in r][-1]
    runs, _ = find_runs([run_dir])
    table = group_table(runs_frame(runs, "accuracy"))
    for key in ("accuracy_client_mean", "accuracy_client_p10", "accuracy_client_worst"):
        assert table.iloc[0][f"{key}_mean"] == last[key]
    header = [c.strip() for c in markdown_table(table).splitlines()[0].strip("|").split("|")]
    assert {"client accuracy mean", "client accuracy p10", "worst-client accuracy"} <= set(header)
