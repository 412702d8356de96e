"""logger=tensorboard and logger=mlflow write the round metrics where their tools read them."""

from __future__ import annotations

import sys

import pytest

from flagstaff.system.runner import train
from tests.conftest import compose


def test_tensorboard_logger(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(compose("experiment=smoke", "logger=tensorboard"), run_dir=str(tmp_path))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("accuracy")]
    assert steps == [1, 2, 3]


def test_mlflow_logger(tmp_path) -> None:
    import mlflow

    train(compose("experiment=smoke", "logger=mlflow"), run_dir=str(tmp_path))
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flagstaff")
    run = client.search_runs([exp.experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert run.data.params["client.lr"] == "0.05"


def test_loggers_are_imported_only_when_chosen(tmp_path) -> None:
    for mod in [m for m in sys.modules if m.startswith(("mlflow", "torch.utils.tensorboard"))]:
        sys.modules.pop(mod)
    train(compose("experiment=smoke"), run_dir=str(tmp_path))
    assert "mlflow" not in sys.modules and "torch.utils.tensorboard" not in sys.modules


def test_unknown_logger_fails(tmp_path) -> None:
    from flagstaff.system.config import ConfigError

    with pytest.raises(ConfigError, match="tensorboard"):
        train(compose("experiment=smoke", "logger.kind=wandb"), run_dir=str(tmp_path))
