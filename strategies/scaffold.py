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

from clients.rules import Scaffold
from strategies.base import RoundExtras, State, add_mean_over_all
from strategies.fedavg import FedAvg

__all__ = ["SCAFFOLD"]


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
