"""Per-batch image transforms: uint8 (..., C, H, W) batches become normalized float32, optionally
randomly cropped (zero padding) and horizontally flipped, as batched tensor ops without torchvision.

Images stay uint8 in memory (CIFAR-10's 50,000 training images are 150 MB, not 600 MB as float32)
and are normalized per step, on the batch the trainer gathers. The random crop with padding 4 and the
horizontal flip are the standard CIFAR augmentation (He et al. 2016, section 4.2: "4 pixels are padded
on each side, and a 32x32 crop is randomly sampled from the padded image or its horizontal flip").

Randomness is counter-based, as the batch plans' shuffle is (``clients.plan``): the draws of a sample
are ``mix64(seed, TAG, round, client id, local step, position of the sample in the client's data)``,
so they depend only on (seed, round, client) and the step, never on which host trains the client, at
which row its data lies, or which clients share the round (STYLE.md point 10).

FL-Simulator's CIFAR augmentation (its ``dataset.py``, used for FedSpeed's table) differs in two
ways, each an option here: it crops only half of the images (``crop_p=0.5``; the others keep their
place) and pads the *normalized* image with zeros, i.e. with the channel mean (``pad_value="mean"``);
the default crops every image and pads with black (zero before normalization), as torchvision's
``RandomCrop(32, padding=4)`` in front of ``Normalize`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flagstaff.clients.seeds import mix64

__all__ = [
    "ImageTransform",
    "RoundTransform",
    "TAG",
    "CROP_TAG",
    "PAD_VALUES",
    "draws",
    "channel_stats",
]

#: the stream tag of augmentation draws (keeps them apart from the batch shuffle's mix64 keys)
TAG = 0xA0617E
#: mixed into a sample's key for its crop-or-not draw (``crop_p`` < 1)
CROP_TAG = 0xC409
#: what a crop pads with: ``zero`` (black, before normalization) or ``mean`` (0 after it)
PAD_VALUES = ("zero", "mean")


def draws(
    keys: np.ndarray, padding: int, flip: bool, crop_p: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop offsets ``dy, dx`` in [0, 2 * padding] and flip flags from uint64 ``keys``: bit 0 is the
    flip, bits 8-31 and 32-55 the two offsets (each modulo 2 * padding + 1). With ``crop_p`` < 1
    an image is cropped with probability ``crop_p`` (a uniform from ``mix64(key, CROP_TAG)``'s top
    53 bits), otherwise its offsets are ``padding`` (the image in place)."""
    keys = np.asarray(keys, dtype=np.uint64)
    span = np.uint64(2 * padding + 1)
    dy = (((keys >> np.uint64(8)) & np.uint64(0xFFFFFF)) % span).astype(np.int64)
    dx = (((keys >> np.uint64(32)) & np.uint64(0xFFFFFF)) % span).astype(np.int64)
    fl = (keys & np.uint64(1)).astype(bool) if flip else np.zeros(keys.shape, dtype=bool)
    if crop_p < 1:
        u = (mix64(keys, CROP_TAG) >> np.uint64(11)).astype(np.float64) / 2.0**53
        keep = u >= crop_p
        dy[keep] = padding
        dx[keep] = padding
    return dy, dx, fl


