"""Offline datasets: scikit-learn's digits, a seeded synthetic generator, mnist1d, and users' own files.

Every loader returns a :class:`Dataset`: float32 features, int64 labels, a fixed train/test split.
Nothing is downloaded; a user's own data is read from ``root`` (``.npz`` arrays or an image folder).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Dataset", "load_dataset", "load_digits", "make_synthetic", "load_mnist1d", "load_user"]


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors of one task (features float32, labels int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str = "dataset"
    #: applied by the trainer to each step's gathered training batch, ``transform(xb)`` or bound to
    #: a round (``clients.augment``): uint8 images -> normalized (augmented) float32. None: the
    #: samples are used as stored. ``x_test`` is stored ready for the model (already normalized).
    transform: Callable[..., torch.Tensor] | None = None
    #: per-training-row columns the partitions may read (``partition=natural partition.key=...``,
    #: Flower Datasets' ``partition_by``): e.g. writer_id, and the label under its dataset name
    columns: Mapping[str, np.ndarray] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def __post_init__(self) -> None:
        if len(self.x_train) == 0:
            raise ValueError(f"dataset {self.name!r} has no training samples")
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError(f"dataset {self.name!r}: features and labels differ in length")
        for key, col in (self.columns or {}).items():
            if len(col) != len(self.y_train):
                raise ValueError(
                    f"dataset {self.name!r}: column {key!r} has {len(col)} rows, the training "
                    f"split {len(self.y_train)}"
                )

    def partition_columns(self) -> dict[str, np.ndarray]:
        """The columns a partition may split by: ``columns`` plus ``label`` (the training labels)."""
        return {"label": self.y_train.numpy(), **(self.columns or {})}


def _split_standardize(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, standardize: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/test split, then per-feature standardization fitted on train."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    if standardize:
        # per feature for tabular data, one scalar for images
        axis = 0 if x_tr.ndim == 2 else None
        mean = x_tr.mean(axis=axis, keepdims=True)
        std = x_tr.std(axis=axis, keepdims=True)
        std = np.where(std > 0, std, 1.0)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return x_tr, x_te, y_tr, y_te


def _to_dataset(x_tr, x_te, y_tr, y_te, num_classes: int, name: str) -> Dataset:
    return Dataset(
        x_train=torch.as_tensor(np.ascontiguousarray(x_tr), dtype=torch.float32),
        y_train=torch.as_tensor(y_tr, dtype=torch.int64),
        x_test=torch.as_tensor(np.ascontiguousarray(x_te), dtype=torch.float32),
        y_test=torch.as_tensor(y_te, dtype=torch.int64),
        num_classes=int(num_classes),
        name=name,
    )


def load_digits(
    test_fraction: float = 0.2, seed: int = 0, standardize: bool = True, image: bool = False
) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 samples, 10 classes); 80/20 stratified split.

    ``image=True`` keeps the (1, 8, 8) layout for convolutional models.
    """
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = bunch.data.astype(np.float32)
    x_tr, x_te, y_tr, y_te = _split_standardize(x, bunch.target, test_fraction, seed, standardize)
    if image:
        x_tr, x_te = x_tr.reshape(-1, 1, 8, 8), x_te.reshape(-1, 1, 8, 8)
    return _to_dataset(x_tr, x_te, y_tr, y_te, 10, "digits")


def make_synthetic(
    n_samples: int = 10000,
    n_features: int = 32,
    num_classes: int = 10,
    task: str = "classification",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Seeded synthetic task for scale tests (sklearn's make_classification / make_regression).

    For ``task="regression"`` the labels are float targets and ``num_classes`` is 1.
    """
    from sklearn.datasets import make_classification, make_regression

    if task == "classification":
        x, y = make_classification(
            n_samples=n_samples,
            n_features=n_features,
            n_informative=max(2, n_features // 2),
            n_redundant=0,
            n_classes=num_classes,
            n_clusters_per_class=1,
            class_sep=1.5,
            random_state=seed,
        )
        x_tr, x_te, y_tr, y_te = _split_standardize(
            x.astype(np.float32), y, test_fraction, seed, True
        )
        return _to_dataset(x_tr, x_te, y_tr, y_te, num_classes, "synthetic")
    if task == "regression":
        from sklearn.model_selection import train_test_split

        x, y = make_regression(
            n_samples=n_samples, n_features=n_features, noise=0.1, random_state=seed
        )
        y = (y - y.mean()) / y.std()
        x_tr, x_te, y_tr, y_te = train_test_split(
            x.astype(np.float32), y, test_size=test_fraction, random_state=seed
        )
        return Dataset(
            torch.as_tensor(x_tr),
            torch.as_tensor(y_tr, dtype=torch.float32),
            torch.as_tensor(x_te),
            torch.as_tensor(y_te, dtype=torch.float32),
            1,
            "synthetic_regression",
        )
    raise ValueError(f"unknown synthetic task {task!r}; choose 'classification' or 'regression'")


def load_mnist1d(seed: int = 42, image: bool = False) -> Dataset:
    """mnist1d generated offline (4000 train / 1000 test, 40 features, 10 classes).

    Uses the ``mnist1d`` package's generator (never its download path). ``image=True`` gives (1, 40).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "data=mnist1d needs the 'mnist1d' package: pip install mnist1d -c constraints.txt"
        ) from err
    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    x_tr, x_te = d["x"].astype(np.float32), d["x_test"].astype(np.float32)
    mean, std = x_tr.mean(0, keepdims=True), x_tr.std(0, keepdims=True) + 1e-8
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if image:
        x_tr, x_te = x_tr[:, None, :], x_te[:, None, :]
    return _to_dataset(x_tr, x_te, d["y"], d["y_test"], 10, "mnist1d")


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def load_user(root: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A user's own data: an ``.npz`` file, or an image folder ``root/<class>/<image>``.

    The ``.npz`` holds ``x`` and ``y`` (split here) or ``x_train, y_train, x_test, y_test``.
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data.root={str(root)!r} does not exist; point it to an .npz file with arrays "
            "x,y (or x_train,y_train,x_test,y_test) or to an image folder root/<class>/<image>"
        )
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(
                f"data.root={str(root)!r} is a {path.suffix or 'suffix-less'} file; expected an "
                ".npz file or an image folder root/<class>/<image>"
            )
        return _load_npz(path, test_fraction, seed)
    return _load_image_folder(path, test_fraction, seed)


def _check_labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) == 0:
        raise ValueError(f"{where}: the labels have 0 rows; save at least one sample per class")
    if y.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0")
    return y.astype(np.int64)


