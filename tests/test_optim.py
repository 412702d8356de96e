"""Server rules as chains of transforms (strategies/optim.py; issue 20, item 5): the chain algebra,
typed state with named parts in checkpoints, and SCAFFOLD with a server Adam."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose

import flagstaff.strategies.optim
from flagstaff.strategies.base import RoundExtras
from flagstaff.strategies.dp import ClientLevelDP
from flagstaff.strategies.fedadam import FedAdam
from flagstaff.strategies.fedavg import FedAvg
from flagstaff.strategies.feddyn import FedDyn
from flagstaff.strategies.fedspeed import FedSpeed
from flagstaff.strategies.optim import Composed, Transform, adam, chain, momentum, sgd
from flagstaff.strategies.scaffold import SCAFFOLD, ControlVariate

D = 7


def _steps(rounds: int = 6, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(D, generator=g, dtype=dtype) for _ in range(rounds)]


def test_docstring_examples() -> None:
    assert doctest.testmod(flagstaff.strategies.optim).failed == 0


def test_chain_of_momentum_and_sgd_is_fedavgm_bit_for_bit() -> None:
    """chain(momentum(b), sgd(lr)) equals the previous FedAvgM rule, x + lr (b v + Delta), exactly."""
    lr, beta = 0.7, 0.9
    s = Composed(momentum(beta), sgd(lr))
    x, st = torch.zeros(D), s.init(torch.zeros(D))
    ref_x, ref_v = torch.zeros(D), torch.zeros(D)
    for r, delta in enumerate(_steps()):
        x, st = s.update(x, delta, st, r)
        ref_v = beta * ref_v + delta
        ref_x = ref_x + lr * ref_v
        assert torch.equal(x, ref_x) and torch.equal(st["momentum"].velocity, ref_v)
    fedavgm = FedAvg(server_lr=lr, server_momentum=beta)
    y, st2 = torch.zeros(D), fedavgm.init(torch.zeros(D))
    for r, delta in enumerate(_steps()):
        y, st2 = fedavgm.update(y, delta, st2, r)
    assert torch.equal(x, y)


def test_adam_is_the_previous_fedadam_bit_for_bit() -> None:
    """adam(lr, b1, b2, tau) == Reddi et al.'s Algorithm 2 as FedAdam computed it (v_0 = tau^2)."""
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    s = Composed(adam(lr, b1, b2, tau))
    x, st = torch.zeros(D, dtype=torch.float64), s.init(torch.zeros(D, dtype=torch.float64))
    m, v = torch.zeros(D, dtype=torch.float64), torch.full((D,), tau**2, dtype=torch.float64)
    ref = torch.zeros(D, dtype=torch.float64)
    for r, delta in enumerate(_steps(dtype=torch.float64)):
        x, st = s.update(x, delta, st, r)
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta.square()
        ref = ref + lr * m / (v.sqrt() + tau)
        assert torch.equal(x, ref)
    fedadam = FedAdam(server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    y = torch.zeros(D, dtype=torch.float64)
    st2 = fedadam.init(y)
    for r, delta in enumerate(_steps(dtype=torch.float64)):
        y, st2 = fedadam.update(y, delta, st2, r)
    assert torch.equal(y, x) and torch.equal(st2["adam"].v, v)


def test_sgd_with_lr_one_adds_the_aggregate_exactly_and_chains_flatten() -> None:
    x, delta = _steps(2)
    s = Composed(sgd(1.0))
    assert torch.equal(s.update(x, delta, s.init(x), 0)[0], x + delta)
    c = chain(chain(momentum(0.5), sgd(0.1)), ControlVariate())
    assert [t.name for t in c.transforms] == ["momentum", "sgd", "scaffold"]
    with pytest.raises(ValueError, match="repeat"):
        chain(sgd(0.1), sgd(0.2))
    assert [t.name for t in chain(sgd(0.1), sgd(0.2).named("sgd2")).transforms] == ["sgd", "sgd2"]
    with pytest.raises(ValueError, match="server_opt.lr must be > 0"):
        sgd(0.0)


def test_state_dict_names_the_parts_and_round_trips() -> None:
    x = torch.zeros(D)
    s = SCAFFOLD(server_opt=adam(0.1))
    st = s.init(x)
    extras = RoundExtras({"delta_c": torch.ones(2, D)}, np.array([0, 3]), 10)
    _, st = s.update(x, torch.ones(D), st, 0, extras)
    d = s.state_dict(st)
    assert set(d) == {"scaffold", "adam"} and set(d["adam"]) == {"m", "v"}
    assert set(d["scaffold"]) == {"c"} and all(
        isinstance(t, torch.Tensor) for t in d["adam"].values()
    )
    back = s.load_state(d)
    assert torch.equal(back["scaffold"].c, st["scaffold"].c)
    assert torch.equal(back["adam"].m, st["adam"].m)
    # a checkpoint of the earlier flat format ({"c": ...} for SCAFFOLD) still loads
    old = SCAFFOLD()
    assert torch.equal(old.load_state({"c": st["scaffold"].c})["scaffold"].c, st["scaffold"].c)
    with pytest.raises(ValueError, match="written with another strategy"):
        FedDyn().load_state({"c": st["scaffold"].c})
    dp = ClientLevelDP(
        FedAvg(server_momentum=0.9), num_clients=10, clients_per_round=5, sampling="bernoulli"
    )
    dd = dp.state_dict(dp.init(x))
    assert set(dd) == {"dp", "inner"} and set(dd["inner"]) == {"momentum", "sgd"}
    assert set(dd["dp"]) == {"clip", "last_clip", "history"}
    legacy = {"inner": {"velocity": torch.ones(D)}, "clip": 2.0, "history": [[1.0, 0.5, 3]]}
    st_dp = dp.load_state(legacy)
    assert st_dp.clip == 2.0 and st_dp.history == [[1.0, 0.5, 3]]
    assert torch.equal(st_dp.inner["momentum"].velocity, torch.ones(D))


def test_the_correction_is_independent_of_the_server_optimizer() -> None:
    """Same aggregates and extras: SCAFFOLD's c, FedDyn's h and FedSpeed's G are the same with a
    server SGD and with a server Adam, while the parameters differ."""
    x0 = torch.zeros(D)
    for make, part, field, key in [
        (lambda o: SCAFFOLD(server_opt=o), "scaffold", "c", "delta_c"),
        (lambda o: FedDyn(alpha=0.1, server_opt=o), "feddyn", "h", "delta_grad"),
        (lambda o: FedSpeed(server_opt=o), "fedspeed", "ghat_mean", "delta_ghat"),
    ]:
        a, b = make(sgd(1.0)), make(adam(0.05))
        xa, sa, xb, sb = x0, a.init(x0), x0, b.init(x0)
        g = torch.Generator().manual_seed(0)
        for r in range(4):
            ex = RoundExtras({key: torch.randn(3, D, generator=g)}, np.array([1, 4, 6]), 10)
            delta = torch.randn(D, generator=g)
            xa, sa = a.update(xa, delta, sa, r, ex)
            xb, sb = b.update(xb, delta, sb, r, ex)
        assert torch.equal(getattr(sa[part], field), getattr(sb[part], field)), part
        assert not torch.equal(xa, xb), part


def test_server_opt_refuses_a_second_learning_rate() -> None:
    with pytest.raises(ValueError, match="strategy.server_lr"):
        SCAFFOLD(server_lr=0.5, server_opt=adam(0.1))
    with pytest.raises(TypeError, match="server transform"):
        FedAvg(server_opt="adam")
    assert isinstance(FedAvg(server_opt=momentum(0.5)).transform.transforms[0], Transform)


def test_scaffold_with_server_adam_end_to_end(tmp_path: Path) -> None:
    """strategy=scaffold strategy/server_opt=adam runs (backend=local, 3 rounds), its checkpoint
    names the parts, a resumed run reaches the same parameters, and after one round its c equals
    plain SCAFFOLD's (c does not depend on the server optimizer; both runs start from the same
    model and clients)."""
    from flagstaff.system.runner import train

    base = ("experiment=smoke", "strategy=scaffold")
    res = train(compose(*base, "strategy/server_opt=adam"), run_dir=str(tmp_path / "adam"))
    assert res["rounds_completed"] == 3 and torch.isfinite(res["params"]).all()
    ck = torch.load(tmp_path / "adam" / "checkpoint.pt", weights_only=True)
    assert set(ck["strategy"]) == {"scaffold", "adam"} and set(ck["strategy"]["adam"]) == {"m", "v"}
    assert ck["strategy"]["scaffold"]["c"].abs().sum() > 0
    part = tmp_path / "part"  # resumed from its round-2 checkpoint: the uninterrupted result
    train(compose(*base, "strategy/server_opt=adam", "rounds=2"), run_dir=str(part))
    resumed = train(compose(*base, "strategy/server_opt=adam", "resume=true"), run_dir=str(part))
    assert resumed["resumed_from"] == 2 and torch.equal(resumed["params"], res["params"])
    one = {}
    for name, extra in (("sgd", ()), ("adam1", ("strategy/server_opt=adam",))):
        run = train(compose(*base, *extra, "rounds=1"), run_dir=str(tmp_path / name))
        ck1 = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        one[name] = (run["params"], ck1["strategy"]["scaffold"]["c"])
    assert torch.equal(one["sgd"][1], one["adam1"][1])
    assert not torch.equal(one["sgd"][0], one["adam1"][0])


def test_config_spellings_compose_optimizers_and_dp_without_new_classes() -> None:
    """strategy/server_opt=adam gives any strategy a server Adam; dp_fedavg wraps any strategy of the
    group (strategy@strategy.inner=...), with its own server optimizer."""
    from flagstaff.system.config import to_plain
    from flagstaff.system.specs import build_from

    def built(*over: str):
        return build_from(to_plain(compose("experiment=smoke", *over))["strategy"])

    s = built("strategy=feddyn", "strategy/server_opt=adam", "strategy.server_opt.lr=0.05")
    assert [t.name for t in s.transform.transforms] == ["feddyn", "adam"]
    assert s.transform.transforms[1].lr == 0.05
    m = built("strategy=fedavg", "strategy/server_opt=momentum")
    assert [t.name for t in m.transform.transforms] == ["momentum", "sgd"]
    dp = built(
        "strategy=dp_fedavg",
        "sampling=bernoulli",  # client-level DP refuses fixed-size sampling
        "strategy@strategy.inner=fedprox",
        "strategy/server_opt@strategy.inner.server_opt=adam",
    )
    assert isinstance(dp, ClientLevelDP) and dp.inner.name == "fedprox"
    assert [t.name for t in dp.inner.transform.transforms] == ["adam"]
    assert dp.client_rule.mu == 0.01
