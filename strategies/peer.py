"""Peer-to-peer (decentralized) robust training: peer aggregation rules, topologies, settings.

MoNNA (Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust Collaborative Learning with
Linear Gradient Overhead", ICML 2023): every honest node i keeps parameters theta_i and a Polyak
momentum m_i, and per step t

1. g = one stochastic gradient of its local loss at theta_i (+ weight decay * theta_i),
2. m_i = beta m_i + (1 - beta) g,
3. half_i = theta_i - gamma_t m_i, broadcast half_i (models, not gradients, are exchanged),
4. theta_i = peer aggregate of the received half-steps, centred on its own half_i
   (NNA: the mean of the ``m - f`` received vectors nearest to half_i, m = number received).

A **peer rule** here is ``rule(received (m, d), own (d,)) -> (d,)``: ``received`` holds everything
node i aggregates, its own vector included (at any row); ``own`` is that vector. Every rule is
translation-equivariant, so the inputs are centred on ``own`` before calling the server-side
aggregators of :mod:`strategies.aggregators` (exact, and better conditioned for model vectors whose
spread is tiny next to their norms). ``rule.batch(R (K, m, d), own (K, d))`` aggregates K nodes at
once; ``rule.for_node(own)`` is node i's aggregation as a callable on (m, d), what the adaptive
attacks line-search against. Nothing here loops over d.

Rules (``PEER_RULES``): ``nna`` (MoNNA's mixing), ``trimmed_mean`` and ``geomed`` (peer versions of
the server rules, as in the paper's baselines), ``scclip`` (self-centred clipping, He, Karimireddy,
Jaggi 2022) and ``mean`` (D-SGD, not robust).

Topologies (:func:`make_topology`): ``complete`` (the paper's setting), ``random_regular`` and
``erdos_renyi`` (seeded; resampled until connected). See docs/decentralized.md for what is known
about robustness on sparse graphs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from flagstaff.clients.seeds import stream
from flagstaff.strategies.aggregators import GeometricMedian, TrimmedMean

__all__ = [
    "PEER_RULES",
    "TOPOLOGIES",
    "NNA",
    "PeerMean",
    "PeerRule",
    "PeerGeometricMedian",
    "PeerTrimmedMean",
    "PeerTraining",
    "SelfCentredClipping",
    "build_peer_rule",
    "hyperbolic_lr",
    "make_topology",
]


# ----------------------------------------------------------------------------------------------
# peer rules
# ----------------------------------------------------------------------------------------------


class PeerRule:
    """Base: ``PeerRule(f=...)``; ``rule(received, own) -> Tensor[d]`` (see module docstring)."""

    name: ClassVar[str] = "peer"
    #: True when the aggregate does not depend on ``own`` (up to float rounding): the rule is
    #: translation-equivariant and only centres on ``own`` for precision. Then every node of a
    #: complete graph aggregates the same inputs the same way, and an adaptive attack's search is
    #: the same for all of them.
    centre_free: ClassVar[bool] = False

    def __init__(self, f: int = 0) -> None:
        if isinstance(f, bool) or int(f) != f or f < 0:
            raise ValueError(f"peer rule {self.name}: f must be an integer >= 0, got {f!r}")
        self.f = int(f)

    def requirement(self, m: int) -> str | None:
        """An error message if a node receiving ``m`` vectors (own included) cannot run this rule."""
        return None

    def check(self, m: int) -> None:
        msg = self.requirement(m)
        if msg is not None:
            raise ValueError(f"peer rule {self.name} with f={self.f}: {msg}")

    def __call__(self, received: Tensor, own: Tensor) -> Tensor:
        if received.dim() != 2 or own.dim() != 1 or received.shape[1] != own.shape[0]:
            raise ValueError(
                f"peer rule {self.name}: expected received (m, d) and own (d,), got "
                f"{tuple(received.shape)} and {tuple(own.shape)}"
            )
        self.check(received.shape[0])
        return self.aggregate(received, own)

    def aggregate(self, received: Tensor, own: Tensor) -> Tensor:
        raise NotImplementedError

    def batch(self, R: Tensor, own: Tensor) -> Tensor:
        """K nodes at once: ``R`` (K, m, d), ``own`` (K, d) -> (K, d). Default: one node at a time."""
        self.check(R.shape[1])
        return torch.stack([self.aggregate(R[k], own[k]) for k in range(R.shape[0])])

    def for_node(self, own: Tensor) -> Callable[[Tensor], Tensor]:
        """Node ``own``'s aggregation of a stacked (m, d) tensor (for the adaptive attacks)."""
        return lambda U: self(U, own)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class PeerMean(PeerRule):
    """Plain average of the received vectors: D-SGD's gossip step with uniform weights (Lian et
    al., NeurIPS 2017). Not robust; ``f`` is ignored."""

    name = "mean"
    centre_free = True

    def aggregate(self, received: Tensor, own: Tensor) -> Tensor:
        return received.mean(dim=0)

    def batch(self, R: Tensor, own: Tensor) -> Tensor:
        return R.mean(dim=1)


