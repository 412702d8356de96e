"""FedDyn (Acar, Zhao, Matas, Mattina, Whatmough, Saligrama; ICLR 2021).

Clients minimize f_i(x) - <grad_i, x> + (alpha/2)||x - x_t||^2 and update
grad_i <- grad_i - alpha (x_i - x_t) (per-client state on the host). Server state h:
h <- h - alpha (1/N) sum_{i in S} (x_i - x_t);  x <- mean_S(x_i) - h / alpha.
The h update is computed from the clients' delta grad_i: h += (|S|/N) aggregate(delta grad_i),
with the run's aggregator (Byzantine clients send attacked delta grad_i; issue 18, item 3). With the
mean aggregator that is the plain sum over S divided by N, so h = mean over all N clients of
grad_i holds exactly (tested); the mean_S(x_i) - x_t term is the aggregator's output. The method's
fixed-point argument assumes both are means: with a robust aggregator FedDyn is a heuristic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clients.rules import Context, Finish, GradFn, LocalRule
from strategies.base import RoundExtras, State, add_mean_over_all
from strategies.fedavg import FedAvg

__all__ = ["FedDyn", "FedDynRule"]


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


class FedDyn(FedAvg):
    """FedDyn with regularization ``alpha`` (the paper's alpha; 0.01-0.1 typical)."""

    name = "feddyn"

    def __init__(self, alpha: float = 0.01) -> None:
        super().__init__(1.0, 0.0)
        self.alpha = float(alpha)
        self.client_rule = FedDynRule(alpha)

    def init(self, params: torch.Tensor) -> State:
        return {"h": torch.zeros_like(params)}

    def update(
        self,
        params: torch.Tensor,
        aggregate: torch.Tensor,
        state: State,
        round_idx: int,
        extras: RoundExtras | None = None,
    ) -> tuple[torch.Tensor, State]:
        h = state["h"]
        h = add_mean_over_all(h, extras, "delta_grad")
        return params + aggregate - h / self.alpha, {**state, "h": h}
