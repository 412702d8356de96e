"""Flower adapters against the real flwr 1.41 package (no mocks).

* ``FlagstaffStrategy.aggregate_train`` on real ``flwr.app.Message`` replies: sorted by client id,
  model attack on the Byzantine ids, Flagstaff aggregator, strategy update; Flower-style replies
  (trained models) and Flagstaff replies (updates) give the same result.
* ``backend=flower`` (Flower's simulation engine with Flagstaff's ClientApp and strategy) computes
  the same model as ``backend=local`` on the smoke config.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from flagstaff.clients.flower_app import REPLY_KEY, arrays_to_vector, vector_to_arrays
from flagstaff.strategies.aggregators import build
from flagstaff.strategies.attacks import SignFlip
from flagstaff.strategies.fedavg import FedAvg
from flagstaff.strategies.flower import FlagstaffStrategy
from flagstaff.system.runner import train
from tests.conftest import compose

NAMES, SHAPES = ("w", "b"), ((2, 3), (3,))


def _reply(node: int, cid: int, vec: torch.Tensor, payload: str, n: int) -> Message:
    meta = Metadata(1, f"m{node}", node, 0, "ins", "", 0.0, 60.0, MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": vector_to_arrays(vec, NAMES, SHAPES),
            "metrics": MetricRecord({"num-examples": n, "client-id": cid, "train_loss": 1.0}),
        }
    )
    if payload == "update":
        content[REPLY_KEY] = ConfigRecord({"payload": "update"})
    return Message(content=content, metadata=meta)  # a reply from node ``node``


def _strategy() -> FlagstaffStrategy:
    agg = build(rule="flag", f=1, n=5)
    s = FlagstaffStrategy(agg, FedAvg(server_lr=0.5), attack=SignFlip(f=1), seed=0)
    s.initialize(vector_to_arrays(torch.linspace(-1, 1, 9), NAMES, SHAPES))
    return s


def test_aggregate_train_sorts_attacks_aggregates_and_updates() -> None:
    torch.manual_seed(0)
    U = torch.randn(5, 9)
    sizes = [10, 12, 9, 11, 10]
    x0 = torch.linspace(-1, 1, 9)
    # expected, computed directly with the Flagstaff pieces (client 0 is Byzantine)
    ref = _strategy()
    crafted = U.clone()
    gen = torch.Generator().manual_seed(0 * 1_000_003 + 0)
    crafted[0] = SignFlip(f=1)(U[1:], generator=gen)[0]
    agg = ref.aggregator(crafted, torch.tensor(sizes, dtype=torch.float32))
    expected = x0 + 0.5 * agg

    results = []
    for payload in ("update", "model"):
        s = _strategy()
        replies = [
            _reply(1000 + 7 * c, c, U[c] if payload == "update" else x0 + U[c], payload, sizes[c])
            for c in range(5)
        ]
        random.Random(1).shuffle(replies)  # arrival order must not matter
        s._sent = 5
        arrays, metrics = s.aggregate_train(1, replies)
        assert metrics["clients"] == 5 and metrics["dropped_failed"] == 0
        results.append(arrays_to_vector(arrays, NAMES))
        assert torch.equal(s.params, results[-1])
    assert torch.allclose(results[0], expected, atol=1e-6)
    assert torch.allclose(results[1], expected, atol=1e-5)  # model payload: x - x0 rounding


def test_nonfinite_reply_is_dropped() -> None:
    s = _strategy()
    U = torch.randn(5, 9)
    U[3, 2] = float("nan")
    replies = [_reply(50 + c, c, U[c], "update", 10) for c in range(5)]
    s._sent = 6  # one node never answered
    _, metrics = s.aggregate_train(1, replies)
    assert metrics["dropped_nonfinite"] == 1 and metrics["dropped_failed"] == 1
    assert torch.isfinite(s.params).all()


def test_backend_flower_matches_local(tmp_path) -> None:
    """Same sampling, same batches, same aggregation: Flower's engine computes the same model."""
    over = ("experiment=smoke", "rounds=3", "cluster.cpus_per_host=1")
    flower = train(compose(*over, "backend=flower"), run_dir=str(tmp_path / "flower"))
    local = train(compose(*over, "backend=local"), run_dir=str(tmp_path / "local"))
    assert torch.allclose(flower["params"], local["params"], atol=1e-6)
    acc_f = [m["accuracy"] for m in flower["metrics"]]
    acc_l = [m["accuracy"] for m in local["metrics"]]
    assert acc_f == acc_l and acc_f[-1] > 0.3
    rows = [json.loads(x) for x in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["round_time_s"] > 0 and r["clients"] == 5 for r in rows)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["backend"] == "flower" and summary["accuracy"] == acc_f[-1]


