"""Every experiment in conf/experiment composes against the schema and passes validation."""

from __future__ import annotations

import pytest

from flagstaff.system.build import validate
from tests.conftest import ROOT, compose

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def test_experiments_found() -> None:
    assert {"smoke", "sim_w1", "sim_w2", "sim_w3", "sim_cnn"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name: str) -> None:
    cfg = compose(f"experiment={name}")
    c = validate(cfg)
    assert c["rounds"] >= 1 and c["clients_per_round"] <= c["num_clients"]
