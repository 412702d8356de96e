"""CoSpaDi: calibration-guided sparse dictionary compression of a linear layer.

Shopkhoev, Makhov, Zhussip, Ali, Lefkimmiatis 2025, "CoSpaDi: Compressing LLMs via
Calibration-Guided Sparse Dictionary Learning" (arXiv 2509.22075).

Orientation. ``W`` is a torch ``nn.Linear`` weight, ``out x in``, acting as ``Y = X W^T`` on
calibration activations ``X`` (``N x in``). The functional error is

    ||X W^T - X W_hat^T||_F = ||L^T (W^T - W_hat^T)||_F,     X^T X = L L^T (Cholesky),

so the whitening acts on the *input* side and the signals to be coded are the columns of
``W^T`` (one per output neuron). The dictionary therefore lives in the input space and the
sparse codes index output neurons:

    W^T ~ D C,   D: in x k (dense),   C: k x out (exactly s nonzeros per column),
    W_hat = (D @ C).T = C.T @ D.T,    and the compressed layer computes y = (x @ D) @ C.

This is the only orientation in which whitening preserves the structure: dictionary learning
on ``Y_w = L^T W^T`` gives ``Y_w ~ D_w C`` and un-whitening ``D = L^{-T} D_w`` leaves ``C`` (and
its sparsity) untouched, while ``||Y_w - D_w C||_F`` *is* the functional error. (With the
dictionary on the output side, ``W ~ D C`` with ``C: k x in``, the metric ``X^T X`` couples the
columns of ``C`` and the problem no longer splits into per-column sparse coding.) Use
``cospadi_reconstruct(D, C)`` to get ``W_hat`` back in ``out x in``.

Algorithm (all in float64, in the whitened space):
  * init: ``D_w`` = the top-k left singular vectors of ``Y_w`` (random unit atoms beyond the
    rank; ``init="data"`` draws k normalized columns of ``Y_w`` with ``seed`` instead);
  * sparse coding: batched OMP over all columns at once (Rubinstein, Zibulevsky, Elad 2008,
    "Batch-OMP": the inverse Cholesky factor of the selected atoms' Gram grows by one row per
    step, correlations are updated through the k x k Gram, no residual recomputation); a tiny
    relative ridge keeps dependent atoms solvable;
  * dictionary update: MOD (Engan, Aase, Husoy 1999), the exact least-squares
    ``D_w = Y_w C^+ = Y_w C^T (C C^T)^+`` for the current codes (vectorized; chosen over K-SVD's
    sequential atom loop; kept only if round-off does not make it raise the error). Unused
    atoms are replaced by the worst-coded columns, atoms are renormalized (rows of C rescaled,
    D C unchanged);
  * monotonicity: per column, the new OMP code competes with the previous support refitted on
    the new dictionary and with the previous code itself; the best is kept, so the functional
    error is non-increasing over iterations.

Parameter counting (``cospadi_params``): ``in*k`` dictionary values + ``s*out`` coefficient
values + ``s*out`` indices at ``index_bits`` each, counted as a fraction ``index_bits/value_bits``
of a parameter, rounded up. Default: the smallest unsigned type that indexes k atoms (uint8 for
k <= 256: a quarter of a float32 parameter per index; uint16 up to 65536: half).

Budget rule (``cospadi_budget``): ``ratio`` = kept fraction of the dense ``out*in`` parameters;
a fixed atoms-per-nonzero ratio ``k = floor(k_over_s * s)`` (default 2); the largest s whose
storage fits ``ratio * out * in``, capped at s <= in (the whitened space's dimension). For
comparison, truncated SVD of rank r costs ``r * (out + in)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor

_RIDGE = 1e-12  # relative ridge in the OMP normal equations (dependent atoms stay solvable)


@dataclass
class CoSpaDiResult:
    """Factors ``D`` (in x k), ``C`` (k x out) with ``W_hat = (D @ C).T`` and the error history."""

    D: Tensor
    C: Tensor
    errors: list[float] = field(default_factory=list)  # relative functional error per iteration
    damping: float = 0.0  # absolute damping added to X^T X before the Cholesky (0 if none)


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite entries")


def whitening_factor(
    in_: int,
    X: Tensor | None = None,
    *,
    gram: Tensor | None = None,
    damp: float = 1e-6,
    device: torch.device | None = None,
) -> tuple[Tensor | None, float]:
    """Lower Cholesky factor L of X^T X (float64; None for identity) and the damping used.

    The Gram may be given directly (``gram``, e.g. summed over data shards). If it is singular,
    ``damp * mean(diag)`` is added, growing tenfold until the factorization succeeds.
    """
    if X is not None and gram is not None:
        raise ValueError("give either X or gram, not both")
    if X is None and gram is None:
        return None, 0.0
    if X is not None:
        if X.dim() != 2 or X.shape[1] != in_:
            raise ValueError(f"X must be N x in = N x {in_}, got {tuple(X.shape)}")
        _check_finite("X", X)
        Xd = X.to(device=device, dtype=torch.float64)
        G = Xd.T @ Xd
    else:
        assert gram is not None
        if gram.shape != (in_, in_):
            raise ValueError(f"gram must be in x in = {in_} x {in_}, got {tuple(gram.shape)}")
        _check_finite("gram", gram)
        G = gram.to(device=device, dtype=torch.float64)
        G = 0.5 * (G + G.T)
    if damp <= 0:
        raise ValueError(f"damp must be > 0, got {damp}")
    scale = float(G.diagonal().mean())
    if scale <= 0:
        raise ValueError("calibration activations are all zero: the functional error is void")
    L, info = torch.linalg.cholesky_ex(G)
    added = 0.0
    eye = torch.eye(in_, dtype=G.dtype, device=G.device)
    while int(info) != 0:
        added = damp * scale if added == 0.0 else added * 10.0
        if added > scale:
            raise ValueError("X^T X could not be factorized even with damping")
        L, info = torch.linalg.cholesky_ex(G + added * eye)
    return L, added


def batch_omp(Y: Tensor, D: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """Sparse codes of every column of Y with exactly s atoms of D (Batch-OMP, all columns at once).

    Rubinstein, Zibulevsky, Elad 2008 (Batch-OMP). Returns (C (k x n) dense with s entries on the
    support of each column, support (n x s) atom indices in selection order). The inverse
    Cholesky factor P of the selected atoms' Gram grows by one row per step (batched matmuls
    only); correlations are updated through the k x k Gram of D.
    """
    n = Y.shape[1]
    k = D.shape[1]
    if not 1 <= s <= k:
        raise ValueError(f"need 1 <= s <= k, got s={s}, k={k}")
    Gm = D.T @ D  # k x k
    gdiag = Gm.diagonal()
    tiny = torch.finfo(D.dtype).tiny
    ridge = _RIDGE * float(gdiag.mean().clamp_min(tiny))
    DtY = (D.T @ Y).T.contiguous()  # n x k
    norms = gdiag.clamp_min(tiny).sqrt()
    support = torch.zeros(n, s, dtype=torch.long, device=Y.device)
    P = torch.zeros(n, s, s, dtype=D.dtype, device=D.device)  # inverse Cholesky factor
    a = torch.zeros(n, s, dtype=D.dtype, device=D.device)  # P @ (D_S^T y)
    rows = torch.arange(n, device=Y.device)
    alpha = DtY
    coef = torch.zeros(n, s, dtype=D.dtype, device=D.device)  # (L L^T)^{-1} b = P^T a
    for t in range(s):
        score = (alpha / norms).abs()
        if t:
            score.scatter_(1, support[:, :t], -1.0)  # never pick an atom twice
        idx = score.argmax(dim=1)
        gii = gdiag[idx] + ridge
        bt = DtY[rows, idx]
        if t == 0:
            dd = gii.sqrt()
            at = bt / dd
        else:
            g = Gm[idx].gather(1, support[:, :t])  # n x t: <d_j, d_new> for selected j
            Pt = P[:, :t, :t]
            w = (Pt @ g[..., None])[..., 0]  # coordinates of d_new in the orthonormalized span
            dd = (gii - (w * w).sum(1)).clamp_min(ridge).sqrt()
            P[:, t, :t] = -(w[:, None, :] @ Pt)[:, 0, :] / dd[:, None]
            at = (bt - (w * a[:, :t]).sum(1)) / dd
        a[:, t] = at
        P[:, t, t] = 1.0 / dd
        support[:, t] = idx
        # P gained row t only, so P^T a gains a_t * P[t, :]
        coef[:, : t + 1] += at[:, None] * P[:, t, : t + 1]
        if t + 1 < s:
            Cn = DtY.new_zeros(n, k).scatter_(1, support[:, : t + 1], coef[:, : t + 1])
            alpha = DtY - Cn @ Gm
    C = DtY.new_zeros(n, k).scatter_(1, support, coef).T.contiguous()
    return C, support


def _refit(Y: Tensor, D: Tensor, support: Tensor) -> Tensor:
    """Least-squares codes on a fixed support per column (ridge as in batch_omp); k x n."""
    n = Y.shape[1]
    k = D.shape[1]
    Gm = D.T @ D
    ridge = _RIDGE * float(Gm.diagonal().mean().clamp_min(torch.finfo(D.dtype).tiny))
    DtY = (D.T @ Y).T
    rows = torch.arange(n, device=Y.device)
    Gs = Gm[support[:, :, None], support[:, None, :]]
    Gs = Gs + ridge * torch.eye(support.shape[1], dtype=D.dtype, device=D.device)
    b = DtY[rows[:, None], support]
    coef = torch.linalg.solve(Gs, b[..., None])[..., 0]
    return DtY.new_zeros(n, k).scatter_(1, support, coef).T.contiguous()


def _col_err(Y: Tensor, D: Tensor, C: Tensor) -> Tensor:
    R = Y - D @ C
    return (R * R).sum(0)


def _validate(W: Tensor, k: int, s: int, iters: int) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D (out x in) matrix, got shape {tuple(W.shape)}")
    if min(W.shape) < 1:
        raise ValueError(f"W is empty: {tuple(W.shape)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
        raise ValueError(f"s must be an integer >= 1, got {s!r}")
    if s > k:
        raise ValueError(f"s={s} nonzeros per column cannot exceed k={k} atoms")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    _check_finite("W", W)


def _init_dictionary(Y: Tensor, k: int, init: str, gen: torch.Generator) -> Tensor:
    n_feat, n = Y.shape
    if init == "svd":
        U, S, _ = torch.linalg.svd(Y, full_matrices=False)
        r = min(k, int((S > S[0] * 1e-12).sum()) if S.numel() and S[0] > 0 else 0)
        extra = torch.randn(n_feat, k - r, generator=gen, dtype=torch.float64).to(Y.device)
        D = torch.cat([U[:, :r], extra], dim=1)
    elif init == "data":
        perm = torch.randperm(n, generator=gen)
        cols = perm[torch.arange(k) % n].to(Y.device)
        D = Y[:, cols] + 1e-3 * torch.randn(n_feat, k, generator=gen, dtype=torch.float64).to(
            Y.device
        ) * Y.norm() / math.sqrt(n_feat * n)
    else:
        raise ValueError(f"init must be 'svd' or 'data', got {init!r}")
    nrm = D.norm(dim=0)
    bad = nrm <= torch.finfo(D.dtype).tiny
    if bad.any():  # e.g. a zero matrix: any unit atoms will do
        D[:, bad] = torch.randn(n_feat, int(bad.sum()), generator=gen, dtype=D.dtype).to(D.device)
        nrm = D.norm(dim=0)
    return D / nrm


def _mod_update(Y: Tensor, C: Tensor) -> Tensor:
    """MOD: D = Y C^+ (= Y C^T (C C^T)^+ without squaring the condition number)."""
    return Y @ torch.linalg.pinv(C)


def _replace_unused_and_normalize(Y: Tensor, D: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Unused atoms -> worst-coded columns (D C unchanged); unit-norm atoms, C rows rescaled."""
    used = (C != 0).any(dim=1)
    nrm = D.norm(dim=0)
    free = (~used) | (nrm <= 1e-12 * nrm.max().clamp_min(torch.finfo(D.dtype).tiny))
    n_free = int(free.sum())
    if n_free:
        err = _col_err(Y, D, C)
        take = torch.argsort(err, descending=True)[: min(n_free, Y.shape[1])]
        R = Y[:, take] - D @ C[:, take]
        new = torch.zeros(D.shape[0], n_free, dtype=D.dtype, device=D.device)
        new[:, : take.numel()] = R
        D = D.clone()
        D[:, free] = new
        C = C.clone()
        C[free] = 0.0
        nrm = D.norm(dim=0)
        dead = nrm <= 1e-12 * nrm.max().clamp_min(torch.finfo(D.dtype).tiny)
        if dead.any():  # residuals exhausted (exact fit): fall back to coordinate atoms
            eye = torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
            D[:, dead] = eye[:, torch.arange(int(dead.sum()), device=D.device) % D.shape[0]]
            nrm = D.norm(dim=0)
    return D / nrm, C * nrm[:, None]


