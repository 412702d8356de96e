"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh; ICML 2020), option II.

Server state: the control variate c (d,), sent to the clients each round. Clients keep c_i (on their
host), correct each local gradient by c - c_i, and send y_i - x_t and delta c_i. Server:
x <- x + eta_g * aggregate(y_i - x_t);  c <- c + (|S|/N) aggregate(delta c_i).
With the mean aggregator the second step is the plain sum_S delta c_i / N, which keeps c equal to
the mean of all N clients' c_i (tested). With a robust aggregator the delta c_i rows go through the
same rule (``RoundExtras.mean_over_all``), because Byzantine clients send attacked delta c_i too
(issue 18, item 3): c then tracks a robust estimate and no longer equals mean(c_i) exactly, the
price of not letting f clients steer the drift correction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clients.rules import Context, Finish, GradFn, LocalRule
from strategies.base import RoundExtras, State, add_mean_over_all
from strategies.fedavg import FedAvg

__all__ = ["SCAFFOLD", "Scaffold"]


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


class SCAFFOLD(FedAvg):
    """SCAFFOLD with global step size ``server_lr`` (eta_g)."""

    name = "scaffold"

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__(server_lr, 0.0)
        self.client_rule = Scaffold()

    def init(self, params: torch.Tensor) -> State:
        return {"c": torch.zeros_like(params)}

    def broadcast(self, params: torch.Tensor, state: State) -> dict[str, torch.Tensor]:
        return {"c": state["c"]}

    def update(
        self,
        params: torch.Tensor,
        aggregate: torch.Tensor,
        state: State,
        round_idx: int,
        extras: RoundExtras | None = None,
    ) -> tuple[torch.Tensor, State]:
        c = state["c"]
        c = add_mean_over_all(c, extras, "delta_c")
        return params + self.server_lr * aggregate, {**state, "c": c}
