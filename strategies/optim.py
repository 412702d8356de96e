"""Server rules as chains of small transforms with typed state (optax's ``GradientTransformation``
and ``chain``/``named_chain``; STYLE.md point 2; issue 20, item 5).

A server round turns the aggregated client update Delta (the aggregator's output over x_i - x_t;
Reddi et al. 2021 call it the pseudo-gradient) into the next global parameters::

    step = Delta
    for t in transforms: step, s_t = t.update(step, s_t, rnd)   # optimizers, corrections of the step
    x = x_t + step
    for t in transforms: x = t.post_apply(x, s_t, rnd)           # corrections of x (FedDyn, FedSVD)

Each transform is an ``init``/``update`` pair whose state is a NamedTuple (``State``), plus optional
``post_apply`` (on the new parameters), ``broadcast`` (server vectors sent to the clients) and
``bind`` (the parameter layout). :class:`Composed` is the strategy that runs a chain; the named
strategies (FedAvg, FedAdam, SCAFFOLD, FedDyn, FedSpeed, FedSVD, ...) are chains of a correction and
a server optimizer, so any correction takes any optimizer (``strategy=scaffold
strategy/server_opt=adam``) and client-level DP wraps any of them (``strategies.dp``).

Server optimizers here: ``sgd(lr)`` (x + lr step), ``momentum(beta)`` (v <- beta v + step; FedAvgM
is ``chain(momentum(beta), sgd(lr))``, Hsu et al. 2019), ``adam(lr, b1, b2, tau)`` (FedAdam,
Reddi et al. 2021, Algorithm 2, no bias correction).

>>> import torch
>>> fedavgm = Composed(momentum(0.9), sgd(0.5))
>>> x = torch.zeros(2)
>>> s = fedavgm.init(x)
>>> x, s = fedavgm.update(x, torch.tensor([1.0, 0.0]), s, 0)
>>> x, s = fedavgm.update(x, torch.tensor([0.0, 1.0]), s, 1)
>>> x.tolist(), s["momentum"].velocity.tolist()
([0.949999988079071, 0.5], [0.8999999761581421, 1.0])
>>> sorted(fedavgm.state_dict(s))
['momentum', 'sgd']
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from flagstaff.strategies.base import RoundExtras, Strategy

if TYPE_CHECKING:
    from torch import nn

    from flagstaff.clients.rules import LocalRule

__all__ = [
    "AdamState",
    "Chain",
    "Composed",
    "Empty",
    "MomentumState",
    "Round",
    "Transform",
    "adam",
    "chain",
    "momentum",
    "server_optimizer",
    "sgd",
]


class Round(NamedTuple):
    """What a transform may read besides the step: the round's starting point and extras."""

    params: Tensor  # x_t, the global parameters the clients started from
    round_idx: int
    extras: RoundExtras | None = None  # per-client extra vectors (SCAFFOLD's delta c_i, ...)


class Empty(NamedTuple):
    """The state of a stateless transform."""


class Transform:
    """One stage of a server rule: ``init``/``update`` with a typed ``State`` (a NamedTuple).

    Defaults: no state, the step unchanged, the parameters unchanged after the step, nothing
    broadcast, no layout needed. ``state_dict``/``load_state`` turn the state into a dict of
    tensors and numbers (checkpoints) and back."""

    name: str = "transform"
    State: type = Empty

    def bind(self, model: nn.Module, spec: Any) -> None:
        """Learn the parameter layout (``spec``: names and shapes of the flat vector); no-op."""

    def init(self, params: Tensor) -> Any:
        """Initial state for global parameters ``params`` (d,)."""
        return Empty()

    def update(self, step: Tensor, state: Any, rnd: Round) -> tuple[Tensor, Any]:
        """Transform the step (d,) that will be added to x_t; return it and the new state."""
        return step, state

    def post_apply(self, params: Tensor, state: Any, rnd: Round) -> Tensor:
        """Correct the new parameters x_t + step (after every transform's ``update``)."""
        return params

    def broadcast(self, state: Any) -> dict[str, Tensor]:
        """Server vectors sent to the clients with the parameters (e.g. SCAFFOLD's c)."""
        return {}

    def state_dict(self, state: Any) -> dict[str, Any]:
        return dict(state._asdict())

    def load_state(self, d: dict[str, Any]) -> Any:
        missing = [f for f in self.State._fields if f not in d]
        if missing:
            raise ValueError(
                f"the checkpoint's strategy state has no {missing} for server transform "
                f"{self.name!r}: it was written with another strategy (or by an older version); "
                "resume with the config the checkpoint was written with"
            )
        return self.State(**{f: d[f] for f in self.State._fields})

    def named(self, name: str) -> Transform:
        """A copy of this transform under another name (two of a kind in one chain)."""
        out = copy.copy(self)
        out.name = name
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k[0] != "_" and k != "name")
        return f"{self.name}({args})"


