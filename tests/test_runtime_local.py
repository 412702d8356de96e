"""The round loop on the in-process backend: run directory, resume, bad input."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from flagstaff.system.config import ConfigError
from flagstaff.system.rundir import CheckpointError, RunDir, RunDirBusy
from flagstaff.system.runner import train
from flagstaff.system.server import sample_clients
from tests.conftest import compose


def test_smoke_run_writes_a_self_describing_directory(tmp_path) -> None:
    res = train(compose("experiment=smoke"), run_dir=str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"round", "accuracy", "loss", "round_time_s"} <= set(r)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accuracy"] == rows[-1]["accuracy"] and summary["seed"] == 0
    assert "torch" in summary["versions"]
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "curves.png").exists()
    part = json.loads((tmp_path / "partition.json").read_text())
    assert part["num_clients"] == 10 and len(part["clients"][0]["labels"]) == 10
    assert res["accuracy"] > 0.3  # 3 short rounds: well above chance (0.1)


def test_same_seed_same_result_and_seed_matters(tmp_path) -> None:
    a = train(compose("experiment=smoke"), run_dir=str(tmp_path / "a"))
    b = train(compose("experiment=smoke"), run_dir=str(tmp_path / "b"))
    c = train(compose("experiment=smoke", "seed=1"), run_dir=str(tmp_path / "c"))
    assert torch.equal(a["params"], b["params"])
    assert not torch.equal(a["params"], c["params"])


def test_host_count_does_not_change_the_result(tmp_path) -> None:
    one = train(compose("experiment=smoke"), run_dir=str(tmp_path / "1"))
    three = train(compose("experiment=smoke", "cluster.hosts=3"), run_dir=str(tmp_path / "3"))
    assert torch.equal(one["params"], three["params"])


def test_resume_reaches_the_uninterrupted_result(tmp_path) -> None:
    over = (
        "experiment=smoke",
        "rounds=5",
        "checkpoint_every=1",
        "strategy=fedavgm",
        "client=momentum",
    )
    full = train(compose(*over), run_dir=str(tmp_path / "full"))
    part_dir = tmp_path / "part"
    train(compose(*over[:1], "rounds=2", *over[2:]), run_dir=str(part_dir))
    resumed = train(compose(*over, "resume=true"), run_dir=str(part_dir))
    assert resumed["resumed_from"] == 2
    assert torch.equal(full["params"], resumed["params"])
    rounds = [r["round"] for r in RunDir(part_dir).read_metrics()]
    assert rounds == [1, 2, 3, 4, 5]


def test_resume_refuses_a_different_config_or_corrupt_checkpoint(tmp_path) -> None:
    train(compose("experiment=smoke"), run_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="different config"):
        train(compose("experiment=smoke", "resume=true", "client.lr=0.3"), run_dir=str(tmp_path))
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        train(compose("experiment=smoke", "resume=true"), run_dir=str(tmp_path))
    assert (tmp_path / "metrics.jsonl").exists()  # nothing lost


def test_nonfinite_updates_are_dropped_and_counted(tmp_path) -> None:
    res = train(
        compose("experiment=smoke", "clients_per_round=10", "attack=nan_vector", "attack.f=2"),
        run_dir=str(tmp_path),
    )
    assert all(r["dropped_nonfinite"] == 2 for r in res["metrics"])
    assert np.isfinite(res["params"].numpy()).all() and res["accuracy"] > 0.3


def test_bad_config_values_fail_before_work(tmp_path) -> None:
    with pytest.raises(ConfigError, match="clients_per_round"):
        train(compose("experiment=smoke", "clients_per_round=50"), run_dir=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="client"):
        train(compose("experiment=smoke", "client.lr=-1"), run_dir=str(tmp_path / "y"))
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_wrong_length_updates_are_refused(tmp_path) -> None:
    """A host running a different model sends updates of the wrong length: a clear error."""
    from flagstaff.clients.data import load_digits
    from flagstaff.system.build import client_host, parameter_server
    from flagstaff.system.config import to_plain
    from flagstaff.system.host import HostShard
    from flagstaff.system.pool import LocalPool

    cfg = to_plain(compose("experiment=smoke", "num_clients=2", "clients_per_round=2"))
    ds = load_digits()
    shard = HostShard(
        np.array([0, 1]), np.array([0, 20]), np.array([20, 20]), ds.x_train[:40], ds.y_train[:40]
    )
    other = {**cfg["model"], "hidden": [8]}
    host = client_host(0, shard, other, cfg["client"], ds.input_shape, 10, 0)
    server = parameter_server(
        cfg, LocalPool([host]), np.zeros(2, dtype=int), ds.x_test, ds.y_test, ds.input_shape, 10
    )
    with pytest.raises(ValueError, match="same model config"):
        server.round(0)


def test_sampling_is_seeded_and_bounded() -> None:
    a = sample_clients(100, 10, seed=0, round_idx=3)
    assert len(a) == 10 and len(set(a.tolist())) == 10
    assert np.array_equal(a, sample_clients(100, 10, 0, 3))
    assert not np.array_equal(a, sample_clients(100, 10, 0, 4))
    assert np.array_equal(sample_clients(5, 5, 0, 0), np.arange(5))


def test_host_reduction_equals_per_client_aggregation(tmp_path) -> None:
    """With a weighted mean, hosts send sum_i w_i u_i (float64) instead of every update."""
    from flagstaff.strategies.attacks import Adversary
    from flagstaff.system.build import build_from
    from flagstaff.system.config import to_plain
    from flagstaff.system.server import can_reduce_on_hosts

    reduced = train(compose("experiment=smoke", "cluster.hosts=2"), run_dir=str(tmp_path / "a"))
    full = train(
        compose("experiment=smoke", "cluster.hosts=2", "cluster.host_reduce=false"),
        run_dir=str(tmp_path / "b"),
    )
    assert torch.allclose(reduced["params"], full["params"], atol=1e-6)
    assert [r["dropped_nonfinite"] for r in reduced["metrics"]] == [0, 0, 0]
    c = to_plain(compose("experiment=smoke"))
    mean, median = (build_from(c["aggregator"] | {"rule": r}) for r in ("mean", "median"))
    fedavg, scaffold = (
        build_from(c["strategy"]),
        build_from(to_plain(compose("experiment=smoke", "strategy=scaffold"))["strategy"]),
    )
    honest = Adversary(build_from(c["attack"]), 10)
    alie = Adversary(build_from(to_plain(compose("attack=alie", "attack.f=2"))["attack"]), 10)
    assert can_reduce_on_hosts(mean, fedavg, honest)
    assert not can_reduce_on_hosts(median, fedavg, honest)  # robust rules need every update
    assert not can_reduce_on_hosts(mean, scaffold, honest)  # per-client control variates
    assert not can_reduce_on_hosts(mean, fedavg, alie)  # the adversary needs the honest updates


# -- issue 19 items 6-9: the run directory survives resumes, torn rows, two runs and bad files --


def _rounds(path) -> list[int]:
    return [json.loads(line)["round"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def _snapshot(path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_resume_before_the_first_checkpoint_starts_a_fresh_log(tmp_path) -> None:
    """Killed before its first checkpoint (rows 1..3, no checkpoint.pt), the resumed run logs
    rounds 1..5 once (before: 1, 2, 3, 1, 2, 3, 4, 5)."""
    train(compose("experiment=smoke", "checkpoint_every=0"), run_dir=str(tmp_path))
    (tmp_path / "checkpoint.pt").unlink()
    res = train(compose("experiment=smoke", "rounds=5", "resume=true"), run_dir=str(tmp_path))
    assert res["resumed_from"] == 0 and _rounds(tmp_path) == [1, 2, 3, 4, 5]


def test_resume_drops_a_torn_metrics_row_with_a_warning(tmp_path, caplog) -> None:
    """A row torn by a kill or a full disk is dropped with a warning naming the file and line
    (before: JSONDecodeError naming no file), and rows past the checkpoint are cut."""
    train(compose("experiment=smoke", "checkpoint_every=2", "rounds=2"), run_dir=str(tmp_path))
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "accuracy": 0.5}\n{"round": 4, "accu')  # past the checkpoint; torn
    with caplog.at_level("WARNING", logger="flagstaff"):
        train(compose("experiment=smoke", "rounds=4", "resume=true"), run_dir=str(tmp_path))
    assert _rounds(tmp_path) == [1, 2, 3, 4]
    assert f"{tmp_path / 'metrics.jsonl'}:4" in caplog.text and "torn" in caplog.text


def test_a_run_directory_is_locked_by_its_run_and_released_after_an_error(tmp_path) -> None:
    """A second run in a directory that a live run holds is refused before it writes anything;
    the lock goes with the run, even when the run fails."""
    train(compose("experiment=smoke"), run_dir=str(tmp_path))
    before = _snapshot(tmp_path)
    with RunDir(tmp_path).lock():
        busy = rf"{re.escape(str(tmp_path))} is in use by another run \(pid {os.getpid()}\)"
        with pytest.raises(RunDirBusy, match=busy):
            train(compose("experiment=smoke", "resume=true", "rounds=4"), run_dir=str(tmp_path))
    assert _snapshot(tmp_path) == before
    with pytest.raises(CheckpointError):  # fails while holding the lock ...
        train(compose("experiment=smoke", "resume=true", "seed=3"), run_dir=str(tmp_path))
    # ... and freed by the error
    train(compose("experiment=smoke", "resume=true", "rounds=4"), run_dir=str(tmp_path))
    assert _rounds(tmp_path) == [1, 2, 3, 4]


def test_a_refused_resume_writes_nothing(tmp_path) -> None:
    """Issue 19 item 7: every check (fingerprint, readability, parameter count, finiteness) runs
    before anything is written into the run directory (before: partition.json was rewritten)."""
    train(compose("experiment=smoke"), run_dir=str(tmp_path))
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="different config"):
        train(compose("experiment=smoke", "resume=true", "num_clients=8"), run_dir=str(tmp_path))
    assert _snapshot(tmp_path) == before


def test_checkpoints_without_fingerprint_or_with_nonfinite_params_are_refused(tmp_path) -> None:
    train(compose("experiment=smoke"), run_dir=str(tmp_path))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["fingerprint"]  # an older checkpoint: only the parameter count can be checked
    torch.save(state, tmp_path / "checkpoint.pt")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds 8970 parameters.*configured model has 1210"):
        train(
            compose("experiment=smoke", "resume=true", "model.hidden=[16]"), run_dir=str(tmp_path)
        )
    state["params"][3] = float("nan")
    torch.save(state, tmp_path / "checkpoint.pt")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="1 non-finite"):
        train(compose("experiment=smoke", "resume=true", "rounds=5"), run_dir=str(tmp_path))
    assert _snapshot(tmp_path) == before


def test_metrics_and_summary_are_valid_json_with_nonfinite_numbers(tmp_path) -> None:
    """NaN and infinity are written as null and listed under "nonfinite" (before: bare NaN,
    which is not JSON)."""
    out = RunDir(tmp_path)
    out.append_metrics(
        {"round": 1, "loss": float("nan"), "accuracy": 0.5, "eps": np.float32("inf")}
    )
    out.write_json("summary.json", {"loss": float("-inf"), "ok": 1.0, "per": [1.0, float("nan")]})
    out.sync()

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    row = strict((tmp_path / "metrics.jsonl").read_text())
    assert row == {
        "round": 1,
        "loss": None,
        "accuracy": 0.5,
        "eps": None,
        "nonfinite": ["eps", "loss"],
    }
    summary = strict((tmp_path / "summary.json").read_text())
    assert summary["loss"] is None and summary["nonfinite"] == ["loss", "per"]


def test_checkpoints_and_metrics_are_fsynced_in_the_right_order(tmp_path, monkeypatch) -> None:
    """Issue 19 item 8: the temp checkpoint is fsynced before its rename, the directory after it,
    and every metric row is on disk before the checkpoint that covers it (the real syscalls run;
    they are only recorded)."""
    events: list[tuple[str, str]] = []

    def path_of(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    real_fsync, real_write, real_replace = os.fsync, os.write, os.replace

    def fsync(fd):
        events.append(("fsync", path_of(fd)))
        return real_fsync(fd)

    def write(fd, data):
        events.append(("write", path_of(fd)))
        return real_write(fd, data)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "replace", replace)
    train(compose("experiment=smoke", "checkpoint_every=1"), run_dir=str(tmp_path))
    metrics, ckpt = str(tmp_path / "metrics.jsonl"), str(tmp_path / "checkpoint.pt")
    renames = [i for i, e in enumerate(events) if e == ("replace", ckpt)]
    assert len(renames) == 3  # rounds 1, 2, 3
    for i in renames:
        before = [p for kind, p in events[:i] if kind == "fsync"]
        assert ".checkpoint." in before[-1]  # the temp file, just before the rename
        assert events[i + 1] == ("fsync", str(tmp_path))  # then the directory
        last_row = max(j for j, e in enumerate(events[:i]) if e == ("write", metrics))
        assert ("fsync", metrics) in events[last_row:i]  # the rows it covers are on disk


# --- REV19b review: what the issue 19 fixes still lost -----------------------------------------


def test_console_and_logging_switches_do_not_block_a_resume() -> None:
    """Keys that only change what the console shows (``verbose``, like ``progress``) stay out of
    the resume fingerprint: a run resumed with ``verbose`` toggled, or from a checkpoint written
    before the key existed, is not refused as "a different config"."""
    from flagstaff.system.loop import fingerprint

    cfg = {"seed": 0, "client": {"lr": 0.1}, "progress": True}
    assert fingerprint({**cfg, "verbose": True}) == fingerprint(cfg)
    assert fingerprint({**cfg, "verbose": False}) == fingerprint(cfg)


def test_a_full_disk_while_drawing_the_curves_is_one_clear_error(tmp_path) -> None:
    """curves.png cut short by a full disk (here RLIMIT_FSIZE, in a subprocess) is a NoSpaceError
    saying what is intact, and the torn image is removed (before: a matplotlib traceback and a
    truncated curves.png)."""
    import subprocess
    import sys

    rows = [{"round": r, "accuracy": 0.1 * r, "loss": 1.0 / r, "round_time_s": 0.1} for r in (1, 2)]
    script = (
        "import json, resource, sys\n"
        "from system.rundir import NoSpaceError, RunDir\n"
        "out = RunDir(sys.argv[1])\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    out.plot_curves(json.loads(sys.argv[2]))\n"
        "except NoSpaceError as err:\n"
        "    print('NoSpaceError:', err)\n"
    )
    from tests.conftest import ROOT

    p = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps(rows)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.stdout.startswith("NoSpaceError: file size limit"), p.stdout + p.stderr[-2000:]
    assert "curves.png could not be written" in p.stdout
    assert not (tmp_path / "curves.png").exists()


def test_a_run_killed_mid_write_leaves_no_temp_files_after_its_resume(tmp_path) -> None:
    """A driver killed while it wrote a checkpoint (or any atomic file) leaves a
    ``.checkpoint.*.tmp`` as large as the model; the resumed run removes such leftovers of this
    directory's writers (before: they stayed, and piled up on a disk that may be full)."""
    train(compose("experiment=smoke", "rounds=1"), run_dir=str(tmp_path))
    stale = [tmp_path / ".checkpoint.x1.tmp", tmp_path / ".summary.json.x2.tmp"]
    stale.append(tmp_path / ".hydra" / ".config.yaml.x3.tmp")
    (tmp_path / ".hydra").mkdir(exist_ok=True)
    for f in stale:
        f.write_bytes(b"\0" * 1000)
    keep = tmp_path / ".user-notes.tmp"  # not a name this directory's writers use
    keep.write_text("mine")
    train(compose("experiment=smoke", "rounds=2", "resume=true"), run_dir=str(tmp_path))
    assert not [f for f in stale if f.exists()] and keep.exists()
    assert _rounds(tmp_path) == [1, 2]