def channel_stats(x: np.ndarray, chunk: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), in [0, 1] units."""
    n, c = x.shape[0], x.shape[1]
    s = np.zeros(c, dtype=np.float64)
    s2 = np.zeros(c, dtype=np.float64)
    for i in range(0, n, chunk):  # chunks bound the float64 temporary
        b = x[i : i + chunk].astype(np.float64) / 255.0
        s += b.sum(axis=(0, 2, 3))
        s2 += (b * b).sum(axis=(0, 2, 3))
    count = n * x.shape[2] * x.shape[3]
    mean = s / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
    return mean.tolist(), np.where(std > 0, std, 1.0).tolist()


@dataclass(frozen=True)
class ImageTransform:
    """uint8 images (..., C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel; with ``keys``
    (one uint64 per image) also a random crop of the padded image and a horizontal flip.

    ``crop_padding`` 0 and ``flip`` False: normalization only (also what ``keys=None`` gives: the
    test set, and batches without augmentation). ``crop_p``: the probability that an image is
    cropped (1: every image); ``pad_value``: ``zero`` pads the uint8 image with black before
    normalization, ``mean`` pads the normalized image with 0, the channel mean (FL-Simulator).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    flip: bool = False
    crop_p: float = 1.0
    pad_value: str = "zero"
    _stats: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"data.mean has {len(self.mean)} values, data.std {len(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"data.std must be > 0 per channel, got {list(self.std)}")
        if self.crop_padding < 0:
            raise ValueError(f"data.crop_padding must be >= 0, got {self.crop_padding}")
        if not 0 <= self.crop_p <= 1:
            raise ValueError(f"data.crop_p must be in [0, 1] (a probability), got {self.crop_p}")
        if self.pad_value not in PAD_VALUES:
            raise ValueError(
                f"data.pad_value={self.pad_value!r}: choose zero (black, before normalization) or "
                "mean (0 after normalization)"
            )

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._stats:
            shape = (len(self.mean), 1, 1)
            self._stats[key] = (
                torch.tensor(self.mean, dtype=torch.float32, device=device).view(shape),
                torch.tensor(self.std, dtype=torch.float32, device=device).view(shape),
            )
        return self._stats[key]

    def __call__(self, xb: torch.Tensor, keys: np.ndarray | None = None) -> torch.Tensor:
        """The transformed batch, same leading shape; ``keys``: uint64 array of ``xb.shape[:-3]``."""
        if xb.dim() < 3:
            raise ValueError(
                f"an image transform needs (..., C, H, W) input, got {tuple(xb.shape)}"
            )
        lead, chw = xb.shape[:-3], xb.shape[-3:]
        x = xb.reshape(-1, *chw)
        augment = keys is not None and self.augments
        if augment:
            keys = np.asarray(keys).reshape(-1)
            dy, dx, fl = draws(keys, self.crop_padding, self.flip, self.crop_p)
            if self.pad_value == "zero":
                x = _crop_flip(x, self.crop_padding, dy, dx, fl)
        mean, std = self._mean_std(x.device)
        out = x.to(torch.float32, copy=True)  # then in place: one float32 copy, not four
        out.div_(255.0).sub_(mean).div_(std)
        if augment and self.pad_value == "mean":  # pad the normalized image: 0 is the mean
            out = _crop_flip(out, self.crop_padding, dy, dx, fl)
        return out.reshape(*lead, *chw)

    def bind(
        self, seed: int, round_idx: int, client_ids: Sequence[int], offsets: Sequence[int]
    ) -> RoundTransform:
        """This transform for one round of the clients ``client_ids`` whose samples start at rows
        ``offsets`` of the host's data (see :class:`RoundTransform`)."""
        return RoundTransform(self, seed, round_idx, client_ids, offsets)


def _crop_flip(
    x: torch.Tensor, p: int, dy: np.ndarray, dx: np.ndarray, fl: np.ndarray
) -> torch.Tensor:
    """Per image n: ``zero_pad(x[n], p)[:, dy:dy+H, dx:dx+W]``, mirrored left-right where ``fl``:
    one gather over (N, H, W) row and column indices."""
    n, _, h, w = x.shape
    dev = x.device
    if p > 0:
        x = torch.nn.functional.pad(x, (p, p, p, p))
    rows = torch.as_tensor(dy, device=dev)[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(torch.as_tensor(fl, device=dev)[:, None], cols.flip(1), cols)
    cols = cols + torch.as_tensor(dx, device=dev)[:, None]  # (N, W)
    b = torch.arange(n, device=dev)[:, None, None]
    out = x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class RoundTransform:
    """An :class:`ImageTransform` bound to a round and a host's row layout: ``self(xb, rows, step)``
    transforms the batch ``xb = x[rows]`` of local step ``step``, drawing each sample's crop and flip
    from ``(seed, round, client id, step, position of the sample in its client's data)``.

    ``rows`` outside every client's block (the padding of a partial batch, masked by the trainer)
    get some draw; ``rows=None`` normalizes only.
    """

    transform: ImageTransform
    seed: int
    round_idx: int
    client_ids: Sequence[int]
    offsets: Sequence[int]

    def keys(self, rows: np.ndarray, step: int) -> np.ndarray:
        """uint64 key of each row (any shape) at local step ``step``."""
        off = np.asarray(self.offsets, dtype=np.int64)
        ids = np.asarray(self.client_ids, dtype=np.int64)
        order = np.argsort(off, kind="stable")
        off, ids = off[order], ids[order]
        k = np.clip(np.searchsorted(off, rows, side="right") - 1, 0, len(off) - 1)
        return mix64(self.seed, TAG, self.round_idx, ids[k], step, rows - off[k])

    def __call__(
        self, xb: torch.Tensor, rows: torch.Tensor | None = None, step: int = 0
    ) -> torch.Tensor:
        if rows is None or not self.transform.augments:
            return self.transform(xb)
        return self.transform(xb, self.keys(rows.cpu().numpy(), step))
