"""Every strategy end to end through the runner: local backend, resume with state, identities of the
server state against the hosts' per-client state, and a Ray run equal to the local one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from flagstaff.system.config import register
from flagstaff.system.runner import train

STRATEGIES = ["fedavg", "fedavgm", "fedprox", "scaffold", "feddyn", "fedsam", "fedspeed", "fedadam"]


def _cfg(*overrides: str):
    register()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        return compose("train", overrides=["experiment=smoke", *overrides])


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_runs_end_to_end(strategy: str, tmp_path: Path) -> None:
    res = train(_cfg(f"strategy={strategy}"), run_dir=str(tmp_path))
    assert res["accuracy"] > 0.3  # digits, 10 classes: well above chance after 3 rounds
    assert torch.isfinite(res["params"]).all()
    state = _ckpt(tmp_path)
    stateful = {"scaffold": "c_i", "feddyn": "grad_i", "fedspeed": "ghat_i"}
    if strategy in stateful:
        clients = state["clients"]
        assert clients[stateful[strategy]].shape == (10, res["params"].numel())
        assert clients["client_ids"].tolist() == list(range(10))
    else:
        assert state["clients"] == {}  # no per-client state allocated


@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=scaffold",),
        ("strategy=feddyn",),
        ("strategy=fedspeed", "strategy.average=sampled"),
        ("strategy=fedspeed", "sampling=bernoulli"),
        ("strategy=fedadam", "client=momentum"),
        ("strategy=fedavgm", "client.lr_decay=0.9"),
    ],
)
def test_resume_reproduces_uninterrupted_run(overrides: tuple[str, ...], tmp_path: Path) -> None:
    full = train(_cfg(*overrides, "rounds=4", "checkpoint_every=2"), run_dir=str(tmp_path / "a"))
    train(_cfg(*overrides, "rounds=2", "checkpoint_every=2"), run_dir=str(tmp_path / "b"))
    resumed = train(_cfg(*overrides, "rounds=4", "resume=true"), run_dir=str(tmp_path / "b"))
    assert resumed["resumed_from"] == 2
    assert torch.equal(full["params"], resumed["params"])
    a, b = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b")
    for k, v in a["clients"].items():
        assert torch.equal(v, b["clients"][k]), k


@pytest.mark.parametrize(
    ("strategy", "server_key", "client_key", "extra"),
    [
        ("scaffold", "c", "c_i", ()),
        ("feddyn", "h", "grad_i", ()),
        ("fedspeed", "ghat_mean", "ghat_i", ("strategy.average=all",)),
    ],
)
def test_server_state_is_mean_of_all_client_states(
    strategy: str, server_key: str, client_key: str, extra: tuple[str, ...], tmp_path: Path
) -> None:
    """With partial participation (5 of 10) the server vector equals the mean over all N clients."""
    train(_cfg(f"strategy={strategy}", "rounds=4", *extra), run_dir=str(tmp_path))
    state = _ckpt(tmp_path)
    per_client = state["clients"][client_key]
    torch.testing.assert_close(
        state["strategy"][strategy][server_key], per_client.mean(0), atol=1e-6, rtol=1e-5
    )


def test_fedprox_mu_zero_equals_fedavg_end_to_end(tmp_path: Path) -> None:
    a = train(_cfg("strategy=fedavg"), run_dir=str(tmp_path / "a"))
    b = train(_cfg("strategy=fedprox", "strategy.mu=0"), run_dir=str(tmp_path / "b"))
    assert torch.equal(a["params"], b["params"])


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def test_scaffold_on_ray_equals_local(ray_cluster, tmp_path: Path) -> None:
    """Stateful strategy on two Ray host actors == in-process: same params, same client state."""
    over = ("strategy=scaffold", "rounds=3", "cluster.hosts=2")
    local = train(_cfg(*over), run_dir=str(tmp_path / "local"))
    remote = train(_cfg(*over, "backend=ray"), run_dir=str(tmp_path / "ray"))
    torch.testing.assert_close(remote["params"], local["params"], atol=0, rtol=0)
    a, b = _ckpt(tmp_path / "local"), _ckpt(tmp_path / "ray")
    assert torch.equal(a["clients"]["c_i"], b["clients"]["c_i"])
    assert torch.equal(a["strategy"]["scaffold"]["c"], b["strategy"]["scaffold"]["c"])


@pytest.mark.parametrize("experiment", ["hetero_digits", "hetero_mnist1d"])
def test_hetero_experiments_compose_and_validate(experiment: str) -> None:
    from flagstaff.system.build import validate

    register()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "strategy=fedspeed"])
    c = validate(cfg)
    assert c["partition"]["kind"] == "dirichlet" and c["model"]["kind"] == "cnn"
    assert c["client"]["lr_decay"] == 0.998 and c["client"]["epochs"] == 5
    assert c["num_clients"] == 100 and c["clients_per_round"] == 10
