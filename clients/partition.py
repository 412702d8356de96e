"""Partitioners: split a labelled training set over clients (IID, Dirichlet over labels, equal-size
Dirichlet priors as FL-Simulator / FedDyn draw them, shards, natural: one client per writer or
speaking role, or any Flower Datasets partitioner).

Each returns a list of index arrays, one per client, fully determined by the seed.
References: Dirichlet label skew (Hsu, Qi, Brown 2019); equal sizes with per-client Dirichlet class
priors (Acar et al. 2021, FedDyn's code, as FL-Simulator's ``dataset.py`` runs it); k shards per client (McMahan et al. 2017);
natural splits by writer and speaking role (LEAF, Caldas et al. 2018); Flower Datasets' partitioners
(Beutel et al. 2020, ``flwr_datasets.partitioner``). Which to use when: docs/data.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from flagstaff.clients.seeds import stream

__all__ = [
    "partition",
    "iid",
    "dirichlet",
    "dirichlet_equal",
    "EXHAUSTED",
    "shards",
    "classes_per_client",
    "with_replacement",
    "unequal_sizes",
    "natural",
    "flower",
    "summarize",
]


def _check(n_samples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if n_samples < num_clients:
        raise ValueError(
            f"{n_samples} training samples cannot give each of {num_clients} clients data; "
            "lower num_clients or use a larger dataset"
        )


def iid(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Uniformly random, equal-size split (sizes differ by at most one)."""
    _check(len(labels), num_clients)
    perm = stream(seed, kind="numpy").permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Per class, split its samples over clients with proportions ~ Dir(alpha).

    Redrawn until every client holds at least ``min_size`` samples (the usual convention).
    """
    _check(len(labels), num_clients)
    if alpha <= 0:
        raise ValueError(f"partition.alpha must be > 0, got {alpha}")
    rng = stream(seed, kind="numpy")
    classes = np.unique(labels)
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                buckets[k].append(part)
        parts = [np.sort(np.concatenate(b)) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left a client with fewer than {min_size} samples after "
        f"{max_tries} draws; raise alpha or lower num_clients"
    )


#: what ``dirichlet_equal`` does when a client draws a class with no samples left
EXHAUSTED = ("renormalize", "refill")


def dirichlet_equal(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    exhausted: str = "renormalize",
) -> list[np.ndarray]:
    """Equal client sizes, class proportions from a per-client prior ~ Dir(alpha), drawn sample by
    sample as FL-Simulator's ``dataset.py`` (and FedDyn's code before it) does.

    Every client gets ``n // num_clients`` samples (the first client also the remainder). Each
    client draws a class prior ~ Dir(alpha, ..., alpha); then, in a random order (a uniformly random
    client that is not full, again and again), the client draws the class of its next sample from
    its prior and takes that class's next sample. When the class has none left: ``renormalize``
    draws again from the prior without the exhausted classes (no sample is used twice);
    ``refill`` (FL-Simulator's code) restarts the class and draws again from the whole prior, so the
    class's samples are handed out a second time (its clients' histograms follow their priors; some
    samples repeat, others are never used). Vectorized: the order and the draws are arrays, and only
    the events where a class runs out are handled one after another (:func:`equal_dirichlet_draw`).
    """
    _check(len(labels), num_clients)
    if alpha <= 0:
        raise ValueError(f"partition.alpha must be > 0, got {alpha}")
    if exhausted not in EXHAUSTED:
        raise ValueError(
            f"partition.exhausted={exhausted!r}: choose renormalize (no sample twice) or refill "
            "(FL-Simulator's code)"
        )
    rng = stream(seed, kind="numpy")
    classes, y = np.unique(labels, return_inverse=True)
    n = len(labels)
    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[0] += n - sizes.sum()
    priors = rng.dirichlet(np.full(len(classes), alpha), size=num_clients)
    order = np.argsort(y, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(y, minlength=len(classes)))[:-1])
    members = [rng.permutation(m) for m in members]
    draws = np.empty(0, dtype=np.int64)
    while (np.bincount(draws, minlength=num_clients) < sizes).any():
        draws = np.concatenate([draws, rng.integers(0, num_clients, n + 64 * num_clients)])
    u = rng.random((n, 2 if exhausted == "renormalize" else 4))
    return [np.sort(p) for p in equal_dirichlet_draw(draws, u, priors, members, sizes, exhausted)]


def equal_dirichlet_draw(
    draws: np.ndarray,
    u: np.ndarray,
    priors: np.ndarray,
    members: list[np.ndarray],
    sizes: np.ndarray,
    exhausted: str = "renormalize",
) -> list[np.ndarray]:
    """The sample-by-sample procedure of :func:`dirichlet_equal` on given random numbers.

    ``draws``: uniform client ids, a full client's skipped (the order of the samples); ``u`` (n, W):
    the uniforms of sample t's class draws, ``u[t, j % W]`` for its j-th draw (a class is the first
    whose cumulative prior reaches the uniform); ``priors`` (clients, classes); ``members[c]``:
    class c's samples in the order they are handed out; ``sizes``: samples per client. Returns each
    client's samples in the order it drew them.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = np.array([len(m) for m in members], dtype=np.int64)
    client = _fill_order(np.asarray(draws, dtype=np.int64), sizes)
    p = np.asarray(priors, dtype=np.float64)[client]  # (T, C): each sample's client prior
    if exhausted == "refill":
        cls = _refill(p, u, counts)
    else:
        cls = _renormalize(p, u, counts)
    rank = _rank_within(cls, len(counts))  # the a-th sample a class hands out: members[c][a % n_c]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    flat = np.concatenate(members)[starts[cls] + rank % counts[cls]]
    by_client = np.argsort(client, kind="stable")
    return np.split(flat[by_client], np.cumsum(sizes)[:-1])


