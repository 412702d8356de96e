"""The strategy contract: an init/update pair with explicit state (optax-style; STYLE.md point 2).

A strategy decides what the server sends, which local rule clients run, and how the aggregated update
becomes the next global parameters. Its state is typed (``strategies.optim.Composed``: a dict of
NamedTuples keyed by the transforms' names; ``strategies.dp.ClientLevelDP``: ``DPState``) and
checkpointed through ``state_dict(state)`` / ``load_state(d)`` as a nested dict of named parts.

* ``client_rule``: a picklable :class:`clients.rules.LocalRule` (None = plain local SGD), defined
  beside its server half (``strategies/<name>.py``); the hosts run it and keep its per-client state.
* ``broadcast(params, state)``: server vectors sent with the parameters each round (SCAFFOLD's c).
* ``update(params, aggregate, state, round_idx, extras=None)``: ``aggregate`` is the aggregator's
  output over the clients' messages; ``extras`` holds the per-client extra vectors of the round,
  as the Byzantine clients left them (``strategies.attacks``). A strategy combines them only through
  ``RoundExtras.mean`` / ``mean_over_all`` / ``add_mean_over_all``, which use the run's aggregator
  (``ExtrasAggregation``; the plain mean when the aggregator is the mean).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flagstaff.strategies.aggregators.base import as_aggregator

if TYPE_CHECKING:
    from torch import nn

    from flagstaff.clients.rules import LocalRule

__all__ = ["ExtrasAggregation", "Strategy", "State", "RoundExtras", "add_mean_over_all"]

#: a strategy's state: whatever its ``init`` returns (typed; see the module docstring)
State = Any


def _plain_mean(U: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    return U.mean(dim=0)


class ExtrasAggregation:
    """How a strategy combines the rows of one per-client extra vector: with the run's aggregator,
    so that Byzantine extras meet the same robust rule as Byzantine updates (issue 18, item 3).

    When the run's aggregator is the mean (``decomposable``: a weighted mean) the extras keep their
    plain, unweighted mean (``plain``; no-attack results unchanged). Otherwise each extra name
    gets its own deep copy of the aggregator as it was built (before any call), so a stateful
    rule (centered clipping's centre, bucketing's random stream) keeps one state per vector,
    apart from the updates'; ``state_dict`` holds those states for checkpoints. Rows are
    aggregated unweighted, like the plain mean they replace.
    """

    def __init__(self, aggregator: Callable[..., torch.Tensor] | None = None) -> None:
        agg = None if aggregator is None else as_aggregator(aggregator)
        self.plain = agg is None or agg.decomposable
        self._template = None if self.plain else copy.deepcopy(agg)
        self.rules: dict[str, Callable[..., torch.Tensor]] = {}

    def rule(self, name: str) -> Callable[..., torch.Tensor]:
        """The rule, ``rule(rows, weights=None) -> (e,)``, that aggregates extra ``name``."""
        if self.plain:
            return _plain_mean
        if name not in self.rules:
            self.rules[name] = copy.deepcopy(self._template)
        return self.rules[name]

    def __call__(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return self.rule(name)(rows, None)

    def state_dict(self) -> dict[str, Any]:
        return {n: r.state_dict() for n, r in sorted(self.rules.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, st in (state or {}).items():
            if not self.plain:  # the plain mean keeps no state
                self.rule(name).load_state_dict(st)


@dataclass
class RoundExtras:
    """Per-client extra vectors of one round: rows sorted by client id, after the attack (Byzantine
    rows replaced or removed, non-finite rows dropped together with their update).

    ``aggregation``: how the rows combine (``ExtrasAggregation``; None = the plain mean)."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (n, d)
    client_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    num_clients: int = 1  # N, all clients of the run (for averages over all clients)
    aggregation: ExtrasAggregation | None = None

    def _plain(self) -> bool:
        return self.aggregation is None or self.aggregation.plain

    def mean(self, name: str) -> torch.Tensor:
        """The participants' rows aggregated: the plain mean, or the run's robust rule."""
        if self._plain():
            return self.values[name].mean(dim=0)
        return self.aggregation(name, self.values[name])

    def mean_over_all(self, name: str) -> torch.Tensor:
        """Sum over the participants divided by N: the change of a mean over all clients when only
        the participants changed their vector by these deltas (|S|/N * mean over S). With a robust
        rule: |S|/N * rule(rows) (equal to the plain form when the rule is the mean)."""
        rows = self.values[name]
        if self._plain():
            return rows.sum(dim=0) / self.num_clients
        return self.aggregation(name, rows) * (len(rows) / self.num_clients)