def test_client_app_keeps_scaffold_state_in_context(tmp_path) -> None:
    """The real ClientApp, called in-process: SCAFFOLD's c_i lives in context.state across rounds,
    the strategy's c reaches the clients, and the round trip runs through FlagstaffStrategy."""
    from flwr.app import Context

    from flagstaff.clients.data import load_digits
    from flagstaff.clients.flower_app import (
        STATE_KEY,
        ClientSetup,
        make_client_app,
        model_to_arrays,
    )
    from flagstaff.clients.models import build_model
    from flagstaff.clients.partition import iid
    from flagstaff.clients.trainer import LocalSGD
    from flagstaff.strategies.scaffold import SCAFFOLD

    ds = load_digits()
    parts = iid(ds.y_train.numpy(), 6)
    model = build_model("logistic", ds.input_shape, ds.num_classes)
    strategy = SCAFFOLD()
    setups = {
        c: ClientSetup(
            c, ds.x_train[p], ds.y_train[p], 10, model, LocalSGD(lr=0.05), strategy.client_rule
        )
        for c, p in enumerate(parts[:3])
    }
    app = make_client_app(lambda ctx: setups[int(ctx.node_config["partition-id"])])
    contexts = {c: Context(1, 100 + c, {"partition-id": c}, RecordDict(), {}) for c in range(3)}
    s = FlagstaffStrategy(build(rule="mean"), strategy, num_clients=6)
    s.initialize(model_to_arrays(model))
    for server_round in (1, 2):
        content = s.train_content(server_round, ConfigRecord())
        replies = []
        for c, ctx in contexts.items():
            meta = Metadata(1, f"i{c}", 0, ctx.node_id, "", "", 0.0, 60.0, MessageType.TRAIN)
            replies.append(app(Message(content=content, metadata=meta), ctx))
        s._sent = 3
        _, metrics = s.aggregate_train(server_round, replies)
        assert metrics["dropped_failed"] == 0 and metrics["train_loss"] > 0
        assert all(STATE_KEY in ctx.state for ctx in contexts.values())
    c_i = arrays_to_vector(contexts[0].state[STATE_KEY], ("c_i",))
    assert c_i.abs().sum() > 0 and s.state["scaffold"].c.abs().sum() > 0


def test_dpsgd_client_accountant_survives_a_new_worker() -> None:
    """A DP-SGD client keeps its Opacus accountant history in context.state: when round 2 runs in
    a fresh trainer (another worker process in Flower's simulation), epsilon keeps composing."""
    from flwr.app import Context

    from flagstaff.clients.data import load_digits
    from flagstaff.clients.dp import DPSGDTrainer, epsilon_of_history
    from flagstaff.clients.flower_app import ClientSetup, make_client_app, model_to_arrays
    from flagstaff.clients.models import build_model

    ds = load_digits()
    model = build_model("logistic", ds.input_shape, ds.num_classes)
    x, y = ds.x_train[:40], ds.y_train[:40]
    ctx = Context(1, 7, {"partition-id": 0}, RecordDict(), {})
    s = FlagstaffStrategy(build(rule="mean"), FedAvg())
    s.initialize(model_to_arrays(model))
    eps = []
    for server_round in (1, 2):
        setup = ClientSetup(0, x, y, 10, model, DPSGDTrainer(noise_multiplier=1.0, batch_size=8))
        app = make_client_app(lambda _ctx, setup=setup: setup)  # a new trainer every round
        meta = Metadata(1, "i", 0, 7, "", "", 0.0, 60.0, MessageType.TRAIN)
        content = s.train_content(server_round, ConfigRecord())
        reply = app(Message(content=content, metadata=meta), ctx)
        s._sent = 1
        _, metrics = s.aggregate_train(server_round, [reply])
        eps.append(metrics["epsilon"])
        assert s.last_metrics["epsilon_kind"] == "sample-level"
    one_round = DPSGDTrainer(noise_multiplier=1.0, batch_size=8)
    steps, q = one_round.steps_per_round(40), one_round.sample_rate(40)
    assert eps[0] == pytest.approx(epsilon_of_history([(1.0, q, steps)], 1e-5, "rdp"))
    assert eps[1] == pytest.approx(epsilon_of_history([(1.0, q, 2 * steps)], 1e-5, "rdp"))


def test_backend_flower_with_dpsgd_and_scaffold_equals_local(tmp_path) -> None:
    """DP-SGD (Opacus) with SCAFFOLD's local rule on Flower's engine, 2 rounds: the clients' rule
    state lives in their nodes, their accountants compose, the round reports their epsilon and no
    train loss, summary.json has the privacy block, and the model is backend=local's."""
    over = (
        "experiment=smoke", "rounds=2", "cluster.cpus_per_host=1", "client=dpsgd",
        "client.noise_multiplier=1.0", "client.batch_size=16", "strategy=scaffold",
    )  # fmt: skip
    flower = train(compose(*over, "backend=flower"), run_dir=str(tmp_path / "flower"))
    local = train(compose(*over, "backend=local"), run_dir=str(tmp_path / "local"))
    assert torch.allclose(flower["params"], local["params"], atol=1e-5)
    for f, lo in zip(flower["metrics"], local["metrics"], strict=True):
        assert f["epsilon_kind"] == "sample-level" and "train_loss" not in f
        assert f["epsilon"] == pytest.approx(lo["epsilon"], rel=1e-12)
    assert flower["privacy"]["epsilon"] == pytest.approx(local["privacy"]["epsilon"], rel=1e-12)


def test_backend_flower_refuses_what_it_cannot_account(tmp_path) -> None:
    """A sample-level budget (the accountants live in the SuperNodes) is refused before any work."""
    from flagstaff.system.config import ConfigError

    cfg = compose(
        "experiment=smoke", "backend=flower", "client=dpsgd", "client.noise_multiplier=null",
        "privacy.target_epsilon=3",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="backend=flower cannot stop at privacy.target_epsilon"):
        train(cfg, run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_backend_flower_stops_at_the_client_level_budget(tmp_path) -> None:
    """Client-level DP on Flower's engine stops before the round that would exceed the budget,
    as on the parameter server (one run loop), and writes the released mechanism."""
    over = ("experiment=privacy_dp_fedavg_digits", "rounds=8", "cluster.cpus_per_host=1",
            "strategy.noise_multiplier=0.5", "privacy.target_epsilon=6")  # fmt: skip
    flower = train(compose(*over, "backend=flower"), run_dir=str(tmp_path / "flower"))
    local = train(compose(*over, "backend=local"), run_dir=str(tmp_path / "local"))
    assert flower["stopped"] == local["stopped"] == "privacy budget"
    assert flower["rounds_completed"] == local["rounds_completed"] < 8
    assert flower["privacy"]["mechanism"] == local["privacy"]["mechanism"]
