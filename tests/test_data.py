"""Datasets, users' own files, partitioners and batch plans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flagstaff.clients.data import load_dataset, load_digits, load_user, make_synthetic
from flagstaff.clients.partition import partition, summarize
from flagstaff.clients.plan import make_plan


def test_digits_split_is_stratified_and_standardized() -> None:
    ds = load_digits(seed=0)
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.num_classes == 10
    counts = np.bincount(ds.y_test.numpy(), minlength=10)
    assert counts.min() >= 35  # 20% of every class (about 36 each)
    mean = ds.x_train.mean(0)
    assert float(mean.abs().max()) < 1e-4
    img = load_digits(seed=0, image=True)
    assert img.input_shape == (1, 8, 8)
    assert torch.equal(img.x_train.flatten(1), ds.x_train)


def test_synthetic_is_seeded() -> None:
    a, b = make_synthetic(500, 8, 3, seed=1), make_synthetic(500, 8, 3, seed=1)
    assert torch.equal(a.x_train, b.x_train) and a.num_classes == 3
    reg = make_synthetic(200, 5, task="regression")
    assert reg.num_classes == 1 and reg.y_train.dtype == torch.float32


def test_user_npz_xy_and_split(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 6)).astype(np.float32), rng.integers(0, 3, 100)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset("user", root=str(tmp_path / "d.npz"))
    assert ds.x_train.shape == (80, 6) and ds.num_classes == 3
    np.savez(tmp_path / "s.npz", x_train=x[:70], y_train=y[:70], x_test=x[70:], y_test=y[70:])
    ds2 = load_user(tmp_path / "s.npz")
    assert len(ds2.x_train) == 70 and len(ds2.x_test) == 30


def test_user_data_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_user(tmp_path / "missing.npz")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="expected an .npz"):
        load_user(tmp_path / "a.csv")
    np.savez(tmp_path / "bad.npz", features=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="holds arrays"):
        load_user(tmp_path / "bad.npz")
    np.savez(tmp_path / "len.npz", x=np.zeros((5, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="rows"):
        load_user(tmp_path / "len.npz")
    np.savez(tmp_path / "nan.npz", x=np.full((10, 2), np.nan), y=np.arange(10) % 2)
    with pytest.raises(ValueError, match="NaN"):
        load_user(tmp_path / "nan.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_user(tmp_path / "empty")
    with pytest.raises(ValueError, match="data.root"):
        load_dataset("user", root=None)


def test_user_image_folder(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(10):
            arr = (rng.random((6, 6)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / label / f"{i}.png")
    ds = load_user(tmp_path)
    assert ds.num_classes == 2 and ds.input_shape == (1, 6, 6)
    assert len(ds.x_train) + len(ds.x_test) == 20


def test_partitions_cover_and_skew() -> None:
    y = load_digits().y_train.numpy()
    for kind in ("iid", "dirichlet", "shards", "classes"):
        parts = partition(y, 20, kind=kind, seed=3, alpha=0.1)
        flat = np.concatenate(parts)
        assert len(np.unique(flat)) == len(flat) == len(y), kind  # disjoint and complete
        assert all(len(p) > 0 for p in parts)
    iid = partition(y, 20, "iid")
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    # small alpha concentrates labels: the dominant label share is far above IID's ~0.1-0.2
    dom = lambda ps: np.mean([np.bincount(y[p]).max() / len(p) for p in ps])  # noqa: E731
    assert dom(partition(y, 20, "dirichlet", alpha=0.1)) > 2 * dom(iid)
    classes = partition(y, 20, "classes", classes=2)
    assert all(len(np.unique(y[p])) <= 2 for p in classes)
    shards = partition(y, 20, "shards", shards_per_client=2)
    assert all(len(np.unique(y[p])) <= 4 for p in shards)
    wr = partition(y, 50, "with_replacement", samples_per_client=40)
    assert all(len(p) == 40 for p in wr)
    unequal = partition(y, 20, "iid", size_sigma=1.0)
    assert max(map(len, unequal)) > 2 * min(map(len, unequal))
    s = summarize(iid, y, 10)
    assert s["num_clients"] == 20 and sum(c["samples"] for c in s["clients"]) == len(y)


def test_partition_errors() -> None:
    y = np.arange(10) % 2
    with pytest.raises(ValueError, match="cannot give each"):
        partition(y, 11, "iid")
    with pytest.raises(ValueError, match="unknown partition"):
        partition(y, 2, "zipf")
    with pytest.raises(ValueError, match="alpha"):
        partition(y, 2, "dirichlet", alpha=0)


def test_plan_is_an_epoch_of_shuffled_batches_per_client() -> None:
    sizes = np.array([5, 12, 3])
    offsets = np.cumsum(sizes) - sizes
    plan = make_plan(
        offsets, sizes, np.array([7, 8, 9]), batch_size=4, seed=0, round_idx=2, epochs=2
    )
    assert plan.steps.tolist() == [4, 6, 2]  # 2 * ceil(n / 4)
    for k, (o, n) in enumerate(zip(offsets, sizes, strict=True)):
        sub = plan.select(k)
        rows = sub.idx[:, 0][sub.mask[:, 0] > 0]
        per_epoch = len(rows) // 2
        for e in range(2):  # every sample exactly once per epoch
            got = sorted(rows[e * per_epoch : (e + 1) * per_epoch].tolist())
            assert got == list(range(o, o + n))
    # a client's batches do not depend on which clients share its host or round
    alone = make_plan(offsets[1:2], sizes[1:2], np.array([8]), 4, 0, 2, epochs=2)
    assert torch.equal(alone.idx, plan.select(1).idx)
    other_round = make_plan(offsets[1:2], sizes[1:2], np.array([8]), 4, 0, 3, epochs=2)
    assert not torch.equal(alone.idx, other_round.idx)
    steps = make_plan(offsets, sizes, np.array([7, 8, 9]), 4, 0, 0, steps=5)
    assert steps.steps.tolist() == [5, 5, 5] and int(steps.mask[:, 1].sum()) == 20


def test_plan_rejects_empty_clients() -> None:
    with pytest.raises(ValueError, match="hold no samples"):
        make_plan(np.array([0, 3]), np.array([3, 0]), np.array([0, 1]), 2, 0, 0)


def _npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_user_npz_inputs_that_cannot_train_are_refused_naming_the_fix(tmp_path) -> None:
    """Issue 19 item 9: each bad .npz gets a ValueError naming the file and what to change, at load
    time (before: a crash after round 1, an IndexError, an EOFError, or a silent 0-accuracy model)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 6)).astype(np.float32), np.arange(60) % 3
    split = dict(x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    features = _npz(tmp_path / "f.npz", **{**split, "x_test": x[40:, :4]})
    with pytest.raises(ValueError, match=r"x_train has 6 features.*x_test has 4"):
        load_user(features)
    with pytest.raises(ValueError, match=r"1-D.*reshape\(-1, 1\)"):
        load_user(_npz(tmp_path / "one_d.npz", x=x[:, 0], y=y))
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        load_user(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="0 rows"):
        load_user(_npz(tmp_path / "zero.npz", x=np.zeros((0, 6)), y=np.zeros(0, dtype=int)))
    with pytest.raises(ValueError, match="0 rows"):
        load_user(_npz(tmp_path / "zero_test.npz", **{**split, "x_test": x[:0], "y_test": y[:0]}))
    unseen = {**split, "y_train": y[:40] % 2, "y_test": np.full(20, 2)}
    with pytest.raises(ValueError, match=r"test labels \[2\] never appear in training"):
        load_user(_npz(tmp_path / "unseen.npz", **unseen))
    assert load_user(_npz(tmp_path / "ok.npz", **split)).input_shape == (6,)  # a good file loads
