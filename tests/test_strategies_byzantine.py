"""Byzantine clients corrupt everything they send, per-client extras included (issue 18, item 3).

SCAFFOLD's delta c_i, FedDyn's delta grad_i and FedSpeed's delta ghat_i travel next to the update.
A model attack applies to each extra with the same rule as to the update (computed from the honest
clients' extras of the round), crashed clients send neither, non-finite rows leave update and
extras together, and the server state built from the extras goes through the run's aggregator
(the plain mean when that aggregator is the mean). Checked on the adversary, on the parameter
server, through the runner (server state against the hosts' per-client state) and on the Flower
adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from flagstaff.clients.flower_app import (
    EXTRAS_KEY,
    REPLY_KEY,
    arrays_to_vector,
    vector_to_arrays,
    vectors_to_record,
)
from flagstaff.strategies.aggregators import build
from flagstaff.strategies.aggregators.base import coordinate_median
from flagstaff.strategies.attacks import ALIE, Adversary, ALIEAdaptive, alie_z, build_attack
from flagstaff.strategies.base import ExtrasAggregation, RoundExtras
from flagstaff.strategies.flower import FlagstaffStrategy
from flagstaff.strategies.scaffold import SCAFFOLD
from flagstaff.system.build import parameter_server, validate
from flagstaff.system.host import HostReply
from flagstaff.system.pool import LocalPool, RoundReplies
from flagstaff.system.runner import train
from flagstaff.system.server import ParameterServer, sample_clients
from tests.conftest import compose


def _attack_cfg(name: str, f: int, **kw) -> Any:
    """The attack ``name`` with f Byzantine clients (built as ``attack=<name>`` builds it)."""
    return build_attack(name, f=f, seed=0, **kw)


def _round(n: int = 8, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(n, d, generator=g, dtype=torch.float64)
    E = {"delta_c": torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0}
    w = torch.arange(1, n + 1, dtype=torch.float64)
    return U, w, E, np.arange(n)


# -- the adversary ---------------------------------------------------------------------------------
def test_sign_flip_flips_the_extras_and_leaves_the_update_attack_as_it_was() -> None:
    U, w, E, ids = _round()
    adv = Adversary(_attack_cfg("sign_flip", 3), num_clients=8)
    out = adv.attack_round(U, w, ids, build("mean"), 0, E)
    honest = E["delta_c"][3:]
    torch.testing.assert_close(out.extras["delta_c"][:3], -honest.mean(0).expand(3, -1))
    assert torch.equal(out.extras["delta_c"][3:], honest)
    U_only, w_only = adv.apply(U, w, ids, build("mean"), 0)  # the update attack is unchanged
    assert torch.equal(out.U, U_only) and torch.equal(out.w, w_only)
    assert bool(out.keep.all()) and out.dropped_nonfinite == 0


def test_alie_uses_the_extras_mean_and_std() -> None:
    U, w, E, ids = _round()
    out = Adversary(_attack_cfg("alie", 3), num_clients=8).attack_round(
        U, w, ids, build("mean"), 0, E
    )
    honest = E["delta_c"][3:]
    want = honest.mean(0) - alie_z(8, 3) * honest.std(0)
    torch.testing.assert_close(out.extras["delta_c"][:3], want.expand(3, -1))


def test_uniform_draws_a_vector_of_the_extras_size_after_the_update() -> None:
    U, w, E, ids = _round()
    E["delta_c"] = E["delta_c"][:, :4]  # an extra need not have the update's length
    adv = Adversary(_attack_cfg("uniform", 2), num_clients=8)
    out = adv.attack_round(U, w, ids, build("mean"), 5, E)
    byz = out.extras["delta_c"][:2]
    assert byz.shape == (2, 4) and bool((byz >= 0).all() and (byz < 1).all())
    assert not torch.equal(byz[0], byz[1])
    U_only, _ = adv.apply(U, w, ids, build("mean"), 5)
    assert torch.equal(out.U, U_only)  # the update's draw comes first: same as without extras


def test_mimic_copies_the_extras_of_the_client_it_copies() -> None:
    U, w, E, ids = _round()
    out = Adversary(_attack_cfg("mimic", 2, index=4), num_clients=8).attack_round(
        U, w, ids, build("mean"), 0, E
    )
    assert torch.equal(out.U[:2], U[[6, 6]])  # honest rows are 2..7: index 4 is client 6
    assert torch.equal(out.extras["delta_c"][:2], E["delta_c"][[6, 6]])


@pytest.mark.parametrize("name", ["crash", "nan_vector"])
def test_crash_and_nonfinite_remove_update_and_extras_together(name: str) -> None:
    U, w, E, ids = _round()
    out = Adversary(_attack_cfg(name, 3), num_clients=8).attack_round(
        U, w, ids, build("mean"), 0, E
    )
    assert out.keep.tolist() == [False] * 3 + [True] * 5
    assert torch.equal(out.U, U[3:]) and torch.equal(out.extras["delta_c"], E["delta_c"][3:])
    assert out.dropped_nonfinite == (3 if name == "nan_vector" else 0)


def test_data_attack_leaves_extras_honest() -> None:
    U, w, E, ids = _round()
    out = Adversary(_attack_cfg("label_flip", 3), num_clients=8).attack_round(
        U, w, ids, build("mean"), 0, E
    )
    assert torch.equal(out.extras["delta_c"], E["delta_c"]) and torch.equal(out.U, U)


def test_adaptive_alie_searches_against_the_extras_aggregation() -> None:
    """The line search on an extra probes the rule that aggregates that extra (median here) and
    displaces it at least as far as the fixed ALIE vector does."""
    U, w, E, ids = _round(n=9)
    agg = build("median", f=3, n=9)
    rules = ExtrasAggregation(agg)
    adv = Adversary(_attack_cfg("alie_adaptive", 3), num_clients=9)
    out = adv.attack_round(U, w, ids, agg, 0, E, rules.rule)
    honest = E["delta_c"][3:]
    mu, sigma = honest.mean(0), honest.std(0)
    factor = adv.attack.last_factor  # the extra's search ran last
    torch.testing.assert_close(out.extras["delta_c"][:3], (mu - factor * sigma).expand(3, -1))
    fixed = ALIE(f=3)(honest)
    shift_adaptive = (coordinate_median(out.extras["delta_c"]) - mu).norm()
    shift_fixed = (coordinate_median(torch.cat([fixed, honest])) - mu).norm()
    assert shift_adaptive >= shift_fixed
    assert rules.state_dict() == {"delta_c": {}}  # probes ran on copies; the median is stateless
    assert isinstance(adv.attack, ALIEAdaptive)


# -- the extras' aggregation -----------------------------------------------------------------------
def test_extras_aggregation_is_the_plain_sum_over_n_for_the_mean() -> None:
    rows = torch.randn(4, 5, dtype=torch.float64)
    ids, N = np.array([0, 2, 5, 7]), 10
    plain = RoundExtras({"delta_c": rows}, ids, N, ExtrasAggregation(build("mean")))
    assert torch.equal(plain.mean_over_all("delta_c"), rows.sum(0) / N)  # bit-identical
    med = RoundExtras({"delta_c": rows}, ids, N, ExtrasAggregation(build("median", f=1)))
    torch.testing.assert_close(med.mean_over_all("delta_c"), 0.4 * coordinate_median(rows))
    torch.testing.assert_close(med.mean("delta_c"), coordinate_median(rows))


def test_stateful_rule_keeps_one_state_per_extra_and_checkpoints_it() -> None:
    """Centered clipping of the delta c_i rows keeps its own centre, apart from the updates'."""
    agg = build("cclip", f=1, n=5, tau=0.5)
    ex = ExtrasAggregation(agg)
    rows = torch.randn(5, 3, dtype=torch.float64) + 10.0
    first = ex("delta_c", rows)
    assert agg.state_dict() == {}  # the run's rule (the updates' centre) is untouched
    state = ex.state_dict()
    again = ExtrasAggregation(build("cclip", f=1, n=5, tau=0.5))
    again.load_state_dict(state)
    assert torch.equal(again("delta_c", rows), ex("delta_c", rows))
    assert not torch.equal(first, ex("delta_c", rows))  # the centre moved


