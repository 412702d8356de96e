"""Local rules: what a client does at each local step and what it sends back, batched over clients.

A rule sees the K clients of one lockstep chunk as stacked flat parameters ``X`` of shape (K, d).
The trainer (``clients.trainer.LocalSGD``, or a DP-SGD trainer: ``clients.dp``, ``clients.dp_batched``)
owns the optimizer step (clipping, weight decay, momentum, learning rate, gating by ``plan.active``)
and the gradient function: the mini-batch gradient, or under DP-SGD the private one (per-sample
clipping and noise), so the same rule composes with both; a rule only supplies

* ``direction(grad_fn, X, ctx)``: the local descent direction at ``X`` (K, d), e.g. the plain
  mini-batch gradient, a SAM gradient at a perturbed point, or a corrected gradient;
* ``finish(X_K, ctx, steps, lr)``: after the local steps, the message sent to the server (as an
  update relative to the broadcast ``x_t``), the new per-client state, and extra per-client vectors
  the server aggregates (e.g. SCAFFOLD's delta c_i).

Per-client state (``client_state`` names, one (d,) vector per client) lives on the host that owns
the client for the whole run and is checkpointed there. ``finish`` is called once per round with
each client's own number of steps, so a client with fewer steps updates its state from exactly its
own steps (its parameters were frozen by the gate once it finished).

References: FedProx (Li et al., MLSys 2020), SCAFFOLD (Karimireddy et al., ICML 2020, option II),
FedDyn (Acar et al., ICLR 2021), FedSAM (Qu et al., ICML 2022; Caldarola et al., ECCV 2022),
FedSpeed (Sun et al., ICLR 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "Context",
    "LocalRule",
    "Plain",
    "Prox",
    "Scaffold",
    "FedDynRule",
    "SAM",
    "FedSpeedRule",
    "sam_perturbation",
]

#: ``grad_fn(P) -> (G, loss)``: mini-batch gradients (K, d) and losses (K,) at points P (K, d),
#: all on the current step's batches.
GradFn = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class Context:
    """What a rule sees during one round of one chunk of clients."""

    x0: Tensor  # (d,) the broadcast global parameters x_t
    state: dict[str, Tensor]  # per-client state, name -> (K, d), as of the start of the round
    broadcast: dict[str, Tensor] = field(default_factory=dict)  # server vectors, name -> (d,)


@dataclass
class Finish:
    """A rule's output after the local steps."""

    message: Tensor  # (K, d) what the server aggregates, relative to x_t
    state: dict[str, Tensor]  # new per-client state, name -> (K, d)
    extras: dict[str, Tensor] = field(
        default_factory=dict
    )  # name -> (K, d), averaged by the server


def sam_perturbation(g: Tensor, rho: float) -> Tensor:
    """The SAM ascent step ``rho * g / ||g||`` per row (norm exactly rho unless g = 0)."""
    norm = g.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, g * (rho / norm.clamp_min(1e-30)), torch.zeros_like(g))


class LocalRule:
    """Plain local SGD: direction = mini-batch gradient; message = x_K - x_t; no state."""

    name = "sgd"
    client_state: tuple[str, ...] = ()
    #: gradient evaluations per local step, i.e. ``grad_fn`` calls per ``direction`` (SAM-style
    #: rules use 2); under DP-SGD each is a private release, accounted before the step runs
    grads_per_step = 1

    def direction(self, grad_fn: GradFn, X: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        return grad_fn(X)

    def finish(self, X: Tensor, ctx: Context, steps: Tensor, lr: float) -> Finish:
        return Finish(X - ctx.x0, {})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


Plain = LocalRule


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
