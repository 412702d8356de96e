"""A round with exactly one usable reply runs on every server path (issue 18 review REV18P item 6:
the per-client path indexed the client ids, a numpy array, with a one-element torch bool mask,
which numpy reads as the integer index 1, so such a round raised IndexError)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import compose

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_SMOKE = ("experiment=smoke", "rounds=2", "clients_per_round=1")


@pytest.mark.parametrize(
    "setting",
    [
        (*_SMOKE,),  # FedAvg + mean: the hosts send their weighted sums
        (*_SMOKE, "cluster.host_reduce=false"),  # the same, every update to the server
        (*_SMOKE, "strategy=scaffold"),  # per-client extras
        (*_SMOKE, "aggregator=median"),
        # client-level DP (Poisson sampling: seed 0 samples exactly one of 10 clients in round 1)
        (
            "experiment=privacy_dp_fedavg_digits",
            "backend=local",
            "progress=false",
            "num_clients=10",
            "clients_per_round=1",
            "rounds=1",
            "seed=0",
        ),
    ],
    ids=["fedavg-reduced", "fedavg-per-client", "scaffold", "median", "dp_fedavg"],
)
def test_a_round_with_one_reply_runs_through_the_runner(tmp_path, setting) -> None:
    from flagstaff.system.runner import train
    from flagstaff.system.server import sample_clients

    cfg = compose(*setting)
    rounds, n, m, kind = cfg.rounds, cfg.num_clients, cfg.clients_per_round, cfg.sampling
    kind = getattr(kind, "value", kind)  # the structured config's enum
    sampled = [len(sample_clients(n, m, cfg.seed, r, kind)) for r in range(rounds)]
    assert sampled == [1] * rounds  # every round has exactly one reply
    res = train(cfg, run_dir=str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert not any("skipped" in r for r in rows)
    assert torch.isfinite(res["params"]).all() and res["accuracy"] is not None