# -- the parameter server ------------------------------------------------------------------------
def _server(*overrides: str) -> ParameterServer:
    c = validate(compose("experiment=smoke", "model=logistic", *overrides))
    owner = np.zeros(c["num_clients"], dtype=np.int64)
    x_test, y_test = torch.zeros(2, 64), torch.zeros(2, dtype=torch.long)
    return parameter_server(c, LocalPool([]), owner, x_test, y_test, (64,), 10)


def _replies(ids: list[int], d: int, name: str = "delta_c", seed: int = 0) -> RoundReplies:
    """Two hosts' replies (out of client-id order) with updates and one extra per client."""
    g = torch.Generator().manual_seed(seed)
    k = len(ids)
    U = torch.randn(k, d, generator=g)
    E = torch.randn(k, d, generator=g) + 1.0
    half = k // 2
    reps = []
    for h, rows in enumerate((slice(half, k), slice(0, half))):
        reps.append(
            HostReply(
                host_id=h,
                client_ids=np.asarray(ids[rows], dtype=np.int64),
                updates=U[rows],
                weights=torch.full((len(ids[rows]),), 10.0),
                losses=torch.ones(len(ids[rows])),
                train_time_s=0.0,
                extras={name: E[rows]},
            )
        )
    return RoundReplies(reps)


