"""The Strategy base declares every optional hook with a default (issue 20, item 4): every strategy
of conf/strategy (and the client-level DP wrapper) derives from it, so callers call the hooks
instead of probing with getattr/hasattr."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose

from flagstaff.strategies.base import Strategy

ROOT = Path(__file__).resolve().parent.parent
SERVER_STRATEGIES = sorted(
    p.stem
    for p in (ROOT / "conf" / "strategy").glob("*.yaml")
    if "mode: p2p" not in p.read_text() and "- monna" not in p.read_text()
)


def _build(name: str) -> Strategy:
    from flagstaff.system.build import build_from
    from flagstaff.system.config import to_plain

    # client-level DP's accountant analyses Poisson sampling of clients: it refuses sampling=fixed
    over = ["sampling=bernoulli"] if name == "dp_fedavg" else []
    return build_from(to_plain(compose("experiment=smoke", f"strategy={name}", *over))["strategy"])


@pytest.mark.parametrize("name", SERVER_STRATEGIES)
def test_every_strategy_derives_from_the_base_and_answers_every_hook(name: str) -> None:
    s = _build(name)
    assert isinstance(s, Strategy)
    params = torch.arange(6, dtype=torch.float32)
    state = s.init(params)
    U, w = torch.ones(3, 6), torch.tensor([1.0, 2.0, 3.0])
    U2, w2, state = s.pre_aggregate(U, w, state, 0)
    assert U2.shape == U.shape and w2.shape == w.shape
    assert isinstance(s.broadcast(params, state), dict)
    assert isinstance(s.name, str) and isinstance(s.transforms_updates, bool)
    assert s.state_dict(s.load_state(s.state_dict(state))).keys() == s.state_dict(state).keys()
    private = s.epsilon_kind is not None
    assert (s.epsilon(state) is not None) == private
    assert (s.epsilon_after(state) is not None) == private
    assert (s.mechanism(state) is not None) == private
    assert s.transforms_updates == private  # client-level DP clips each update


def test_defaults_of_the_base() -> None:
    class Shift(Strategy):
        def init(self, params):
            return {}

        def update(self, params, aggregate, state, round_idx, extras=None):
            return params + aggregate, state

    s, p = Shift(), torch.zeros(2)
    U, w = torch.ones(2, 2), torch.ones(2)
    assert s.client_rule is None and s.epsilon_kind is None and not s.transforms_updates
    assert s.bind(None, None) is None
    assert s.broadcast(p, {}) == {}
    assert s.pre_aggregate(U, w, {}, 0) == (U, w, {})
    assert s.epsilon({}) is None and s.epsilon_after({}) is None and s.mechanism({}) is None
    assert torch.equal(s.update(p, torch.ones(2), {}, 0)[0], torch.ones(2))