class NNA(PeerRule):
    """Nearest-neighbour averaging (Farhadkhani et al., ICML 2023, Algorithm 1): the mean of the
    ``m - f`` received vectors closest (Euclidean) to the node's own vector.

    The own vector is at distance 0, so it is always among them (a received copy of it is an
    equal vector, so which of the two is kept does not change the mean). Distances are computed
    from the differences ``x_j - own`` directly (no Gram-matrix cancellation). Needs ``m > f``;
    the robustness guarantee needs an honest majority among the received (m > 2f).
    """

    name = "nna"

    def requirement(self, m: int) -> str | None:
        if m <= self.f:
            return f"needs more than f = {self.f} received vectors, got m = {m}"
        return None

    def aggregate(self, received: Tensor, own: Tensor) -> Tensor:
        return self.batch(received.unsqueeze(0), own.unsqueeze(0))[0]

    def batch(self, R: Tensor, own: Tensor) -> Tensor:
        m = R.shape[1]
        self.check(m)
        dist = torch.linalg.vector_norm(R - own.unsqueeze(1), dim=2)  # (K, m)
        keep = dist.topk(m - self.f, dim=1, largest=False, sorted=True).indices
        w = torch.zeros_like(dist).scatter_(1, keep, 1.0 / (m - self.f))  # (K, m) averaging weights
        return torch.bmm(w.unsqueeze(1), R).squeeze(1)


class PeerTrimmedMean(PeerRule):
    """Coordinate-wise trimmed mean of the received vectors (drop f smallest and f largest per
    coordinate; Yin et al. 2018), the peer rule of BRIDGE (Yang & Bajwa 2019) and of the MoNNA
    paper's CWTM baselines. Reuses :class:`strategies.aggregators.TrimmedMean`. Needs m > 2f."""

    name = "trimmed_mean"
    centre_free = True

    def __init__(self, f: int = 0) -> None:
        super().__init__(f)
        self._rule = TrimmedMean(f=self.f)

    def requirement(self, m: int) -> str | None:
        return self._rule.requirement(m)

    def aggregate(self, received: Tensor, own: Tensor) -> Tensor:
        return own + self._rule(received - own)


class PeerGeometricMedian(PeerRule):
    """Geometric median of the received vectors by smoothed Weiszfeld (RFA; Pillutla et al. 2022),
    the paper's GM baseline. Reuses :class:`strategies.aggregators.GeometricMedian` on the inputs
    centred on the node's own vector. Needs m > 2f."""

    name = "geomed"
    centre_free = True

    def __init__(
        self, f: int = 0, nu: float = 1e-6, max_iter: int = 100, tol: float = 1e-7
    ) -> None:
        super().__init__(f)
        self._rule = GeometricMedian(f=self.f, nu=nu, max_iter=max_iter, tol=tol)
        self.nu, self.max_iter, self.tol = float(nu), int(max_iter), float(tol)

    def requirement(self, m: int) -> str | None:
        return self._rule.requirement(m)

    def aggregate(self, received: Tensor, own: Tensor) -> Tensor:
        return own + self._rule(received - own)


