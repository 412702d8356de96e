"""FedSAM (Qu, Li, Duan, Liu, Tang, Lu; ICML 2022; also Caldarola, Caputo, Ciccone; ECCV 2022).

Each local step is a sharpness-aware (SAM, Foret et al. 2021) step: ascend by exactly rho along the
normalized gradient, take the gradient there, apply it at the original weights. Server: FedAvg.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flagstaff.clients.rules import Context, GradFn, LocalRule
from flagstaff.strategies.optim import Composed, Transform, server_optimizer

__all__ = ["FedSAM", "SAM", "sam_perturbation"]


def sam_perturbation(g: Tensor, rho: float) -> Tensor:
    """The SAM ascent step ``rho * g / ||g||`` per row (norm exactly rho unless g = 0)."""
    norm = g.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, g * (rho / norm.clamp_min(1e-30)), torch.zeros_like(g))


class SAM(LocalRule):
    """FedSAM (Qu et al. 2022): each local step is a SAM step (Foret et al. 2021).

    g1 = grad f(x); e = rho g1/||g1|| (norm exactly rho, per client); direction = grad f(x + e) on
    the same batch. The weights stay x (the perturbation is only where the gradient is taken).
    """

    name = "fedsam"
    grads_per_step = 2

    def __init__(self, rho: float) -> None:
        if rho < 0:
            raise ValueError(f"strategy.rho must be >= 0, got {rho}")
        self.rho = float(rho)

    def direction(self, grad_fn: GradFn, X: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        g1, loss = grad_fn(X)
        g2, _ = grad_fn(X + sam_perturbation(g1, self.rho))
        return g2, loss


class FedSAM(Composed):
    """FedAvg's server step (or ``server_opt``) with the SAM local rule (radius ``rho``)."""

    name = "fedsam"

    def __init__(
        self,
        rho: float = 0.1,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_opt: Transform | None = None,
    ) -> None:
        opt = server_optimizer(server_lr, server_momentum, server_opt)
        super().__init__(opt, client_rule=SAM(rho))