def _fill_order(draws: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The client of each sample in drawing order: ``draws`` with every draw of a full client
    dropped (a client's first ``sizes[k]`` draws are kept)."""
    rank = _rank_within(draws, len(sizes))
    keep = rank < sizes[draws]
    if keep.sum() != sizes.sum():
        raise ValueError("equal_dirichlet_draw: draws too short to fill every client")
    return draws[keep]


def _rank_within(values: np.ndarray, n: int) -> np.ndarray:
    """For each entry, how many earlier entries have the same value (values in 0..n-1)."""
    order = np.argsort(values, kind="stable")
    counts = np.bincount(values, minlength=n)
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values)) - np.repeat(np.cumsum(counts) - counts, counts)
    return rank


def _draw_class(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, the first class whose cumulative share of the weights ``p`` reaches ``u`` (as
    ``argmax(u <= cumsum(prior))`` in FL-Simulator; rows of positive total)."""
    cum = np.cumsum(p, axis=1)
    cum /= cum[:, -1:]
    return np.minimum((cum < u[:, None]).sum(1), p.shape[1] - 1)


def _first_overflow(cls: np.ndarray, counts: np.ndarray) -> tuple[int, int] | None:
    """(time, class) of the earliest draw of a class beyond its ``counts`` samples, or None."""
    rank = _rank_within(cls, len(counts))
    over = np.flatnonzero(rank == counts[cls])
    if len(over) == 0:
        return None
    t = int(over[0])
    return t, int(cls[t])


def _renormalize(p: np.ndarray, u: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Classes with exhaustion handled by redrawing (``u[:, 1]``) from the prior without the
    classes that ran out before the sample: one pass per class that runs out, in time order."""
    first = _draw_class(p, u[:, 0])
    cls = first.copy()
    out = np.zeros(len(counts), dtype=bool)
    while (hit := _first_overflow(cls, counts)) is not None:
        t, c = hit
        out[c] = True
        redo = t + np.flatnonzero(out[first[t:]])
        avail = ~out
        w = p[redo] * avail
        w = np.where(w.sum(1, keepdims=True) > 0, w, avail.astype(np.float64))
        cls[redo] = _draw_class(w, u[redo, 1])
    return cls


def _refill(p: np.ndarray, u: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Classes with FL-Simulator's refill: a draw of a class that ran out restarts the class and
    is drawn again (``u[t, j % W]`` for the j-th draw of sample t); each class's draws, rejected
    ones included, come in cycles of ``counts[c] + 1`` whose last is the rejected one."""
    T, W = u.shape
    cls = _draw_class(p, u[:, 0])
    tries = np.zeros(T, dtype=np.int64)
    rej_t, rej_j, rej_c = (np.empty(0, dtype=np.int64) for _ in range(3))
    while True:
        t_all = np.concatenate([np.arange(T), rej_t])
        j_all = np.concatenate([tries, rej_j])
        c_all = np.concatenate([cls, rej_c])
        order = np.lexsort((j_all, t_all, c_all))  # by class, then time, then try
        n = np.bincount(c_all, minlength=len(counts))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order)) - np.repeat(np.cumsum(n) - n, n)
        rejected = (rank[:T] + 1) % (counts[cls] + 1) == 0  # a sample's current draw is rejected
        if not rejected.any():
            break
        t = int(np.flatnonzero(rejected)[0])
        rej_t, rej_j, rej_c = (
            np.append(rej_t, t),
            np.append(rej_j, tries[t]),
            np.append(rej_c, cls[t]),
        )
        tries[t] += 1
        cls[t] = _draw_class(p[t : t + 1], u[t : t + 1, tries[t] % W])[0]
    return cls


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Sort by label, cut into ``num_clients * shards_per_client`` shards, deal k to each client."""
    _check(len(labels), num_clients * shards_per_client)
    rng = stream(seed, kind="numpy")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * shards_per_client)
    deal = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[j] for j in row])) for row in deal]


