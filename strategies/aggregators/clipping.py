"""Clipping: static clipping and adaptive robust clipping (pre-aggregations), centered clipping."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flagstaff.strategies.aggregators.base import Aggregator, PreAggregator
from flagstaff.strategies.aggregators.registry import register

__all__ = ["StaticClip", "ARC", "CenteredClipping"]


def _scale_to(U: Tensor, norms: Tensor, threshold: Tensor | float) -> Tensor:
    """Rows of U scaled by ``min(1, threshold / ||x_i||)`` (zero rows stay zero)."""
    scale = (threshold / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_max(1.0)
    return U * scale[:, None]


@register("clip", pre=True)
class StaticClip(PreAggregator):
    """Static clipping: ``x_i <- x_i * min(1, c / ||x_i||)``, then the inner rule (default: the
    weighted mean). As a rule (``rule: clip``) it is clip-then-average; as a pre-aggregation
    (``pre: [clip]``) it wraps any rule, as in ByzFL. Weights pass through to the inner rule.
    """

    name = "clip"

    def __init__(
        self,
        inner: Aggregator | None = None,
        *,
        f: int = 0,
        n: int | None = None,
        c: float = 1.0,
    ) -> None:
        super().__init__(inner, f=f, n=n)
        if not c > 0:
            raise ValueError(f"clip: the clipping norm c must be > 0, got {c}")
        self.c = float(c)
        self._validate_n()

    def transform(self, U: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return _scale_to(U, torch.linalg.vector_norm(U, dim=1), self.c), weights


@register("arc", pre=True)
class ARC(PreAggregator):
    """Adaptive robust clipping (Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan 2024,
    "Boosting robustness by clipping gradients in distributed learning").

    With ``k = floor(2 (f/n) (n - f))``, the ``k`` largest-norm inputs are clipped to the norm of
    the ``(k+1)``-th largest; the others are unchanged (k = 0: no-op). Then the inner rule (default:
    the weighted mean); usable as ``rule: arc`` or ``pre: [arc]``. Needs f < n.
    """

    name = "arc"

    def __init__(self, inner: Aggregator | None = None, *, f: int = 0, n: int | None = None):
        super().__init__(inner, f=f, n=n)
        self._validate_n()

    def own_requirement(self, n: int) -> str | None:
        if self.f >= n:
            return f"needs f < n; got f={self.f} with {n} inputs"
        return None

    @staticmethod
    def num_clipped(n: int, f: int) -> int:
        return int(2 * f * (n - f) // n)

    def transform(self, U: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
        n = U.shape[0]
        k = self.num_clipped(n, self.f)
        if k == 0:
            return U, weights
        norms = torch.linalg.vector_norm(U, dim=1)
        threshold = torch.sort(norms, descending=True).values[k]
        return _scale_to(U, norms, threshold), weights


@register("cclip")
class CenteredClipping(Aggregator):
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021, "Learning from history for Byzantine
    robust optimization"): ``L`` times ``v <- v + (1/n) sum_i (x_i - v) min(1, tau/||x_i - v||)``.

    Stateful: v starts at the previous output (``state_dict() == {"center": v}``); on the first call
    (or after ``reset``) at zero (``init="zero"``, the paper's momentum start) or at the plain mean
    (``init="mean"``). A zero distance counts as unclipped. The paper pairs it with worker momentum
    beta and ``tau ~ 10 / (1 - beta)``. Needs n > 2f. Ignores weights.

    Every call moves the centre: code that probes the rule (adaptive attacks' line searches)
    should probe a ``copy.deepcopy`` of it, or save and restore ``state_dict()``.
    """

    name = "cclip"

    def __init__(
        self,
        *,
        f: int = 0,
        n: int | None = None,
        tau: float = 10.0,
        n_iter: int = 1,
        init: str = "zero",
    ) -> None:
        super().__init__(f=f, n=n)
        if not tau > 0:
            raise ValueError(f"cclip: tau must be > 0, got {tau}")
        if int(n_iter) != n_iter or n_iter < 1:
            raise ValueError(f"cclip: n_iter (L) must be an integer >= 1, got {n_iter}")
        if init not in ("zero", "mean"):
            raise ValueError(f"cclip: init must be 'zero' or 'mean', got {init!r}")
        self.tau, self.n_iter, self.init = float(tau), int(n_iter), init
        self._center: Tensor | None = None
        self._validate_n()

    def requirement(self, n: int) -> str | None:
        if n <= 2 * self.f:
            return f"needs n > 2f = {2 * self.f} inputs; use at least {2 * self.f + 1} clients"
        return None

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        n = U.shape[0]
        v = self._center
        if v is None or v.shape != U.shape[1:]:
            v = U.mean(dim=0) if self.init == "mean" else torch.zeros_like(U[0])
        else:
            v = v.to(device=U.device, dtype=U.dtype)
        for _ in range(self.n_iter):
            diff = U - v
            norms = torch.linalg.vector_norm(diff, dim=1)
            scale = (self.tau / norms.clamp_min(torch.finfo(U.dtype).tiny)).clamp_max(1.0)
            v = v + (scale / n) @ diff
            del diff
        self._center = v.detach().clone()
        return v

    def reset(self) -> None:
        """Forget the previous output."""
        self._center = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self._center is None else {"center": self._center.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        center = state.get("center")
        self._center = None if center is None else torch.as_tensor(center).clone()
