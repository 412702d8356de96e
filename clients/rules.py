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

This module holds the contract the trainers use (``LocalRule``, ``Context``, ``Finish``); each
strategy's concrete rule lives beside its server half (issue 20, item 6): ``strategies.fedprox.Prox``
(FedProx, Li et al., MLSys 2020), ``strategies.scaffold.Scaffold`` (SCAFFOLD, Karimireddy et al.,
ICML 2020, option II), ``strategies.feddyn.FedDynRule`` (FedDyn, Acar et al., ICLR 2021),
``strategies.fedsam.SAM`` (FedSAM, Qu et al., ICML 2022; Caldarola et al., ECCV 2022),
``strategies.fedspeed.FedSpeedRule`` (FedSpeed, Sun et al., ICLR 2023). Clients never import
strategies: the host receives the rule object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["Context", "Finish", "GradFn", "LocalRule", "Plain"]

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


class LocalRule:
    """Plain local SGD: direction = mini-batch gradient; message = x_K - x_t; no state."""

    name = "sgd"
    client_state: tuple[str, ...] = ()
    #: gradient evaluations per local step, i.e. ``grad_fn`` calls per ``direction`` (SAM-style
    #: rules use 2); under DP-SGD each is a private release, accounted before the step runs
    grads_per_step = 1
    #: weight decay the rule adds to the client's, after the clip (FedSpeed's ``prox="decay"``);
    #: only LocalSGD applies it (system/build.py refuses such a rule with another trainer)
    decay = 0.0

    def direction(self, grad_fn: GradFn, X: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        return grad_fn(X)

    def finish(self, X: Tensor, ctx: Context, steps: Tensor, lr: float) -> Finish:
        return Finish(X - ctx.x0, {})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


Plain = LocalRule