def classes_per_client(
    labels: np.ndarray, num_clients: int, classes: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Each client draws ``classes`` distinct labels; each class's samples are split evenly
    among the clients that drew it (pathological non-IID, "c classes per client")."""
    _check(len(labels), num_clients)
    rng = stream(seed, kind="numpy")
    all_classes = np.unique(labels)
    if not 1 <= classes <= len(all_classes):
        raise ValueError(f"partition.classes must be in 1..{len(all_classes)}, got {classes}")
    # round-robin start so every class is drawn by someone, then random extra classes
    chosen = []
    for k in range(num_clients):
        first = all_classes[k % len(all_classes)]
        rest = rng.permutation(all_classes[all_classes != first])[: classes - 1]
        chosen.append(np.concatenate([[first], rest]))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in all_classes:
        owners = [k for k in range(num_clients) if c in chosen[k]]
        if not owners:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, part in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[k].append(part)
    out = [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]
    if min(len(p) for p in out) == 0:
        raise ValueError("classes_per_client left a client without data; lower num_clients")
    return out


def with_replacement(
    labels: np.ndarray, num_clients: int, samples_per_client: int, seed: int = 0
) -> list[np.ndarray]:
    """Each client draws ``samples_per_client`` samples uniformly with replacement (scale tests:
    any number of clients from a small dataset; used by the W2/W3 simulation workloads)."""
    if samples_per_client < 1:
        raise ValueError(f"partition.samples_per_client must be >= 1, got {samples_per_client}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    rng = stream(seed, kind="numpy")
    draws = rng.integers(0, len(labels), size=(num_clients, samples_per_client))
    return list(np.sort(draws, axis=1))


def unequal_sizes(
    parts: list[np.ndarray], sigma: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Subsample each client to a log-normal(0, sigma) share of its data (unequal client sizes)."""
    if sigma <= 0:
        return parts
    rng = stream(seed, kind="numpy", scheme="partition_sizes")
    scale = rng.lognormal(0.0, sigma, size=len(parts))
    scale = scale / scale.max()
    return [
        np.sort(rng.choice(p, size=max(min_size, int(round(len(p) * s))), replace=False))
        for p, s in zip(parts, scale, strict=True)
    ]


def natural(
    values: np.ndarray, num_clients: int, seed: int = 0, key: str = "key"
) -> list[np.ndarray]:
    """One client per distinct value of a per-sample column (a writer, a speaking role): the
    ``num_clients`` first values of a seeded permutation of the distinct values (all of them when
    ``num_clients`` equals their number; more is an error naming that number)."""
    values = np.asarray(values)
    groups, inverse = np.unique(values, return_inverse=True)
    if num_clients < 1 or num_clients > len(groups):
        raise ValueError(
            f"partition=natural: the data has {len(groups)} distinct {key} values, so "
            f"num_clients={num_clients} cannot give each client one; set num_clients="
            f"{len(groups)} (every {key}) or fewer (the first of a seeded order)"
        )
    order = np.argsort(inverse, kind="stable")  # rows grouped by value, in row order within
    members = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(groups)))[:-1])
    chosen = np.random.default_rng(seed).permutation(len(groups))[:num_clients]
    return [members[g] for g in chosen]