class Chain(Transform):
    """Transforms applied in order (optax's ``named_chain``): the state is a dict keyed by the
    transforms' names, so a checkpoint names its parts. Nested chains are flattened."""

    name = "chain"

    def __init__(self, *transforms: Transform) -> None:
        flat: list[Transform] = []
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"chain: {t!r} is not a server transform (strategies.optim)")
            flat.extend(t.transforms if isinstance(t, Chain) else [t])
        names = [t.name for t in flat]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"chain: transform names {names} repeat {dup}; rename one with .named('...')"
            )
        self.transforms = tuple(flat)

    def bind(self, model: nn.Module, spec: Any) -> None:
        for t in self.transforms:
            t.bind(model, spec)

    def init(self, params: Tensor) -> dict[str, Any]:
        return {t.name: t.init(params) for t in self.transforms}

    def update(
        self, step: Tensor, state: dict[str, Any], rnd: Round
    ) -> tuple[Tensor, dict[str, Any]]:
        new = dict(state)
        for t in self.transforms:
            step, new[t.name] = t.update(step, state[t.name], rnd)
        return step, new

    def post_apply(self, params: Tensor, state: dict[str, Any], rnd: Round) -> Tensor:
        for t in self.transforms:
            params = t.post_apply(params, state[t.name], rnd)
        return params

    def broadcast(self, state: dict[str, Any]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for t in self.transforms:
            out.update(t.broadcast(state[t.name]))
        return out

    def state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        return {t.name: t.state_dict(state[t.name]) for t in self.transforms}

    def load_state(self, d: dict[str, Any]) -> dict[str, Any]:
        names = {t.name for t in self.transforms}
        # a checkpoint of the earlier flat format ({"c": ...}, {"m": ..., "v": ...}) holds the
        # same field names without the part names: each transform picks its own fields
        parts = d if set(d) <= names else {n: d for n in names}
        return {t.name: t.load_state(parts.get(t.name, {})) for t in self.transforms}

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.transforms))})"


def chain(*transforms: Transform) -> Chain:
    """The transforms applied one after the other (see :class:`Chain`)."""
    return Chain(*transforms)


# -- server optimizers ------------------------------------------------------------------------------
class Sgd(Transform):
    """x <- x + lr * step (Reddi et al. 2021: FedAvg's server step with server learning rate)."""

    name = "sgd"

    def __init__(self, lr: float = 1.0) -> None:
        if not lr > 0:
            raise ValueError(f"server_opt.lr must be > 0, got {lr}")
        self.lr = float(lr)

    def update(self, step: Tensor, state: Empty, rnd: Round) -> tuple[Tensor, Empty]:
        return self.lr * step, state


class MomentumState(NamedTuple):
    velocity: Tensor


class Momentum(Transform):
    """v <- beta v + step, step <- v (heavy-ball server momentum; FedAvgM, Hsu et al. 2019)."""

    name = "momentum"
    State = MomentumState

    def __init__(self, beta: float = 0.9) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"server_opt.momentum must be in [0, 1), got {beta}")
        self.beta = float(beta)

    def init(self, params: Tensor) -> MomentumState:
        return MomentumState(torch.zeros_like(params))

    def update(self, step: Tensor, state: MomentumState, rnd: Round) -> tuple[Tensor, Any]:
        v = self.beta * state.velocity + step
        return v, MomentumState(v)


class AdamState(NamedTuple):
    m: Tensor
    v: Tensor


