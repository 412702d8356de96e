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

from typing import NamedTuple

import torch
from torch import Tensor

from flagstaff.clients.rules import Context, Finish, GradFn, LocalRule
from flagstaff.strategies.base import add_mean_over_all
from flagstaff.strategies.fedsam import sam_perturbation
from flagstaff.strategies.optim import Composed, Round, Transform, server_optimizer

__all__ = ["CorrectionMean", "CorrectionMeanState", "FedSpeed", "FedSpeedRule"]


class FedSpeedRule(LocalRule):
    """FedSpeed (Sun et al. 2023), client side, in the paper's algebra (specs/federated.md).

    g1 = grad f(x); g2 = grad f(x + rho g1/||g1||); quasi-gradient g = (1 - alpha) g1 + alpha g2;
    direction g - ghat_i + lamb (x - x_t) with lamb = 1/lambda (the reference's name).
    After K steps: ghat_i <- ghat_i - lamb (x_K - x_t).
    ``average="sampled"``: the client sends x_K - lambda ghat_i (as the update x_K - lambda ghat_i - x_t)
    and the server averages over the sampled clients. ``average="all"``: the client sends x_K - x_t
    and delta ghat_i; the server subtracts lambda times the mean of ghat_i over all clients.
    ``prox="decay"`` (FL-Simulator's client, client/fedspeed.py): the direction is
    g - ghat_i - lamb x_t and the prox's lamb x is a weight decay the trainer adds after the
    gradient clip with the client's own: clip(g - ghat_i - lamb x_t) + (wd + lamb) x. Without an
    active clip it is the same step as the default ``"direction"``.
    """

    name = "fedspeed"
    client_state = ("ghat_i",)
    grads_per_step = 2

    def __init__(
        self,
        rho: float,
        alpha: float,
        lamb: float,
        average: str = "sampled",
        prox: str = "direction",
    ) -> None:
        if rho < 0 or not 0 <= alpha <= 1 or lamb <= 0:
            raise ValueError(
                f"FedSpeed needs rho >= 0, alpha in [0, 1], lamb > 0; got rho={rho}, "
                f"alpha={alpha}, lamb={lamb}"
            )
        if average not in ("sampled", "all"):
            raise ValueError(f"strategy.average must be sampled or all, got {average!r}")
        if prox not in ("direction", "decay"):
            raise ValueError(f"strategy.prox must be direction or decay, got {prox!r}")
        self.prox = prox
        self.rho, self.alpha, self.lamb, self.average = (
            float(rho),
            float(alpha),
            float(lamb),
            average,
        )
        self.grads_per_step = 2 if alpha > 0 and rho > 0 else 1

    @property
    def decay(self) -> float:  # type: ignore[override]
        """The weight decay this rule adds after the clip: lamb with ``prox="decay"``, else 0."""
        return self.lamb if self.prox == "decay" else 0.0

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
        if self.prox == "decay":  # lamb X is in the client's weight decay, after the clip
            return g - ctx.state["ghat_i"] - self.lamb * ctx.x0, loss
        return g - ctx.state["ghat_i"] + self.lamb * (X - ctx.x0), loss

    def finish(self, X: Tensor, ctx: Context, steps: Tensor, lr: float) -> Finish:
        delta = X - ctx.x0
        old = ctx.state["ghat_i"]
        new = old - self.lamb * delta
        if self.average == "sampled":
            return Finish(delta - new / self.lamb, {"ghat_i": new})
        return Finish(delta, {"ghat_i": new}, {"delta_ghat": new - old})


class CorrectionMeanState(NamedTuple):
    ghat_mean: Tensor  # (d,) G = mean over all N clients of ghat_i (with the mean aggregator)


class CorrectionMean(Transform):
    """FedSpeed's server step (``average="all"``): G <- G + (|S|/N) aggregate(delta ghat_i), and
    the step becomes Delta - lambda G (``lamb`` = 1/lambda), before the server optimizer."""

    name = "fedspeed"
    State = CorrectionMeanState

    def __init__(self, lamb: float = 0.1) -> None:
        if not lamb > 0:
            raise ValueError(f"strategy.lamb must be > 0, got {lamb}")
        self.lamb = float(lamb)

    def init(self, params: Tensor) -> CorrectionMeanState:
        return CorrectionMeanState(torch.zeros_like(params))

    def update(
        self, step: Tensor, state: CorrectionMeanState, rnd: Round
    ) -> tuple[Tensor, CorrectionMeanState]:
        G = add_mean_over_all(state.ghat_mean, rnd.extras, "delta_ghat")
        # x_{t+1} = x_t + mean_S(x_K - x_t) - lambda G
        return step - G / self.lamb, CorrectionMeanState(G)


class FedSpeed(Composed):
    """FedSpeed; reference defaults rho 0.1, alpha 1, lamb 0.1 (lambda = 10). Server half:
    ``chain(CorrectionMean(lamb), sgd(server_lr))`` with ``average="all"``, ``sgd(server_lr)``
    alone with ``"sampled"`` (or another server optimizer ``server_opt``)."""

    name = "fedspeed"

    def __init__(
        self,
        rho: float = 0.1,
        alpha: float = 1.0,
        lamb: float = 0.1,
        average: str = "all",
        server_lr: float = 1.0,
        server_opt: Transform | None = None,
        prox: str = "direction",
    ) -> None:
        opt = server_optimizer(server_lr, 0.0, server_opt)
        rule = FedSpeedRule(rho, alpha, lamb, average, prox)
        parts = (CorrectionMean(lamb), opt) if average == "all" else (opt,)
        super().__init__(*parts, client_rule=rule)
