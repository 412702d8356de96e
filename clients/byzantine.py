"""Byzantine behaviours of the clients: the attack contract and data poisoning.

Threat model (docs: ../shared/specs/robust.md): ``f`` of the clients are Byzantine (the ``f`` lowest
client ids). Two kinds of attack share the base class :class:`Attack` (class attribute ``kind``):

* ``"data"`` (here): applied in the Byzantine client, to its training data, by
  ``attack.poison(x, y, num_classes, generator)``, once, where the client's data is placed. The
  updates those clients then compute are their Byzantine updates; ``attack(updates)`` is the
  identity, so a runtime may treat both kinds alike. The extras such a client sends (SCAFFOLD's
  delta c_i, ...) are what it computed on its poisoned data.
* ``"model"``: applied where every client's update meets, before aggregation, by an omniscient
  adversary. Model-poisoning attacks live beside the aggregators they attack, in
  :mod:`strategies.attacks` (registry ``strategies.attacks.ATTACKS`` of both kinds).

Conventions of the base contract (tested in tests/test_attacks.py): ``attack(honest,
aggregator=None, generator=None)`` returns the ``(f, d)`` Byzantine vectors, ``extra`` the vectors
sent in place of a per-client extra, ``targeted``/``per_target`` the peer-to-peer forms; randomness
comes from the ``generator`` argument when given, else the attack's own CPU generator seeded with
``seed`` (its state is in ``state_dict`` for checkpoints); noise is drawn on the generator's device
and moved to the data's, so results do not depend on where the data lives.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "Aggregator",
    "Attack",
    "DataAttack",
    "LabelFlip",
    "NoAttack",
    "NoisyData",
    "as_count",
]

Aggregator = Callable[[Tensor], Tensor]


def as_count(value: Any, what: str) -> int:
    """An integer >= 0 (Python or NumPy integer), else ValueError naming the setting."""
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {count}")
    return count


class Attack:
    """Base of all Byzantine behaviours: ``f`` Byzantine clients, a seed, a kind and a name."""

    name: ClassVar[str] = "attack"
    kind: ClassVar[str] = "model"
    #: True when the crafted vectors depend on the aggregator, hence on the target node in P2P.
    adaptive: ClassVar[bool] = False

    def __init__(self, f: int = 0, seed: int = 0) -> None:
        self.f = as_count(f, f"attack {self.name!r}: f (number of Byzantine clients)")
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
        k = as_count(num_classes, "label_flip: num_classes")
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
