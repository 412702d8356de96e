"""Adapters beyond plain LoRA for the LoRA client trainer: PiSSA, SORSA and FLoRA.

Selected with ``model.adapter`` (``lora`` | ``pissa`` | ``sorsa`` | ``flora``; see
:func:`clients.lora.build_lora_model`). Every adapter keeps the pretrained weight frozen and its own
factors trainable, so the factors are global state in the flat update vector like LoRA's and every
strategy averages them unchanged.

- :class:`PiSSALinear` (Meng, Wang, Zhang 2024, "PiSSA: Principal Singular Values and Singular
  Vectors Adaptation of Large Language Models"): a :class:`clients.lora.LoRALinear` whose factors
  start at the principal singular components of W and whose frozen base is the residual, so FedSVD,
  FFA-LoRA and DP clients treat it as any LoRA adapter.
- :class:`SORSALinear` (Cao 2024, "SORSA: Singular Values and Orthonormal Regularized Singular
  Vectors Adaptation of Large Language Models"): U_r, s_r, V_r^T all trainable, residual frozen, with
  the orthonormal regularizer :class:`OrthonormalPenalty` that the trainers add to the objective
  (``model.penalty``, a pure function of the named parameters).
- :class:`FLoRALayer` (Si et al. 2024, "FLoRA: Low-Rank Core Space for N-dimension"): the change of
  an N-dimensional weight (a conv kernel (out, in, *k) or a Linear matrix) is a Tucker product of a
  small core with one factor per mode, keeping the weight's structure instead of flattening it.

Trainable tensors live in leaf modules that hold nothing frozen (``nn.Linear`` factors, or the
small :class:`_Scale` / :class:`TuckerDelta` modules), so Opacus computes per-sample gradients with
its stock Linear grad sampler or its functorch fallback, and ``torch.func`` treats them as any
parameter.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flagstaff.clients.lora_layer import _FACTORS, LoRALinear

__all__ = [
    "ADAPTERS",
    "PiSSALinear",
    "SORSALinear",
    "OrthonormalPenalty",
    "TuckerDelta",
    "FLoRALayer",
    "FLORA_TYPES",
    "tucker_product",
]

#: valid values of ``model.adapter``
ADAPTERS = ("lora", "pissa", "sorsa", "flora")

#: layer types FLoRA adapts (Linear is the 2-D case)
FLORA_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_rank(base: nn.Linear, rank: int) -> None:
    if rank < 1:
        raise ValueError(f"model.rank must be >= 1, got {rank}")
    if rank > min(base.in_features, base.out_features):
        raise ValueError(
            f"model.rank={rank} exceeds min(in, out)={min(base.in_features, base.out_features)} "
            "of a target layer; lower the rank or change model.targets"
        )


def _svd64(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 (exact initializations in float32 need the extra precision)."""
    return torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)


# -- PiSSA ----------------------------------------------------------------------------------------------


