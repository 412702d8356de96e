"""One helper for every random stream (issue 20 item 6): flagstaff.clients.seeds.stream reproduces the formulas
the runtimes wrote by hand before it existed (their draws are in committed tables and tests)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import flagstaff.clients.seeds
from flagstaff.clients.seeds import mix64, stream


@pytest.mark.parametrize("seed", [0, 3, 2**32 - 1])
@pytest.mark.parametrize("key", [0, 1, 29])
def test_legacy_and_sequence_streams_keep_their_old_formulas(seed: int, key: int) -> None:
    draws = lambda g: torch.randn(4, generator=g)  # noqa: E731
    assert torch.equal(
        draws(stream(seed, key, scheme="attack")),
        draws(torch.Generator().manual_seed(seed * 1_000_003 + key)),
    )
    assert stream(seed, key, kind="int", scheme="poison") == seed * 1_000_003 + 7919 * key
    assert stream(seed, key, kind="int", scheme="flower_eval") == seed * 7919 + key
    old = np.random.default_rng([seed, key, 0x5A3]).random(5)
    assert np.array_equal(stream(seed, key, 0x5A3, kind="numpy").random(5), old)
    old = int(mix64(seed, key, 4, 0xD95) % np.uint64(2**62))
    assert stream(seed, key, 4, 0xD95, kind="int", scheme="mix64") == old
    words = [p & 0xFFFFFFFF for p in (seed, key, 0x5EE7C4)]
    old = int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> 1)
    assert stream(seed, key, 0x5EE7C4, kind="int", scheme="sequence63") == old
    old = int(np.random.SeedSequence([seed, key, 0xC11]).generate_state(1)[0])
    assert stream(seed, key, 0xC11, kind="int") == old
    assert np.array_equal(
        stream(seed, kind="numpy", scheme="partition_sizes").random(3),
        np.random.default_rng(seed + 7919).random(3),
    )


def test_bad_scheme_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown stream scheme 'nope'.*sequence"):
        stream(0, 1, scheme="nope")


def test_docstring_examples() -> None:
    assert doctest.testmod(flagstaff.clients.seeds).failed == 0