def test_server_hands_the_strategy_attacked_extras_and_aggregates_them_robustly() -> None:
    srv = _server(
        "strategy=scaffold", "attack=sign_flip", "attack.f=2", "aggregator=median", "seed=2"
    )
    d = srv.params.numel()
    ids = [0, 1, 3, 5, 7]
    got = _replies(ids, d)
    metrics: dict = {}
    agg, extras = srv._aggregate(got, metrics, 0)
    E = torch.cat([rep.extras["delta_c"] for rep in reversed(got.replies)])  # id order
    honest = E[2:]
    assert extras.client_ids.tolist() == ids
    torch.testing.assert_close(extras.values["delta_c"][:2], -honest.mean(0).expand(2, -1))
    assert torch.equal(extras.values["delta_c"][2:], honest)
    _, state = srv.strategy.update(srv.params, agg, srv.state, 0, extras=extras)
    rows = torch.cat([-honest.mean(0).expand(2, -1), honest])
    torch.testing.assert_close(state["scaffold"].c, (5 / 10) * coordinate_median(rows))


def test_server_drops_a_client_whose_extra_is_not_finite() -> None:
    srv = _server("strategy=scaffold")
    got = _replies([1, 2, 4, 6], srv.params.numel())
    got.replies[1].extras["delta_c"][0, 3] = float("inf")  # client 1: finite update, inf extra
    metrics: dict = {}
    agg, extras = srv._aggregate(got, metrics, 0)
    assert metrics["dropped_nonfinite"] == 1
    assert extras.client_ids.tolist() == [2, 4, 6] and len(extras.values["delta_c"]) == 3
    U = torch.cat([rep.updates for rep in reversed(got.replies)])[1:]
    torch.testing.assert_close(agg, U.mean(0))  # equal weights: the mean of the 3 others
    assert bool(torch.isfinite(extras.mean_over_all("delta_c")).all())


# -- the Flower adapter: the same server half ----------------------------------------------------
def _flower_reply(cid: int, vec: torch.Tensor, extra: torch.Tensor, n: float) -> Message:
    meta = Metadata(1, f"m{cid}", 500 + cid, 0, "ins", "", 0.0, 60.0, MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": vector_to_arrays(vec, ("p",), (tuple(vec.shape),)),
            "metrics": MetricRecord({"num-examples": n, "client-id": cid, "train_loss": 1.0}),
            REPLY_KEY: ConfigRecord({"payload": "update"}),
            EXTRAS_KEY: vectors_to_record({"delta_c": extra}),
        }
    )
    return Message(content=content, metadata=meta)


def test_flower_adapter_equals_the_parameter_server_under_attack() -> None:
    """Same replies, SCAFFOLD under sign flip with the median: same parameters and same c."""
    srv = _server(
        "strategy=scaffold", "attack=sign_flip", "attack.f=2", "aggregator=median", "seed=2"
    )
    d = srv.params.numel()
    ids = [0, 1, 3, 5, 7]
    got = _replies(ids, d, seed=3)
    agg, extras = srv._aggregate(got, {}, 0)
    p_srv, st_srv = srv.strategy.update(srv.params, agg, srv.state, 0, extras=extras)

    fl = FlagstaffStrategy(
        build("median", f=2, n=5), SCAFFOLD(), attack=srv.adversary.attack, num_clients=10
    )
    fl.initialize(vector_to_arrays(srv.params, ("p",), ((d,),)))
    U = torch.cat([rep.updates for rep in got.replies])
    E = torch.cat([rep.extras["delta_c"] for rep in got.replies])
    cids = np.concatenate([rep.client_ids for rep in got.replies])
    fl._sent = len(cids)
    fl.aggregate_train(1, [_flower_reply(int(c), U[i], E[i], 10.0) for i, c in enumerate(cids)])
    torch.testing.assert_close(fl.params, p_srv, atol=0, rtol=0)
    torch.testing.assert_close(fl.state["scaffold"].c, st_srv["scaffold"].c, atol=0, rtol=0)
    honest = torch.cat([got.replies[1].extras["delta_c"], got.replies[0].extras["delta_c"]])[2:]
    rows = torch.cat([-honest.mean(0).expand(2, -1), honest])
    torch.testing.assert_close(fl.state["scaffold"].c, 0.5 * coordinate_median(rows))
    assert arrays_to_vector(fl.arrays(), ("p",)).shape == (d,)


