"""The LoRA layer: ``W x + b + (alpha / r) B A x`` around a frozen ``nn.Linear`` (Hu et al., ICLR 2022).

Its own module so that :mod:`clients.lora` (which applies adapters to models) and
:mod:`clients.adapters` (PiSSA subclasses it) both import it, one way, without a circle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear"]

_FACTORS = ("A", "B")


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * B (A x)``; ``base`` frozen, ``train`` the factors clients train."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        train: Sequence[str] = _FACTORS,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"model.rank must be >= 1, got {rank}")
        if rank > min(base.in_features, base.out_features):
            raise ValueError(
                f"model.rank={rank} exceeds min(in, out)={min(base.in_features, base.out_features)} "
                "of a target layer; lower the rank or change model.targets"
            )
        bad = [f for f in train if f not in _FACTORS]
        if bad or not train:
            raise ValueError(f"model.train={list(train)}: choose a non-empty subset of ['A', 'B']")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.train_factors = tuple(f for f in _FACTORS if f in train)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        with torch.no_grad():
            # Kaiming-uniform A (as nn.Linear / the LoRA reference), zero B
            bound = 1.0 / math.sqrt(base.in_features)
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()

    @property
    def A(self) -> torch.Tensor:
        return self.lora_A.weight

    @property
    def B(self) -> torch.Tensor:
        return self.lora_B.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "A" in self.train_factors:
            h = self.lora_A(x)
        else:
            h = F.linear(x, self.lora_A.weight.detach())
        if "B" in self.train_factors:
            d = self.lora_B(h)
        else:
            d = F.linear(h, self.lora_B.weight.detach())
        return self.base(x) + self.scaling * d

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, train={list(self.train_factors)}"