def add_mean_over_all(mean: torch.Tensor, extras: RoundExtras | None, name: str) -> torch.Tensor:
    """A server-side mean over all clients after this round's participants changed their vectors
    by ``extras[name]`` (unchanged when the round carried none, e.g. every update was dropped)."""
    if extras is None or name not in extras.values or not len(extras.client_ids):
        return mean
    return mean + extras.mean_over_all(name)


class Strategy:
    """Base of every server strategy: the init/update pair plus every optional hook, declared
    with its default so that callers never probe with getattr/hasattr (issue 20, item 4; the
    accountant interface of Opacus is the model). Subclasses override what they need.

    * ``name``: short name for logs; ``client_rule``: the :class:`clients.rules.LocalRule` clients
      run (None = plain local SGD);
    * ``epsilon_kind``: None, or ``"client-level"`` for strategies that release a DP aggregate
      (``epsilon``, ``epsilon_after`` and ``mechanism`` then answer; by default they return None);
    * ``transforms_updates``: True when ``pre_aggregate`` changes individual updates (client-level
      DP clipping), so hosts must send every update instead of their weighted sum;
    * ``releases_empty_rounds``: True when a round without any usable update must still run
      ``pre_aggregate`` and ``update`` (on no rows and a zero aggregate) instead of being skipped:
      client-level DP, whose every round is one release of the sampled Gaussian mechanism (a skip
      would reveal that nobody was sampled or usable, outside the accounting; docs/privacy.md);
    * ``state_dict(state)`` / ``load_state(d)``: the checkpointed form of the state (a nested dict
      of tensors and numbers, readable with ``torch.load(weights_only=True)``) and back.
    """

    name: str = "strategy"
    client_rule: LocalRule | None = None
    epsilon_kind: str | None = None
    transforms_updates: bool = False
    releases_empty_rounds: bool = False

    def bind(self, model: nn.Module, spec: Any) -> None:
        """Learn the parameter layout (``spec``: names and shapes of the flat vector); no-op."""

    def init(self, params: torch.Tensor) -> State:
        """Initial server state for global parameters ``params`` (d,)."""
        raise NotImplementedError

    def broadcast(self, params: torch.Tensor, state: State) -> dict[str, torch.Tensor]:
        """Vectors sent to the clients with the parameters this round (default: none)."""
        return {}

    def pre_aggregate(
        self, U: torch.Tensor, weights: torch.Tensor, state: State, round_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Transform the round's updates (n, d) and weights before the aggregator (identity)."""
        return U, weights, state

    def update(
        self,
        params: torch.Tensor,
        aggregate: torch.Tensor,
        state: State,
        round_idx: int,
        extras: RoundExtras | None = None,
    ) -> tuple[torch.Tensor, State]:
        """New global parameters from the aggregated client update (mean of x_i - x)."""
        raise NotImplementedError

    def epsilon(self, state: State) -> float | None:
        """Client-level epsilon spent so far; None for a strategy that releases nothing private."""
        return None

    def epsilon_after(self, state: State) -> float | None:
        """Client-level epsilon after one more round (the budget stop); None if not private."""
        return None

    def mechanism(self, state: State) -> dict[str, Any] | None:
        """What a private strategy released and how it is accounted (summary.json); None."""
        return None

    def state_dict(self, state: State) -> dict[str, Any]:
        """``state`` as a nested dict of tensors and numbers (for checkpoints)."""
        return state

    def load_state(self, d: dict[str, Any]) -> State:
        """The state that ``state_dict`` wrote (inverse of ``state_dict``)."""
        return d

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