# -- through the runner: server state against the hosts' per-client state -----------------------
STATEFUL = [
    ("scaffold", "c", "c_i", ()),
    ("feddyn", "h", "grad_i", ()),
    ("fedspeed", "ghat_mean", "ghat_i", ("strategy.average=all",)),
]


def _one_round(tmp_path: Path, strategy: str, extra: tuple[str, ...], *overrides: str) -> dict:
    """One round of the smoke run with seed 2 (round 0 samples clients 0, 1, 3, 5, 7; 0 and 1 are
    the Byzantine ones with attack.f=2); returns the final checkpoint."""
    assert sample_clients(10, 5, 2, 0).tolist() == [0, 1, 3, 5, 7]
    over = ("experiment=smoke", f"strategy={strategy}", *extra, "rounds=1", "seed=2", *overrides)
    train(compose(*over), run_dir=str(tmp_path))
    return torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize(("strategy", "server_key", "client_key", "extra"), STATEFUL)
def test_sign_flipped_extras_reach_the_server_state(
    tmp_path: Path, strategy: str, server_key: str, client_key: str, extra: tuple[str, ...]
) -> None:
    """After round 1 each sampled client's state is its delta (it started at 0). The server state
    is sum over the round's rows / N, the two Byzantine rows being minus the honest mean."""
    ck = _one_round(tmp_path, strategy, extra, "attack=sign_flip", "attack.f=2")
    delta = ck["clients"][client_key]  # (N, d): the hosts keep every client's honest state
    honest = delta[[3, 5, 7]]
    rows = torch.cat([-honest.mean(0).expand(2, -1), honest])
    torch.testing.assert_close(
        ck["strategy"][strategy][server_key], rows.sum(0) / 10, atol=1e-7, rtol=1e-6
    )


def test_crashed_clients_send_no_extras(tmp_path: Path) -> None:
    ck = _one_round(tmp_path, "scaffold", (), "attack=crash", "attack.f=2")
    c_i = ck["clients"]["c_i"]
    assert bool(c_i[0].abs().sum() > 0)  # the Byzantine clients trained ...
    c = ck["strategy"]["scaffold"]["c"]
    torch.testing.assert_close(c, c_i[[3, 5, 7]].sum(0) / 10)  # ... sent nothing


def test_median_aggregates_the_control_variate_updates(tmp_path: Path) -> None:
    ck = _one_round(tmp_path, "scaffold", (), "attack=sign_flip", "attack.f=2", "aggregator=median")
    honest = ck["clients"]["c_i"][[3, 5, 7]]
    rows = torch.cat([-honest.mean(0).expand(2, -1), honest])
    torch.testing.assert_close(
        ck["strategy"]["scaffold"]["c"], (5 / 10) * coordinate_median(rows), atol=1e-7, rtol=1e-6
    )


def test_resume_with_a_stateful_rule_on_the_extras_reproduces(tmp_path: Path) -> None:
    """cclip keeps a centre for the delta c_i rows too; it is checkpointed, so a resumed run equals
    an uninterrupted one."""
    over = ("strategy=scaffold", "attack=sign_flip", "attack.f=1", "aggregator=cclip", "seed=2")
    full = train(compose("experiment=smoke", *over, "rounds=4"), run_dir=str(tmp_path / "a"))
    b = str(tmp_path / "b")
    train(compose("experiment=smoke", *over, "rounds=2", "checkpoint_every=2"), run_dir=b)
    resumed = train(compose("experiment=smoke", *over, "rounds=4", "resume=true"), run_dir=b)
    assert resumed["resumed_from"] == 2
    assert torch.equal(full["params"], resumed["params"])


@pytest.mark.slow
def test_backend_flower_equals_local_under_attack(tmp_path: Path) -> None:
    """Flower's simulation engine with the adapter == the local parameter server, for SCAFFOLD
    under sign flip with the median (the setup of tests/test_flower.py's equality test)."""
    over = (
        "experiment=smoke",
        "rounds=3",
        "cluster.cpus_per_host=1",
        "strategy=scaffold",
        "attack=sign_flip",
        "attack.f=2",
        "aggregator=median",
        "seed=2",
    )
    flower = train(compose(*over, "backend=flower"), run_dir=str(tmp_path / "flower"))
    local = train(compose(*over, "backend=local"), run_dir=str(tmp_path / "local"))
    assert torch.allclose(flower["params"], local["params"], atol=1e-6)
    assert [m["accuracy"] for m in flower["metrics"]] == [m["accuracy"] for m in local["metrics"]]