def cospadi_fit(
    W: Tensor,
    X: Tensor | None,
    k: int,
    s: int,
    iters: int = 10,
    seed: int = 0,
    *,
    gram: Tensor | None = None,
    damp: float = 1e-6,
    init: str = "svd",
) -> CoSpaDiResult:
    """CoSpaDi with its error history: W^T ~ D C minimizing ||X W^T - X (D C)||_F (see module doc).

    Shopkhoev et al. 2025 (arXiv 2509.22075). ``X`` (N x in) or ``gram`` (= X^T X) give the
    whitening; both None means plain dictionary learning on W^T. ``errors[t]`` is the relative
    functional error (in the damped metric) after t alternations, ``errors[0]`` at the init.
    """
    _validate(W, k, s, iters)
    k, s, iters = int(k), int(s), int(iters)
    out, in_ = W.shape
    device = W.device
    L, added = whitening_factor(in_, X, gram=gram, damp=damp, device=device)
    Wt = W.detach().to(dtype=torch.float64).T  # in x out: one column per output neuron
    Y = Wt if L is None else L.T @ Wt
    ynorm = float(Y.norm()) or 1.0
    gen = torch.Generator().manual_seed(int(seed))

    Dw = _init_dictionary(Y, k, init, gen)
    C, support = batch_omp(Y, Dw, s)
    err = _col_err(Y, Dw, C)
    errors = [math.sqrt(float(err.sum())) / ynorm]
    for _ in range(iters):
        D_mod = _mod_update(Y, C)
        if float(_col_err(Y, D_mod, C).sum()) <= float(err.sum()):  # guard against round-off
            Dw = D_mod
        Dw, C = _replace_unused_and_normalize(Y, Dw, C)
        err_keep = _col_err(Y, Dw, C)
        C_old = _refit(Y, Dw, support)
        err_old = _col_err(Y, Dw, C_old)
        C_new, sup_new = batch_omp(Y, Dw, s)
        err_new = _col_err(Y, Dw, C_new)
        # per column: the best of (new OMP code, old support refitted, old code unchanged)
        use_new = err_new <= torch.minimum(err_old, err_keep)
        use_old = (~use_new) & (err_old <= err_keep)
        C = torch.where(use_new, C_new, torch.where(use_old, C_old, C))
        support = torch.where(use_new[:, None], sup_new, support)
        err = torch.where(use_new, err_new, torch.where(use_old, err_old, err_keep))
        errors.append(math.sqrt(float(err.sum())) / ynorm)
    D = Dw if L is None else torch.linalg.solve_triangular(L.T, Dw, upper=True)
    return CoSpaDiResult(D=D.to(dtype=W.dtype), C=C.to(dtype=W.dtype), errors=errors, damping=added)