def flower(
    columns: Mapping[str, np.ndarray], num_clients: int, partitioner: Callable[..., Any]
) -> list[np.ndarray]:
    """Any Flower Datasets partitioner (``flwr_datasets.partitioner``) applied to the training
    split: ``partitioner`` is its class or a partial of it (Hydra ``_partial_: true``), called with
    ``num_partitions=num_clients`` where it takes that argument (NaturalIdPartitioner counts its
    partitions itself, which must then equal ``num_clients``); it sees the per-sample ``columns``
    (the label under its dataset name and ``label``, writer ids, ...) as a ``datasets.Dataset``."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "partition=flwr needs flwr-datasets: pip install flwr-datasets -c constraints.txt"
        ) from err
    row = "_flagstaff_row"
    n = len(next(iter(columns.values())))
    table = datasets.Dataset.from_dict(
        {**{k: np.asarray(v) for k, v in columns.items()}, row: np.arange(n)}
    )
    params = inspect.signature(partitioner).parameters
    p = partitioner(num_partitions=num_clients) if "num_partitions" in params else partitioner()
    name = type(p).__name__
    by = getattr(p, "_partition_by", None)
    if by is not None and by not in columns:
        raise ValueError(
            f"partition=flwr: {name} partitions by {by!r}, the data has columns "
            f"{sorted(columns)}; set partition.partitioner.partition_by to one of them (data.columns "
            "keeps more)"
        )
    p.dataset = table
    if p.num_partitions != num_clients:
        raise ValueError(
            f"partition=flwr: {name} made {p.num_partitions} partitions; set "
            f"num_clients={p.num_partitions}"
        )
    parts = [
        np.sort(np.asarray(p.load_partition(i)[row], dtype=np.int64)) for i in range(num_clients)
    ]
    empty = [k for k, q in enumerate(parts) if len(q) == 0]
    if empty:
        raise ValueError(
            f"partition=flwr: {name} left clients {empty[:10]} without samples; lower num_clients "
            "or change the partitioner's settings"
        )
    return parts


def partition(
    labels: np.ndarray,
    num_clients: int,
    kind: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    classes: int = 2,
    size_sigma: float = 0.0,
    samples_per_client: int = 40,
    exhausted: str = "renormalize",
    key: str | None = None,
    partitioner: Callable[..., Any] | None = None,
    columns: Mapping[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Dispatch by ``kind``: iid | dirichlet | dirichlet_equal (``exhausted``: renormalize |
    refill) | shards | classes | with_replacement | natural (one
    client per value of the column ``key``) | flwr (a Flower Datasets ``partitioner``); optional
    unequal sizes. ``columns``: the dataset's per-sample columns (``Dataset.partition_columns``)."""
    labels = np.asarray(labels)
    columns = dict(columns) if columns is not None else {"label": labels}
    if kind in ("natural", "flwr") and len(next(iter(columns.values()))) != len(labels):
        raise ValueError("partition: the columns and the labels differ in length")
    if kind == "natural":
        if key not in columns:
            raise ValueError(
                f"partition=natural partition.key={key}: the data has no such per-sample column "
                f"(it has {sorted(columns)}); name one, and keep it with data.columns=[...] "
                "(e.g. data=femnist: writer_id, data=shakespeare: character_id)"
            )
        parts = natural(columns[key], num_clients, seed, key)
    elif kind == "flwr":
        if partitioner is None:
            raise ValueError(
                "partition=flwr needs partition.partitioner._target_=flwr_datasets.partitioner.<Name> "
                "(with _partial_: true, as conf/partition/flwr.yaml)"
            )
        parts = flower(columns, num_clients, partitioner)
    elif kind == "iid":
        parts = iid(labels, num_clients, seed)
    elif kind == "dirichlet":
        parts = dirichlet(labels, num_clients, alpha, seed)
    elif kind == "dirichlet_equal":
        parts = dirichlet_equal(labels, num_clients, alpha, seed, exhausted)
    elif kind == "shards":
        parts = shards(labels, num_clients, shards_per_client, seed)
    elif kind == "classes":
        parts = classes_per_client(labels, num_clients, classes, seed)
    elif kind == "with_replacement":
        parts = with_replacement(labels, num_clients, samples_per_client, seed)
    else:
        raise ValueError(
            f"unknown partition {kind!r}; choose iid, dirichlet, dirichlet_equal, shards, classes, "
            "with_replacement, natural or flwr"
        )
    return unequal_sizes(parts, size_sigma, seed)


def summarize(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> dict:
    """Samples and label histogram per client (written to the run directory)."""
    labels = np.asarray(labels)
    sizes = [len(p) for p in parts]
    return {
        "num_clients": len(parts),
        "samples_min": int(min(sizes)),
        "samples_max": int(max(sizes)),
        "samples_mean": float(np.mean(sizes)),
        "clients": [
            {
                "client": k,
                "samples": len(p),
                "labels": np.bincount(labels[p], minlength=num_classes).tolist(),
            }
            for k, p in enumerate(parts)
        ],
    }
