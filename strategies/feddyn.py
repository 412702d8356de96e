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

from clients.rules import FedDynRule
from strategies.base import RoundExtras, State, add_mean_over_all
from strategies.fedavg import FedAvg

__all__ = ["FedDyn"]


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
