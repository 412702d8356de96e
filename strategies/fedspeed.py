"""FedSpeed (Sun, Li, Wang, Shen, Tao; ICLR 2023), in the paper's algebra (specs/federated.md).

Clients take quasi-gradient steps (extra SAM-like ascent, mixing weight ``alpha``) with a
prox-correction towards x_t weighted by ``lamb`` = 1/lambda and corrected by a per-client ghat_i
(kept on the host, checkpointed): see :class:`clients.rules.FedSpeedRule`.

Averaging set (``average``):
* ``"sampled"`` (the paper's form): client i sends x_K - lambda ghat_i; the server averages what
  the sampled clients sent: x_{t+1} = mean_S(x_K,i - lambda ghat_i).
* ``"all"`` (default; the reference code, woodenchild95/FL-Simulator): the correction is averaged over all N
  clients, including those not sampled: x_{t+1} = mean_S(x_K,i) - lambda mean_{i<N}(ghat_i); the server
  keeps G = mean_{i<N} ghat_i, updated by (|S|/N) aggregate(delta ghat_i): the plain
  sum_S(delta ghat_i)/N with the mean aggregator, the run's robust rule otherwise (Byzantine
  clients send attacked delta ghat_i; issue 18, item 3).
The default is ``"all"``: with 10% participation the sampled form doubles a client's update on its
first visit (x_K - lambda ghat_i = x_t + 2 (x_K - x_t) when ghat_i was 0) and averages stale
corrections of the few sampled clients; on the heterogeneity benchmark it trailed FedAvg while
``"all"`` beat it (docs/heterogeneity.md).
"""

from __future__ import annotations

import torch

from clients.rules import FedSpeedRule
from strategies.base import RoundExtras, State, add_mean_over_all
from strategies.fedavg import FedAvg

__all__ = ["FedSpeed"]


class FedSpeed(FedAvg):
    """FedSpeed; reference defaults rho 0.1, alpha 1, lamb 0.1 (lambda = 10)."""

    name = "fedspeed"

    def __init__(
        self,
        rho: float = 0.1,
        alpha: float = 1.0,
        lamb: float = 0.1,
        average: str = "all",
        server_lr: float = 1.0,
    ) -> None:
        super().__init__(server_lr, 0.0)
        self.client_rule = FedSpeedRule(rho, alpha, lamb, average)
        self.average = average
        self.lamb = float(lamb)

    def init(self, params: torch.Tensor) -> State:
        return {"ghat_mean": torch.zeros_like(params)} if self.average == "all" else {}

    def update(
        self,
        params: torch.Tensor,
        aggregate: torch.Tensor,
        state: State,
        round_idx: int,
        extras: RoundExtras | None = None,
    ) -> tuple[torch.Tensor, State]:
        if self.average == "sampled":
            return params + self.server_lr * aggregate, state
        G = state["ghat_mean"]
        G = add_mean_over_all(G, extras, "delta_ghat")
        # x_{t+1} = x_t + mean_S(x_K - x_t) - lambda G
        return params + self.server_lr * (aggregate - G / self.lamb), {**state, "ghat_mean": G}
