"""Natural partitions (one client per writer / speaking role) and Flower Datasets' partitioners."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from flagstaff.clients.partition import partition
from tests.test_hf_data import make_cifar


def _writers(n_writers: int = 7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([f"f{w:04d}" for w in rng.integers(0, n_writers, 200)])


def test_natural_gives_each_client_one_writer() -> None:
    w = _writers()
    labels = np.arange(len(w)) % 10
    parts = partition(labels, 7, kind="natural", key="writer_id", columns={"writer_id": w})
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(w)))  # every row, once
    owners = [set(w[p]) for p in parts]
    assert all(len(o) == 1 for o in owners) and len(set().union(*owners)) == 7
    for p in parts:  # all of the writer's rows
        assert np.array_equal(p, np.flatnonzero(w == w[p[0]]))


def test_natural_fewer_clients_take_a_seeded_subset_and_more_fail() -> None:
    w = _writers()
    cols = {"writer_id": w}
    a = partition(np.zeros(len(w)), 3, kind="natural", key="writer_id", seed=1, columns=cols)
    b = partition(np.zeros(len(w)), 3, kind="natural", key="writer_id", seed=1, columns=cols)
    c = partition(np.zeros(len(w)), 3, kind="natural", key="writer_id", seed=2, columns=cols)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert [w[p[0]] for p in a] != [w[p[0]] for p in c]
    with pytest.raises(ValueError, match=r"7 distinct writer_id values.*num_clients=7") as err:
        partition(np.zeros(len(w)), 8, kind="natural", key="writer_id", columns=cols)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"no such per-sample column.*data.columns"):
        partition(np.zeros(len(w)), 3, kind="natural", key="speaker", columns=cols)


def _flower_parts(partitioner, dataset) -> list[set[str]]:
    """Flower's own partitions of the on-disk dataset, as sets of image hashes."""
    partitioner.dataset = dataset
    return [
        {hashlib.sha1(r["bytes"]).hexdigest() for r in partitioner.load_partition(i)["img"]}
        for i in range(partitioner.num_partitions)
    ]


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("DirichletPartitioner", {"alpha": 0.3, "min_partition_size": 2, "seed": 5}),
        ("PathologicalPartitioner", {"num_classes_per_partition": 2, "seed": 5}),
        ("ShardPartitioner", {"num_shards_per_partition": 2, "seed": 5}),
    ],
)
def test_flower_partitioners_match_flower_datasets_exactly(tmp_path, name, kwargs) -> None:
    from functools import partial

    import datasets
    import flwr_datasets.partitioner as fp

    from flagstaff.clients.hf import load_hf

    root = make_cifar(tmp_path / "cifar", n_train=80, n_test=10)
    ds = load_hf(path=str(root), cache=False)
    cls = getattr(fp, name)
    parts = partition(
        ds.y_train.numpy(),
        4,
        kind="flwr",
        partitioner=partial(cls, partition_by="label", **kwargs),  # as Hydra's _partial_
        columns=ds.partition_columns(),
    )
    train = datasets.load_from_disk(str(root))["train"].cast_column(
        "img", datasets.Image(decode=False)
    )
    hashes = np.array([hashlib.sha1(r["bytes"]).hexdigest() for r in train["img"]])
    ours = [set(hashes[p]) for p in parts]
    theirs = _flower_parts(cls(num_partitions=4, partition_by="label", **kwargs), train)
    assert ours == theirs


def test_flower_natural_id_partitioner_counts_its_clients() -> None:
    from functools import partial

    from flwr_datasets.partitioner import NaturalIdPartitioner

    w = _writers()
    cols = {"label": np.zeros(len(w), dtype=np.int64), "writer_id": w}
    make = partial(NaturalIdPartitioner, partition_by="writer_id")
    parts = partition(cols["label"], 7, kind="flwr", partitioner=make, columns=cols)
    assert sorted(len(set(w[p])) for p in parts) == [1] * 7
    with pytest.raises(ValueError, match="made 7 partitions; set num_clients=7"):
        partition(cols["label"], 5, kind="flwr", partitioner=make, columns=cols)
    with pytest.raises(ValueError, match="partitions by 'speaker'"):
        partition(
            cols["label"],
            7,
            kind="flwr",
            partitioner=partial(NaturalIdPartitioner, partition_by="speaker"),
            columns=cols,
        )
