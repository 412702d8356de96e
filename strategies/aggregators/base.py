"""The aggregator contract and the helpers every rule shares.

An aggregator is a validated constructor plus one pure call (STYLE.md point 1): hyperparameters in
``__init__``; ``__call__(U, weights=None)`` maps an ``(n, d)`` tensor to a ``(d,)`` tensor on U's
device and dtype, with no Python loop over ``d``, no Ray and no I/O.

Validation done here for every rule, so a rule's ``aggregate`` sees clean input:

* ``U`` is a 2-D floating tensor with at least one row; ``weights`` (per-client sample counts), when
  given, are ``n`` finite, non-negative numbers with a positive sum.
* Rows containing NaN or +-inf raise ``ValueError`` naming the row indices (the runtime filters them
  before aggregating; an aggregator never silently returns NaN).
* The rule's precondition (e.g. ``n > 2f``) is checked in ``__init__`` when ``n`` is given and again
  against ``U.shape[0]`` on every call.
* The aggregate is checked to be finite (e.g. a float32 mean of huge finite vectors can overflow).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from flagstaff.strategies.aggregators.registry import RULES, discover

__all__ = [
    "Aggregator",
    "FunctionAggregator",
    "PreAggregator",
    "as_aggregator",
    "check_finite_rows",
    "coordinate_median",
    "duplicate_representatives",
    "gram",
    "mean_of_rows",
    "pairwise_sq_dists",
]


def _as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_finite_rows(U: Tensor) -> None:
    """Raise ``ValueError`` naming the rows of ``U`` that contain NaN or +-inf.

    Fast path: a row whose sum is finite has only finite entries (inf or NaN always propagate to
    the sum), so the exact per-entry test runs only when some row sum is not finite.
    """
    if bool(torch.isfinite(U.sum(dim=1)).all()):
        return
    bad = (~torch.isfinite(U).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"rows {bad} of the update matrix contain NaN or inf; filter non-finite updates "
            "before aggregating"
        )


def gram(U: Tensor) -> Tensor:
    """The ``(n, n)`` Gram matrix ``U U^T`` in float64 (one pass over ``d``, in U's dtype).

    If U's dtype overflows (finite float32 entries around 1e19 or above), the product is redone in
    float64, so the Gram matrix of any finite float32 input is finite.
    """
    if U.element_size() < 4:  # half precision: accumulate in float32
        U = U.float()
    K = U @ U.T
    if not bool(torch.isfinite(K).all()):
        if U.dtype == torch.float64:
            raise ValueError(
                "the inputs are too large to compare (their Gram matrix overflows float64); "
                "rescale the updates"
            )
        U64 = U.double()
        K = U64 @ U64.T
    return K.double()


def pairwise_sq_dists(U: Tensor, K: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``||x_i - x_j||^2`` as an ``(n, n)`` float64 matrix.

    Computed from the Gram matrix (``K_ii + K_jj - 2 K_ij``, clamped at 0), so the only pass over
    ``d`` is the Gram product. Like ``torch.cdist``'s matrix-multiply mode, the result has absolute
    error about ``eps(dtype) * ||x||^2``: for float32 vectors whose spread is tiny next to their
    norms (e.g. raw model weights rather than updates) pass float64 or centre them first.
    The result is exactly symmetric, and exactly equal rows of U get bit-identical rows of
    distances (``duplicate_representatives``), so ties between them do not depend on rounding.
    """
    if K is None:
        K = gram(U)
    K = 0.5 * (K + K.T)  # exactly symmetric: a + b == b + a in floating point
    sq = K.diagonal()
    D = (sq[:, None] + sq[None, :] - 2.0 * K).clamp_min_(0.0)
    D.fill_diagonal_(0.0)
    rep = duplicate_representatives(U, D, sq)
    return D if rep is None else D[rep][:, rep]


def duplicate_representatives(U: Tensor, D: Tensor, sq: Tensor) -> Tensor | None:
    """For each row of U, the lowest index of a row exactly equal to it (None if all differ).

    A Gram matrix rounds each entry in an order chosen by the BLAS kernel (it differs with the
    entry's position and with the CPU's instruction set), so equal rows get distances that differ
    in the last bits, and rules that rank distances (Krum, Bulyan, NNM) would break their ties by
    rounding. Indexing ``D`` by these representatives gives equal rows bit-identical distances
    (and 0 between them), so ties go to the lowest index. Only pairs whose computed distance is
    within rounding of 0 are compared entry by entry (``torch.equal``, O(d) per such pair).
    """
    tol = 1e-8 if U.dtype == torch.float64 else 1e-2
    near = torch.triu(D <= tol * (sq[:, None] + sq[None, :]), diagonal=1).nonzero().tolist()
    if not near:
        return None
    rep = list(range(U.shape[0]))
    for i, j in near:  # pairs (i < j) in increasing i: the first match is the lowest index
        if rep[j] == j and rep[i] == i and torch.equal(U[i], U[j]):
            rep[j] = i
    if rep == list(range(U.shape[0])):
        return None
    return torch.tensor(rep, device=D.device)


def mean_of_rows(U: Tensor, rows: Tensor | list[int] | None = None) -> Tensor:
    """Plain mean of the rows ``rows`` of U (all rows when None) as one (n,) x (n, d) product,
    which on CPU is faster than ``U[rows].mean(0)`` (no copy) and than ``U.mean(0)``."""
    c = torch.zeros(U.shape[0], dtype=U.dtype, device=U.device)
    if rows is None:
        c.fill_(1.0 / U.shape[0])
    else:
        rows = torch.as_tensor(rows, device=U.device, dtype=torch.long).flatten()
        c[rows] = 1.0 / rows.numel()
    return c @ U


def coordinate_median(U: Tensor, transposed: bool = False) -> Tensor:
    """Coordinate-wise median of the rows of U, averaging the two middle values when n is even.

    This is numpy's convention (``np.median``); ``torch.median`` would return the lower middle.
    Reducing a contiguous ``(d, n)`` copy is faster on CPU than reducing over the strided dim 0;
    pass ``transposed=True`` with such a ``(d, n)`` tensor to skip the copy.
    """
    V = U if transposed else U.T.contiguous()
    n = V.shape[1]
    if n % 2 == 1:
        return torch.median(V, dim=1).values
    S = torch.sort(V, dim=1).values
    return 0.5 * (S[:, n // 2 - 1] + S[:, n // 2])


class Aggregator:
    """Base class: ``agg = Rule(f=..., n=..., **hparams)``; ``agg(U, weights) -> Tensor[d]``.

    Subclasses set their hyperparameters, then call ``self._validate_n()``; they implement
    ``aggregate(U, weights)`` (already validated input) and, if they need a minimum number of
    inputs, ``requirement(n) -> str | None`` (an error message when ``n`` inputs are too few).
    Stateless rules keep the empty ``state_dict``; stateful ones override both state methods.
    """

    name: ClassVar[str] = "aggregator"
    #: whether the rule uses the per-client ``weights`` (others ignore them)
    uses_weights: ClassVar[bool] = False
    #: whether the rule is a weighted mean, so that sum_i w_i x_i and sum_i w_i can be formed per
    #: host and added (the runtime's host reduction; the extras' plain mean)
    decomposable: ClassVar[bool] = False

    def __init__(self, *, f: int = 0, n: int | None = None) -> None:
        self.f = _as_int("f", f, 0)
        self.n = None if n is None else _as_int("n", n, 1)

    # -- preconditions -------------------------------------------------------------------------
    def requirement(self, n: int) -> str | None:
        """An error message if this rule cannot run on ``n`` inputs with ``self.f``, else None."""
        return None

    def _validate_n(self, n: int | None = None) -> None:
        n = self.n if n is None else n
        if n is None:
            return
        msg = self.requirement(n)
        if msg is not None:
            raise ValueError(f"{self.name} with f={self.f}, n={n}: {msg}")

    # -- the call ------------------------------------------------------------------------------
    def __call__(self, U: Tensor, weights: Tensor | None = None) -> Tensor:
        U, weights = self.validate(U, weights)
        out = self.aggregate(U, weights)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"{self.name}: the aggregate of finite inputs overflowed {U.dtype}; rescale the "
                "updates or use float64"
            )
        return out

    def validate(self, U: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Check shape, dtype, finiteness, the precondition and the weights; return them."""
        if not isinstance(U, Tensor) or U.dim() != 2:
            shape = tuple(U.shape) if isinstance(U, Tensor) else type(U).__name__
            raise ValueError(f"{self.name}: expected a 2-D (n, d) tensor of updates, got {shape}")
        if not U.is_floating_point():
            raise ValueError(f"{self.name}: expected a floating-point tensor, got {U.dtype}")
        if U.shape[0] == 0:
            raise ValueError(f"{self.name}: no updates to aggregate (n = 0)")
        check_finite_rows(U)
        self._validate_n(U.shape[0])
        if weights is not None:
            weights = torch.as_tensor(weights).to(device=U.device, dtype=U.dtype).flatten()
            if weights.numel() != U.shape[0]:
                raise ValueError(
                    f"{self.name}: got {weights.numel()} weights for {U.shape[0]} updates"
                )
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError(f"{self.name}: weights must be finite and >= 0, got {weights}")
            if float(weights.sum()) <= 0:
                raise ValueError(f"{self.name}: weights must have a positive sum")
        return U, weights

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ValueError(f"{self.name} is stateless; got state keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"

    def _repr_args(self) -> str:
        keys = [k for k in vars(self) if not k.startswith("_") and k != "inner"]
        return ", ".join(f"{k}={vars(self)[k]!r}" for k in keys)


class FunctionAggregator(Aggregator):
    """Any ``fn(U, weights=None) -> (d,)`` as an :class:`Aggregator` (stateless, no precondition),
    so that callers ask every rule the declared hooks instead of probing for them."""

    def __init__(self, fn: Any, *, f: int = 0, n: int | None = None) -> None:
        super().__init__(f=f, n=n)
        if not callable(fn):
            raise ValueError(f"an aggregator must be callable as fn(U, weights), got {fn!r}")
        self.fn = fn
        self.name = fn.__name__ if inspect.isfunction(fn) else type(fn).__name__

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        return self.fn(U, weights)


def as_aggregator(agg: Any) -> Aggregator:
    """``agg`` itself when it is an :class:`Aggregator`, else wrapped (:class:`FunctionAggregator`)."""
    return agg if isinstance(agg, Aggregator) else FunctionAggregator(agg)


class PreAggregator(Aggregator):
    """A pre-aggregation: maps ``(n, d)`` inputs to ``(n', d)`` vectors, then delegates to ``inner``.

    Subclasses implement ``transform(U, weights) -> (U', weights')`` and, when they change the
    number of vectors, ``output_count(n)``. The inner rule's precondition is checked against
    ``output_count(n)``. State is ``{"inner": inner.state_dict(), **own}``.
    """

    def __init__(self, inner: Aggregator | None = None, *, f: int = 0, n: int | None = None):
        super().__init__(f=f, n=n)
        if inner is None:  # the weighted mean, found by name (no import of the rule modules)
            if "mean" not in RULES:
                discover()
            inner = RULES["mean"](f=self.f)
        if not callable(inner):
            raise ValueError(f"{self.name}: inner must be an aggregator, got {inner!r}")
        self.inner = as_aggregator(inner)

    def output_count(self, n: int) -> int:
        """How many vectors the inner rule receives when this stage gets ``n``."""
        return n

    def requirement(self, n: int) -> str | None:
        own = self.own_requirement(n)
        if own is not None:
            return own
        n_out = self.output_count(n)
        msg = self.inner.requirement(n_out)
        if msg is not None:
            return f"the inner rule {self.inner.name} receives {n_out} vectors and {msg}"
        return None

    def own_requirement(self, n: int) -> str | None:
        return None

    def transform(self, U: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        V, w = self.transform(U, weights)
        return self.inner.aggregate(V, w)  # V is finite and the precondition was checked

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()}, inner={self.inner!r})"


def binomial_exceeds(n: int, k: int, limit: float) -> bool:
    """Whether C(n, k) > limit (exact integer arithmetic)."""
    return math.comb(n, k) > limit
