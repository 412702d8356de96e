"""Model-poisoning attacks that need no line search: crash, sign flip, reversed, Gaussian, uniform,
inf/NaN vectors, ALIE and FOE/IPM (``kind = "model"``), applied where a round's updates meet.

Threat model (docs: ../shared/specs/robust.md). A round has ``h`` honest update vectors, stacked as
``honest`` of shape ``(h, d)``, and ``f`` Byzantine clients, so ``n = h + f`` vectors reach the
aggregator. The adversary is omniscient: it sees every honest update of the round and, for the
adaptive attacks (:mod:`strategies.attacks.adaptive`), the aggregation rule itself.
``attack(honest, aggregator=None, generator=None)`` returns the ``(f, d)`` Byzantine vectors (same
device and dtype as ``honest``), or ``None`` when the Byzantine clients send nothing (crash).

Per-client extras (SCAFFOLD's delta c_i, FedDyn's delta grad_i, FedSpeed's delta ghat_i): a
Byzantine client corrupts everything it sends. ``attack.extra(honest_extra_rows, aggregator=...)``
crafts the f rows sent in place of one extra, by default with the same rule as the update's applied
to that extra's honest rows (each attack's docstring says what it sends);
:func:`strategies.attacks.round.attack_round` applies update and extras together (crash: nothing
sent; non-finite: dropped from both).

Peer-to-peer (MoNNA): a Byzantine node may send a different vector to every honest node
(``targeted``/``per_target`` of :class:`clients.byzantine.Attack`); there the exchanged vectors are
models, not updates: the peer-to-peer runtime uses ``attack.for_models()``.

Conventions chosen here (tested in tests/test_attacks.py):

* ``mu`` and ``sigma`` are the coordinate-wise mean and standard deviation of the honest vectors;
  ``sigma`` uses Bessel's correction (``ddof=1``, torch's default, as in the reference codes of the
  ALIE and MoNNA papers), and is 0 when only one honest vector exists.
* ALIE sends ``mu - z * sigma``; FOE/IPM sends ``-eps * mu``; all Byzantines send the same vector.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import ClassVar

import torch
from torch import Tensor

from flagstaff.clients.byzantine import Aggregator, Attack, as_count

__all__ = [
    "ALIE",
    "ALIE_VARIANTS",
    "FOE",
    "Crash",
    "Gaussian",
    "InfAttack",
    "ModelAttack",
    "NaNAttack",
    "Reversed",
    "SignFlip",
    "Uniform",
    "alie_z",
    "check_updates",
    "moments",
    "repeat_rows",
]

ALIE_VARIANTS = ("paper", "implementation")


def check_updates(updates: Tensor, name: str) -> None:
    if not isinstance(updates, Tensor) or updates.dim() != 2:
        shape = tuple(updates.shape) if isinstance(updates, Tensor) else type(updates).__name__
        raise ValueError(f"attack {name!r}: updates must be a 2-D (h, d) tensor, got {shape}")
    if not updates.is_floating_point():
        raise ValueError(f"attack {name!r}: updates must be floating point, got {updates.dtype}")
    if updates.shape[0] < 1:
        raise ValueError(f"attack {name!r}: needs at least one honest update, got h = 0")


def moments(honest: Tensor, ddof: int) -> tuple[Tensor, Tensor]:
    """Coordinate-wise mean and std (``ddof`` degrees of freedom; std 0 if h <= ddof)."""
    mu = honest.mean(dim=0)
    if honest.shape[0] <= ddof:
        return mu, torch.zeros_like(mu)
    return mu, honest.std(dim=0, correction=ddof)


def repeat_rows(vector: Tensor, f: int) -> Tensor:
    """f copies of a (d,) vector as a fresh (f, d) tensor."""
    return vector.unsqueeze(0).repeat(f, 1)


def alie_z(n: int, f: int, variant: str = "paper") -> float:
    """ALIE's z (Baruch et al., "A Little Is Enough", NeurIPS 2019) for n inputs, f Byzantine.

    ``s = floor(n/2 + 1) - f`` honest inputs must be won over. ``variant="paper"`` uses
    ``z = Phi^-1((n - s) / n)`` (the paper's formula); ``variant="implementation"`` uses
    ``z = Phi^-1((n - f - s) / (n - f))``, the form in widely used code. Both need f < n/2.
    """
    n = as_count(n, "ALIE: n (number of inputs)")
    f = as_count(f, "ALIE: f (number of Byzantine clients)")
    if variant not in ALIE_VARIANTS:
        raise ValueError(f"ALIE: unknown variant {variant!r}; choose one of {list(ALIE_VARIANTS)}")
    if 2 * f >= n:
        raise ValueError(
            f"ALIE's z formula needs an honest majority, f < n/2; got f = {f}, n = {n}. "
            "Lower attack.f, or set attack.z to a fixed value."
        )
    s = n // 2 + 1 - f
    p = (n - s) / n if variant == "paper" else (n - f - s) / (n - f)
    if not 0.0 < p < 1.0:
        raise ValueError(
            f"ALIE's z formula ({variant}) is undefined for n = {n}, f = {f} "
            f"(quantile {p:.3f} outside (0, 1)); use more clients or set attack.z."
        )
    return NormalDist().inv_cdf(p)


class ModelAttack(Attack):
    """A model-poisoning attack; subclasses implement ``craft(honest, aggregator, gen)``."""

    kind: ClassVar[str] = "model"

    def __call__(
        self,
        honest: Tensor,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """The f Byzantine vectors (f, d) for this round, same device/dtype as ``honest``."""
        check_updates(honest, self.name)
        self.check(honest.shape[0] + self.f)
        if self.f == 0:
            return honest.new_empty((0, honest.shape[1]))
        return self.craft(honest, aggregator, self._rng(generator))

    def craft(
        self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator
    ) -> Tensor | None:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# model poisoning: non-adaptive
# ----------------------------------------------------------------------------------------------


class Crash(ModelAttack):
    """Crash failures: the Byzantine clients send nothing (``__call__`` returns None): no update
    and no per-client extras (the runtime removes their rows everywhere)."""

    name: ClassVar[str] = "crash"

    def __call__(
        self,
        honest: Tensor,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        check_updates(honest, self.name)
        return None


class SignFlip(ModelAttack):
    """Sign flipping: send ``-scale * mu`` (``source="mean"``) or ``-scale * honest[j mod h]``.

    ``source="rows"`` stands in for "each Byzantine sends minus its own honest update" (Allen-Zhu
    et al. 2021) with a distinct honest row per Byzantine client.
    Extras (``extra``): the same flip of the honest clients' extra rows (``-scale`` times their
    mean, or of the same honest rows).
    """

    name: ClassVar[str] = "sign_flip"
    SOURCES: ClassVar[tuple[str, ...]] = ("mean", "rows")

    def __init__(self, f: int = 0, seed: int = 0, scale: float = 1.0, source: str = "mean") -> None:
        super().__init__(f, seed)
        if source not in self.SOURCES:
            raise ValueError(
                f"{self.name}: unknown source {source!r}; choose one of {list(self.SOURCES)}"
            )
        self.scale, self.source = float(scale), source

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        if self.source == "mean":
            return repeat_rows(-self.scale * honest.mean(dim=0), self.f)
        rows = torch.arange(self.f, device=honest.device) % honest.shape[0]
        return -self.scale * honest[rows]


class Reversed(SignFlip):
    """Reversed gradient ``-10 g``: the scaled flip of the Flag Aggregator paper (Almasi 2024).
    Extras: ``-10`` times the honest extras' mean, as for the update."""

    name: ClassVar[str] = "reversed"

    def __init__(
        self, f: int = 0, seed: int = 0, scale: float = 10.0, source: str = "mean"
    ) -> None:
        super().__init__(f, seed, scale=scale, source=source)


