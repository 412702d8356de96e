"""Averaging and coordinate-wise rules: mean, median, trimmed mean, mean-around-median, Phocas."""

from __future__ import annotations

from torch import Tensor

from flagstaff.strategies.aggregators.base import Aggregator, coordinate_median, mean_of_rows
from flagstaff.strategies.aggregators.registry import register

__all__ = ["Mean", "CoordinateMedian", "TrimmedMean", "MeanAroundMedian", "Phocas"]


def _needs_more_than_2f(n: int, f: int) -> str | None:
    if n <= 2 * f:
        return f"needs n > 2f = {2 * f} inputs; use at least {2 * f + 1} clients or f <= {(n - 1) // 2}"
    return None


def _closest_mean(V: Tensor, center: Tensor, k: int) -> Tensor:
    """Per coordinate, the mean of the ``k`` values closest to ``center`` (ties: any), for the
    transposed, contiguous ``(d, n)`` inputs V (reductions along the fast dim)."""
    dist = (V - center[:, None]).abs_()
    idx = dist.topk(k, dim=1, largest=False, sorted=False).indices
    del dist
    return V.gather(1, idx).mean(dim=1)


@register("mean")
class Mean(Aggregator):
    """Weighted average ``sum_i w_i x_i / sum_i w_i`` (FedAvg; McMahan et al. 2017).

    ``weights`` are per-client sample counts (uniform when None). Not robust: one outlier moves it
    arbitrarily far. ``f`` is accepted and ignored.
    """

    name = "mean"
    uses_weights = True
    #: sum_i w_i x_i and sum_i w_i can be formed per host and added (the runtime's host reduction)
    decomposable = True

    def __init__(self, *, f: int = 0, n: int | None = None) -> None:
        super().__init__(f=f, n=n)
        self._validate_n()

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        if weights is None:
            return mean_of_rows(U)
        return (weights / weights.sum()) @ U


class _NeedsMoreThan2f(Aggregator):
    """Shared by the coordinate-wise rules that need n > 2f inputs (median, trimmed mean, ...)."""

    def __init__(self, *, f: int = 0, n: int | None = None) -> None:
        super().__init__(f=f, n=n)
        self._validate_n()

    def requirement(self, n: int) -> str | None:
        return _needs_more_than_2f(n, self.f)


@register("median")
class CoordinateMedian(_NeedsMoreThan2f):
    """Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML 2018).

    Convention: for even n the two middle values are averaged (numpy's ``median``; ``torch.median``
    would return the lower one), so the result is symmetric in the inputs. Needs n > 2f.
    Ignores ``weights``.
    """

    name = "median"

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        return coordinate_median(U)


@register("trimmed_mean")
class TrimmedMean(_NeedsMoreThan2f):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate drop the ``f`` smallest
    and ``f`` largest values and average the remaining ``n - 2f``. Needs n > 2f. Ignores weights.

    Computed by sorting (not by subtracting extremes from the sum, which would lose all precision
    next to huge outliers).
    """

    name = "trimmed_mean"

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        n, f = U.shape[0], self.f
        if f == 0:
            return mean_of_rows(U)
        S = U.T.contiguous().sort(dim=1).values
        return S[:, f : n - f].mean(dim=1)


@register("meamed")
class MeanAroundMedian(_NeedsMoreThan2f):
    """Mean-around-median, MeaMed (Xie, Koyejo, Gupta 2018, "Generalized Byzantine-tolerant SGD"):
    per coordinate, the mean of the ``n - f`` values closest to the coordinate-wise median
    (even-n median: average of the two middles). Needs n > 2f. Ignores weights.
    """

    name = "meamed"

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        if self.f == 0:
            return mean_of_rows(U)
        V = U.T.contiguous()
        return _closest_mean(V, coordinate_median(V, transposed=True), U.shape[0] - self.f)


@register("phocas")
class Phocas(_NeedsMoreThan2f):
    """Phocas (Xie, Koyejo, Gupta 2018, "Phocas: dimensional Byzantine-resilient SGD"): per
    coordinate, the mean of the ``n - f`` values closest to the f-trimmed mean. Needs n > 2f.
    Ignores weights.
    """

    name = "phocas"

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        n, f = U.shape[0], self.f
        if f == 0:
            return mean_of_rows(U)
        V = U.T.contiguous()
        center = V.sort(dim=1).values[:, f : n - f].mean(dim=1)
        return _closest_mean(V, center, n - f)
