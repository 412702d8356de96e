"""Peer-to-peer is a run mode (issue 20 item 6): ``mode=p2p`` with its own settings group ``p2p``
(``p2p=monna | dsgd``), not a strategy that silently ignores ``aggregator``, ``client`` and
``clients_per_round``; the older spelling ``strategy=monna`` keeps working as documented."""

from __future__ import annotations

import logging

import pytest
import torch

from flagstaff.system.build import validate
from flagstaff.system.config import ConfigError
from flagstaff.system.runner import train
from tests.conftest import compose

NODES = (
    "backend=local",
    "num_clients=8",
    "clients_per_round=8",
    "partition=dirichlet",
    "partition.alpha=1.0",
    "cluster.hosts=2",
    "progress=false",
    "eval_every=2",
    "checkpoint_every=0",
    "rounds=3",
    "attack=alie",
    "attack.f=2",
)
SETTINGS = ("lr=0.5", "t_half=20", "lr_period=1", "momentum=0.5")


def test_mode_p2p_equals_the_older_spelling(tmp_path) -> None:
    new = ("mode=p2p", "p2p=monna", *(f"p2p.{s}" for s in SETTINGS))
    old = ("strategy=monna", *(f"strategy.{s}" for s in SETTINGS))
    a = train(compose(*NODES, *new), run_dir=str(tmp_path / "new"))
    b = train(compose(*NODES, *old), run_dir=str(tmp_path / "old"))
    assert a["mode"] == b["mode"] == "p2p" and a["rule"] == "nna"
    assert torch.equal(a["params"], b["params"])
    dsgd = compose(*NODES, "mode=p2p", "p2p=dsgd")
    assert validate(dsgd)["p2p"]["rule"] == "mean"


@pytest.mark.parametrize(
    "setting, named",
    [
        ("clients_per_round=4", "clients_per_round=4"),
        ("aggregator=median", "aggregator=median"),
        ("client.lr=0.1", "client="),
        ("strategy=scaffold", "strategy="),
    ],
)
def test_mode_p2p_refuses_what_it_does_not_use(setting: str, named: str, tmp_path) -> None:
    cfg = compose(*NODES, "mode=p2p", "p2p=monna", setting)
    with pytest.raises(ConfigError, match="peer-to-peer mode does not use") as err:
        train(cfg, run_dir=str(tmp_path / "run"))
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_mode_p2p_needs_its_settings_group() -> None:
    with pytest.raises(ConfigError, match="p2p=monna"):
        validate(compose(*NODES, "mode=p2p"))


def test_older_spelling_names_what_it_ignores(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="flagstaff"):
        validate(compose(*NODES, "strategy=monna", "clients_per_round=4"))
    assert any("ignores clients_per_round=4" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("spelling", [("mode=p2p", "p2p=monna"), ("strategy=monna",)])
@pytest.mark.parametrize("dp", ["client=dpsgd", "client=dpsgd_batched", "privacy.target_epsilon=3"])
def test_p2p_refuses_dp_it_would_ignore_in_both_spellings(spelling, dp: str) -> None:
    """The peer-to-peer mode has no DP: a DP client or a budget would train without DP."""
    with pytest.raises(ConfigError, match="no differential privacy") as err:
        validate(compose(*NODES, *spelling, dp))
    assert "\n" not in str(err.value)


def batchnorm_model(input_shape, num_classes, seed: int = 0) -> torch.nn.Module:
    """A model the trainers refuse (``Trainer.check_model``): BatchNorm."""
    torch.manual_seed(seed)
    d = int(torch.tensor(input_shape).prod())
    return torch.nn.Sequential(
        torch.nn.Linear(d, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, num_classes)
    )


def test_a_model_the_trainer_refuses_fails_before_any_work(tmp_path) -> None:
    cfg = compose("experiment=smoke", "~model", f"+model._target_={__name__}.batchnorm_model")
    with pytest.raises(ConfigError, match="model Sequential has BatchNorm layers") as err:
        train(cfg, run_dir=str(tmp_path / "run"))
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "metrics.jsonl").exists()
