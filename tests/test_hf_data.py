"""Hugging Face datasets in their real on-disk layouts, and the per-batch image transform.

No network here: every test builds a small dataset in the layout users download (a ``datasets``
folder written by ``save_to_disk`` with PIL images, parquet files, FEMNIST-, Shakespeare- and
GLUE-shaped records) and loads it with the code users run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.augment import TAG, ImageTransform, channel_stats
from clients.seeds import mix64


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
