"""Partitioners: split a labelled training set over clients (IID, Dirichlet over labels, shards,
natural: one client per writer or speaking role, or any Flower Datasets partitioner).

Each returns a list of index arrays, one per client, fully determined by the seed.
References: Dirichlet label skew (Hsu, Qi, Brown 2019); k shards per client (McMahan et al. 2017);
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
    key: str | None = None,
    partitioner: Callable[..., Any] | None = None,
    columns: Mapping[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Dispatch by ``kind``: iid | dirichlet | shards | classes | with_replacement | natural (one
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
    elif kind == "shards":
        parts = shards(labels, num_clients, shards_per_client, seed)
    elif kind == "classes":
        parts = classes_per_client(labels, num_clients, classes, seed)
    elif kind == "with_replacement":
        parts = with_replacement(labels, num_clients, samples_per_client, seed)
    else:
        raise ValueError(
            f"unknown partition {kind!r}; choose iid, dirichlet, shards, classes, "
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
