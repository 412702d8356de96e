"""Where everything the round's clients sent meets the model attack: updates and per-client extras.

:func:`attack_round` replaces the Byzantine rows of the updates and of every extra with the attack's
vectors (each computed from the honest rows of the same tensor), removes them for crash, and drops
rows left non-finite from all tensors together. Adaptive attacks probe the aggregation rule through
:func:`adaptive_probe`, always on deep copies, so the rule's own state is never advanced by probing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flagstaff.clients.byzantine import Attack

__all__ = ["AttackedRound", "adaptive_probe", "apply_model_attack", "attack_round"]


def adaptive_probe(aggregator: Any, byz: torch.Tensor, w: torch.Tensor) -> Callable:
    """The callable an adaptive attack line-searches against.

    The attack stacks ``[honest rows; its f crafted rows]``; the probe puts the crafted rows back at
    the Byzantine clients' positions (so order-dependent rules see the real order), passes the
    round's weights, and calls a fresh deep copy of ``aggregator`` each time, so the real rule's
    state (e.g. centered clipping's centre, bucketing's random stream) is untouched by probing.
    """
    nb, h = int(byz.sum()), int((~byz).sum())
    snapshot = copy.deepcopy(aggregator)

    def probe(stacked: torch.Tensor) -> torch.Tensor:
        full = stacked.new_empty((nb + h, stacked.shape[1]))
        full[~byz] = stacked[:h]
        full[byz] = stacked[h : h + nb]
        try:
            return copy.deepcopy(snapshot)(full, w)
        except (ValueError, FloatingPointError):  # e.g. an overflowing aggregate: no gain
            return full.new_full((full.shape[1],), float("nan"))

    return probe


@dataclass
class AttackedRound:
    """What the aggregation receives after a model attack (rows in the input's order).

    ``keep`` (n,) marks the input rows still present (crash and non-finite rows removed);
    ``extras`` holds each per-client extra vector's rows, removed and replaced like ``U``'s.
    """

    U: torch.Tensor
    w: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    keep: torch.Tensor | None = None
    dropped_nonfinite: int = 0


def _plain_mean(U: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The plain mean of the rows (how a strategy combines extras when no rule is given)."""
    return U.mean(dim=0)


def attack_round(
    attack: Attack,
    U: torch.Tensor,
    w: torch.Tensor,
    byz: torch.Tensor,
    aggregator: Any,
    generator: torch.Generator,
    extras: dict[str, torch.Tensor] | None = None,
    extras_rule: Callable[[str], Any] | None = None,
) -> AttackedRound:
    """Where everything the clients sent meets (the omniscient threat model): replace the
    Byzantine rows ``byz`` of ``U`` and of every extra by the attack's vectors, each computed from
    the honest rows of the same tensor; crash removes the Byzantine rows everywhere; a row left
    non-finite in ``U`` or in any extra is dropped from all of them (counted in
    ``dropped_nonfinite``).

    Order: the update first (so its random draws do not depend on the extras), then the extras in
    sorted name order through ``attack.extra`` with the same ``generator``. Adaptive attacks
    line-search the update against ``aggregator`` and each extra against ``extras_rule(name)``
    (the rule the strategy aggregates that extra with; the plain mean when None), each probed
    only through deep copies.
    """
    extras = dict(extras or {})
    n = U.shape[0]
    nb = int(byz.sum())
    keep = torch.ones(n, dtype=torch.bool)
    if nb == 0:
        return AttackedRound(U, w, extras, keep)

    def removed(mask: torch.Tensor, dropped: int = 0) -> AttackedRound:
        ext = {k: v[mask] for k, v in extras.items()}
        return AttackedRound(U[mask], w[mask], ext, mask, dropped)

    if int((~byz).sum()) == 0:  # nothing to compute an attack from: Byzantines send nothing
        return removed(~byz)
    adaptive = bool(attack.adaptive)
    probe = adaptive_probe(aggregator, byz, w) if adaptive else None
    crafted = attack(U[~byz], aggregator=probe, generator=generator)
    if crafted is None:  # crash: the Byzantine clients send nothing
        return removed(~byz)
    U = U.clone()
    U[byz] = crafted[:nb].to(device=U.device, dtype=U.dtype)
    craft_extra = attack.extra
    for name in sorted(extras):
        E = extras[name]
        rule = extras_rule(name) if extras_rule is not None else _plain_mean
        probe = adaptive_probe(rule, byz, None) if adaptive else None
        fake = craft_extra(E[~byz], aggregator=probe, generator=generator)
        if fake is None:  # sends no extra: then it sent nothing at all
            return removed(~byz)
        E = E.clone()
        E[byz] = fake[:nb].to(device=E.device, dtype=E.dtype)
        extras[name] = E
    finite = torch.isfinite(U).all(dim=1)
    for E in extras.values():
        finite &= torch.isfinite(E).all(dim=1)
    dropped = int((~finite).sum())
    if dropped:
        return removed(finite, dropped)
    return AttackedRound(U, w, extras, keep)


def apply_model_attack(
    attack: Attack,
    U: torch.Tensor,
    w: torch.Tensor,
    byz: torch.Tensor,
    aggregator: Any,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`attack_round` on the updates alone: returns ``(U, w, dropped_nonfinite)``."""
    out = attack_round(attack, U, w, byz, aggregator, generator)
    return out.U, out.w, out.dropped_nonfinite
