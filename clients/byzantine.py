"""Byzantine behaviours: model-poisoning attacks on a round's updates and data-poisoning clients.

Threat model (docs: ../shared/specs/robust.md). A round has ``h`` honest update vectors, stacked as
``honest`` of shape ``(h, d)``, and ``f`` Byzantine clients, so ``n = h + f`` vectors reach the
aggregator. The adversary is omniscient: it sees every honest update of the round and, for the
adaptive attacks, the aggregation rule itself.

Two kinds of attack (class attribute ``kind``):

* ``"model"``: applied where the updates meet, before aggregation.
  ``attack(honest, aggregator=None, generator=None)`` returns the ``(f, d)`` Byzantine vectors (same
  device and dtype as ``honest``), or ``None`` when the Byzantine clients send nothing (crash).
* ``"data"``: applied in the Byzantine client, to its training data, by
  ``attack.poison(x, y, num_classes, generator)``. The updates those clients then compute are their
  Byzantine updates; ``attack(updates)`` is the identity, so a runtime may treat both kinds alike.

Per-client extras (SCAFFOLD's delta c_i, FedDyn's delta grad_i, FedSpeed's delta ghat_i): a
Byzantine client corrupts everything it sends. ``attack.extra(honest_extra_rows, aggregator=...)``
crafts the f rows sent in place of one extra, by default with the same rule as the update's applied
to that extra's honest rows (each attack's docstring says what it sends); ``attack_round`` applies
update and extras together (crash: nothing sent; non-finite: dropped from both). Data poisoning
leaves the extras as the client computed them on its poisoned data.

Peer-to-peer (MoNNA): a Byzantine node may send a different vector to every honest node.
``attack.targeted(received_honest, target, aggregator=...)`` crafts the ``(f, d)`` vectors for one
honest node (``received_honest``: the honest vectors that node holds, its own included; ``target``:
its own vector; ``aggregator``: its own aggregation, e.g. NNA centred on ``target``).
``attack.per_target(honest, aggregators=[...])`` does it for every node of a complete graph and
returns ``(h, f, d)``. Built-in attacks compute their statistics from ``received_honest`` and use
``target`` only through the node's aggregator; non-adaptive ones send the same vectors to everyone.
There the exchanged vectors are models, not updates: the peer-to-peer runtime uses
``attack.for_models()``, which is the attack itself except for adaptive FOE, whose model-space form
(:class:`FOEModelAdaptive`, the MoNNA reference code's) sends ``(1 - c) mu`` instead of ``-eps mu``.

Conventions chosen here (tested in tests/test_attacks.py):

* ``mu`` and ``sigma`` are the coordinate-wise mean and standard deviation of the honest vectors;
  ``sigma`` uses Bessel's correction (``ddof=1``, torch's default, as in the reference codes of the
  ALIE and MoNNA papers), and is 0 when only one honest vector exists.
* ALIE sends ``mu - z * sigma``; FOE/IPM sends ``-eps * mu``; all Byzantines send the same vector.
* Adaptive attacks line-search a scalar factor to maximise
  ``||aggregator(cat([honest, byz])) - mu||`` (honest rows first); the fixed variant's factor is
  always a candidate, so the adaptive attack displaces the aggregate at least as far as the fixed
  one. Non-finite aggregates count as no displacement.
* Randomness: the ``generator`` argument when given, else the attack's own CPU generator seeded
  with ``seed`` (its state is in ``state_dict`` for checkpoints). Noise is drawn on the generator's
  device and moved to the data's device, so results do not depend on where the data lives.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "ATTACKS",
    "ALIE",
    "ALIEAdaptive",
    "Attack",
    "AttackedRound",
    "Crash",
    "DataAttack",
    "FOE",
    "FOEAdaptive",
    "FOEModelAdaptive",
    "Gaussian",
    "InfAttack",
    "LabelFlip",
    "Mimic",
    "ModelAttack",
    "NaNAttack",
    "NoAttack",
    "NoisyData",
    "Reversed",
    "SignFlip",
    "Uniform",
    "alie_z",
    "attack_round",
    "build_attack",
    "line_search",
]

Aggregator = Callable[[Tensor], Tensor]

ALIE_VARIANTS = ("paper", "implementation")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _as_count(value: Any, what: str) -> int:
    """An integer >= 0 (Python or NumPy integer), else ValueError naming the setting."""
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {count}")
    return count


def _check_updates(updates: Tensor, name: str) -> None:
    if not isinstance(updates, Tensor) or updates.dim() != 2:
        shape = tuple(updates.shape) if isinstance(updates, Tensor) else type(updates).__name__
        raise ValueError(f"attack {name!r}: updates must be a 2-D (h, d) tensor, got {shape}")
    if not updates.is_floating_point():
        raise ValueError(f"attack {name!r}: updates must be floating point, got {updates.dtype}")
    if updates.shape[0] < 1:
        raise ValueError(f"attack {name!r}: needs at least one honest update, got h = 0")


def _moments(honest: Tensor, ddof: int) -> tuple[Tensor, Tensor]:
    """Coordinate-wise mean and std (``ddof`` degrees of freedom; std 0 if h <= ddof)."""
    mu = honest.mean(dim=0)
    if honest.shape[0] <= ddof:
        return mu, torch.zeros_like(mu)
    return mu, honest.std(dim=0, correction=ddof)


def _repeat(vector: Tensor, f: int) -> Tensor:
    """f copies of a (d,) vector as a fresh (f, d) tensor."""
    return vector.unsqueeze(0).repeat(f, 1)


def alie_z(n: int, f: int, variant: str = "paper") -> float:
    """ALIE's z (Baruch et al., "A Little Is Enough", NeurIPS 2019) for n inputs, f Byzantine.

    ``s = floor(n/2 + 1) - f`` honest inputs must be won over. ``variant="paper"`` uses
    ``z = Phi^-1((n - s) / n)`` (the paper's formula); ``variant="implementation"`` uses
    ``z = Phi^-1((n - f - s) / (n - f))``, the form in widely used code. Both need f < n/2.
    """
    n = _as_count(n, "ALIE: n (number of inputs)")
    f = _as_count(f, "ALIE: f (number of Byzantine clients)")
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


# ----------------------------------------------------------------------------------------------
# base classes
# ----------------------------------------------------------------------------------------------


class Attack:
    """Base of all Byzantine behaviours: ``f`` Byzantine clients, a seed, a kind and a name."""

    name: ClassVar[str] = "attack"
    kind: ClassVar[str] = "model"
    #: True when the crafted vectors depend on the aggregator, hence on the target node in P2P.
    adaptive: ClassVar[bool] = False

    def __init__(self, f: int = 0, seed: int = 0) -> None:
        self.f = _as_count(f, f"attack {self.name!r}: f (number of Byzantine clients)")
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    # -- configuration checks -------------------------------------------------------------------
    def check(self, n: int) -> None:
        """Raise ValueError if the attack cannot run with ``n`` inputs in total (h + f)."""
        if n <= self.f:
            raise ValueError(
                f"attack {self.name!r}: f = {self.f} Byzantine clients need at least one honest "
                f"client, got n = {n} inputs in total"
            )

    # -- the attack -----------------------------------------------------------------------------
    def __call__(
        self,
        honest: Tensor,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        raise NotImplementedError

    def extra(
        self,
        honest: Tensor,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """The f vectors sent in place of one per-client extra vector (SCAFFOLD's delta c_i,
        FedDyn's delta grad_i, FedSpeed's delta ghat_i), called after the update's ``__call__``.

        ``honest`` (h, e): the honest clients' rows of that extra; ``aggregator``: the rule the
        strategy aggregates it with. Default: the update's rule on the extra's own rows (sign flip
        sends minus their mean, ALIE their mean - z std, uniform/Gaussian draw vectors of length e
        from the same generator, the adaptive attacks line-search against the extra's rule).
        """
        return self(honest, aggregator=aggregator, generator=generator)

    def targeted(
        self,
        received_honest: Tensor,
        target: Tensor | None = None,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """The f vectors sent to one honest node (peer-to-peer).

        ``received_honest`` (h, d): the honest vectors that node aggregates, its own included;
        ``target`` (d,): the node's own vector; ``aggregator``: the node's aggregation of a stacked
        (m, d) tensor (close over ``target`` for rules centred on it, such as NNA).
        Default: the same crafting as ``__call__`` on the node's view.
        """
        return self(received_honest, aggregator=aggregator, generator=generator)

    def per_target(
        self,
        honest: Tensor,
        *,
        aggregators: Sequence[Aggregator] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """Vectors for every honest node of a complete graph: (h, f, d), row i sent to node i.

        Every node receives all ``honest`` rows; ``aggregators[i]`` is node i's aggregation.
        Attacks that do not depend on the target are crafted once and broadcast (an expanded view,
        read-only); adaptive ones are crafted per node. ``None`` if the attack sends nothing.
        """
        h = honest.shape[0]
        if aggregators is not None and len(aggregators) != h:
            raise ValueError(
                f"attack {self.name!r}: per_target needs one aggregator per honest node, "
                f"got {len(aggregators)} for h = {h}"
            )
        if not self.adaptive and type(self).targeted is Attack.targeted:
            agg = aggregators[0] if aggregators is not None else None
            out = self(honest, aggregator=agg, generator=generator)
            return None if out is None else out.unsqueeze(0).expand(h, -1, -1)
        outs = []
        for i in range(h):
            agg = aggregators[i] if aggregators is not None else None
            out = self.targeted(honest, honest[i], aggregator=agg, generator=generator)
            if out is None:
                return None
            outs.append(out)
        return torch.stack(outs)

    def for_models(self) -> Attack:
        """This attack as a peer-to-peer adversary applies it to exchanged *models* (the honest
        rows are models, not updates); ``system.p2p`` calls it once. Default: the attack itself."""
        return self

    # -- randomness and checkpoints -------------------------------------------------------------
    def _rng(self, generator: torch.Generator | None) -> torch.Generator:
        return generator if generator is not None else self._generator

    def _noise(self, kind: str, shape: Sequence[int], like: Tensor, gen: torch.Generator) -> Tensor:
        """Standard normal or U[0, 1) noise drawn on the generator's device, moved to ``like``'s."""
        sample = torch.randn if kind == "normal" else torch.rand
        out = sample(tuple(shape), generator=gen, dtype=like.dtype, device=gen.device)
        return out.to(like.device)

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (the private generator's state; subclasses add theirs)."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        inner = ", ".join(f"{k}={v!r}" for k, v in params.items())
        return f"{type(self).__name__}({inner})"


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
        _check_updates(honest, self.name)
        self.check(honest.shape[0] + self.f)
        if self.f == 0:
            return honest.new_empty((0, honest.shape[1]))
        return self.craft(honest, aggregator, self._rng(generator))

    def craft(
        self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator
    ) -> Tensor | None:
        raise NotImplementedError


class DataAttack(Attack):
    """A data-poisoning behaviour applied in the Byzantine client by ``poison``.

    ``__call__`` is the identity: the Byzantine updates are what the client computed from its
    poisoned data, so a runtime that passes them through the adversary gets them back unchanged.
    """

    kind: ClassVar[str] = "data"

    def __call__(
        self,
        updates: Tensor,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        return updates

    def poison(
        self,
        x: Tensor,
        y: Tensor,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# no attack, data poisoning
# ----------------------------------------------------------------------------------------------


class NoAttack(DataAttack):
    """No attack: the f designated Byzantine clients (if any) behave honestly.

    With ``f = 0`` (the config default) no client is Byzantine. With ``f > 0`` this is the
    no-attack reference at the same n, aggregator f and client sampling as an attacked run:
    ``poison`` and ``__call__`` are identities.
    """

    name: ClassVar[str] = "none"

    def poison(
        self,
        x: Tensor,
        y: Tensor,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        return x, y


class LabelFlip(DataAttack):
    """Label flipping: train on ``y -> K - 1 - y`` (as in Karimireddy, He, Jaggi; ICLR 2022)."""

    name: ClassVar[str] = "label_flip"

    def poison(
        self,
        x: Tensor,
        y: Tensor,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        k = _as_count(num_classes, "label_flip: num_classes")
        if k < 1:
            raise ValueError("label_flip: num_classes must be >= 1")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"label_flip: labels must be an integer tensor, got {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ValueError(
                f"label_flip: labels must lie in [0, {k}), got range "
                f"[{int(y.min())}, {int(y.max())}]; check num_classes"
            )
        return x, (k - 1) - y


class NoisyData(DataAttack):
    """Noisy-data workers: train on features plus N(0, std^2) noise, or on U[low, high) features.

    The "augmented"/noisy workers of the Flag Aggregator paper (Almasi et al., ICLR 2024).
    ``mode="gaussian"`` adds noise to the features; ``mode="uniform"`` replaces them.
    Labels are kept.
    """

    name: ClassVar[str] = "noisy_data"
    MODES: ClassVar[tuple[str, ...]] = ("gaussian", "uniform")

    def __init__(
        self,
        f: int = 0,
        seed: int = 0,
        mode: str = "gaussian",
        std: float = 1.0,
        low: float = 0.0,
        high: float = 1.0,
    ) -> None:
        super().__init__(f, seed)
        if mode not in self.MODES:
            raise ValueError(f"noisy_data: unknown mode {mode!r}; choose one of {list(self.MODES)}")
        if not std >= 0:
            raise ValueError(f"noisy_data: std must be >= 0, got {std}")
        if not low < high:
            raise ValueError(f"noisy_data: need low < high, got low = {low}, high = {high}")
        self.mode, self.std, self.low, self.high = mode, float(std), float(low), float(high)

    def poison(
        self,
        x: Tensor,
        y: Tensor,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        if not x.is_floating_point():
            raise ValueError(f"noisy_data: features must be floating point, got {x.dtype}")
        gen = self._rng(generator)
        if self.mode == "gaussian":
            return x + self.std * self._noise("normal", x.shape, x, gen), y
        return self.low + (self.high - self.low) * self._noise("uniform", x.shape, x, gen), y


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
        _check_updates(honest, self.name)
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
            return _repeat(-self.scale * honest.mean(dim=0), self.f)
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
        self.ddof = _as_count(ddof, f"{self.name}: ddof")

    def z_value(self, n: int) -> float:
        """The z used with n inputs in total (h + f)."""
        return self.z if self.z is not None else alie_z(n, self.f, self.variant)

    def check(self, n: int) -> None:
        super().check(n)
        if self.z is None and self.f > 0:
            alie_z(n, self.f, self.variant)

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        mu, sigma = _moments(honest, self.ddof)
        z = self.z_value(honest.shape[0] + self.f)
        return _repeat(mu - z * sigma, self.f)


class FOE(ModelAttack):
    """Fall of Empires / inner-product manipulation (Xie, Koyejo, Gupta; UAI 2019): ``-eps mu``.
    Extras: ``-eps`` times the honest extras' mean."""

    name: ClassVar[str] = "foe"

    def __init__(self, f: int = 0, seed: int = 0, eps: float = 0.1) -> None:
        super().__init__(f, seed)
        self.eps = float(eps)

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        return _repeat(-self.eps * honest.mean(dim=0), self.f)


# ----------------------------------------------------------------------------------------------
# model poisoning: adaptive (line search against the aggregator)
# ----------------------------------------------------------------------------------------------


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
        max_evals = _as_count(max_evals, f"{self.name}: max_evals")
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
        return _repeat(vector(best), self.f)


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
        mu, sigma = _moments(honest, self.ddof)
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
        mu, sigma = _moments(honest, 1)
        norm = float(torch.linalg.vector_norm(mu))
        rho = float(torch.linalg.vector_norm(sigma)) / norm if norm > 0 else 0.0
        out = self._search(honest, aggregator, lambda s: (1.0 - s * rho) * mu, None)
        self.last_factor = None if self.last_factor is None else self.last_factor * rho  # c
        return out


# ----------------------------------------------------------------------------------------------
# mimic
# ----------------------------------------------------------------------------------------------


class Mimic(ModelAttack):
    """Mimic (Karimireddy, He, Jaggi; ICLR 2022): every Byzantine copies one honest input.

    ``index`` given: copy ``honest[index]`` (rows are in the runtime's order, sorted by client id).
    ``index=None``: the paper's heuristic. For the first ``warmup`` calls (rounds) the attack keeps
    a running mean ``m`` of the honest inputs over rounds and a streaming power-iteration estimate
    ``z`` of the top eigenvector of their covariance (``v <- t/(t+1) v + 1/(t+1) C^T C z / h``,
    ``z = v/||v||``, C the centred honest inputs), and copies the input with the largest
    ``|<x_i - m, z>|``; after warmup that choice is frozen (state: ``state_dict``).
    Call ``__call__`` (or ``per_target``) once per round so the estimate advances once per round;
    ``targeted`` only reads it. Extras (``extra``): the Byzantines send the extras of the honest
    client whose update they copied in the preceding ``__call__`` (they pose as that client).
    """

    name: ClassVar[str] = "mimic"

    def __init__(
        self, f: int = 0, seed: int = 0, index: int | None = None, warmup: int = 20
    ) -> None:
        super().__init__(f, seed)
        self.index = None if index is None else _as_count(index, "mimic: index")
        self.warmup = _as_count(warmup, "mimic: warmup")
        if self.index is None and self.warmup < 1:
            raise ValueError(
                "mimic: the heuristic (index=null) needs warmup >= 1 rounds to estimate its "
                "direction; set warmup >= 1 or a fixed index"
            )
        self._rounds = 0
        self._mean: Tensor | None = None
        self._acc: Tensor | None = None
        self._dir: Tensor | None = None
        self._chosen: int | None = None
        self._last_row = 0  # the honest row copied by the last ``__call__`` (for ``extra``)

    def _pick(self, honest: Tensor, gen: torch.Generator, update: bool) -> int:
        h = honest.shape[0]
        if self.index is not None:
            if self.index >= h:
                raise ValueError(f"mimic: index {self.index} out of range for h = {h} honest rows")
            return self.index
        if update and self._rounds < self.warmup:
            t = self._rounds
            mean = honest.mean(dim=0)
            if self._mean is None:
                self._mean = mean
            else:  # running mean over rounds (state may come from another device)
                self._mean, self._acc, self._dir = (
                    v.to(honest) for v in (self._mean, self._acc, self._dir)
                )
                self._mean = self._mean + (mean - self._mean) / (t + 1)
            if self._dir is None:
                z = self._noise("normal", (honest.shape[1],), honest, gen)
                self._dir = z / torch.linalg.vector_norm(z).clamp_min(torch.finfo(z.dtype).tiny)
                self._acc = torch.zeros_like(self._dir)
            centred = honest - self._mean
            cov_z = centred.T @ (centred @ self._dir) / h
            self._acc = self._acc * (t / (t + 1)) + cov_z / (t + 1)
            norm = torch.linalg.vector_norm(self._acc)
            if norm > 0:
                self._dir = self._acc / norm
            self._rounds += 1
            self._chosen = None
        if self._dir is None:  # nothing observed yet (targeted before any round)
            return 0
        if not update or self._chosen is None or self._chosen >= h:
            proj = (honest - self._mean.to(honest)) @ self._dir.to(honest)
            chosen = int(torch.argmax(proj.abs()))
            if not update:  # targeted: the best row of what this node received
                return chosen
            self._chosen = chosen
        return self._chosen

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        self._last_row = self._pick(honest, gen, update=True)
        return _repeat(honest[self._last_row], self.f)

    def extra(
        self,
        honest: Tensor,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The copied client's row of the extra (no state update, no randomness)."""
        _check_updates(honest, self.name)
        return _repeat(honest[min(self._last_row, honest.shape[0] - 1)], self.f)

    def targeted(
        self,
        received_honest: Tensor,
        target: Tensor | None = None,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        _check_updates(received_honest, self.name)
        self.check(received_honest.shape[0] + self.f)
        row = self._pick(received_honest, self._rng(generator), update=False)
        return _repeat(received_honest[row], self.f)

    def per_target(
        self,
        honest: Tensor,
        *,
        aggregators: Sequence[Aggregator] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        out = self(honest, generator=generator)  # one state update per round
        return None if out is None else out.unsqueeze(0).expand(honest.shape[0], -1, -1)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            rounds=self._rounds, mean=self._mean, acc=self._acc, dir=self._dir, chosen=self._chosen
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._rounds, self._chosen = int(state["rounds"]), state["chosen"]
        self._mean, self._acc, self._dir = state["mean"], state["acc"], state["dir"]


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

ATTACKS: dict[str, type[Attack]] = {
    "none": NoAttack,
    "sign_flip": SignFlip,
    "reversed": Reversed,
    "label_flip": LabelFlip,
    "noisy_data": NoisyData,
    "gaussian": Gaussian,
    "uniform": Uniform,
    "alie": ALIE,
    "alie_adaptive": ALIEAdaptive,
    "foe": FOE,
    "ipm": FOE,  # inner-product manipulation: the same attack
    "foe_adaptive": FOEAdaptive,
    "ipm_adaptive": FOEAdaptive,
    "mimic": Mimic,
    "inf_vector": InfAttack,  # not "inf": Hydra parses attack=inf as a float
    "nan_vector": NaNAttack,
    "crash": Crash,
}


def build_attack(name: str, f: int = 0, **kwargs: Any) -> Attack:
    """Construct the attack registered as ``name`` with f Byzantine clients and its settings."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}") from None
    return cls(f=f, **kwargs)


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
    attack: Any,
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
    adaptive = bool(getattr(attack, "adaptive", False))
    probe = adaptive_probe(aggregator, byz, w) if adaptive else None
    crafted = attack(U[~byz], aggregator=probe, generator=generator)
    if crafted is None:  # crash: the Byzantine clients send nothing
        return removed(~byz)
    U = U.clone()
    U[byz] = crafted[:nb].to(device=U.device, dtype=U.dtype)
    craft_extra = getattr(attack, "extra", attack)
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
    attack: Any,
    U: torch.Tensor,
    w: torch.Tensor,
    byz: torch.Tensor,
    aggregator: Any,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`attack_round` on the updates alone: returns ``(U, w, dropped_nonfinite)``."""
    out = attack_round(attack, U, w, byz, aggregator, generator)
    return out.U, out.w, out.dropped_nonfinite
