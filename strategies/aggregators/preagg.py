"""Pre-aggregations that wrap any rule: nearest-neighbour mixing (NNM) and bucketing."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flagstaff.strategies.aggregators.base import Aggregator, PreAggregator, pairwise_sq_dists
from flagstaff.strategies.aggregators.registry import register

__all__ = ["NNM", "Bucketing"]


@register("nnm", rule=False, pre=True)
class NNM(PreAggregator):
    """Nearest-neighbour mixing (Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, AISTATS
    2023, "Fixing by mixing"): each ``x_i`` becomes the mean of its ``n - f`` nearest inputs
    (itself included), then the inner rule runs on the ``n`` mixed vectors.

    Cost: one Gram product for the distances and one ``(n, n) x (n, d)`` product for the mixing,
    O(n^2 d). Distance ties are broken by ``topk`` (arbitrary but deterministic). Weights pass
    through to the inner rule (the mixing itself is unweighted, as in the paper). Needs n > 2f.
    """

    name = "nnm"

    def __init__(self, inner: Aggregator | None = None, *, f: int = 0, n: int | None = None):
        super().__init__(inner, f=f, n=n)
        self._validate_n()

    def own_requirement(self, n: int) -> str | None:
        if n <= 2 * self.f:
            return f"needs n > 2f = {2 * self.f} inputs; use at least {2 * self.f + 1} clients"
        return None

    def mixing_matrix(self, U: Tensor) -> Tensor:
        """The row-stochastic (n, n) float64 matrix W with ``NNM(U) = W U``."""
        k = U.shape[0] - self.f
        D = pairwise_sq_dists(U)
        D.fill_diagonal_(-1.0)  # itself always among its neighbours, whatever the rounding
        idx = D.topk(k, dim=1, largest=False).indices
        W = torch.zeros_like(D)
        W.scatter_(1, idx, 1.0 / k)
        return W

    def transform(self, U: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.f == 0:
            mixed = U.mean(dim=0, keepdim=True).expand_as(U).clone()
            return mixed, weights
        W = self.mixing_matrix(U).to(device=U.device, dtype=U.dtype)
        return W @ U, weights


@register("bucketing", rule=False, pre=True)
class Bucketing(PreAggregator):
    """Bucketing (Karimireddy, He, Jaggi, ICLR 2022, "Byzantine-robust learning on heterogeneous
    datasets via bucketing"): randomly permute the inputs, average consecutive buckets of ``s``
    (the last bucket may be smaller), and run the inner rule on the ``ceil(n/s)`` bucket means with
    the same f (a Byzantine input spoils at most one bucket).

    Randomness: a ``torch.Generator`` seeded with ``seed`` at construction, advanced by each call;
    its state is in ``state_dict()`` so a resumed run draws the same permutations. With weights,
    each bucket is the weighted mean of its members; every bucket carries its members' total
    weight (their count when unweighted) to the inner rule, so bucketing followed by the mean is
    the (weighted) mean, and robust inner rules ignore it.
    """

    name = "bucketing"

    def __init__(
        self,
        inner: Aggregator | None = None,
        *,
        f: int = 0,
        n: int | None = None,
        s: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(inner, f=f, n=n)
        if int(s) != s or s < 1:
            raise ValueError(f"bucketing: the bucket size s must be an integer >= 1, got {s}")
        self.s, self.seed = int(s), int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._validate_n()

    def output_count(self, n: int) -> int:
        return math.ceil(n / self.s)

    def bucket_matrix(self, n: int) -> Tensor:
        """Draw a permutation; return the (ceil(n/s), n) 0/1 membership matrix of the buckets."""
        perm = torch.randperm(n, generator=self._generator)
        B = torch.zeros(self.output_count(n), n, dtype=torch.float64)
        B[torch.arange(n) // self.s, perm] = 1.0
        return B

    def transform(self, U: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
        B = self.bucket_matrix(U.shape[0])
        w = torch.ones(U.shape[0], dtype=torch.float64) if weights is None else weights.double()
        Bw = B * w.cpu()[None, :]
        totals = Bw.sum(dim=1)
        if bool((totals <= 0).any()):  # a bucket of zero-weight clients: average it uniformly
            Bw = torch.where(totals[:, None] > 0, Bw, B)
            totals = Bw.sum(dim=1)
        A = (Bw / totals[:, None]).to(device=U.device, dtype=U.dtype)
        new_w = (B @ w.cpu()).to(device=U.device, dtype=U.dtype)  # counts when unweighted
        return A @ U, new_w

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "generator" in state:
            self._generator.set_state(state["generator"])