class SelfCentredClipping(PeerRule):
    """Self-centred clipping (He, Karimireddy, Jaggi 2022, "Byzantine-robust decentralized learning
    via ClippedGossip"): ``own + (1/m) sum_j clip(x_j - own, tau)``, clip(v, tau) = v min(1,
    tau/||v||), uniform gossip weights over the m received vectors (own included, a zero term).

    ``tau``: fixed radius (the MoNNA paper's baseline uses 2), or ``None`` for an adaptive radius,
    our choice: the distance from own to its ``(m - f)``-th nearest received vector, so that at
    least ``m - f`` vectors pass unclipped. Needs m > f.
    """

    name = "scclip"

    def __init__(self, f: int = 0, tau: float | None = 2.0) -> None:
        super().__init__(f)
        if tau is not None and not tau > 0:
            raise ValueError(f"peer rule scclip: tau must be > 0 or null (adaptive), got {tau}")
        self.tau = None if tau is None else float(tau)

    def requirement(self, m: int) -> str | None:
        if m <= self.f:
            return f"needs more than f = {self.f} received vectors, got m = {m}"
        return None

    def aggregate(self, received: Tensor, own: Tensor) -> Tensor:
        return self.batch(received.unsqueeze(0), own.unsqueeze(0))[0]

    def batch(self, R: Tensor, own: Tensor) -> Tensor:
        m = R.shape[1]
        self.check(m)
        diff = R - own.unsqueeze(1)
        norms = torch.linalg.vector_norm(diff, dim=2)  # (K, m)
        if self.tau is None:
            tau = norms.kthvalue(m - self.f, dim=1, keepdim=True).values
        else:
            tau = torch.full_like(norms[:, :1], self.tau)
        scale = (tau / norms.clamp_min(torch.finfo(R.dtype).tiny)).clamp_max(1.0)
        return own + (scale.unsqueeze(2) * diff).mean(dim=1)


PEER_RULES: dict[str, type[PeerRule]] = {
    "nna": NNA,
    "mean": PeerMean,
    "trimmed_mean": PeerTrimmedMean,
    "geomed": PeerGeometricMedian,
    "scclip": SelfCentredClipping,
}


def build_peer_rule(name: str, f: int = 0, **kwargs: Any) -> PeerRule:
    """The peer rule registered as ``name`` tolerating ``f`` Byzantine inputs."""
    if name not in PEER_RULES:
        raise ValueError(f"unknown peer rule {name!r}; choose one of {sorted(PEER_RULES)}")
    try:
        return PEER_RULES[name](f=f, **kwargs)
    except TypeError as err:
        raise ValueError(f"peer rule {name!r}: {err}") from None


# ----------------------------------------------------------------------------------------------
# topologies
# ----------------------------------------------------------------------------------------------

TOPOLOGIES = ("complete", "random_regular", "erdos_renyi")


def _connected(adj: np.ndarray) -> bool:
    seen = np.zeros(len(adj), bool)
    seen[0] = True
    frontier = seen.copy()
    while frontier.any():
        nxt = adj[frontier].any(axis=0) & ~seen
        seen |= nxt
        frontier = nxt
    return bool(seen.all())


