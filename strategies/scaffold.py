"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh; ICML 2020), option II.

Server state: the control variate c (d,), sent to the clients each round. Clients keep c_i (on their
host), correct each local gradient by c - c_i, and send y_i - x_t and delta c_i. Server:
x <- x + eta_g * aggregate(y_i - x_t);  c <- c + (|S|/N) aggregate(delta c_i).
The server half is the chain ``ControlVariate()`` (c) then the server optimizer (``sgd(eta_g)``, or
any other: ``strategy/server_opt=adam``; c does not depend on it).
With the mean aggregator the second step is the plain sum_S delta c_i / N, which keeps c equal to
the mean of all N clients' c_i (tested). With a robust aggregator the delta c_i rows go through the
same rule (``RoundExtras.mean_over_all``), because Byzantine clients send attacked delta c_i too
(issue 18, item 3): c then tracks a robust estimate and no longer equals mean(c_i) exactly, the
price of not letting f clients steer the drift correction.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from flagstaff.clients.rules import Context, Finish, GradFn, LocalRule
from flagstaff.strategies.base import add_mean_over_all
from flagstaff.strategies.optim import Composed, Round, Transform, server_optimizer

__all__ = ["SCAFFOLD", "ControlVariate", "ControlVariateState", "Scaffold"]


class Scaffold(LocalRule):
    """SCAFFOLD (Karimireddy et al. 2020), option II control variates.

    Direction g - c_i + c; after K_i steps with step size eta:
    c_i+ = c_i - c + (x_t - y_i) / (K_i eta); the client sends y_i - x_t and delta c_i = c_i+ - c_i.
    """

    name = "scaffold"
    client_state = ("c_i",)

    def direction(self, grad_fn: GradFn, X: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        g, loss = grad_fn(X)
        return g - ctx.state["c_i"] + ctx.broadcast["c"], loss

    def finish(self, X: Tensor, ctx: Context, steps: Tensor, lr: float) -> Finish:
        c_i, c = ctx.state["c_i"], ctx.broadcast["c"]
        k_eta = (steps.to(X.dtype) * lr).clamp_min(1e-30)[:, None]
        new = c_i - c + (ctx.x0 - X) / k_eta
        return Finish(X - ctx.x0, {"c_i": new}, {"delta_c": new - c_i})


class ControlVariateState(NamedTuple):
    c: Tensor  # (d,) the server control variate, the mean of the clients' c_i (with the mean)


class ControlVariate(Transform):
    """SCAFFOLD's server correction: c <- c + (|S|/N) aggregate(delta c_i), sent to the clients
    each round; the step passes unchanged, so any server optimizer follows it."""

    name = "scaffold"
    State = ControlVariateState

    def init(self, params: Tensor) -> ControlVariateState:
        return ControlVariateState(torch.zeros_like(params))

    def update(
        self, step: Tensor, state: ControlVariateState, rnd: Round
    ) -> tuple[Tensor, ControlVariateState]:
        return step, ControlVariateState(add_mean_over_all(state.c, rnd.extras, "delta_c"))

    def broadcast(self, state: ControlVariateState) -> dict[str, Tensor]:
        return {"c": state.c}


class SCAFFOLD(Composed):
    """SCAFFOLD with global step size ``server_lr`` (eta_g): ``chain(ControlVariate(),
    sgd(server_lr))``, or another server optimizer ``server_opt`` after the correction."""

    name = "scaffold"

    def __init__(self, server_lr: float = 1.0, server_opt: Transform | None = None) -> None:
        opt = server_optimizer(server_lr, 0.0, server_opt)
        super().__init__(ControlVariate(), opt, client_rule=Scaffold())
