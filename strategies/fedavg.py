"""FedAvg with a server learning rate and server momentum (FedAvgM).

References: McMahan et al. 2017 (FedAvg); Hsu, Qi, Brown 2019 (FedAvgM, server momentum);
Reddi et al. 2021 (server learning rate as a server optimizer step on the pseudo-gradient).
"""

from __future__ import annotations

import torch

from clients.rules import LocalRule
from strategies.base import RoundExtras, State, Strategy

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """x <- x + lr * v,  v <- momentum * v + Delta, with Delta the aggregated update.

    With ``server_lr=1`` and ``server_momentum=0`` this is plain FedAvg: the next model is the
    (sample-weighted, by the aggregator) average of the client models. Base class of the strategies
    whose server rule is an average plus a server step (FedProx, FedSAM, FedSpeed).
    """

    name = "fedavg"
    client_rule: LocalRule | None = None

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        if server_lr <= 0:
            raise ValueError(f"strategy.server_lr must be > 0, got {server_lr}")
        if not 0 <= server_momentum < 1:
            raise ValueError(f"strategy.server_momentum must be in [0, 1), got {server_momentum}")
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)

    def init(self, params: torch.Tensor) -> State:
        return {"velocity": torch.zeros_like(params)} if self.server_momentum else {}

    def server_step(self, params: torch.Tensor, step: torch.Tensor, state: State) -> tuple:
        """x + lr * (momentum-filtered) step; returns (params, state)."""
        if self.server_momentum:
            step = self.server_momentum * state["velocity"] + step
            state = {**state, "velocity": step}
        return params + self.server_lr * step, state

    def update(
        self,
        params: torch.Tensor,
        aggregate: torch.Tensor,
        state: State,
        round_idx: int,
        extras: RoundExtras | None = None,
    ) -> tuple[torch.Tensor, State]:
        return self.server_step(params, aggregate, state)
