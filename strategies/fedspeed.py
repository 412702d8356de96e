"""FedSpeed (Sun, Li, Wang, Shen, Tao; ICLR 2023), in the paper's algebra (specs/federated.md).

Clients take quasi-gradient steps (extra SAM-like ascent, mixing weight ``alpha``) with a
prox-correction towards x_t weighted by ``lamb`` = 1/lambda and corrected by a per-client ghat_i
(kept on the host, checkpointed): see :class:`FedSpeedRule` below.

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
from torch import Tensor

from clients.rules import Context, Finish, GradFn, LocalRule
from strategies.base import RoundExtras, State, add_mean_over_all
from strategies.fedavg import FedAvg
from strategies.fedsam import sam_perturbation

__all__ = ["FedSpeed", "FedSpeedRule"]


class FedSpeedRule(LocalRule):
    """FedSpeed (Sun et al. 2023), client side, in the paper's algebra (specs/federated.md).

    g1 = grad f(x); g2 = grad f(x + rho g1/||g1||); quasi-gradient g = (1 - alpha) g1 + alpha g2;
    direction g - ghat_i + lamb (x - x_t) with lamb = 1/lambda (the reference's name).
    After K steps: ghat_i <- ghat_i - lamb (x_K - x_t).
    ``average="sampled"``: the client sends x_K - lambda ghat_i (as the update x_K - lambda ghat_i - x_t)
    and the server averages over the sampled clients. ``average="all"``: the client sends x_K - x_t
    and delta ghat_i; the server subtracts lambda times the mean of ghat_i over all clients.
    """

    name = "fedspeed"
    client_state = ("ghat_i",)
    grads_per_step = 2

    def __init__(self, rho: float, alpha: float, lamb: float, average: str = "sampled") -> None:
        if rho < 0 or not 0 <= alpha <= 1 or lamb <= 0:
            raise ValueError(
                f"FedSpeed needs rho >= 0, alpha in [0, 1], lamb > 0; got rho={rho}, "
                f"alpha={alpha}, lamb={lamb}"
            )
        if average not in ("sampled", "all"):
            raise ValueError(f"strategy.average must be sampled or all, got {average!r}")
        self.rho, self.alpha, self.lamb, self.average = (
            float(rho),
            float(alpha),
            float(lamb),
            average,
        )
        self.grads_per_step = 2 if alpha > 0 and rho > 0 else 1

    def quasi_gradient(self, grad_fn: GradFn, X: Tensor) -> tuple[Tensor, Tensor]:
        g1, loss = grad_fn(X)
        if self.alpha == 0 or self.rho == 0:
            return g1, loss
        g2, _ = grad_fn(X + sam_perturbation(g1, self.rho))
        if self.alpha == 1:
            return g2, loss
        return (1 - self.alpha) * g1 + self.alpha * g2, loss

    def direction(self, grad_fn: GradFn, X: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        g, loss = self.quasi_gradient(grad_fn, X)
        return g - ctx.state["ghat_i"] + self.lamb * (X - ctx.x0), loss

    def finish(self, X: Tensor, ctx: Context, steps: Tensor, lr: float) -> Finish:
        delta = X - ctx.x0
        old = ctx.state["ghat_i"]
        new = old - self.lamb * delta
        if self.average == "sampled":
            return Finish(delta - new / self.lamb, {"ghat_i": new})
        return Finish(delta, {"ghat_i": new}, {"delta_ghat": new - old})


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