def _check_features(x: np.ndarray, name: str, where: str) -> np.ndarray:
    """Features are (samples, features...) with at least one sample."""
    if x.ndim < 2:
        raise ValueError(
            f"{where}: {name} is {x.ndim}-D {x.shape}; features must be (samples, features...): "
            f"for one feature per sample save {name}.reshape(-1, 1)"
        )
    if len(x) == 0:
        raise ValueError(f"{where}: {name} has 0 rows; save at least one sample per class")
    return x.astype(np.float32)


def _load_npz(path: Path, test_fraction: float, seed: int) -> Dataset:
    where = str(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{where} is an empty file (0 bytes); save the arrays with numpy.savez")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"could not read {path} as .npz arrays: {err}") from err
    keys = set(arrays.files)
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        x_tr = _check_features(arrays["x_train"], "x_train", where)
        x_te = _check_features(arrays["x_test"], "x_test", where)
        y_tr = _check_labels(arrays["y_train"], where)
        y_te = _check_labels(arrays["y_test"], where)
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise ValueError(
                f"{where}: x_train has {_features(x_tr)} features per sample but x_test has "
                f"{_features(x_te)}; both splits must have the same features"
            )
    elif {"x", "y"} <= keys:
        x = _check_features(arrays["x"], "x", where)
        y = _check_labels(arrays["y"], where)
        if len(x) != len(y):
            raise ValueError(f"{where}: x has {len(x)} rows but y has {len(y)}")
        x_tr, x_te, y_tr, y_te = _split_standardize(x, y, test_fraction, seed, False)
    else:
        raise ValueError(
            f"{where} holds arrays {sorted(keys)}; expected 'x','y' or "
            "'x_train','y_train','x_test','y_test'"
        )
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise ValueError(f"{where}: features and labels differ in length")
    if not (np.isfinite(x_tr).all() and np.isfinite(x_te).all()):
        raise ValueError(f"{where}: features contain NaN or infinity")
    unseen = np.setdiff1d(y_te, y_tr)
    if len(unseen):
        raise ValueError(
            f"{where}: test labels {unseen.tolist()} never appear in training (training labels: "
            f"{np.unique(y_tr).tolist()}), so no model can predict them; put samples of every "
            "test class into x_train/y_train, or save x,y and let Flagstaff split them"
        )
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return _to_dataset(x_tr, x_te, y_tr, y_te, num_classes, path.stem)


def _features(x: np.ndarray) -> str:
    return str(x.shape[1]) if x.ndim == 2 else "x".join(map(str, x.shape[1:]))


def _load_image_folder(path: Path, test_fraction: float, seed: int) -> Dataset:
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(
            f"{path} is a folder with no class sub-folders; expected root/<class>/<image>"
        )
    xs, ys, shape = [], [], None
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            img = np.asarray(Image.open(file).convert("L"), dtype=np.float32) / 255.0
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise ValueError(f"{file} is {img.shape}, other images are {shape}; resize them")
            xs.append(img[None])
            ys.append(label)
    if not xs:
        raise ValueError(f"{path}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found")
    x, y = np.stack(xs), np.asarray(ys)
    x_tr, x_te, y_tr, y_te = _split_standardize(x, y, test_fraction, seed, True)
    return _to_dataset(x_tr, x_te, y_tr, y_te, len(classes), path.name)


def load_dataset(
    name: str, root: str | None = None, seed: int = 0, image: bool = False, **kwargs
) -> Dataset:
    """Build a dataset by name: digits, synthetic, mnist1d or user (with ``root``)."""
    if name == "digits":
        return load_digits(seed=seed, image=image, **kwargs)
    if name == "synthetic":
        return make_synthetic(seed=seed, **kwargs)
    if name == "mnist1d":
        return load_mnist1d(image=image, **kwargs)
    if name == "user":
        if not root:
            raise ValueError("data=user needs data.root=PATH (.npz file or image folder)")
        return load_user(root, seed=seed, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose digits, synthetic, mnist1d or user")
