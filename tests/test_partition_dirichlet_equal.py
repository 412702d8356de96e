"""partition=dirichlet_equal: FL-Simulator's (FedDyn's) Dirichlet split (issue 21 item 5).

Equal client sizes, a Dir(alpha) class prior per client, samples drawn one by one in a random client
order; a class that runs out is either left out of the redraw (``renormalize``) or restarted
(``refill``, FL-Simulator's code). The vectorized draw equals a straightforward sample-by-sample
loop written after FL-Simulator's ``dataset.py`` on the same random numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

from flagstaff.clients.partition import dirichlet_equal, equal_dirichlet_draw, partition


def _loop(draws, u, priors, members, sizes, exhausted):
    """FL-Simulator's ``while(np.sum(client_data_list)!=0)`` loop, reading its random numbers from
    ``draws`` (np.random.randint(n_client)) and ``u`` (np.random.uniform(), the j-th draw of the
    t-th sample at u[t, j % W]); ``renormalize`` redraws once from the prior without the classes
    that ran out (where FL-Simulator restarts the class)."""
    left = np.array(sizes)
    amount = [len(m) for m in members]
    out = [[] for _ in sizes]
    t = 0
    for k in draws:
        if left.sum() == 0:
            break
        if left[k] <= 0:  # a full client: draw another
            continue
        left[k] -= 1
        j = 0
        while True:
            if exhausted == "renormalize" and j > 0:
                w = priors[k] * (np.array(amount) > 0)
                c = int(np.argmax(u[t, 1] <= np.cumsum(w) / np.cumsum(w)[-1]))
            else:
                cum = np.cumsum(priors[k])
                c = int(np.argmax(u[t, j % u.shape[1]] <= cum / cum[-1]))
            if amount[c] <= 0:
                if exhausted == "refill":
                    amount[c] = len(members[c])
                j += 1
                continue
            amount[c] -= 1
            out[k].append(members[c][len(members[c]) - 1 - amount[c]])
            t += 1
            break
    return out


@pytest.mark.parametrize("exhausted", ["renormalize", "refill"])
def test_vectorized_draw_equals_the_sample_by_sample_loop(exhausted) -> None:
    """Small cases where classes run out (3 classes of 6, 18 and 36 samples over 6 clients)."""
    events = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        sizes = np.array([10, 10, 10, 10, 10, 10])
        members = [rng.permutation(np.arange(a, b)) for a, b in ((0, 6), (6, 24), (24, 60))]
        priors = rng.dirichlet(np.full(3, 0.3), size=6)
        draws = rng.integers(0, 6, 400)
        u = rng.random((60, 2 if exhausted == "renormalize" else 3))
        want = _loop(draws, u, priors, members, sizes, exhausted)
        got = equal_dirichlet_draw(draws, u, priors, members, sizes, exhausted)
        assert [list(g) for g in got] == want, seed
        flat = np.concatenate(got)
        events += len(np.unique(flat)) < 60
        if exhausted == "renormalize":
            assert sorted(flat.tolist()) == list(range(60))
    if exhausted == "refill":
        assert events > 10  # samples handed out twice: classes ran out and were restarted


def test_equal_sizes_no_sample_twice_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5_003)
    parts = dirichlet_equal(labels, 50, 0.1, seed=3)
    assert [len(p) for p in parts] == [100 + 3] + [100] * 49  # FL-Simulator: client 0 the rest
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat) == len(labels)
    again = dirichlet_equal(labels, 50, 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_equal(labels, 50, 0.1, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    refill = dirichlet_equal(labels, 50, 0.1, seed=3, exhausted="refill")
    assert [len(p) for p in refill] == [len(p) for p in parts]

    # alpha 0.1: most of a client's samples in its two largest classes; less so where classes ran
    # out and the rest of the prior was used (renormalize) than where they restart (refill)
    def top2(ps):
        return np.median(
            [np.sort(np.bincount(labels[p], minlength=10))[-2:].sum() / len(p) for p in ps]
        )

    assert 0.7 < top2(parts) < top2(refill) and top2(refill) > 0.9


def test_histograms_follow_the_priors() -> None:
    """With classes that never run out, each client's label counts are multinomial draws from its
    prior: every count within 4.5 standard deviations of n * p."""
    rng = np.random.default_rng(1)
    sizes = np.full(8, 3_000)
    members = [np.arange(c * 30_000, (c + 1) * 30_000) for c in range(5)]
    priors = rng.dirichlet(np.full(5, 0.5), size=8)
    for exhausted in ("renormalize", "refill"):
        parts = equal_dirichlet_draw(
            rng.integers(0, 8, 40_000), rng.random((24_000, 2)), priors, members, sizes, exhausted
        )
        for k, p in enumerate(parts):
            counts = np.bincount(p // 30_000, minlength=5)
            sd = np.sqrt(3_000 * priors[k] * (1 - priors[k]))
            assert np.all(np.abs(counts - 3_000 * priors[k]) <= 4.5 * sd + 1), (k, counts)


def test_dispatch_and_bad_settings() -> None:
    labels = np.repeat(np.arange(4), 25)
    parts = partition(labels, 5, kind="dirichlet_equal", alpha=0.5, seed=1)
    assert [len(p) for p in parts] == [20] * 5
    with pytest.raises(ValueError, match="partition.alpha must be > 0"):
        partition(labels, 5, kind="dirichlet_equal", alpha=0.0)
    with pytest.raises(ValueError, match="partition.exhausted='x': choose renormalize"):
        partition(labels, 5, kind="dirichlet_equal", exhausted="x")
    with pytest.raises(ValueError, match="draws too short"):
        equal_dirichlet_draw(np.zeros(3, dtype=np.int64), np.zeros((4, 2)), np.ones((2, 4)),
                             [np.arange(4)], np.array([2, 2]))  # fmt: skip


def test_config_composes_and_builds_the_partition() -> None:
    from flagstaff.system.build import validate
    from tests.conftest import compose

    cfg = compose("partition=dirichlet_equal", "partition.alpha=0.1")
    assert cfg.partition.kind == "dirichlet_equal" and cfg.partition.exhausted == "renormalize"
    validate(cfg)
