"""Flag Aggregator (Almasi, Mishra, Vamanan, Ravi, ICLR 2024, arXiv 2302.05865).

The quality of input i is how much of it an m-dimensional subspace Y (d x m, orthonormal columns)
explains. With unit vectors ``u_i = x_i / ||x_i||`` (zero inputs stay zero) and, for distinct
``u_i != u_j``, the unit difference directions ``v_ij = (u_i - u_j) / ||u_i - u_j||``, Y minimizes

    F(Y) = sum_i sqrt(1 - ||Y^T u_i||^2 + eps)
           + lam / (n (n-1)) * sum_{i != j, u_i != u_j} sqrt(1 - ||Y^T v_ij||^2 + eps)

(for m = 1 and eps = 0 the first term is the sum of |sin| of the angles; eps = 1e-7 smooths the
square root at 0, as the reference's weights do, and changes F by at most sqrt(eps) per term), and
the aggregate is the projection of the inputs onto Y. ``fit().objectives`` records this F.

Solver: IRLS, which here is a majorize-minimize (MM) method, so F never increases (tested).
sqrt(s + eps) is concave in s, so at the current Y0 each term is majorized by its tangent,
``sqrt(s0 + eps) + (s - s0) / (2 sqrt(s0 + eps))``, and the sum of tangents is linear in Y Y^T;
its minimizer is the top-m eigenvectors of ``A = sum_i a_i u_i u_i^T + sum_{i != j} C_ij (u_i -
u_j)(u_i - u_j)^T`` with ``a_i = (s_i + eps)^(-1/2)``, ``s_i = |1 - ||Y0^T u_i||^2|`` and ``C_ij
= lam / (n (n-1)) (s_ij + eps)^(-1/2) / ||u_i - u_j||^2``, ``s_ij = |1 - ||Y0^T v_ij||^2|``:
the weights multiply the squared terms, i.e. the columns ``sqrt(a_i) u_i`` (the reference's
``(s_i + eps)^(-1/4) u_i``) and ``sqrt(C_ij) (u_i - u_j)``. At lam = 0 this is the reference's
iteration exactly. With lam > 0 the reference differs: it weights the columns ``u_i - u_j`` by
``lam / (n (n-1)) (s_ij + eps)^(-1/4)`` with ``s_ij = |1 - ||Y0^T (u_i - u_j)||^2|``, so lam
enters squared and the raw differences (norm up to 2) make ``s_ij`` non-concave in Y Y^T: its
objective can rise between iterations (9.301, 8.776, 8.783 on a test instance, lam = 1). The unit
directions ``v_ij`` keep every term of the form sqrt(1 - ||Y^T w||^2) with ||w|| = 1, for which
the MM step holds. (Hunter and Lange 2004, "A tutorial on MM algorithms"; Mankovich et al. 2022,
"The flag median and FlagIRLS", the reference's solver.) The best iterate is kept; the loop stops
after ``max_iter`` iterations or when an iterate lowers F by no more than ``tol``.

Two routes, same mathematics:

* ``method="gram"`` (default): ``A = Unorm^T M Unorm`` with the n x n matrix
  ``M = diag(a) + 2 (diag(C 1) - C)`` (the pairwise terms form a graph Laplacian). With
  ``G = Unorm Unorm^T = E diag(g) E^T`` (one Gram product, one pass over d), write
  ``Y = Unorm^T C``; the top-m eigenvectors Q of the r x r matrix
  ``diag(g^1/2) E^T M E diag(g^1/2)`` give ``C = E diag(g^-1/2) Q`` and the projections
  ``Unorm Y = E diag(g^1/2) Q`` (and ``||u_i - u_j||^2`` comes from G). So every IRLS iteration is
  O(n^3), whatever lam (the n(n-1) pairwise columns never exist), and the only d-sized work is
  the Gram product and the final (n,) x (n, d) product: O(n^2 d) like Krum.
* ``method="svd"``: builds the d x k matrix W with ``W W^T = A`` explicitly (k = n, or
  n + n(n-1)/2 with lam > 0: unordered pairs with a sqrt(2) factor, the same ``W W^T`` as the
  ordered pairs) and takes ``torch.linalg.svd(W, full_matrices=False)``. Exact and simple;
  O(d k^2) per iteration. Kept as the reference the Gram route is tested against.

Both routes truncate to the numerical rank of the inputs (``m > rank`` gives ``rank`` columns;
the dropped directions are orthogonal to every input and would not change the output).

Initial subspace (the first IRLS weights come from it; it is never itself returned):

* ``init="flag_mean"`` (default): projections zero, i.e. all first weights equal, so the first
  iterate is the flag mean (top-m left singular vectors) of the unit inputs. This is what the
  reference's random d x m start amounts to when d >> n (its projections are O(sqrt(m/d))), it is
  deterministic, permutation invariant and free.
* ``init="random"``: a seeded random orthonormal basis of an m-dim subspace of span{u_i}
  (``Unorm^T R``, R uniform noise from ``torch.Generator().manual_seed(seed)``), orthonormalized
  by QR/SVD in both routes. Different seeds explore different local minima.
* ``init="ambient"``: the reference's start: QR of seeded uniform d x m noise (costs O(d m)
  memory and O(d m^2) time).

Output (``rescale``): the reference returns ``(1/m) Y Y^T sum_i u_i`` (``rescale="none"``), whose
norm is about n/m whatever the inputs' scale (there, the learning rate absorbs it). The default
``rescale="median_proj"`` returns the same direction ``w`` with length ``median_i <x_i, w>``: the
median of the inputs' components along it, a robust estimate of the honest mean's length along the
aggregate's direction (a Byzantine minority cannot move a median outside the honest components).
``rescale="median_norm"`` (the default before 2026-12) gives it the median input norm instead;
for honest noisy updates that is 1.4-2.5x the norm of their mean (the noise does not cancel in one
input), a larger step than any mean-based rule takes, and under the uniform attack it multiplied
the noise that leaks into the subspace (docs/robustness.md, "Flag Aggregator defaults"). If the
projection is zero the output is zero. (Even n: medians average the two middle values.)

Defaults, chosen on the robustness benchmark (docs/robustness.md, "Flag Aggregator defaults"):
``m=None``, i.e. ``ceil(n/2)`` of the actual number of inputs (the reference experiments use m = 8
for 15 workers, 16 for 30, 32 for 60; its README example uses m = 1; m = 1 and m = 4 were worse
or equal there); ``max_iter=1`` (the reference's current value: one IRLS step from the flag mean;
1, 4 and 10 steps score the same on the benchmark, and further steps move the output away from
the honest mean on honest inputs); ``rescale="median_proj"``; ``lam=0``; ``tol=1e-6``;
``eps=1e-7`` (reference). Ignores ``weights``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flagstaff.strategies.aggregators.base import Aggregator, gram
from flagstaff.strategies.aggregators.registry import register

__all__ = ["FlagAggregator", "FlagFit"]


@dataclass
class FlagFit:
    """Diagnostics of one Flag Aggregator solve.

    ``objectives[0]`` is F at the initial subspace (for ``init="flag_mean"``: at zero projections,
    i.e. the largest possible value), ``objectives[t]`` at IRLS iterate t; ``best_iteration`` (>= 1)
    is the iterate kept; ``projections`` (n x k, float64) are ``Unorm Y`` for it, so
    ``projections @ projections.T`` is the subspace's projector seen from the inputs; ``coef``
    (n,) float64 are the output coefficients, ``output = coef @ U`` (Gram route only); ``output``
    is the aggregate; ``basis`` the d x k orthonormal Y when requested.
    """

    objectives: list[float] = field(default_factory=list)
    best_iteration: int = 0
    rank: int = 0
    projections: Tensor | None = None
    coef: Tensor | None = None
    output: Tensor | None = None
    basis: Tensor | None = None


def _pair_scale(R2: Tensor, rtol: float) -> Tensor:
    """``1 / ||u_i - u_j||^2`` for the ordered pairs with distinct unit inputs, 0 elsewhere (equal
    inputs and the diagonal: their difference has no direction, its term is left out)."""
    keep = R2 > rtol
    keep.fill_diagonal_(False)
    return torch.where(keep, 1.0 / torch.where(keep, R2, torch.ones_like(R2)), torch.zeros_like(R2))


def _residuals(P: Tensor, inv_r2: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """s_i = |1 - ||Y^T u_i||^2| (n,) and, with ``inv_r2``, s_ij = |1 - ||Y^T v_ij||^2| (n, n);
    ``P = Unorm Y`` gives ``Y^T v_ij = (P_i - P_j) / r_ij``. (The squared norms are at most 1; the
    absolute value, as in the reference, only guards against rounding.)"""
    s = (1.0 - (P * P).sum(dim=1)).abs()
    if inv_r2 is None:
        return s, None
    diff = P[:, None, :] - P[None, :, :]
    return s, (1.0 - (diff * diff).sum(dim=-1) * inv_r2).abs()


def _objective(P: Tensor, lam: float, eps: float, inv_r2: Tensor | None) -> float:
    """The documented objective F at projections ``P`` (see the module docstring)."""
    s, s2 = _residuals(P, inv_r2)
    obj = (s + eps).sqrt().sum()
    if s2 is not None:
        n = P.shape[0]
        obj = obj + lam / (n * (n - 1)) * ((s2 + eps).sqrt() * (inv_r2 > 0)).sum()
    return float(obj)


def _weights(
    P: Tensor, lam: float, eps: float, inv_r2: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Majorize-minimize weights at the current projections: ``a_i = (s_i + eps)^(-1/2)`` (n,)
    for the terms ``u_i u_i^T`` and, when lam > 0, ``C_ij = lam/(n(n-1)) (s_ij + eps)^(-1/2) /
    ||u_i - u_j||^2`` (n, n) for the terms ``(u_i - u_j)(u_i - u_j)^T`` (= ``v_ij v_ij^T`` times
    ``||u_i - u_j||^2``). sqrt(s + eps) is concave in s, so
    ``sqrt(s + eps) <= sqrt(s0 + eps) + (s - s0) / (2 sqrt(s0 + eps))``, and summing these
    tangents gives a surrogate that is linear in ``Y Y^T``: the new Y, the top-m eigenvectors of
    ``sum_i a_i u_i u_i^T + sum_{i != j} C_ij (u_i - u_j)(u_i - u_j)^T``, minimizes it, so F never
    increases (Hunter and Lange 2004, "A tutorial on MM algorithms")."""
    s, s2 = _residuals(P, inv_r2)
    a2 = (s + eps).pow(-0.5)
    if s2 is None:
        return a2, None
    n = P.shape[0]
    return a2, lam / (n * (n - 1)) * (s2 + eps).pow(-0.5) * inv_r2


