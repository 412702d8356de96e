"""Models: logistic regression, MLP, small CNN (2-D images or 1-D signals), FedAvg's CNN, ResNets
with GroupNorm and LEAF's character LSTM (``build_model`` picks one by ``kind``).

No BatchNorm anywhere, so every model works with torch.func (batched clients) and Opacus; why
BatchNorm cannot work with per-client batching and federated averaging: ``clients.models.resnet``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from flagstaff.clients.models.cnn import FedAvgCNN
from flagstaff.clients.models.lstm import CharLSTM
from flagstaff.clients.models.resnet import ResNet, resnet
from flagstaff.clients.models.stacked import (
    StackedModel,
    conv_chain_loss_grad,
    conv_pool_head,
    linear_chain,
    linear_chain_loss_grad,
)

__all__ = [
    "KINDS",
    "build_model",
    "Logistic",
    "MLP",
    "SmallCNN",
    "FedAvgCNN",
    "ResNet",
    "CharLSTM",
    "num_parameters",
]

#: the model kinds ``build_model`` knows (``model.kind``)
KINDS = ("logistic", "mlp", "cnn", "cnn_femnist", "resnet8", "resnet20", "resnet18", "lstm")


class _LinearChain(StackedModel):
    """Linear layers with ReLU between them on flattened input; K clients' forward and loss
    gradient through the stacked layers (``clients.models.stacked.linear_chain``)."""

    def _layers(self) -> list[str]:
        return [n for n, m in self.named_modules() if isinstance(m, nn.Linear)]

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return linear_chain(params, x.flatten(2), self._layers())

    def loss_grad(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        return linear_chain_loss_grad(self._layers(), params, x.flatten(2), y, weight)


class Logistic(_LinearChain):
    """Multinomial logistic regression (one linear layer on flattened input)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(_LinearChain):
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


class SmallCNN(StackedModel):
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

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return conv_pool_head(params, x, ("features.0", "features.3"), "head", padding=1)

    def loss_grad(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        convs = [(f"features.{i}.weight", f"features.{i}.bias", 1, 1) for i in (0, 3)]
        return conv_chain_loss_grad(convs, ("head.weight", "head.bias"), params, x, y, weight)


def build_model(
    kind: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] | int | None = None,
    channels: Sequence[int] | int | None = None,
    seed: int = 0,
    *,
    groups: int = 2,
    vocab_size: int = 80,
    embed_dim: int = 8,
    layers: int = 2,
    stem: str = "cifar",
    init: str = "default",
) -> nn.Module:
    """Construct a model with seeded initialization (same seed -> same initial parameters).

    ``kind``: ``logistic``; ``mlp`` (``hidden``: widths, default 64-64); ``cnn`` (SmallCNN,
    ``channels`` default 16); ``cnn_femnist`` (FedAvg's CNN: ``channels`` default 32-64, ``hidden``
    default 512); ``resnet8``, ``resnet20``, ``resnet18`` (GroupNorm with ``groups`` groups,
    ``stem`` cifar or imagenet, ``init`` default or torchvision: ``clients.models.resnet``);
    ``lstm`` (LEAF's character LSTM: ``vocab_size``, ``embed_dim``, ``hidden`` default 256,
    ``layers``). None takes the kind's default.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flat = math.prod(input_shape)
        if kind == "logistic":
            return Logistic(flat, num_classes)
        if kind == "mlp":
            return MLP(flat, num_classes, tuple(hidden) if hidden is not None else (64, 64))
        if kind == "cnn":
            return SmallCNN(input_shape, num_classes, 16 if channels is None else int(channels))
        if kind == "cnn_femnist":
            return FedAvgCNN(
                input_shape,
                num_classes,
                (32, 64) if channels is None else tuple(channels),
                512 if hidden is None else int(hidden),
            )
        if kind in ("resnet8", "resnet20", "resnet18"):
            return resnet(int(kind[6:]), input_shape, num_classes, groups, stem, init)
        if init != "default":
            raise ValueError(f"model.init={init!r} is for the ResNets; {kind} has no init option")
        if kind == "lstm":
            return CharLSTM(
                input_shape,
                num_classes,
                vocab_size,
                embed_dim,
                256 if hidden is None else int(hidden),
                layers,
            )
    raise ValueError(f"unknown model {kind!r}; choose {', '.join(KINDS)}")


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (the length d of the update vectors)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