class PiSSALinear(LoRALinear):
    """LoRA with principal-component init: ``A = sqrt(S_r / c) V_r^T``, ``B = U_r sqrt(S_r / c)``,
    frozen base ``W_res = W - c B A`` with c = alpha / r (Meng, Wang, Zhang 2024, PiSSA).

    The LoRA scaling c is folded into the factors (as peft's ``init_lora_weights="pissa"``), so
    ``c B A = U_r S_r V_r^T`` is the rank-r truncation of W and the residual is exactly its tail
    (singular values sigma_{r+1}, ...). The residual is formed from the float32-rounded factors, so
    the adapted layer equals the original one to float rounding at init. ``train`` works as for
    LoRA (``[B]`` for FedSVD / FFA-LoRA: A frozen at sqrt(S_r / c) V_r^T).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        train: Sequence[str] = _FACTORS,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, train, generator)
        r, dtype = self.rank, base.weight.dtype
        with torch.no_grad():
            W = base.weight.detach().to(torch.float64)
            U, S, Vh = _svd64(W)
            root = (S[:r] / self.scaling).sqrt()
            A = (root[:, None] * Vh[:r]).to(dtype)
            B = (U[:, :r] * root).to(dtype)
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)
            residual = W - self.scaling * (B.to(torch.float64) @ A.to(torch.float64))
            self.base.weight.copy_(residual.to(dtype))

    def extra_repr(self) -> str:
        return "init=pissa, " + super().extra_repr()


# -- SORSA ----------------------------------------------------------------------------------------------


class _Scale(nn.Module):
    """``x * weight`` along the last dimension (SORSA's trainable singular values)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class SORSALinear(nn.Module):
    """``y = W_res x + b + c U diag(s) V^T x``; U (out x r), s (r), V^T (r x in) trainable, W_res
    frozen (Cao 2024, SORSA).

    Init: W = U S V^T (float64), U <- U_r, s <- S_r / c, V^T <- V_r^T, W_res = W - c U diag(s) V^T
    formed from the float32-rounded factors (c = alpha / r; folding c into s keeps U and V^T
    orthonormal and the residual the tail of the spectrum; the reference code keeps s = S_r and
    subtracts c U S V^T, the same function). The orthonormal regularizer is
    :class:`OrthonormalPenalty`.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        _check_rank(base, rank)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        r, dtype = self.rank, base.weight.dtype
        self.sorsa_Vh = nn.Linear(base.in_features, r, bias=False)
        self.sorsa_S = _Scale(r)
        self.sorsa_U = nn.Linear(r, base.out_features, bias=False)
        with torch.no_grad():
            W = base.weight.detach().to(torch.float64)
            U, S, Vh = _svd64(W)
            u, s, vh = U[:, :r].to(dtype), (S[:r] / self.scaling).to(dtype), Vh[:r].to(dtype)
            self.sorsa_U.weight.copy_(u)
            self.sorsa_S.weight.copy_(s)
            self.sorsa_Vh.weight.copy_(vh)
            principal = (u.to(torch.float64) * s.to(torch.float64)) @ vh.to(torch.float64)
            self.base.weight.copy_((W - self.scaling * principal).to(dtype))

    @property
    def U(self) -> torch.Tensor:
        return self.sorsa_U.weight

    @property
    def S(self) -> torch.Tensor:
        return self.sorsa_S.weight

    @property
    def Vh(self) -> torch.Tensor:
        return self.sorsa_Vh.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.sorsa_U(self.sorsa_S(self.sorsa_Vh(x)))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


@dataclass(frozen=True)
class OrthonormalPenalty:
    """SORSA's orthonormal regularizer (Cao 2024): ``gamma * mean over the model's factor matrices of
    ||U^T U - I||_F and ||V^T V - I||_F`` (Frobenius norms, not squared, averaged over all U and V^T
    as the reference code's ``calc_ortho``).

    A pure function of the named trainable parameters (``pairs``: names of each adapter's U and
    V^T weights), so LocalSGD can ``vmap`` it over clients and the DP trainers can differentiate it
    on its own. The reference applies the regularizer's gradient with step ``gamma_ref`` (it scales
    the loss by gamma_ref / lr); here it is part of the objective, so ``gamma = gamma_ref / lr``.
    """

    gamma: float
    pairs: tuple[tuple[str, str], ...]

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        terms = []
        for u_name, vh_name in self.pairs:
            U, Vh = params[u_name], params[vh_name]
            eye = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
            terms.append(torch.linalg.matrix_norm(U.mT @ U - eye))
            terms.append(torch.linalg.matrix_norm(Vh @ Vh.mT - eye))
        return self.gamma * torch.stack(terms).mean(0)


# -- FLoRA ----------------------------------------------------------------------------------------------


def tucker_product(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``G x_1 U_1 x_2 U_2 ... x_N U_N`` (mode-k products; U_k: dim_k x r_k) by one einsum."""
    n = core.ndim
    if len(factors) != n or n > 13:
        raise ValueError(f"need one factor per core mode (<= 13 modes), got {len(factors)} for {n}")
    letters = string.ascii_letters
    ranks, dims = letters[:n], letters[n : 2 * n]
    spec = ",".join([ranks] + [dims[k] + ranks[k] for k in range(n)]) + "->" + dims
    return torch.einsum(spec, core, *factors)


class TuckerDelta(nn.Module):
    """The FLoRA update ``scaling * tucker_product(core, factors)`` applied as its layer's operation
    (linear or N-d convolution with the base layer's stride/padding/dilation/groups).

    Holds only trainable tensors (``core``: r_1 x ... x r_N, ``factor_k``: dim_k x r_k), so Opacus'
    functorch fallback computes its per-sample gradients. Init as the FLoRA reference: core zero
    (the model equals the base model), factors Kaiming-normal with a = sqrt(3), i.e.
    N(0, 1 / (2 r_k)).
    """

    def __init__(
        self,
        base: nn.Module,
        ranks: Sequence[int],
        scaling: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(base.weight.shape)
        self.shape, self.ranks, self.scaling = shape, tuple(int(r) for r in ranks), float(scaling)
        dtype = base.weight.dtype
        self.core = nn.Parameter(torch.zeros(self.ranks, dtype=dtype))
        for k, (d, r) in enumerate(zip(shape, self.ranks, strict=True)):
            std = 1.0 / math.sqrt(2.0 * r)
            init = torch.randn(d, r, generator=generator, dtype=torch.float32) * std
            self.register_parameter(f"factor_{k}", nn.Parameter(init.to(dtype)))
        if isinstance(base, nn.Linear):
            self.conv_dims = 0
            self.conv_args: dict = {}
        else:
            self.conv_dims = len(shape) - 2
            self.conv_args = {
                "stride": base.stride,
                "padding": base.padding,
                "dilation": base.dilation,
                "groups": base.groups,
            }

    @property
    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"factor_{k}") for k in range(len(self.shape))]

    def delta_weight(self) -> torch.Tensor:
        """delta W, the shape of the base weight."""
        return self.scaling * tucker_product(self.core, self.factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.delta_weight().to(x.dtype)
        if self.conv_dims == 0:
            return F.linear(x, w)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.conv_dims - 1]
        return conv(x, w, None, **self.conv_args)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, ranks={self.ranks}, scaling={self.scaling}"


