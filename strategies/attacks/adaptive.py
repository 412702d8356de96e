"""Adaptive model-poisoning attacks: a line search of one scalar factor against the aggregation rule.

The adversary is omniscient (docs: ../shared/specs/robust.md): it probes the run's rule (exactly,
with the round's weights and row order, but on deep copies: :func:`strategies.attacks.round.
adaptive_probe`) to maximise ``||aggregator(cat([honest, byz])) - mu||`` (honest rows first); the
fixed variant's factor is always a candidate, so the adaptive attack displaces the aggregate at
least as far as the fixed one. Non-finite aggregates count as no displacement.
ALIE (Baruch et al., NeurIPS 2019) searches its z; FOE/IPM (Xie et al., UAI 2019) its eps; the
model-space FOE (:class:`FOEModelAdaptive`) is the MoNNA reference code's peer-to-peer form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from flagstaff.clients.byzantine import Aggregator, Attack, as_count
from flagstaff.strategies.attacks.model import ALIE, FOE, ModelAttack, moments, repeat_rows

__all__ = ["ALIEAdaptive", "FOEAdaptive", "FOEModelAdaptive", "line_search"]


def line_search(
    objective: Callable[[float], float],
    *,
    start: float = 0.0,
    step: float = 1.0,
    max_evals: int = 16,
    expand: float = 2.0,
    shrink: float = 0.8,
    candidates: Sequence[float] = (),
) -> tuple[float, float, int]:
    """Maximise a scalar function of one factor with at most ``max_evals`` evaluations.

    Evaluate ``start`` and any extra ``candidates``; from the best so far, step up by ``step``,
    multiplying the step by ``expand`` while the objective improves; then probe both sides of the
    best point, moving when one is better and otherwise shrinking the step by ``shrink``, until the
    budget is spent.
    Returns ``(best_factor, best_value, evaluations)``. NaN values never win.
    """
    if max_evals < 1:
        raise ValueError(f"line search: max_evals must be >= 1, got {max_evals}")

    evals = 0

    def probe(x: float) -> float:
        nonlocal evals
        evals += 1
        value = float(objective(x))
        return value if not math.isnan(value) else -math.inf

    best_x, best_v = start, probe(start)
    for x in candidates:
        if evals >= max_evals:
            break
        v = probe(x)
        if v > best_v:
            best_x, best_v = x, v
    delta = step
    while evals < max_evals:  # expansion
        x = best_x + delta
        v = probe(x)
        if v <= best_v:
            break
        best_x, best_v = x, v
        delta *= expand
    improved = False
    while evals < max_evals:  # refinement: keep the step after a move, else shrink it
        if not improved:
            delta *= shrink
        improved = False
        for x in (best_x + delta, best_x - delta):
            if evals >= max_evals:
                break
            v = probe(x)
            if v > best_v:
                best_x, best_v, improved = x, v, True
                break
    return best_x, best_v, evals


class _LineSearch:
    """Line-search settings and the displacement objective shared by the adaptive attacks."""

    name: ClassVar[str]
    f: int

    def _init_search(
        self, start: float, step: float, max_evals: int, expand: float, shrink: float
    ) -> None:
        if not step > 0:
            raise ValueError(f"{self.name}: step must be > 0, got {step}")
        if not expand > 1:
            raise ValueError(f"{self.name}: expand must be > 1, got {expand}")
        if not 0 < shrink < 1:
            raise ValueError(f"{self.name}: shrink must be in (0, 1), got {shrink}")
        max_evals = as_count(max_evals, f"{self.name}: max_evals")
        if max_evals < 1:
            raise ValueError(f"{self.name}: max_evals must be >= 1, got {max_evals}")
        self.start, self.step, self.max_evals = float(start), float(step), max_evals
        self.expand, self.shrink = float(expand), float(shrink)
        self.last_factor: float | None = None  # factor chosen in the last call (for inspection)

    def _search(
        self,
        honest: Tensor,
        aggregator: Aggregator | None,
        vector: Callable[[float], Tensor],
        fixed: float | None,
    ) -> Tensor:
        """The f copies of ``vector(factor)`` for the factor that moves ``aggregator`` farthest."""
        if aggregator is None:
            raise ValueError(
                f"attack {self.name!r} is adaptive: pass aggregator= (the rule under attack, a "
                f"callable on an (n, d) tensor), or use the fixed variant"
            )
        mu = honest.mean(dim=0)

        def displacement(factor: float) -> float:
            byz = vector(factor).unsqueeze(0).expand(self.f, -1)
            out = aggregator(torch.cat([honest, byz]))
            value = float(torch.linalg.vector_norm(out - mu))
            return value if math.isfinite(value) else -math.inf

        best, _, _ = line_search(
            displacement,
            start=self.start,
            step=self.step,
            max_evals=self.max_evals,
            expand=self.expand,
            shrink=self.shrink,
            candidates=() if fixed is None else (fixed,),
        )
        self.last_factor = best
        return repeat_rows(vector(best), self.f)


class ALIEAdaptive(_LineSearch, ALIE):
    """ALIE with the factor z chosen by line search to maximise ``||aggregator(all) - mu||``.

    The adaptive form used against robust rules (e.g. MoNNA, Farhadkhani et al. ICML 2023; ByzFL).
    The formula's z (when defined for this n, f) is an extra candidate. ``max_evals`` bounds the
    number of aggregator calls per crafted set of vectors.
    Extras: a separate search of ``mu_e - factor * sigma_e`` (honest extras' statistics) against
    the rule that aggregates the extra (``extra``; the run's aggregator, or the plain mean when
    that is the mean), so each vector is displaced as far as its own rule lets it; ``last_factor``
    is then the last extra's factor.
    """

    name: ClassVar[str] = "alie_adaptive"
    adaptive: ClassVar[bool] = True

    def __init__(
        self,
        f: int = 0,
        seed: int = 0,
        variant: str = "paper",
        z: float | None = None,
        ddof: int = 1,
        start: float = 0.0,
        step: float = 1.0,
        max_evals: int = 16,
        expand: float = 2.0,
        shrink: float = 0.8,
    ) -> None:
        ALIE.__init__(self, f, seed, variant=variant, z=z, ddof=ddof)
        self._init_search(start, step, max_evals, expand, shrink)

    def check(self, n: int) -> None:  # the search needs no formula
        Attack.check(self, n)

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        mu, sigma = moments(honest, self.ddof)
        n = honest.shape[0] + self.f
        try:
            fixed = self.z_value(n)
        except ValueError:  # formula undefined (e.g. f >= n/2): search from start only
            fixed = None
        return self._search(honest, aggregator, lambda factor: mu - factor * sigma, fixed)


class FOEAdaptive(_LineSearch, FOE):
    """FOE/IPM with eps chosen by line search to maximise ``||aggregator(all) - mu||``.

    ``eps`` (the fixed variant's value) is an extra candidate; ``max_evals`` bounds the number of
    aggregator calls. Extras: a separate search of ``-eps * mu_e`` against the rule that
    aggregates the extra, as for :class:`ALIEAdaptive`.
    """

    name: ClassVar[str] = "foe_adaptive"
    adaptive: ClassVar[bool] = True

    def __init__(
        self,
        f: int = 0,
        seed: int = 0,
        eps: float = 0.1,
        start: float = 0.0,
        step: float = 1.0,
        max_evals: int = 16,
        expand: float = 2.0,
        shrink: float = 0.8,
    ) -> None:
        FOE.__init__(self, f, seed, eps=eps)
        self._init_search(start, step, max_evals, expand, shrink)

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        mu = honest.mean(dim=0)
        return self._search(honest, aggregator, lambda eps: -eps * mu, self.eps)

    def for_models(self) -> FOEModelAdaptive:
        """The model-space form (peer-to-peer): :class:`FOEModelAdaptive` with the same f, seed,
        budget, expansion and shrink factors (its start and step are in units of the spread)."""
        return FOEModelAdaptive(
            f=self.f,
            seed=self.seed,
            max_evals=self.max_evals,
            expand=self.expand,
            shrink=self.shrink,
        )


class FOEModelAdaptive(_LineSearch, ModelAttack):
    """Adaptive FOE on exchanged models (peer-to-peer): every Byzantine sends ``(1 - c) mu``.

    ``mu``: mean of the honest models the target node receives; ``(1 - c) mu = mu + c (-mu)``, the
    honest average moved by c along FOE's direction -mu. This is the MoNNA reference code's attack
    (LPD-EPFL/robust-collaborative-learning: ``attacks/identical.py``, "empire", applied by
    ``peerToPeer.py`` to the honest models, c >= 0 line-searched from 0). Why not ``-eps mu``:
    honest models spread over about 1 % of their norm, so ``-eps mu`` lies ``(1 + eps) ||mu||``
    from every one of them and nearest-neighbour averaging always discards it (a no-op attack).

    c is chosen by :func:`line_search` to maximise ``||aggregator(honest + f copies) - mu||`` (the
    objective of every adaptive attack here; the reference maximises its square), searching
    ``s = c / rho`` with ``rho = ||sigma|| / ||mu||`` (``sigma``: coordinate-wise std of the
    honest models, ddof 1), so that a step moves the vector by a fixed fraction of the honest
    spread, the scale on which NNA keeps or drops it (``start``, ``step`` in units of the spread;
    the reference searches c itself with step 1). ``last_factor`` is the chosen c.

    >>> H = torch.tensor([[10.0, 0.1, 0.0], [10.0, 0.0, 0.2], [10.0, -0.1, -0.2]])
    >>> a = FOEModelAdaptive(f=1, max_evals=4)
    >>> out = a(H, aggregator=lambda U: U.mean(dim=0))
    >>> bool(torch.allclose(out, (1 - a.last_factor) * H.mean(dim=0)))
    True
    """

    name: ClassVar[str] = "foe_adaptive"
    adaptive: ClassVar[bool] = True

    def __init__(
        self,
        f: int = 0,
        seed: int = 0,
        start: float = 0.0,
        step: float = 0.25,
        max_evals: int = 16,
        expand: float = 2.0,
        shrink: float = 0.8,
    ) -> None:
        super().__init__(f, seed)
        self._init_search(start, step, max_evals, expand, shrink)

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        mu, sigma = moments(honest, 1)
        norm = float(torch.linalg.vector_norm(mu))
        rho = float(torch.linalg.vector_norm(sigma)) / norm if norm > 0 else 0.0
        out = self._search(honest, aggregator, lambda s: (1.0 - s * rho) * mu, None)
        self.last_factor = None if self.last_factor is None else self.last_factor * rho  # c
        return out
