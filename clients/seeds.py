"""Random streams: every generator of a run is ``stream(seed, *keys)``, derived from the root seed and
a tuple of integer keys (round, client id, a tag naming the use), never from global state, so that
results do not depend on hosts, arrival order or what else ran (STYLE.md point 10; numpy's
SeedSequence, O'Neill 2015 / numpy NEP 19).

``stream(seed, *keys)`` returns a ``torch.Generator`` (``kind="torch"``), a
``numpy.random.Generator`` (``kind="numpy"``: ``np.random.default_rng([seed, *keys])``) or the
integer seed itself (``kind="int"``). ``scheme`` says how the keys become a seed:

* ``"sequence"`` (default): ``SeedSequence([seed, *keys])``, 32 bits (client-level DP noise).
* ``"sequence63"``: ``SeedSequence`` of the keys' low 32 bits, 63 bits (communication codecs).
* ``"mix64"``: :func:`mix64` of the keys modulo 2**62 (DP-SGD trainers' per-client streams); the
  same hash, unreduced, is the batch plans' counter-based shuffle (``clients.plan``).
* ``"root"``: the seed as it is, no keys (``torch.Generator().manual_seed(seed)``).

Legacy keys: streams whose hand-written formulas predate this module and that committed tables or
tests depend on keep their formulas bit for bit (``LEGACY``):

* ``"attack"``: ``seed * 1_000_003 + round`` (model attacks, per round or peer-to-peer step);
* ``"poison"``: ``seed * 1_000_003 + 7919 * client`` (data poisoning, per Byzantine client);
* ``"flower_eval"``: ``seed * 7919 + round`` (the Flower adapter's evaluation sample, ``random``);
* ``"partition_sizes"``: ``seed + 7919`` (the size draw of ``partition=with_replacement``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

__all__ = ["LEGACY", "SCHEMES", "mix64", "stream"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def mix64(*parts: np.ndarray | int) -> np.ndarray:
    """SplitMix64 finalizer chained over integer arrays: a fast, well-mixed hash (Steele et al. 2014)."""
    h = np.zeros((), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for p in parts:
            h = h ^ np.asarray(p).astype(np.uint64)
            h = h + _GOLD
            h = (h ^ (h >> np.uint64(30))) * _M1
            h = (h ^ (h >> np.uint64(27))) * _M2
            h = h ^ (h >> np.uint64(31))
    return h


def _sequence(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0])


def _sequence63(seed: int, *keys: int) -> int:
    words = [int(p) & 0xFFFFFFFF for p in (seed, *keys)]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> 1)


def _mix64(seed: int, *keys: int) -> int:
    return int(mix64(seed, *keys) % np.uint64(2**62))


def _root(seed: int, *keys: int) -> int:
    if keys:
        raise ValueError(f"scheme 'root' takes no keys, got {keys}")
    return int(seed)


SCHEMES: dict[str, Callable[..., int]] = {
    "sequence": _sequence,
    "sequence63": _sequence63,
    "mix64": _mix64,
    "root": _root,
}

#: hand-written formulas kept bit for bit (see the module docstring); each takes (seed, key)
LEGACY: dict[str, Callable[..., int]] = {
    "attack": lambda seed, round_idx: int(seed) * 1_000_003 + int(round_idx),
    "poison": lambda seed, client: int(seed) * 1_000_003 + 7919 * int(client),
    "flower_eval": lambda seed, round_idx: int(seed) * 7919 + int(round_idx),
    "partition_sizes": lambda seed: int(seed) + 7919,
}


def stream(
    seed: int,
    *keys: int,
    kind: Literal["torch", "numpy", "int"] = "torch",
    scheme: str = "sequence",
) -> torch.Generator | np.random.Generator | int:
    """The random stream ``(seed, *keys)``: a CPU ``torch.Generator``, a numpy ``Generator`` or
    its integer seed (see the module docstring for ``scheme``).

    >>> int(stream(7, 3, 0x5A3, kind="numpy").integers(100)) == int(
    ...     np.random.default_rng([7, 3, 0x5A3]).integers(100)
    ... )
    True
    >>> stream(2, 5, kind="int", scheme="attack")
    2000011
    """
    if kind == "numpy":
        if scheme == "sequence":
            return np.random.default_rng([int(seed), *map(int, keys)])
        return np.random.default_rng(_seed(seed, keys, scheme))
    value = _seed(seed, keys, scheme)
    if kind == "int":
        return value
    if kind != "torch":
        raise ValueError(f"stream kind {kind!r}: choose torch, numpy or int")
    return torch.Generator(device="cpu").manual_seed(value)


def _seed(seed: int, keys: tuple[int, ...], scheme: str) -> int:
    if scheme in SCHEMES:
        return SCHEMES[scheme](seed, *keys)
    if scheme in LEGACY:
        return LEGACY[scheme](seed, *keys)
    raise ValueError(f"unknown stream scheme {scheme!r}; choose one of {[*SCHEMES, *LEGACY]}")
