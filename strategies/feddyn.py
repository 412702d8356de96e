"""FedDyn (Acar, Zhao, Matas, Mattina, Whatmough, Saligrama; ICLR 2021).

Clients minimize f_i(x) - <grad_i, x> + (alpha/2)||x - x_t||^2 and update
grad_i <- grad_i - alpha (x_i - x_t) (per-client state on the host). Server state h:
h <- h - alpha (1/N) sum_{i in S} (x_i - x_t);  x <- mean_S(x_i) - h / alpha.
The h update is computed from the clients' delta grad_i: h += (|S|/N) aggregate(delta grad_i),
with the run's aggregator (Byzantine clients send attacked delta grad_i; issue 18, item 3). With the
mean aggregator that is the plain sum over S divided by N, so h = mean over all N clients of
grad_i holds exactly (tested); the mean_S(x_i) - x_t term is the aggregator's output. The method's
fixed-point argument assumes both are means: with a robust aggregator FedDyn is a heuristic.
The server half is the chain ``DynamicRegularizer(alpha)`` (h, and - h / alpha on the new
parameters) then the server optimizer (``sgd(1.0)``, or ``strategy/server_opt=...``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from flagstaff.clients.rules import Context, Finish, GradFn, LocalRule
from flagstaff.strategies.base import add_mean_over_all
from flagstaff.strategies.optim import Composed, Round, Transform, server_optimizer

__all__ = ["DynamicRegularizer", "DynamicRegularizerState", "FedDyn", "FedDynRule"]


class FedDynRule(LocalRule):
    """FedDyn (Acar et al. 2021), client side.

    Local objective f_i(x) - <grad_i, x> + (alpha/2)||x - x_t||^2, so direction
    g - grad_i + alpha (x - x_t); afterwards grad_i <- grad_i - alpha (x_K - x_t).
    The client sends x_K - x_t and delta grad_i (the server keeps h, see ``strategies.feddyn``).
    """

    name = "feddyn"
    client_state = ("grad_i",)

    def __init__(self, alpha: float) -> None:
        if alpha <= 0:
            raise ValueError(f"strategy.alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)

    def direction(self, grad_fn: GradFn, X: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        g, loss = grad_fn(X)
        return g - ctx.state["grad_i"] + self.alpha * (X - ctx.x0), loss

    def finish(self, X: Tensor, ctx: Context, steps: Tensor, lr: float) -> Finish:
        delta = X - ctx.x0
        step = -self.alpha * delta
        return Finish(delta, {"grad_i": ctx.state["grad_i"] + step}, {"delta_grad": step})


class DynamicRegularizerState(NamedTuple):
    h: Tensor  # (d,) the server's h = mean over all N clients of grad_i (with the mean)


class DynamicRegularizer(Transform):
    """FedDyn's server correction: h <- h + (|S|/N) aggregate(delta grad_i) in ``update`` (the step
    passes unchanged), then x <- (x_t + step) - h / alpha on the new parameters."""

    name = "feddyn"
    State = DynamicRegularizerState

    def __init__(self, alpha: float = 0.01) -> None:
        if not alpha > 0:
            raise ValueError(f"strategy.alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)

    def init(self, params: Tensor) -> DynamicRegularizerState:
        return DynamicRegularizerState(torch.zeros_like(params))

    def update(
        self, step: Tensor, state: DynamicRegularizerState, rnd: Round
    ) -> tuple[Tensor, DynamicRegularizerState]:
        return step, DynamicRegularizerState(add_mean_over_all(state.h, rnd.extras, "delta_grad"))

    def post_apply(self, params: Tensor, state: DynamicRegularizerState, rnd: Round) -> Tensor:
        return params - state.h / self.alpha


class FedDyn(Composed):
    """FedDyn with regularization ``alpha`` (the paper's alpha; 0.01-0.1 typical):
    ``chain(DynamicRegularizer(alpha), sgd(1.0))``, or another server optimizer ``server_opt``."""

    name = "feddyn"

    def __init__(self, alpha: float = 0.01, server_opt: Transform | None = None) -> None:
        opt = server_optimizer(1.0, 0.0, server_opt)
        rule = FedDynRule(alpha)
        super().__init__(DynamicRegularizer(alpha), opt, client_rule=rule)