class Adam(Transform):
    """Server Adam (FedAdam; Reddi et al. 2021, Algorithm 2, no bias correction):
    m <- b1 m + (1 - b1) step; v <- b2 v + (1 - b2) step^2; step <- lr m / (sqrt(v) + tau),
    v starting at tau^2 (the algorithm asks v_{-1} >= tau^2). ``tau`` sets the adaptivity."""

    name = "adam"
    State = AdamState

    def __init__(
        self, lr: float = 0.01, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if not (lr > 0 and 0 <= b1 < 1 and 0 <= b2 < 1 and tau > 0):
            raise ValueError(
                f"server Adam needs lr > 0, b1, b2 in [0, 1) and tau > 0; got lr={lr}, "
                f"b1={b1}, b2={b2}, tau={tau}"
            )
        self.lr, self.b1, self.b2, self.tau = float(lr), float(b1), float(b2), float(tau)

    def init(self, params: Tensor) -> AdamState:
        return AdamState(torch.zeros_like(params), torch.full_like(params, self.tau**2))

    def update(self, step: Tensor, state: AdamState, rnd: Round) -> tuple[Tensor, AdamState]:
        m = self.b1 * state.m + (1 - self.b1) * step
        v = self.b2 * state.v + (1 - self.b2) * step.square()
        return self.lr * m / (v.sqrt() + self.tau), AdamState(m, v)


def sgd(lr: float = 1.0, momentum: float = 0.0) -> Transform:
    """x <- x + lr * step; with ``momentum`` > 0, ``chain(momentum(momentum), sgd(lr))`` (optax's
    ``sgd``: heavy-ball momentum, then the learning rate)."""
    if momentum:
        return chain(Momentum(momentum), Sgd(lr))
    return Sgd(lr)


def momentum(beta: float = 0.9) -> Momentum:
    """Heavy-ball momentum on the step (chain it before ``sgd(lr)``)."""
    return Momentum(beta)


def adam(lr: float = 0.01, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> Adam:
    """Server Adam with learning rate ``lr`` (FedAdam)."""
    return Adam(lr, b1, b2, tau)


def server_optimizer(
    server_lr: float = 1.0, server_momentum: float = 0.0, server_opt: Transform | None = None
) -> Transform:
    """A strategy's server optimizer: ``server_opt`` when given (``strategy/server_opt=adam``),
    else ``sgd(server_lr)``, with ``momentum(server_momentum)`` before it when that is > 0."""
    if server_opt is not None:
        if server_lr != 1.0 or server_momentum != 0.0:
            raise ValueError(
                f"strategy.server_opt={server_opt!r} is the server step: leave strategy.server_lr "
                f"(got {server_lr}) and strategy.server_momentum (got {server_momentum}) at 1.0 "
                "and 0.0 and set the optimizer's own settings (e.g. strategy.server_opt.lr)"
            )
        if not isinstance(server_opt, Transform):
            raise TypeError(
                f"strategy.server_opt must be a server transform (strategies.optim: sgd, momentum, "
                f"adam, chain), got {server_opt!r}"
            )
        return server_opt
    if not server_lr > 0:
        raise ValueError(f"strategy.server_lr must be > 0, got {server_lr}")
    if not 0 <= server_momentum < 1:
        raise ValueError(f"strategy.server_momentum must be in [0, 1), got {server_momentum}")
    return sgd(server_lr, server_momentum)


# -- the strategy that runs a chain -----------------------------------------------------------------
class Composed(Strategy):
    """A strategy whose server rule is ``chain(*transforms)`` and whose clients run
    ``client_rule``: x <- post_apply(x + update(aggregate)). Its state is the chain's (a dict of
    typed parts keyed by the transforms' names); ``state_dict`` is the nested dict of tensors."""

    def __init__(
        self, *transforms: Transform, client_rule: LocalRule | None = None, name: str = ""
    ) -> None:
        self.transform = chain(*transforms)
        self.client_rule = client_rule
        if name:
            self.name = name

    def bind(self, model: nn.Module, spec: Any) -> None:
        self.transform.bind(model, spec)

    def init(self, params: Tensor) -> dict[str, Any]:
        return self.transform.init(params)

    def broadcast(self, params: Tensor, state: dict[str, Any]) -> dict[str, Tensor]:
        return self.transform.broadcast(state)

    def update(
        self,
        params: Tensor,
        aggregate: Tensor,
        state: dict[str, Any],
        round_idx: int,
        extras: RoundExtras | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        rnd = Round(params, round_idx, extras)
        step, state = self.transform.update(aggregate, state, rnd)
        return self.transform.post_apply(params + step, state, rnd), state

    def state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.transform.state_dict(state)

    def load_state(self, d: dict[str, Any]) -> dict[str, Any]:
        return self.transform.load_state(d)

    def __repr__(self) -> str:
        rule = f", client_rule={self.client_rule!r}" if self.client_rule is not None else ""
        return f"{type(self).__name__}({self.transform!r}{rule})"
