"""FedSVD: private federated LoRA with SVD re-factorization of the adapters (Lee et al., NeurIPS
2025, arXiv 2505.12805), with FFA-LoRA (Sun et al., ICLR 2024) as its ``period=0`` special case.

Clients keep A fixed and train only B (under DP-SGD; ``model.train: [B]``). The server averages
the B updates, B_bar = B_t + sum_i p_i dB_i, and every ``period`` rounds re-factorizes each adapter:
M = B_bar A_t = U S V^T, A <- V^T[:r] (orthonormal rows), B <- U_r S_r. Since rank(M) <= r the
product, hence the model function, is unchanged; the new A is part of the global parameters and so
reaches the clients with the next broadcast. ``period=0`` never re-factorizes: A stays at its random
initialization, which is FFA-LoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from flagstaff.clients.lora import adapter_layers, lora_factors
from flagstaff.strategies.optim import Composed, Empty, Round, Transform, server_optimizer

__all__ = ["FedSVD", "Refactorize", "fedsvd_refactorize"]


def fedsvd_refactorize(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSVD's server step for one adapter: (B, A) -> (U_r S_r, V_r^T) with B A = U S V^T.

    ``B``: (out, r), ``A``: (r, in). Returns B_new (out, r) and A_new (r, in) with orthonormal rows
    and B_new A_new = B A up to rounding (the SVD is taken in float64). Pure function.
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"need B (out, r) and A (r, in), got {tuple(B.shape)} and {tuple(A.shape)}"
        )
    r = A.shape[0]
    if r > min(B.shape[0], A.shape[1]):
        raise ValueError(f"rank {r} exceeds min(out, in) = {min(B.shape[0], A.shape[1])}")
    M = B.to(torch.float64) @ A.to(torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]).to(B.dtype), Vh[:r].contiguous().to(A.dtype)


class Refactorize(Transform):
    """FedSVD's server transform on the parameters: after the step, every ``period`` rounds
    (``(round_idx + 1) % period == 0``; 0 = never), ``fedsvd_refactorize`` on every adapter."""

    name = "fedsvd"

    def __init__(self, period: int = 1) -> None:
        if period < 0:
            raise ValueError(f"strategy.period must be >= 0 (0 = never, FFA-LoRA), got {period}")
        self.period = int(period)
        self._slices: list[tuple[slice, tuple[int, int], slice, tuple[int, int]]] = []

    def bind(self, model: nn.Module, spec) -> None:
        """Find each adapter's A and B in the flat parameter vector (``spec``: its layout)."""
        offsets, i = {}, 0
        for name, shape in zip(spec.names, spec.shapes, strict=True):
            n = int(torch.Size(shape).numel())
            offsets[name] = (slice(i, i + n), tuple(shape))
            i += n
        self._slices = []
        for mod_name, mod in lora_factors(model):
            if "A" in mod.train_factors:
                raise ValueError(
                    f"strategy=fedsvd/ffa_lora: clients must keep A fixed, but adapter {mod_name!r} "
                    "trains it; set model.train=[B] (DP-LoRA trains both: strategy=dp_lora)"
                )
            pre = f"{mod_name}." if mod_name else ""
            a, b = f"{pre}lora_A.weight", f"{pre}lora_B.weight"
            if a not in offsets or b not in offsets:
                raise ValueError(f"strategy=fedsvd: adapter {mod_name!r} has no trainable A and B")
            self._slices.append((*offsets[b], *offsets[a]))
        if not self._slices:
            other = sorted({type(m).__name__ for _, m in adapter_layers(model)})
            raise ValueError(
                "strategy=fedsvd/ffa_lora needs a LoRA model (model=lora_mlp, lora_cnn or lora_minilm) "
                "with LoRA factors A, B: model.adapter=lora or pissa"
                + (f"; {other} adapters (model.adapter=sorsa/flora) have none" if other else "")
            )

    def refactorize(self, params: torch.Tensor) -> torch.Tensor:
        """Apply ``fedsvd_refactorize`` to every adapter of the flat vector ``params``."""
        out = params.clone()
        for sb, shape_b, sa, shape_a in self._slices:
            B, A = fedsvd_refactorize(params[sb].view(shape_b), params[sa].view(shape_a))
            out[sb], out[sa] = B.reshape(-1), A.reshape(-1)
        return out

    def post_apply(self, params: torch.Tensor, state: Empty, rnd: Round) -> torch.Tensor:
        if self.period and (rnd.round_idx + 1) % self.period == 0:
            if not self._slices:
                raise RuntimeError("FedSVD.update before bind(model, spec)")
            params = self.refactorize(params)
        return params


class FedSVD(Composed):
    """FedAvg of the trainable vector (or ``server_opt``), then ``fedsvd_refactorize`` on every
    LoRA adapter every ``period`` rounds (0 = never: FFA-LoRA): ``chain(sgd(server_lr),
    Refactorize(period))``. Needs a LoRA model (``model=lora_*``)."""

    name = "fedsvd"

    def __init__(
        self,
        period: int = 1,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_opt: Transform | None = None,
    ) -> None:
        opt = server_optimizer(server_lr, server_momentum, server_opt)
        self.refactorization = Refactorize(period)
        super().__init__(opt, self.refactorization)

    @property
    def period(self) -> int:
        return self.refactorization.period

    def refactorize(self, params: torch.Tensor) -> torch.Tensor:
        """Apply ``fedsvd_refactorize`` to every adapter of the flat vector ``params``."""
        return self.refactorization.refactorize(params)