def cospadi(
    W: Tensor,
    X: Tensor | None,
    k: int,
    s: int,
    iters: int = 10,
    seed: int = 0,
    *,
    gram: Tensor | None = None,
    damp: float = 1e-6,
    init: str = "svd",
) -> tuple[Tensor, Tensor]:
    """(D, C) with D: in x k dense, C: k x out with s nonzeros per column, W_hat = (D @ C).T.

    Shopkhoev et al. 2025, CoSpaDi (arXiv 2509.22075): whitened sparse dictionary learning of a
    linear layer's weight W (out x in) against the functional error on activations X (N x in).
    """
    res = cospadi_fit(W, X, k, s, iters, seed, gram=gram, damp=damp, init=init)
    return res.D, res.C


def cospadi_reconstruct(D: Tensor, C: Tensor) -> Tensor:
    """The compressed weight W_hat = (D @ C).T, out x in (CoSpaDi, arXiv 2509.22075)."""
    return (D @ C).T


def functional_error(
    W: Tensor, W_hat: Tensor, X: Tensor | None = None, *, gram: Tensor | None = None
) -> float:
    """Relative functional error ||X (W - W_hat)^T||_F / ||X W^T||_F (weight error if no X).

    The CoSpaDi objective (arXiv 2509.22075); ``gram`` = X^T X may replace X.
    """
    if W.shape != W_hat.shape:
        raise ValueError(f"shape mismatch: W {tuple(W.shape)} vs W_hat {tuple(W_hat.shape)}")
    E = (W - W_hat).to(torch.float64)
    Wd = W.to(torch.float64)
    if X is not None:
        Xd = X.to(device=W.device, dtype=torch.float64)
        num, den = (Xd @ E.T).norm(), (Xd @ Wd.T).norm()
    elif gram is not None:
        G = gram.to(device=W.device, dtype=torch.float64)
        num = ((E @ G) * E).sum().clamp_min(0).sqrt()
        den = ((Wd @ G) * Wd).sum().clamp_min(0).sqrt()
    else:
        num, den = E.norm(), Wd.norm()
    return float(num / den) if float(den) > 0 else float(num)


