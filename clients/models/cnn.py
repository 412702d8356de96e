"""The CNN of FedAvg's paper (McMahan et al. 2017, section 3, "CNN"), used for (F)EMNIST.

Two 5x5 convolutions (32 then 64 channels, "same" padding), each followed by ReLU and 2x2 max
pooling, a fully connected layer of 512 units with ReLU and a linear output: 1,663,370 parameters
for MNIST's 10 classes (the paper's count), 1,690,046 for FEMNIST's 62.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from flagstaff.clients.models.stacked import (
    StackedModel,
    conv_pool_head,
    first_conv_large,
    linear,
)

__all__ = ["FedAvgCNN"]


class FedAvgCNN(StackedModel):
    """conv5x5(32) - ReLU - maxpool2 - conv5x5(64) - ReLU - maxpool2 - fc(hidden) - ReLU - fc."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 512,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"model=cnn_femnist needs image input (C, H, W), got {tuple(input_shape)}; use an "
                "image data set (FEMNIST: 1x28x28)"
            )
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = c2 * math.prod(s // 4 for s in input_shape[1:])
        self.classifier = nn.Sequential(
            nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

    def per_client(self, x: torch.Tensor) -> bool:
        return first_conv_large(x, self.features[0])

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        convs = ("features.0", "features.3")
        h = conv_pool_head(params, x, convs, "classifier.0", padding=2).relu()
        return linear(h, params["classifier.2.weight"], params["classifier.2.bias"])
