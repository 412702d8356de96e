"""flagstaff-train as a user runs it: Hydra CLI, --cfg job, errors before work, sweeps."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flagstaff.launch.train", *args],
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


# -- issue 19 items 6-9 through the real entry point (launch.train.main, in this process) --------


@pytest.fixture
def cli(monkeypatch, capsys):
    """``flagstaff-train ARGS`` via launch.train.main in this process; returns (rc, out, err).
    Hydra reconfigures logging per call; the root logger is restored afterwards."""
    from flagstaff.launch.train import main

    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["flagstaff-train", *args])
        try:
            main()
            rc = 0
        except SystemExit as stop:
            rc = stop.code if isinstance(stop.code, int) else 1
        got = capsys.readouterr()
        return rc, got.out, got.err

    yield run
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def _files(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _bad_npz(tmp: Path, kind: str) -> Path:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 6)).astype(np.float32), np.arange(60) % 3
    split = dict(x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    path = tmp / f"{kind}.npz"
    if kind == "features":
        np.savez(path, **{**split, "x_test": x[40:, :4]})
    elif kind == "one_d":
        np.savez(path, x=x[:, 0], y=y)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zero_rows":
        np.savez(path, x=np.zeros((0, 6), np.float32), y=np.zeros(0, np.int64))
    elif kind == "unseen_labels":
        np.savez(path, **{**split, "y_train": y[:40] % 2, "y_test": np.full(20, 2)})
    return path


@pytest.mark.parametrize(
    "case, args, named",
    [
        ("features", (), "x_test has 4"),
        ("one_d", (), "reshape(-1, 1)"),
        ("empty", (), "empty file"),
        ("zero_rows", (), "0 rows"),
        ("unseen_labels", (), "test labels [2] never appear in training"),
        (None, ("seed=-5",), "seed=-5"),
        (None, ("seed=4294967296",), "seed=4294967296"),
        (None, ("strategy=ffa_lora", "model=lora_mlp"), "model.train=[B]"),
        (None, ("model=cnn",), "data.image=true"),
    ],
)
def test_cli_bad_input_gets_one_line_exit_2_and_writes_nothing(
    cli, tmp_path, case, args, named
) -> None:
    """Issue 19 item 9: one stderr line naming the input and the fix, rc 2, no run output (before:
    tracebacks, a crash after round 1, or rc 0 with accuracy 0)."""
    data = ()
    if case is not None:
        data = ("data=user", f"data.root={_bad_npz(tmp_path, case)}")
    run_dir = tmp_path / "run"
    rc, _, err = cli("experiment=smoke", *data, *args, f"hydra.run.dir={run_dir}")
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], err
    if case is not None:
        assert f"{case}.npz" in lines[0]  # names the file
    assert _files(run_dir) == {}


def test_cli_refused_resumes_leave_the_run_directory_as_it_was(cli, tmp_path) -> None:
    """Issue 19 items 7 and 9: a resume refused for a changed config, a checkpoint without
    fingerprint holding another parameter count, or non-finite parameters rewrites nothing, not
    even .hydra/config.yaml (which Hydra used to write before the run could check anything)."""
    import torch

    run_dir = tmp_path / "run"
    assert cli("experiment=smoke", f"hydra.run.dir={run_dir}")[0] == 0
    before = _files(run_dir)
    rc, _, err = cli("experiment=smoke", "resume=true", "num_clients=8", f"hydra.run.dir={run_dir}")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "num_clients" in err, err
    assert _files(run_dir) == before
    ckpt = run_dir / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["fingerprint"]
    torch.save(state, ckpt)
    before = _files(run_dir)
    rc, _, err = cli(
        "experiment=smoke", "resume=true", "model.hidden=[8]", f"hydra.run.dir={run_dir}"
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "parameters" in err, err
    assert _files(run_dir) == before
    state["params"][0] = float("inf")
    torch.save(state, ckpt)
    before = _files(run_dir)
    rc, _, err = cli("experiment=smoke", "resume=true", "rounds=4", f"hydra.run.dir={run_dir}")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "non-finite" in err, err
    assert _files(run_dir) == before


def test_cli_second_run_in_a_live_runs_directory_is_refused(cli, tmp_path) -> None:
    """Issue 19 item 6: a run holds its directory (flock); a second run gets one refusal line and
    rc 2 and writes nothing; the kernel frees the lock of a killed run, so a stale lock file does
    not block the next run."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = cli("experiment=smoke", f"hydra.run.dir={run_dir}")
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"{run_dir} is in use by another run (pid {holder.pid})" in err
        assert sorted(_files(run_dir)) == [".flagstaff.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rc, out, err = cli("experiment=smoke", f"hydra.run.dir={run_dir}")
    assert rc == 0 and "done:" in out, err


_HOLD = """
import sys, time
from flagstaff.system.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(300)
"""


def _two_rounds(run_dir: Path) -> None:
    """A finished 2-round smoke run (checkpoint at round 2), made in this process."""
    from flagstaff.system.runner import train
    from tests.conftest import compose

    train(compose("experiment=smoke", "rounds=2"), run_dir=str(run_dir))


def _resume_under(run_dir: Path, preexec=None) -> subprocess.CompletedProcess:
    """flagstaff-train resuming ``run_dir`` to round 4 in a subprocess (``preexec``: its limits)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "flagstaff.launch.train",
            "experiment=smoke",
            "rounds=4",
            "resume=true",
        ]
        + [f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,
    )


def _assert_checkpoint_intact(run_dir: Path, err: str) -> None:
    import torch

    assert "the previous checkpoint (round 2) is intact" in err, err
    assert "Traceback" not in err and "inline_container" not in err, err
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["round"] == 2
    assert not list(run_dir.glob(".checkpoint.*")), "a temp file was left behind"


def test_cli_file_size_limit_while_checkpointing_keeps_the_previous_checkpoint(tmp_path) -> None:
    """Issue 19 item 8, for real: RLIMIT_FSIZE below the checkpoint's size makes the round-4
    checkpoint write fail with EFBIG (SIGXFSZ ignored, as a shell's `ulimit -f` run sees it). One
    clear line says what is intact (before: RuntimeError: [enforce fail at inline_container.cc])."""
    import resource

    run_dir = tmp_path / "run"
    _two_rounds(run_dir)
    limit = (run_dir / "checkpoint.pt").stat().st_size // 2

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = _resume_under(run_dir, small_files)
    assert p.returncode == 1, p.stderr
    assert f"file size limit (ulimit -f) reached on {run_dir}" in p.stderr
    _assert_checkpoint_intact(run_dir, p.stderr)


def test_cli_no_space_left_while_checkpointing_keeps_the_previous_checkpoint(tmp_path) -> None:
    """Issue 19 item 8 with a real ENOSPC: the run directory on a 96 KiB tmpfs (in a private
    mount namespace, so no mount outlives the test) that holds the round-2 checkpoint but not a
    second copy of it. Needs unshare(1) and root or user namespaces; skipped otherwise."""
    import shutil

    src, mnt, out = tmp_path / "src", tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-Urm"]
    if (
        shutil.which("unshare") is None
        or subprocess.run(
            [*prefix, "mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
            capture_output=True,
        ).returncode
    ):
        pytest.skip("cannot mount a private tmpfs here (needs unshare and namespaces)")
    _two_rounds(src)
    (src / "curves.png").unlink()  # what the resumed run needs: checkpoint, metrics, partition
    (src / "summary.json").unlink()
    run_dir = mnt / "run"
    script = f"""
mount -t tmpfs -o size=96k tmpfs {mnt} || exit 90
cp -r {src} {run_dir} || exit 91
{sys.executable} -m launch.train experiment=smoke rounds=4 resume=true hydra.run.dir={run_dir}
rc=$?; cp -r {run_dir} {out}; exit $rc
"""
    p = subprocess.run(
        [*prefix, "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 1, p.stderr
    assert f"no space left on {run_dir}: the previous checkpoint (round 2) is intact" in p.stderr
    _assert_checkpoint_intact(out, p.stderr)