class Gaussian(ModelAttack):
    """Gaussian random vectors N(mean, sigma^2 I), drawn independently per Byzantine client.
    Extras: fresh N(mean, sigma^2 I) vectors of the extra's length, drawn after the update's."""

    name: ClassVar[str] = "gaussian"

    def __init__(self, f: int = 0, seed: int = 0, sigma: float = 1.0, mean: float = 0.0) -> None:
        super().__init__(f, seed)
        if not sigma >= 0:
            raise ValueError(f"gaussian: sigma must be >= 0, got {sigma}")
        self.sigma, self.mean = float(sigma), float(mean)

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        noise = self._noise("normal", (self.f, honest.shape[1]), honest, gen)
        return self.mean + self.sigma * noise


class Uniform(ModelAttack):
    """Uniform random vectors U[low, high)^d: the Flag Aggregator paper's headline attack.
    Extras: fresh U[low, high) vectors of the extra's length, drawn after the update's."""

    name: ClassVar[str] = "uniform"

    def __init__(self, f: int = 0, seed: int = 0, low: float = 0.0, high: float = 1.0) -> None:
        super().__init__(f, seed)
        if not low < high:
            raise ValueError(f"uniform: need low < high, got low = {low}, high = {high}")
        self.low, self.high = float(low), float(high)

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        noise = self._noise("uniform", (self.f, honest.shape[1]), honest, gen)
        return self.low + (self.high - self.low) * noise