def test_sparse_label_ids_are_refused_before_any_work(tmp_path) -> None:
    """A user's labels that are ids, not 0..K-1 (here 0, 1e6, 2e6), would give the model two
    million outputs (a 1 GB model and rounds of minutes: the run hung); refused in one line that
    names the data and the fix, before the run directory exists."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120) * 1_000_000
    np.savez(tmp_path / "ids.npz", x=rng.normal(size=(120, 4)).astype(np.float32), y=y)
    cfg = compose(
        "data=user", f"data.root={tmp_path / 'ids.npz'}", "num_clients=4", "clients_per_round=2"
    )
    with pytest.raises(ConfigError, match=r"^data: .*3 distinct labels.*2000000.*0\.\.2"):
        train(cfg, run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_run_files_get_the_mode_of_the_umask_like_metrics(tmp_path) -> None:
    """summary.json, partition.json, checkpoint.pt and .hydra/ files are written through temp
    files; they get 0666 minus the umask, as metrics.jsonl does (before: mkstemp's 0600, and
    metrics.jsonl turned 0600 after a resume)."""
    old = os.umask(0o027)
    try:
        train(compose("experiment=smoke", "rounds=1"), run_dir=str(tmp_path))
        train(compose("experiment=smoke", "rounds=2", "resume=true"), run_dir=str(tmp_path))
    finally:
        os.umask(old)
    names = ("summary.json", "partition.json", "checkpoint.pt", "metrics.jsonl")
    modes = {n: oct((tmp_path / n).stat().st_mode & 0o777) for n in names}
    assert set(modes.values()) == {oct(0o640)}, modes


def test_a_corrupt_checkpoint_is_refused_in_a_short_line_without_torchs_advice(tmp_path) -> None:
    """Random bytes in checkpoint.pt: one short line naming the file and what to do (before: 830
    characters of torch's text, advising to load it again with weights_only=False, which runs
    any code a foreign file holds, and to file a PyTorch issue)."""
    rdir = RunDir(tmp_path)
    rdir.checkpoint_path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(CheckpointError) as err:
        rdir.load_checkpoint()
    msg = str(err.value)
    assert msg.startswith(f"{rdir.checkpoint_path} is not a readable Flagstaff checkpoint"), msg
    short = len(msg.replace(str(rdir.checkpoint_path), "")) < 250
    assert "weights_only" not in msg and "file an issue" not in msg and short, msg
    # a foreign file whose pickle calls a function: refused, named, and no advice to allow it
    torch.save({"round": 1, "params": _CallsOsSystem()}, rdir.checkpoint_path)
    with pytest.raises(CheckpointError, match="GLOBAL posix.system") as err:
        rdir.load_checkpoint()
    msg = str(err.value)
    assert "weights_only" not in msg and len(msg.replace(str(tmp_path), "")) < 250, msg


class _CallsOsSystem:
    """Pickles as a call of os.system (never loaded: torch.load(weights_only=True) refuses it)."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_resume_with_fewer_rounds_than_the_checkpoint_is_refused(tmp_path) -> None:
    """rounds=1 with a checkpoint of round 2: one line before anything is written (before: it
    ran no round, rewrote summary.json with rounds 1 and rounds_completed 2, and printed
    'rounds=2/1')."""
    train(compose("experiment=smoke", "rounds=2"), run_dir=str(tmp_path))
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds round 2 but rounds=1; .*rounds=2 or more"):
        train(compose("experiment=smoke", "resume=true", "rounds=1"), run_dir=str(tmp_path))
    assert _snapshot(tmp_path) == before


def test_a_fresh_run_over_a_previous_run_says_what_it_replaces(tmp_path, caplog) -> None:
    """The same command again without resume=true starts over and replaces the previous run's
    checkpoint and metrics (benchmarks rely on it); it says so, naming resume=true (before:
    silently)."""
    train(compose("experiment=smoke", "rounds=1"), run_dir=str(tmp_path))
    with caplog.at_level("WARNING", logger="flagstaff"):
        train(compose("experiment=smoke", "rounds=1"), run_dir=str(tmp_path))
    assert f"{tmp_path} holds a previous run's checkpoint.pt" in caplog.text
    assert "resume=true" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="flagstaff"):  # continuing it: no such warning
        train(compose("experiment=smoke", "rounds=2", "resume=true"), run_dir=str(tmp_path))
    assert "previous run" not in caplog.text