def _random_regular(n: int, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """One attempt at a uniform-ish k-regular simple graph: pair random free stubs one edge at a
    time among the still-allowed pairs (Steger & Wormald 1999); None if it gets stuck."""
    adj = np.zeros((n, n), bool)
    free = np.full(n, k)
    for _ in range(n * k // 2):
        allowed = (free[:, None] > 0) & (free[None, :] > 0) & ~adj
        np.fill_diagonal(allowed, False)
        weight = np.triu(allowed * np.outer(free, free)).astype(float)
        total = weight.sum()
        if total == 0:
            return None
        e = rng.choice(n * n, p=(weight / total).ravel())
        i, j = divmod(int(e), n)
        adj[i, j] = adj[j, i] = True
        free[i] -= 1
        free[j] -= 1
    return adj


def make_topology(
    kind: str,
    n: int,
    seed: int = 0,
    degree: int | None = None,
    edge_prob: float | None = None,
    max_tries: int = 200,
) -> np.ndarray:
    """Symmetric (n, n) boolean adjacency without self-loops; node i receives from its row.

    ``complete``: every pair. ``random_regular``: a random ``degree``-regular connected graph
    (n * degree even, degree < n). ``erdos_renyi``: each edge with probability ``edge_prob``,
    resampled until connected. Seeded: same (kind, n, seed, ...) -> same graph.
    """
    if n < 1:
        raise ValueError(f"topology: need n >= 1 nodes, got {n}")
    rng = stream(int(seed), 0x70B0, kind="numpy")
    if kind == "complete":
        adj = np.ones((n, n), bool)
        np.fill_diagonal(adj, False)
        return adj
    if kind == "random_regular":
        if degree is None or not 1 <= degree < n or (n * degree) % 2:
            raise ValueError(
                f"topology random_regular: degree must be in [1, n) with n * degree even; got "
                f"degree={degree}, n={n}"
            )
        for _ in range(max_tries):
            adj = _random_regular(n, int(degree), rng)
            if adj is not None and _connected(adj):
                return adj
        raise ValueError(f"topology random_regular: no connected {degree}-regular graph found")
    if kind == "erdos_renyi":
        if edge_prob is None or not 0 < edge_prob <= 1:
            raise ValueError(f"topology erdos_renyi: edge_prob must be in (0, 1], got {edge_prob}")
        for _ in range(max_tries):
            upper = np.triu(rng.random((n, n)) < edge_prob, k=1)
            adj = upper | upper.T
            if _connected(adj):
                return adj
        raise ValueError(
            f"topology erdos_renyi: no connected graph in {max_tries} draws with "
            f"edge_prob={edge_prob}; raise it above log(n)/n = {math.log(max(n, 2)) / n:.3f}"
        )
    raise ValueError(f"unknown topology {kind!r}; choose one of {list(TOPOLOGIES)}")


# ----------------------------------------------------------------------------------------------
# settings (conf/strategy/monna.yaml, dsgd.yaml)
# ----------------------------------------------------------------------------------------------


def hyperbolic_lr(lr: float, t: int, t_half: float, period: int) -> float:
    """gamma_t = gamma_0 / (1 + floor(t / delta) * delta / T_half) (MoNNA's schedule; t 0-based)."""
    if t_half <= 0:
        return lr
    return lr / (1.0 + (t // period) * period / t_half)


@dataclass
class PeerTraining:
    """Settings of the peer-to-peer mode (``mode=p2p p2p=monna``; ``system.p2p``; in the older
    spelling ``strategy=monna``, the strategy group's ``mode: p2p`` selects the mode). ``rule``/``rule_kwargs``: the peer rule; ``lr`` (gamma_0), ``t_half`` and
    ``lr_period`` (delta): the hyperbolic schedule (``t_half: 0`` = constant); ``momentum``: beta
    of m = beta m + (1 - beta) g (0 = no momentum, the ablation); ``weight_decay``: L2 added to the
    gradient; ``batch_size``: samples per stochastic gradient; ``topology`` with ``degree`` /
    ``edge_prob``; ``asynchronous``: each node aggregates only ``deg + 1 - f`` of its messages;
    ``adversary``: how model attacks address honest nodes, ``per_target`` (crafted against each
    node's own aggregation) or ``broadcast`` (one set of vectors for all, crafted against the mean
    of the honest aggregations, as in the MoNNA reference code)."""

    mode: str = "p2p"
    rule: str = "nna"
    rule_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 0.75
    t_half: float = 50.0
    lr_period: int = 50
    momentum: float = 0.99
    weight_decay: float = 1e-4
    batch_size: int = 25
    topology: str = "complete"
    degree: int | None = None
    edge_prob: float | None = None
    asynchronous: bool = False
    adversary: str = "per_target"

    name: ClassVar[str] = "p2p"
    ADVERSARIES: ClassVar[tuple[str, ...]] = ("per_target", "broadcast")

    def __post_init__(self) -> None:
        if self.mode != "p2p":
            raise ValueError(f"mode must be p2p for peer training, got {self.mode!r}")
        if self.rule not in PEER_RULES:
            raise ValueError(f"rule={self.rule!r}; choose one of {sorted(PEER_RULES)}")
        build_peer_rule(self.rule, 0, **self.rule_kwargs)  # unknown kwargs fail here
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.t_half < 0 or int(self.lr_period) < 1:
            raise ValueError("t_half must be >= 0 and lr_period >= 1")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or int(self.batch_size) < 1:
            raise ValueError("weight_decay must be >= 0 and batch_size >= 1")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology={self.topology!r}; choose one of {TOPOLOGIES}")
        if self.adversary not in self.ADVERSARIES:
            raise ValueError(
                f"adversary={self.adversary!r}; choose one of {list(self.ADVERSARIES)}"
            )

    def lr_at(self, t: int) -> float:
        """Learning rate of step ``t`` (0-based)."""
        return hyperbolic_lr(self.lr, t, self.t_half, int(self.lr_period))

    def build_rule(self, f: int) -> PeerRule:
        return build_peer_rule(self.rule, f, **self.rule_kwargs)
