"""Models for the offline tasks: logistic regression, MLP, small CNN (2-D images or 1-D signals).

No BatchNorm anywhere, so every model works with torch.func (batched clients) and Opacus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["build_model", "Logistic", "MLP", "SmallCNN", "num_parameters"]


class Logistic(nn.Module):
    """Multinomial logistic regression (one linear layer on flattened input)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network, e.g. 64-64-10 on digits."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        dims = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two conv layers + linear head; Conv2d for (C, H, W) input, Conv1d for (C, L)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 16) -> None:
        super().__init__()
        if len(input_shape) == 3:
            conv, pool = nn.Conv2d, nn.MaxPool2d
        elif len(input_shape) == 2:
            conv, pool = nn.Conv1d, nn.MaxPool1d
        else:
            raise ValueError(
                f"model=cnn needs image-shaped input (C,H,W) or (C,L), got {tuple(input_shape)}; "
                "set data.image=true"
            )
        c = input_shape[0]
        self.features = nn.Sequential(
            conv(c, channels, 3, padding=1),
            nn.ReLU(),
            pool(2),
            conv(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            pool(2),
        )
        spatial = [s // 4 for s in input_shape[1:]]
        self.head = nn.Linear(2 * channels * math.prod(spatial), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def build_model(
    kind: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (64, 64),
    channels: int = 16,
    seed: int = 0,
) -> nn.Module:
    """Construct a model with seeded initialization (same seed -> same initial parameters)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flat = math.prod(input_shape)
        if kind == "logistic":
            return Logistic(flat, num_classes)
        if kind == "mlp":
            return MLP(flat, num_classes, tuple(hidden))
        if kind == "cnn":
            return SmallCNN(input_shape, num_classes, channels)
    raise ValueError(f"unknown model {kind!r}; choose logistic, mlp or cnn")


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (the length d of the update vectors)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