class FLoRALayer(nn.Module):
    """``y = base(x) + op(x, delta W)`` with delta W a Tucker product of a small trainable core and
    one factor per weight mode (Si et al. 2024, FLoRA: Low-Rank Core Space for N-dimension).

    ``base``: ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (frozen). ``ranks``: one per weight mode (weight
    order: out, in, kernel...), or a scalar ``rank`` capped at each mode's size (a Tucker rank
    cannot exceed its mode's dimension). ``scaling`` multiplies delta W (alpha / rank in configs).
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int | None = None,
        scaling: float = 1.0,
        ranks: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if type(base) not in FLORA_TYPES:
            raise ValueError(
                f"model.adapter=flora supports {[t.__name__ for t in FLORA_TYPES]}, "
                f"not {type(base).__name__}"
            )
        if getattr(base, "padding_mode", "zeros") != "zeros":
            raise ValueError(
                f"model.adapter=flora: conv padding_mode={base.padding_mode!r} is not supported "
                "(only 'zeros')"
            )
        shape = tuple(base.weight.shape)
        if ranks is None:
            if rank is None or rank < 1:
                raise ValueError(f"model.rank must be >= 1, got {rank}")
            if rank > max(shape):
                raise ValueError(
                    f"model.rank={rank} exceeds every mode of a target weight of shape {shape}; "
                    "lower the rank"
                )
            ranks = [min(int(rank), d) for d in shape]
        ranks = [int(r) for r in ranks]
        if len(ranks) != len(shape) or any(
            not 1 <= r <= d for r, d in zip(ranks, shape, strict=False)
        ):
            raise ValueError(
                f"FLoRA ranks {ranks} must give one rank in [1, dim] per mode of the weight {shape}"
            )
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.flora = TuckerDelta(base, ranks, scaling, generator)

    def delta_weight(self) -> torch.Tensor:
        """delta W (same shape as the base weight)."""
        return self.flora.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.flora(x)
