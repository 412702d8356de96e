"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith; MLSys 2020).

Clients minimize f_i(x) + (mu/2)||x - x_t||^2 (proximal term towards the broadcast model); the server
averages like FedAvg. ``mu = 0`` is FedAvg exactly.
"""

from __future__ import annotations

from torch import Tensor

from flagstaff.clients.rules import Context, GradFn, LocalRule
from flagstaff.strategies.optim import Composed, Transform, server_optimizer

__all__ = ["FedProx", "Prox"]


class Prox(LocalRule):
    """FedProx (Li et al. 2020): minimize f_i(x) + (mu/2)||x - x_t||^2, i.e. add mu (x - x_t)."""

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        if mu < 0:
            raise ValueError(f"strategy.mu must be >= 0, got {mu}")
        self.mu = float(mu)

    def direction(self, grad_fn: GradFn, X: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        g, loss = grad_fn(X)
        if self.mu:
            g = g + self.mu * (X - ctx.x0)
        return g, loss


class FedProx(Composed):
    """FedAvg's server step (or ``server_opt``) with the proximal local rule ``g + mu (x - x_t)``."""

    name = "fedprox"

    def __init__(
        self,
        mu: float = 0.01,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_opt: Transform | None = None,
    ) -> None:
        opt = server_optimizer(server_lr, server_momentum, server_opt)
        super().__init__(opt, client_rule=Prox(mu))
