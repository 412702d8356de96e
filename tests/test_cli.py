"""flagstaff-train as a user runs it: Hydra CLI, --cfg job, errors before work, sweeps."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_smoke_run_and_run_dir(tmp_path) -> None:
    out = tmp_path / "run"
    p = _run("experiment=smoke", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr
    assert "done: accuracy=" in p.stdout and str(out) in p.stdout
    for name in (
        "metrics.jsonl",
        "summary.json",
        "checkpoint.pt",
        "curves.png",
        "partition.json",
        ".hydra/config.yaml",
    ):
        assert (out / name).exists(), name
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["round"] == 3


def test_cli_prints_config() -> None:
    p = _run("--cfg", "job", "rounds=7", "strategy=fedavgm")
    assert p.returncode == 0, p.stderr
    assert "rounds: 7" in p.stdout and "server_momentum: 0.9" in p.stdout


def test_cli_unknown_key_and_bad_values_fail_before_work(tmp_path) -> None:
    p = _run("experiment=smoke", "model.depth=3", f"hydra.run.dir={tmp_path / 'a'}")
    assert p.returncode != 0 and "depth" in p.stderr
    p = _run("experiment=smoke", "backend=gpu", f"hydra.run.dir={tmp_path / 'b'}")
    assert p.returncode != 0 and "local" in p.stderr and "ray" in p.stderr
    p = _run("experiment=smoke", "model=transformer9", f"hydra.run.dir={tmp_path / 'c'}")
    assert p.returncode != 0 and "mlp" in p.stderr  # lists the available options
    p = _run("experiment=smoke", "clients_per_round=99", f"hydra.run.dir={tmp_path / 'd'}")
    assert p.returncode == 2 and "clients_per_round" in p.stderr
    assert not (tmp_path / "d" / "metrics.jsonl").exists()


def test_cli_multirun_sweep(tmp_path) -> None:
    p = _run("-m", "experiment=smoke", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2
    seeds = {json.loads(s.read_text())["seed"] for s in summaries}
    assert seeds == {0, 1}


def test_cli_ray_backend_starts_ray_alongside_imports(tmp_path) -> None:
    """backend=ray through the CLI: Ray starts while torch imports (launch.train.run), the run
    uses the configured hosts, and a config error found after Ray started still exits cleanly."""
    out = tmp_path / "ray"
    p = _run("experiment=smoke", "backend=ray", "cluster.hosts=2", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["hosts"] == 2
    assert summary["startup_s"] > 0 and summary["accuracy"] is not None
    bad = _run("experiment=smoke", "backend=ray", "client.lr=-1", f"hydra.run.dir={tmp_path / 'b'}")
    assert bad.returncode == 2 and "client.lr" in bad.stderr


def test_cli_final_line_counts_the_rounds_run_after_a_budget_stop(tmp_path) -> None:
    """After a privacy-budget stop the final line says how many rounds ran, not the configured
    number (issue 18 item 7)."""
    p = _run(
        "experiment=privacy_dp_fedavg_digits",
        "backend=local",
        "progress=false",
        "num_clients=20",
        "clients_per_round=10",
        "client.batch_size=32",
        "rounds=10",
        "privacy.target_epsilon=5",
        f"hydra.run.dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    ran = summary["rounds_completed"]
    assert summary["stopped"] == "privacy budget" and 1 <= ran < 10
    assert f"rounds={ran}/10 stopped='privacy budget'" in p.stdout
