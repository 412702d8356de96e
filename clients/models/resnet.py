"""ResNets with GroupNorm for 32x32 images: ResNet-8/20 (CIFAR family) and ResNet-18.

ResNet-8/20 are He et al. 2016's CIFAR networks (section 4.2: a 3x3 stem with 16 channels, three
stages of n basic blocks with 16, 32, 64 channels, depth 6n + 2; n = 1 and 3), ResNet-18 the
four-stage network of their Table 1 (64-512 channels, two blocks per stage) with the 3x3 stride-1
stem and no max pool that CIFAR uses (11.17M parameters for 10 classes). ``stem="imagenet"`` is
Table 1's own stem instead (7x7 convolution of stride 2, then 3x3 max pooling of stride 2: a 32x32
image reaches the first stage at 8x8, a sixteenth of the positions), as torchvision's ``resnet18``
builds it and FL-Simulator's ResNet-18-GN uses it on CIFAR (11,181,642 parameters for 10 classes:
torchvision's 11,689,512 with a 10-way head). Every BatchNorm is a
GroupNorm (Wu and He 2018; two groups per layer, as in Hsieh et al. 2020 and the FedDyn/FedSpeed
ResNet-18-GN): batch statistics mix one client's samples with the padding of a batched step and
running statistics do not average across clients, so BatchNorm breaks both per-client batching
and federated averaging (``clients.trainer.LocalSGD`` refuses it). A block whose shape changes
takes the projection shortcut (1x1 convolution + GroupNorm, He et al.'s option B).
``init="torchvision"`` initializes every convolution as torchvision's ResNet does (and so the
resnet18 FL-Simulator builds): ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, He et al.
2015 (eq. 14 with the output fan), std sqrt(2 / (c_out k k)); ``default`` keeps torch's own conv init
(``kaiming_uniform_(a=sqrt(5))``: std sqrt(1 / (3 c_in k k)), 2.5x smaller for ResNet-18's last
convolutions). GroupNorm weights 1 and biases 0 and the head's ``nn.Linear`` init are the same in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flagstaff.clients.models.stacked import (
    StackedModel,
    conv,
    first_conv_large,
    group_norm,
    linear,
    max_pool,
    to_channels_last,
)

__all__ = ["BasicBlock", "ResNet", "resnet", "STEMS", "INITS"]

#: the stems (``model.stem``): conv kernel, stride, padding and whether a 3x3/2 max pool follows
STEMS: dict[str, tuple[int, int, int, bool]] = {
    "cifar": (3, 1, 1, False),
    "imagenet": (7, 2, 3, True),
}

#: the convolution initializations (``model.init``): torch's own, or torchvision's ResNet's
INITS = ("default", "torchvision")

#: blocks per stage and stage widths of each depth
DEPTHS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    8: ((1, 1, 1), (16, 32, 64)),
    20: ((3, 3, 3), (16, 32, 64)),
    18: ((2, 2, 2, 2), (64, 128, 256, 512)),
}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(
            f"model.groups={groups} does not divide {channels} channels; use a divisor "
            "(2 works for every ResNet here)"
        )
    return nn.GroupNorm(groups, channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and a shortcut (identity or 1x1 projection)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = _norm(c_out, groups)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out, groups)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(h)) + self.shortcut(x))

    def stacked(
        self, params: dict[str, torch.Tensor], prefix: str, x: torch.Tensor
    ) -> torch.Tensor:
        """The block on K clients' channels-last maps (clients.models.stacked)."""
        stride = self.conv1.stride[0]
        h = _conv_gn(params, prefix + "conv1", prefix + "gn1", self.gn1, x, stride, 1)
        h = _conv_gn(params, prefix + "conv2", prefix + "gn2", self.gn2, F.relu(h), 1, 1)
        if len(self.shortcut):
            x = _conv_gn(
                params, prefix + "shortcut.0", prefix + "shortcut.1", self.shortcut[1], x, stride, 0
            )
        return F.relu(h + x)


def _conv_gn(
    params: dict[str, torch.Tensor],
    conv_name: str,
    gn_name: str,
    gn: nn.GroupNorm,
    x: torch.Tensor,
    stride: int,
    padding: int,
) -> torch.Tensor:
    h = conv(x, params[conv_name + ".weight"], None, stride, padding)
    w, b = params[gn_name + ".weight"], params[gn_name + ".bias"]
    return group_norm(h, gn.num_groups, w, b, gn.eps)


class ResNet(StackedModel):
    """Stem (3x3 conv, or 7x7/2 conv + 3x3/2 max pool) + GroupNorm, stages of :class:`BasicBlock`
    (the first block of every stage after the first halves the resolution), global average pool,
    linear head."""

    stacked_modules = (BasicBlock,)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        blocks: Sequence[int],
        widths: Sequence[int],
        groups: int = 2,
        stem: str = "cifar",
        init: str = "default",
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"model.stem={stem!r}: choose one of {', '.join(STEMS)}")
        if init not in INITS:
            raise ValueError(
                f"model.init={init!r}: choose default (torch's conv init) or torchvision "
                "(kaiming_normal_ fan_out, as torchvision's ResNet)"
            )
        if len(input_shape) != 3:
            raise ValueError(
                f"a ResNet needs image input (C, H, W), got {tuple(input_shape)}; use an image "
                "data set (e.g. CIFAR-shaped 3x32x32)"
            )
        kernel, stride, padding, self.stem_pool = STEMS[stem]
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], kernel, stride, padding, bias=False)
        self.gn1 = _norm(widths[0], groups)
        layers: list[nn.Module] = []
        c_in = widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(c_in, width, 2 if i > 0 and j == 0 else 1, groups))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        if init == "torchvision":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gn1(self.conv1(x)))
        if self.stem_pool:
            h = F.max_pool2d(h, 3, 2, 1)
        return self.head(self.layers(h).mean((2, 3)))

    def per_client(self, x: torch.Tensor) -> bool:
        return first_conv_large(x, self.conv1)

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        stride, padding = self.conv1.stride[0], self.conv1.padding[0]
        h = _conv_gn(params, "conv1", "gn1", self.gn1, to_channels_last(x), stride, padding)
        h = F.relu(h)
        if self.stem_pool:
            h = max_pool(h, 3, 2, 1)
        for i, block in enumerate(self.layers):
            h = block.stacked(params, f"layers.{i}.", h)
        return linear(h.mean((2, 3)), params["head.weight"], params["head.bias"])


def resnet(
    depth: int,
    input_shape: Sequence[int],
    num_classes: int,
    groups: int = 2,
    stem: str = "cifar",
    init: str = "default",
) -> ResNet:
    """ResNet-``depth`` (8, 20 or 18) with GroupNorm of ``groups`` groups per layer, the ``stem``
    of :data:`STEMS` (cifar: 3x3 stride 1; imagenet: He et al. 2016 Table 1's 7x7/2 + max pool)
    and the convolution ``init`` of :data:`INITS`."""
    if depth not in DEPTHS:
        raise ValueError(f"model.depth={depth}: choose one of {sorted(DEPTHS)}")
    blocks, widths = DEPTHS[depth]
    return ResNet(input_shape, num_classes, blocks, widths, groups, stem, init)
