"""FL-Simulator's CIFAR augmentation as options of the per-batch transform (issue 21 item 5):
``data.crop_p`` (crop with probability p, else the image stays in place) and ``data.pad_value=mean``
(pad the normalized image with 0, i.e. the channel mean), checked against a per-sample numpy version
of its ``dataset.py``; the defaults (every image cropped, black padding) are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flagstaff.clients.augment import TAG, ImageTransform, draws
from flagstaff.clients.seeds import mix64

MEAN, STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)  # FL-Simulator's CIFAR-10 Normalize


def _fl_simulator(img: np.ndarray, dy: int, dx: int, flip: bool, crop: bool, p: int) -> np.ndarray:
    """One uint8 image (C, H, W) as FL-Simulator's ``Dataset.__getitem__`` treats it: normalized
    first (its DatasetObject stores ToTensor + Normalize output), then flipped, then cropped from
    the zero-padded normalized image. It flips before it crops: a flip followed by the offset
    2p - dx is a crop at dx followed by the flip (the same uniform offsets)."""
    m = np.asarray(MEAN, dtype=np.float32)[:, None, None]
    s = np.asarray(STD, dtype=np.float32)[:, None, None]
    x = (img.astype(np.float32) / np.float32(255.0) - m) / s
    c, h, w = x.shape
    if flip:
        x = x[:, :, ::-1]
        dx = 2 * p - dx
    if crop:
        ext = np.zeros((c, h + 2 * p, w + 2 * p), dtype=np.float32)
        ext[:, p:-p, p:-p] = x
        x = ext[:, dy : dy + h, dx : dx + w]
    return x


def test_half_cropped_mean_padded_equals_fl_simulators_procedure() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(4, 50, 3, 8, 8), dtype=np.uint8)
    keys = mix64(3, TAG, np.arange(200).reshape(4, 50))
    tf = ImageTransform(MEAN, STD, crop_padding=4, flip=True, crop_p=0.5, pad_value="mean")
    got = tf(torch.from_numpy(x), keys).numpy()
    dy, dx, fl = draws(keys.reshape(-1), 4, True, 0.5)
    key = keys.reshape(-1)
    # which images were cropped: the crop-or-not draw, independent of the offsets
    crop = (mix64(key, 0xC409) >> np.uint64(11)).astype(np.float64) / 2.0**53 < 0.5
    assert 60 < crop.sum() < 140 and 60 < fl.sum() < 140
    raw = draws(key, 4, True)  # the offsets every image would get at crop_p=1
    np.testing.assert_array_equal(np.where(crop, raw[0], 4), dy)
    np.testing.assert_array_equal(np.where(crop, raw[1], 4), dx)
    for i, img in enumerate(x.reshape(-1, 3, 8, 8)):
        want = _fl_simulator(img, raw[0][i], raw[1][i], bool(fl[i]), bool(crop[i]), 4)
        np.testing.assert_allclose(got.reshape(-1, 3, 8, 8)[i], want, rtol=0, atol=1e-5)


def test_crop_probability_and_padding_value() -> None:
    keys = mix64(1, TAG, np.arange(20_000))
    dy, dx, _ = draws(keys, 4, True, 0.5)
    moved = (dy != 4) | (dx != 4)  # a crop at the centre offset also leaves the image in place
    assert 0.5 * (1 - 1 / 81) - 0.02 < moved.mean() < 0.5 * (1 - 1 / 81) + 0.02
    assert not ((draws(keys, 4, True, 0.0)[0] != 4).any())
    # a crop shifted fully down-right: its top-left 4x4 is padding
    key = next(int(k) for k, a, b in zip(keys, dy, dx, strict=True) if a == 0 and b == 0)
    k = np.array([key], dtype=np.uint64)
    img = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    zero = ImageTransform(MEAN, STD, 4, False, 0.5)(img, k)[0, :, :4, :4]
    mean = ImageTransform(MEAN, STD, 4, False, 0.5, "mean")(img, k)[0, :, :4, :4]
    assert torch.all(mean == 0)  # the channel mean, after normalization
    want = -torch.tensor(MEAN) / torch.tensor(STD)  # black, normalized
    torch.testing.assert_close(zero, want[:, None, None].expand(3, 4, 4))


def test_defaults_are_unchanged_and_bad_settings_refused() -> None:
    keys = mix64(2, TAG, np.arange(500))
    a, b = draws(keys, 4, True), draws(keys, 4, True, 1.0)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    span = np.uint64(9)
    np.testing.assert_array_equal(a[0], ((keys >> np.uint64(8)) & np.uint64(0xFFFFFF)) % span)
    tf = ImageTransform(MEAN, STD, 4, True)
    assert (tf.crop_p, tf.pad_value) == (1.0, "zero")
    with pytest.raises(ValueError, match=r"data.crop_p must be in \[0, 1\]"):
        ImageTransform(MEAN, STD, 4, True, 1.5)
    with pytest.raises(ValueError, match="data.pad_value='edge': choose zero"):
        ImageTransform(MEAN, STD, 4, True, 0.5, "edge")


def test_load_hf_passes_the_options_to_the_transform(tmp_path) -> None:
    from flagstaff.clients.hf import load_hf
    from tests.test_hf_data import make_cifar

    root = make_cifar(tmp_path / "cifar10", n_train=20, n_test=4)
    ds = load_hf(path=str(root), crop_padding=4, flip=True, crop_p=0.5, pad_value="mean")
    assert (ds.transform.crop_p, ds.transform.pad_value) == (0.5, "mean")