class InfAttack(ModelAttack):
    """Every coordinate +inf (``sign=1``) or -inf (``sign=-1``): breaks non-robust arithmetic.
    Extras too; the runtime drops such a client's row from update and extras together."""

    name: ClassVar[str] = "inf_vector"

    def __init__(self, f: int = 0, seed: int = 0, sign: int = 1) -> None:
        super().__init__(f, seed)
        if sign not in (1, -1):
            raise ValueError(f"inf: sign must be 1 or -1, got {sign!r}")
        self.sign = int(sign)

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        return honest.new_full((self.f, honest.shape[1]), self.sign * math.inf)


class NaNAttack(ModelAttack):
    """Every coordinate NaN (extras too; dropped from update and extras together)."""

    name: ClassVar[str] = "nan_vector"

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        return honest.new_full((self.f, honest.shape[1]), math.nan)


class ALIE(ModelAttack):
    """A Little Is Enough (Baruch, Baruch, Goldberg; NeurIPS 2019): send ``mu - z * sigma``.

    ``z`` comes from :func:`alie_z` (``variant="paper"`` or ``"implementation"``) with
    ``n = h + f``, unless given. ``ddof`` is the std's degrees of freedom (1: unbiased).
    Extras: ``mu_e - z * sigma_e`` with the mean and std of the honest clients' extra rows and
    the same z.
    """

    name: ClassVar[str] = "alie"

    def __init__(
        self,
        f: int = 0,
        seed: int = 0,
        variant: str = "paper",
        z: float | None = None,
        ddof: int = 1,
    ) -> None:
        super().__init__(f, seed)
        if variant not in ALIE_VARIANTS:
            raise ValueError(
                f"{self.name}: unknown variant {variant!r}; choose one of {list(ALIE_VARIANTS)} "
                "(paper: z = Phi^-1((n - s)/n); implementation: z = Phi^-1((n - f - s)/(n - f)))"
            )
        self.variant = variant
        self.z = None if z is None else float(z)
        self.ddof = as_count(ddof, f"{self.name}: ddof")

    def z_value(self, n: int) -> float:
        """The z used with n inputs in total (h + f)."""
        return self.z if self.z is not None else alie_z(n, self.f, self.variant)

    def check(self, n: int) -> None:
        super().check(n)
        if self.z is None and self.f > 0:
            alie_z(n, self.f, self.variant)

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        mu, sigma = moments(honest, self.ddof)
        z = self.z_value(honest.shape[0] + self.f)
        return repeat_rows(mu - z * sigma, self.f)


class FOE(ModelAttack):
    """Fall of Empires / inner-product manipulation (Xie, Koyejo, Gupta; UAI 2019): ``-eps mu``.
    Extras: ``-eps`` times the honest extras' mean."""

    name: ClassVar[str] = "foe"

    def __init__(self, f: int = 0, seed: int = 0, eps: float = 0.1) -> None:
        super().__init__(f, seed)
        self.eps = float(eps)

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        return repeat_rows(-self.eps * honest.mean(dim=0), self.f)