def index_bits_for(k: int) -> int:
    """Bits of the smallest unsigned integer type (8, 16, 32) that indexes k atoms."""
    return 8 if k <= 1 << 8 else 16 if k <= 1 << 16 else 32


def cospadi_params(
    out: int, in_: int, k: int, s: int, index_bits: int | None = None, value_bits: int = 32
) -> int:
    """Storage of a CoSpaDi layer in parameters: in*k + s*out values + s*out indices (rounded up).

    CoSpaDi (arXiv 2509.22075) counts the index storage: each index costs index_bits/value_bits
    of a parameter; ``index_bits=None`` takes the smallest unsigned type holding k atoms (uint8
    up to k = 256, else uint16, else uint32), against float32 values by default.
    """
    for name, v in (("out", out), ("in_", in_), ("k", k), ("s", s)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if s > k:
        raise ValueError(f"s={s} cannot exceed k={k}")
    bits = index_bits_for(k) if index_bits is None else index_bits
    if bits < 0 or value_bits < 1:
        raise ValueError("index_bits must be >= 0 and value_bits >= 1")
    nnz = s * out
    return in_ * k + nnz + -(-nnz * bits // value_bits)


def cospadi_budget(
    out: int,
    in_: int,
    ratio: float,
    k_over_s: float = 2.0,
    index_bits: int | None = None,
    value_bits: int = 32,
) -> tuple[int, int]:
    """(k, s) with k = floor(k_over_s * s) and the largest s whose storage <= ratio * out * in.

    CoSpaDi (arXiv 2509.22075) budget: ``ratio`` is the kept fraction of the dense out x in
    parameters; indices are counted as in ``cospadi_params``; s is capped at in (the dimension
    of the whitened space). Raises ValueError if not even s = 1 fits.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if k_over_s < 1.0:
        raise ValueError(f"k_over_s must be >= 1, got {k_over_s}")
    if out < 1 or in_ < 1:
        raise ValueError(f"out and in_ must be >= 1, got {out}, {in_}")
    budget = ratio * out * in_
    min_bits = 8 if index_bits is None else index_bits
    per_s = k_over_s * in_ + out * (1.0 + min_bits / value_bits)
    s = min(int(budget // per_s) + 1, in_)  # an upper bound; storage grows with s
    while s >= 1:
        k = max(s, int(math.floor(k_over_s * s)))
        if cospadi_params(out, in_, k, s, index_bits, value_bits) <= budget:
            return k, s
        s -= 1
    raise ValueError(f"budget ratio {ratio} is too small for even one atom per column")