@register("flag")
class FlagAggregator(Aggregator):
    """Flag Aggregator (Almasi et al., ICLR 2024): IRLS for the maximum-likelihood subspace of the
    unit inputs; returns their projection onto it. See the module docstring for the objective,
    the Gram and SVD routes, the initializations and the output scaling. Ignores ``weights``.
    """

    name = "flag"

    def __init__(
        self,
        *,
        f: int = 0,
        n: int | None = None,
        m: int | None = None,
        lam: float = 0.0,
        max_iter: int = 1,
        tol: float = 1e-6,
        seed: int = 0,
        eps: float = 1e-7,
        method: str = "gram",
        rescale: str = "median_proj",
        init: str = "flag_mean",
    ) -> None:
        super().__init__(f=f, n=n)
        if m is not None and (int(m) != m or m < 1):
            raise ValueError(f"flag: m must be a positive integer or None (= ceil(n/2)), got {m}")
        if not lam >= 0:
            raise ValueError(f"flag: lam must be >= 0, got {lam}")
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"flag: max_iter must be an integer >= 1, got {max_iter}")
        if not tol >= 0 or not eps > 0:
            raise ValueError(f"flag: need tol >= 0 and eps > 0, got tol={tol}, eps={eps}")
        for key, value, valid in (
            ("method", method, ("gram", "svd")),
            ("rescale", rescale, ("none", "median_norm", "median_proj")),
            ("init", init, ("flag_mean", "random", "ambient")),
        ):
            if value not in valid:
                raise ValueError(f"flag: {key} must be one of {list(valid)}, got {value!r}")
        self.m = None if m is None else int(m)
        self.lam, self.max_iter, self.tol, self.eps = float(lam), int(max_iter), float(tol), eps
        self.seed, self.method, self.rescale, self.init = int(seed), method, rescale, init
        self._validate_n()

    def subspace_dim(self, n: int) -> int:
        """The configured m, or ceil(n/2) when m is None."""
        return self.m if self.m is not None else max(1, math.ceil(n / 2))

    def _rtol(self, U: Tensor) -> float:
        return max(U.shape[0], 1) * torch.finfo(U.dtype).eps * 100.0

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    # -- initial projections, identical in both routes --------------------------------------------
    def _ambient_init(self, U: Tensor, inv: Tensor, m: int) -> Tensor:
        noise = torch.rand(U.shape[1], m, generator=self._generator(), dtype=U.dtype) - 0.5
        Y0 = torch.linalg.qr(noise.to(U.device)).Q
        return (U @ Y0).double().cpu() * inv[:, None]

    def _random_coeffs(self, n: int, m: int) -> Tensor:
        return torch.rand(n, min(m, n), generator=self._generator(), dtype=torch.float64) - 0.5

    # -- the Gram route ---------------------------------------------------------------------------
    def _fit_gram(self, U: Tensor, return_basis: bool) -> FlagFit:
        n = U.shape[0]
        m = self.subspace_dim(n)
        K = gram(U).cpu()
        norms = K.diagonal().clamp_min(0.0).sqrt()
        inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        G = inv[:, None] * K * inv[None, :]
        g, E = torch.linalg.eigh(G)
        keep = g > g.max().clamp_min(0.0) * self._rtol(U)
        fit = FlagFit()
        if not bool(keep.any()):  # every input is zero
            fit.coef = torch.zeros(n, dtype=torch.float64)
            fit.objectives, fit.projections = [float(n)], torch.zeros(n, 0, dtype=torch.float64)
            fit.output = torch.zeros_like(U[0])
            fit.basis = torch.zeros_like(U[0])[:, None][:, :0] if return_basis else None
            return fit
        Er, gr = E[:, keep], g[keep]
        half = Er * gr.sqrt()  # P = half @ Q
        r = half.shape[1]
        inv_r2 = None
        if self.lam > 0 and n > 1:
            dg = G.diagonal()
            inv_r2 = _pair_scale(dg[:, None] + dg[None, :] - 2.0 * G, self._rtol(U))

        if self.init == "flag_mean":
            P = torch.zeros(n, 1, dtype=torch.float64)
        elif self.init == "random":
            R = self._random_coeffs(n, m)
            GR = G @ R
            P = self._orthonormal_projections(GR, R.T @ GR)
        else:
            P = self._ambient_init(U, inv, m)

        fit.objectives = [_objective(P, self.lam, self.eps, inv_r2)]
        best, best_C = math.inf, torch.zeros(n, 0, dtype=torch.float64)
        for t in range(1, self.max_iter + 1):
            a2, c2 = _weights(P, self.lam, self.eps, inv_r2)
            M = torch.diag(a2)
            if c2 is not None:  # sum over ordered pairs: a graph Laplacian
                M = M + 2.0 * (torch.diag(c2.sum(dim=1)) - c2)
            B = half.T @ M @ half
            _, Q = torch.linalg.eigh(0.5 * (B + B.T))
            k = min(m, r)
            Qk = Q[:, -k:].flip(-1)
            P = half @ Qk
            obj = _objective(P, self.lam, self.eps, inv_r2)
            fit.objectives.append(obj)
            if obj < best:
                best, fit.best_iteration, fit.projections = obj, t, P
                fit.rank = k
                best_C = (Er / gr.sqrt()) @ Qk  # Y = Unorm^T C
            if fit.objectives[-2] - obj <= self.tol:
                break
        P = fit.projections
        coef = inv * (best_C @ P.sum(dim=0)) / m  # (1/m) Y Y^T sum_i u_i = coef @ U
        out_norm = math.sqrt(max(float(coef @ K @ coef), 0.0))
        coef = coef * self._scale(out_norm, lambda: (K @ coef) / out_norm, norms)
        fit.coef = coef
        fit.output = coef.to(device=U.device, dtype=U.dtype) @ U
        if return_basis:
            fit.basis = ((inv[:, None] * best_C).to(device=U.device, dtype=U.dtype).T @ U).T
        return fit

    @staticmethod
    def _orthonormal_projections(GR: Tensor, RGR: Tensor) -> Tensor:
        """Projections of the unit inputs onto span(Unorm^T R): ``G R (R^T G R)^(-1/2)``, on the
        numerical range of ``R^T G R``."""
        w, V = torch.linalg.eigh(0.5 * (RGR + RGR.T))
        keep = w > w.max().clamp_min(0.0) * 1e-12
        return GR @ (V[:, keep] / w[keep].sqrt())

    def _scale(self, out_norm: float, components: Callable[[], Tensor], norms: Tensor) -> float:
        """The factor that gives the output the scale chosen by ``rescale``: 1 (``none``), the
        median input norm over ``out_norm`` (``median_norm``), or the median of the inputs'
        components along the output, ``components()`` = ``(<x_i, out> / ||out||)_i``, over
        ``out_norm`` (``median_proj``). A zero output stays zero."""
        if self.rescale == "none":
            return 1.0
        if out_norm <= 0.0:
            return 0.0
        if self.rescale == "median_norm":
            return float(torch.quantile(norms.double(), 0.5)) / out_norm
        return float(torch.quantile(components().double(), 0.5)) / out_norm

    # -- the SVD route ----------------------------------------------------------------------------
    def _fit_svd(self, U: Tensor, return_basis: bool) -> FlagFit:
        n = U.shape[0]
        m = self.subspace_dim(n)
        norms = torch.linalg.vector_norm(U, dim=1)
        inv_u = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        Un = U * inv_u[:, None]  # (n, d) unit rows
        inv = inv_u.double().cpu()
        rtol = self._rtol(U)
        iu, ju = torch.triu_indices(n, n, offset=1)
        inv_r2 = None
        if self.lam > 0 and n > 1:
            Ud = Un.double()
            inv_r2 = _pair_scale(torch.cdist(Ud, Ud).pow(2).cpu(), rtol)

        if self.init == "flag_mean":
            P = torch.zeros(n, 1, dtype=torch.float64)
        elif self.init == "random":
            Z = Un.T @ self._random_coeffs(n, m).to(device=U.device, dtype=U.dtype)
            Uz, sz, _ = torch.linalg.svd(Z, full_matrices=False)
            rz = int((sz > sz.max() * 1e-6).sum()) if float(sz.max()) > 0 else 0
            P = (Un @ Uz[:, :rz]).double().cpu()
        else:
            P = self._ambient_init(U, inv, m)

        fit = FlagFit(objectives=[_objective(P, self.lam, self.eps, inv_r2)])
        best, Y_best = math.inf, None
        for t in range(1, self.max_iter + 1):
            a2, c2 = _weights(P, self.lam, self.eps, inv_r2)
            cols = [Un.T * a2.sqrt().to(device=U.device, dtype=U.dtype)]
            if c2 is not None:
                cw = (2.0 * c2[iu, ju]).sqrt().to(device=U.device, dtype=U.dtype)
                cols.append((Un[iu] - Un[ju]).T * cw)
            W = torch.cat(cols, dim=1)
            Uw, S, _ = torch.linalg.svd(W, full_matrices=False)
            del W
            r = int((S * S > (S[0] * S[0]) * rtol).sum()) if float(S[0]) > 0 else 0
            k = min(m, r)
            Y = Uw[:, :k]
            P = (Un @ Y).double().cpu()
            obj = _objective(P, self.lam, self.eps, inv_r2)
            fit.objectives.append(obj)
            if obj < best:
                best, fit.best_iteration, fit.projections, fit.rank, Y_best = obj, t, P, k, Y
            if fit.objectives[-2] - obj <= self.tol:
                break
        if Y_best is None:  # every input is zero
            Y_best = torch.zeros_like(U[0])[:, None][:, :0]
            fit.projections = torch.zeros(n, 0, dtype=torch.float64)
        out = Y_best @ (Y_best.T @ Un.sum(dim=0)) / m
        out_norm = float(torch.linalg.vector_norm(out))
        fit.output = out * self._scale(out_norm, lambda: (U @ out).cpu() / out_norm, norms.cpu())
        fit.basis = Y_best if return_basis else None
        return fit

    # -- public -----------------------------------------------------------------------------------
    def fit(self, U: Tensor, return_basis: bool = False) -> FlagFit:
        """Run IRLS on validated-or-not input U and return the diagnostics (see FlagFit).

        ``return_basis=True`` also materializes the d x k orthonormal basis Y (O(d k) memory).
        """
        U, _ = self.validate(U, None)
        return self._fit(U, return_basis)

    def _fit(self, U: Tensor, return_basis: bool) -> FlagFit:
        if self.method == "gram":
            return self._fit_gram(U, return_basis)
        return self._fit_svd(U, return_basis)

    def aggregate(self, U: Tensor, weights: Tensor | None) -> Tensor:
        return self._fit(U, return_basis=False).output
