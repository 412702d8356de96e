"""Generated image data in CIFAR-10's shape, for speed benchmarks of convolutional clients.

Not a substitute for the real data (``data=cifar10`` loads it): a seeded, offline task whose tensors
have CIFAR's shape (3x32x32, 10 classes), so that a ResNet's per-round time can be measured on any
machine (benchmarks/simulation.py's ``resnet8`` workload, ``experiment=sim_resnet8``). Each class is a
smooth random template (a 4x4 pattern per channel, upsampled); a sample is its class's template
times a random contrast plus Gaussian pixel noise, standardized with the training set's mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flagstaff.clients.data import Dataset

__all__ = ["cifar_shaped"]


def cifar_shaped(
    n_train: int = 1000,
    n_test: int = 500,
    num_classes: int = 10,
    shape: Sequence[int] = (3, 32, 32),
    noise: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """``n_train`` + ``n_test`` images of ``shape`` in ``num_classes`` balanced classes (see the
    module docstring); float32, the same for the same arguments."""
    if n_train < num_classes or n_test < 1 or num_classes < 2:
        raise ValueError(
            f"data: n_train={n_train} must be >= num_classes={num_classes} >= 2 and n_test >= 1"
        )
    if len(shape) != 3:
        raise ValueError(f"data.shape={list(shape)}: give (channels, height, width)")
    g = torch.Generator().manual_seed(int(seed))
    c, h, w = (int(s) for s in shape)
    coarse = torch.randn(num_classes, c, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
        x = templates[y] * contrast + noise * torch.randn(n, c, h, w, generator=g)
        return x, y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    mean, std = x_tr.mean(), x_tr.std()
    return Dataset(
        x_train=((x_tr - mean) / std).contiguous(),
        y_train=y_tr,
        x_test=((x_te - mean) / std).contiguous(),
        y_test=y_te,
        num_classes=num_classes,
        name="cifar_shaped",
    )
