"""What a run checks before it starts work or writes into its run directory (issue 19 items 7, 9).

``load_inputs`` reads the data and splits it over the clients; ``check_model`` builds the model as
the server will and binds the strategy to it (FFA-LoRA needs ``model.train=[B]``, a CNN needs image
data); ``check_resume`` reads the checkpoint (readable, same config, finite) and compares its size
with the configured model. Each failure is a ``ConfigError`` or ``CheckpointError`` whose one-line
message names the input and the fix; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from clients.data import Dataset
from clients.trainer import ParamSpec
from system.config import ConfigError
from system.host import build_from
from system.rundir import CheckpointError, RunDir

__all__ = ["load_inputs", "check_model", "check_resume"]

log = logging.getLogger("flagstaff")

# what a loader or builder raises for input it cannot use (Hydra wraps it: see _root)
_INPUT_ERRORS = (ValueError, TypeError, OSError, EOFError, ImportError)


def load_inputs(c: dict[str, Any]) -> tuple[Dataset, list[np.ndarray]]:
    """The dataset and the clients' index arrays, as configured; ConfigError naming the group."""
    try:
        ds = build_from(c["data"])
    except Exception as err:  # noqa: BLE001 - re-raised unless it is about the input
        _raise_input_error("data", err)
        raise
    if ds.transform is not None:
        _check_transform(c, ds)
    try:
        parts = build_from(
            c["partition"],
            labels=ds.y_train.numpy(),
            num_clients=c["num_clients"],
            columns=ds.partition_columns(),  # per-sample columns: natural and Flower partitions
        )
    except Exception as err:  # noqa: BLE001
        _raise_input_error("partition", err)
        raise
    return ds, parts


def _check_transform(c: dict[str, Any], ds: Dataset) -> None:
    """Data with a per-batch transform (uint8 images, normalized and augmented per step) trains on
    the client hosts of backend=local|ray, with a trainer that applies it."""
    what = f"data: {ds.name} keeps its training samples as {ds.x_train.dtype} for a per-batch transform"
    if c["strategy"].get("mode") == "p2p" or c["backend"] == "flower":
        mode = "peer-to-peer runs" if c["strategy"].get("mode") == "p2p" else "backend=flower"
        raise ConfigError(f"{what}, which {mode} do not apply; use backend=local or backend=ray")
    trainer = build_from(c["client"])
    if not trainer.accepts_transform:
        raise ConfigError(
            f"{what}, which {type(trainer).__name__} does not apply; use client=sgd or "
            "client=momentum"
        )


def check_model(c: dict[str, Any], ds: Dataset) -> int:
    """Build the model once as the server will and bind the strategy to its layout; return the
    number of trainable parameters. Leaves torch's global random state as it found it."""
    with torch.random.fork_rng(devices=[]):
        try:
            model = build_from(
                c["model"], input_shape=ds.input_shape, num_classes=ds.num_classes, seed=c["seed"]
            )
        except Exception as err:  # noqa: BLE001
            _raise_input_error("model", err)
            raise
        spec = ParamSpec.of(model)
        strategy = build_from(c["strategy"])  # validate() built it once already: it builds
        if hasattr(strategy, "bind"):  # strategies that need the parameter layout (FedSVD)
            try:
                strategy.bind(model, spec)
            except Exception as err:  # noqa: BLE001
                _raise_input_error("strategy", err)
                raise
    return spec.numel


def check_resume(
    c: dict[str, Any], out: RunDir, fingerprint: dict[str, str], num_params: int
) -> dict[str, Any] | None:
    """With ``resume=true``: the checkpoint to resume from (None when there is none yet), after
    checking that it is readable, was written by this config, holds finite parameters and as many
    as the configured model (the only check left for a checkpoint without fingerprint)."""
    if not c["resume"]:
        return None
    state = out.load_checkpoint(fingerprint)
    if state is None:
        log.info("resume=true: no checkpoint in %s yet, starting at round 0", out.path)
        return None
    got = state["params"].numel()
    if got != num_params:
        raise CheckpointError(
            f"{out.checkpoint_path} holds {got} parameters, the configured model has "
            f"{num_params}; resume with the config it was written with (the run's "
            ".hydra/config.yaml), or start over in a new hydra.run.dir"
        )
    return state


def _raise_input_error(group: str, err: Exception) -> None:
    """Raise ConfigError("<group>: <the root message>") for an input error; return for others
    (the caller re-raises them unchanged: a bug keeps its traceback)."""
    root = _root(err)
    if isinstance(root, _INPUT_ERRORS):
        msg = " ".join(str(root).split())
        raise ConfigError(msg if msg.startswith(group) else f"{group}: {msg}") from err


def _root(err: BaseException) -> BaseException:
    while err.__cause__ is not None:  # hydra.utils.instantiate wraps what the target raised
        err = err.__cause__
    return err
