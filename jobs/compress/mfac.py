"""M-FAC: matrix-free inverse empirical Fisher products, diagonal and OBS pruning.

Frantar, Kurtic, Alistarh, NeurIPS 2021, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information". The damped empirical Fisher of m gradients g_1..g_m (rows of G, m x d)

    F = lambda I + (1/m) sum_i g_i g_i^T

is inverted by the paper's Woodbury chain: with F_0 = lambda I and F_i = F_{i-1} + g_i g_i^T / m,

    F_i^{-1} = F_{i-1}^{-1} - v_i v_i^T / (m + g_i^T v_i),     v_i = F_{i-1}^{-1} g_i,

so F^{-1} = I / lambda - sum_i v_i v_i^T / den_i. Each v_i is a combination of g_1..g_i,
v_i = sum_j B_ij g_j with B lower triangular; the coefficients follow from the m x m Gram
G G^T alone (the recursion below, a loop over m as in the paper: O(m^3)), then V = B G.
Setup O(d m^2); F^{-1} x = x / lambda - V^T ((V x) / den) in O(d m); a single diagonal entry
[F^{-1}]_jj = 1/lambda - sum_i V_ij^2 / den_i in O(m) (all d at once in one vectorized pass).

Block-wise variant (the paper's choice for large models): the flattened vector is cut into
consecutive blocks of size ``block`` (the last one zero-padded, which leaves it exact), each
block has its own Fisher from the same m gradients restricted to it, and everything above runs
batched over blocks.

Pruning (``mfac_prune``): global selection of the lowest OBS saliencies w_j^2 / (2 [F^-1]_jj)
(block-diagonal F), then the OBS update for the whole pruned set Q, applied once:
  * ``update="joint"`` (default): the exact multi-weight OBS step, the minimizer of
    (1/2) dw^T F dw subject to dw_Q = -w_Q, i.e. dw_R = F_RR^{-1} F_RQ w_Q on the kept weights R,
    computed matrix-free per block through Woodbury on the m gradients restricted to R
    (O(d m^2) like the setup);
  * ``update="independent"``: the sum of the single-weight OBS updates
    dw = -F^{-1} sum_{j in Q} e_j w_j / [F^{-1}]_jj, one M-FAC matvec for the whole set (the
    one-shot approximation used with WoodFisher/M-FAC), pruned weights then set to exactly 0;
  * ``update="none"``: plain masking by saliency.

``MFACOptimizer``: the sliding-window variant as a preconditioner (p <- p - lr F^{-1} g over the
last m gradients), with the window's Gram updated by one row per step.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite entries")


def _as_grads(grads: Tensor, d: int | None = None) -> Tensor:
    if not isinstance(grads, Tensor):
        raise ValueError("grads must be a torch.Tensor")
    if grads.dim() < 2 or grads.shape[0] < 1:
        raise ValueError(f"grads must be (m, d) with m >= 1, got shape {tuple(grads.shape)}")
    G = grads.reshape(grads.shape[0], -1)
    if G.shape[1] < 1:
        raise ValueError("grads have zero coordinates")
    if d is not None and G.shape[1] != d:
        raise ValueError(f"grads have {G.shape[1]} coordinates per row, weights have {d}")
    _check_finite("grads", G)
    return G


def _check_damp(damp: float) -> float:
    damp = float(damp)
    if not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"damp (lambda) must be a finite number > 0, got {damp}")
    return damp


class MFACInverse:
    """Inverse of F = damp I + (1/m) sum g_i g_i^T via the M-FAC Woodbury chain (block-wise).

    Frantar, Kurtic, Alistarh, NeurIPS 2021. ``grads`` (m, d); ``block`` None = one Fisher over
    all d coordinates, else consecutive blocks of that size, each its own Fisher. Computations
    run in ``dtype`` (default float64) on the gradients' device.
    """

    def __init__(
        self,
        grads: Tensor,
        damp: float,
        block: int | None = None,
        *,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        G = _as_grads(grads)
        self.damp = _check_damp(damp)
        m, d = G.shape
        if block is None:
            block = d
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
            raise ValueError(f"block must be a positive integer or None, got {block!r}")
        block = min(int(block), d)
        self.m, self.d, self.block = m, d, block
        self.nb = -(-d // block)
        self.dtype = dtype
        self.device = G.device
        Gb = self._blocks(G.to(dtype))  # nb x m x B
        gram = Gb @ Gb.transpose(1, 2)  # nb x m x m, O(d m^2)
        Bc, den = self._chain(gram, self.damp, m)
        self.V = Bc @ Gb  # nb x m x B: v_i = F_{i-1}^{-1} g_i per block
        self.den = den  # nb x m: m + g_i^T v_i

    @staticmethod
    def _chain(gram: Tensor, damp: float, m: int) -> tuple[Tensor, Tensor]:
        """Coefficients B (v_i = sum_j B_ij g_j) and den_i of the Woodbury chain; loop over m."""
        nb = gram.shape[0]
        Bc = torch.zeros_like(gram)
        den = gram.new_zeros(nb, m)
        for i in range(m):
            Bc[:, i, i] = 1.0 / damp
            if i:
                # <v_j, g_i> = sum_l B_jl <g_l, g_i> for j < i
                q = (Bc[:, :i, :] @ gram[:, :, i : i + 1])[..., 0]  # nb x i
                Bc[:, i, :] -= ((q / den[:, :i])[:, None, :] @ Bc[:, :i, :])[:, 0, :]
            den[:, i] = m + (Bc[:, i, :] * gram[:, :, i]).sum(1)
        return Bc, den

    def _blocks(self, x: Tensor) -> Tensor:
        """(..., d) -> (nb, ..., B), zero-padding the last block."""
        pad = self.nb * self.block - self.d
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        x = x.reshape(*x.shape[:-1], self.nb, self.block)
        return x.movedim(-2, 0)

    def _unblocks(self, x: Tensor) -> Tensor:
        x = x.movedim(0, -2)
        return x.reshape(*x.shape[:-2], self.nb * self.block)[..., : self.d]

    def matvec(self, v: Tensor) -> Tensor:
        """F^{-1} v for v (d,) or a batch (k, d), O(d m) per vector (M-FAC, NeurIPS 2021)."""
        if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[-1] != self.d:
            raise ValueError(f"v must be (d,) or (k, d) with d={self.d}, got {tuple(v.shape)}")
        _check_finite("v", v)
        x = self._blocks(v.to(device=self.device, dtype=self.dtype))  # nb x [k] x B
        flat = x.reshape(self.nb, -1, self.block)  # nb x k x B
        coef = (flat @ self.V.transpose(1, 2)) / self.den[:, None, :]  # nb x k x m
        y = flat / self.damp - coef @ self.V
        return self._unblocks(y.reshape(x.shape)).to(device=v.device, dtype=v.dtype)

    def diag(self) -> Tensor:
        """All d diagonal entries of F^{-1}, O(m) each (M-FAC, NeurIPS 2021)."""
        dg = 1.0 / self.damp - ((self.V * self.V) / self.den[..., None]).sum(1)  # nb x B
        return self._unblocks(dg)

    def diag_entry(self, j: int) -> float:
        """One diagonal entry [F^{-1}]_jj in O(m) (M-FAC, NeurIPS 2021)."""
        if not 0 <= j < self.d:
            raise ValueError(f"index {j} out of range for d={self.d}")
        b, r = divmod(j, self.block)
        col = self.V[b, :, r]
        return float(1.0 / self.damp - (col * col / self.den[b]).sum())

    def dense(self) -> Tensor:
        """The full d x d F^{-1} (block-diagonal if block-wise); for checks on small d only."""
        return self.matvec(torch.eye(self.d, dtype=self.dtype, device=self.device))


def _flat_weights(w: Tensor) -> Tensor:
    if not isinstance(w, Tensor) or w.numel() < 1:
        raise ValueError("w must be a non-empty tensor")
    _check_finite("w", w)
    return w.reshape(-1)


def mfac_saliency(w: Tensor, grads: Tensor, damp: float, block: int | None = None) -> Tensor:
    """OBS saliency w_j^2 / (2 [F^-1]_jj) with the M-FAC inverse Fisher, shaped like w.

    Frantar, Kurtic, Alistarh, NeurIPS 2021 (after Hassibi & Stork's OBS). ``grads``: (m, w.numel())
    or (m, *w.shape).
    """
    wf = _flat_weights(w)
    G = _as_grads(grads, wf.numel())
    inv = MFACInverse(G, damp, block)
    sal = wf.to(device=inv.device, dtype=inv.dtype) ** 2 / (2.0 * inv.diag())
    return sal.reshape(w.shape)


def _joint_obs_update(inv: MFACInverse, G: Tensor, wf: Tensor, pruned: Tensor) -> Tensor:
    """Exact OBS step on the kept weights R for the pruned set Q: dw_R = F_RR^{-1} F_RQ w_Q."""
    m = inv.m
    Gb = inv._blocks(G.to(inv.dtype))  # nb x m x B
    keep = inv._blocks((~pruned).to(inv.dtype))  # nb x B (padding counts as pruned-free zeros)
    wq = inv._blocks(torch.where(pruned, wf, torch.zeros_like(wf)))  # nb x B
    GR = Gb * keep[:, None, :]
    z = (Gb @ wq[..., None])[..., 0]  # nb x m: G_Q w_Q
    y = (GR.transpose(1, 2) @ z[..., None])[..., 0] / m  # nb x B: F_RQ w_Q (zero on Q)
    # F_RR^{-1} y = (y - G_R^T (m lambda I + G_R G_R^T)^{-1} G_R y) / lambda  (Woodbury)
    K = GR @ GR.transpose(1, 2)
    K = K + m * inv.damp * torch.eye(m, dtype=K.dtype, device=K.device)
    t = torch.linalg.solve(K, (GR @ y[..., None]))
    dw = (y - (GR.transpose(1, 2) @ t)[..., 0]) / inv.damp
    return inv._unblocks(dw)


def mfac_prune(
    w: Tensor,
    grads: Tensor,
    sparsity: float,
    damp: float,
    block: int | None = None,
    *,
    update: str = "joint",
) -> tuple[Tensor, Tensor]:
    """(w_pruned, mask): prune the floor(sparsity * d) lowest-saliency weights, OBS-update the rest.

    Frantar, Kurtic, Alistarh, NeurIPS 2021, one-shot M-FAC pruning. ``mask`` is True for kept
    weights; the selection is global over all blocks; the update for the whole pruned set is
    applied once (``update``: "joint" exact OBS, "independent" summed single-weight OBS, "none").
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if update not in ("joint", "independent", "none"):
        raise ValueError(f"update must be 'joint', 'independent' or 'none', got {update!r}")
    wf = _flat_weights(w)
    d = wf.numel()
    G = _as_grads(grads, d)
    inv = MFACInverse(G, damp, block)
    diag = inv.diag()
    w64 = wf.to(device=inv.device, dtype=inv.dtype)
    sal = w64 * w64 / (2.0 * diag)
    n_prune = int(math.floor(float(sparsity) * d + 1e-9))
    pruned = torch.zeros(d, dtype=torch.bool, device=inv.device)
    if n_prune:
        pruned[torch.topk(sal, n_prune, largest=False, sorted=False).indices] = True
    new = w64.clone()
    if n_prune and update == "joint":
        new = new + _joint_obs_update(inv, G, w64, pruned)
    elif n_prune and update == "independent":
        u = torch.where(pruned, w64 / diag, torch.zeros_like(w64))
        new = new - inv.matvec(u)
    new = torch.where(pruned, torch.zeros_like(new), new)
    mask = ~pruned
    new = new.to(device=w.device, dtype=w.dtype).reshape(w.shape)
    return new, mask.to(w.device).reshape(w.shape)


def sparse_storage(d: int, nnz: int, value_bits: int = 32) -> int:
    """Storage of a pruned layer in parameters: ``nnz`` values plus where they sit, as the cheaper
    of a d-bit mask and ``nnz`` position indices (the smallest unsigned type indexing d), each
    costing bits / value_bits of a parameter, rounded up (the index rule of CoSpaDi's budget)."""
    from flagstaff.jobs.compress.cospadi import index_bits_for

    if not 0 <= nnz <= d:
        raise ValueError(f"nnz={nnz} must be in [0, d={d}]")
    where = min(-(-d // value_bits), -(-nnz * index_bits_for(d) // value_bits))
    return nnz + (where if nnz < d else 0)  # a dense layer needs no positions


def kept_for_budget(d: int, ratio: float) -> int:
    """The most weights a layer of ``d`` can keep with ``sparse_storage(d, nnz) <=
    floor(ratio * d)`` (storage grows with nnz: bisection)."""
    budget = int(math.floor(float(ratio) * d + 1e-9))
    lo, hi = 0, d  # storage(lo) <= budget is the invariant
    if sparse_storage(d, d) <= budget:
        return d
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sparse_storage(d, mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


class MFACOptimizer(torch.optim.Optimizer):
    """Sliding-window M-FAC preconditioned SGD: p <- p - lr F^{-1} g over the last m gradients.

    Frantar, Kurtic, Alistarh, NeurIPS 2021 (sliding-window M-FAC). The window's m x m Gram is
    kept and updated with one O(d m) row per step (the new gradient replaces the oldest); the
    Woodbury-chain coefficients are rebuilt from it in O(m^3) and F^{-1} g is applied through the
    stored gradients in O(d m), never forming a d x d matrix. One Fisher over all parameters of
    the (single) parameter group, with F = damp I + (1/n) sum of the n <= m window gradients.
    """

    def __init__(self, params, lr: float = 1e-3, m: int = 16, damp: float = 1e-4) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"m must be a positive integer, got {m!r}")
        super().__init__(params, {"lr": lr, "m": int(m), "damp": _check_damp(damp)})
        if len(self.param_groups) != 1:
            raise ValueError("MFACOptimizer keeps one Fisher: pass a single parameter group")
        self._window: Tensor | None = None  # m x d gradients (float64)
        self._gram: Tensor | None = None  # m x m
        self._steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        """One preconditioned step (M-FAC sliding window, NeurIPS 2021); returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        g = torch.cat([p.grad.reshape(-1) for p in params]).to(torch.float64)
        _check_finite("gradient", g)
        m, damp = group["m"], group["damp"]
        if self._window is None or self._window.shape[1] != g.numel():
            self._window = g.new_zeros(m, g.numel())
            self._gram = g.new_zeros(m, m)
            self._steps = 0
        assert self._gram is not None
        slot = self._steps % m
        self._window[slot] = g
        row = self._window @ g  # O(d m): the new gradient against the window
        self._gram[slot, :] = row
        self._gram[:, slot] = row
        self._steps += 1
        n = min(self._steps, m)
        Gw, gram = self._window[:n], self._gram[:n, :n]
        Bc, den = MFACInverse._chain(gram[None], damp, n)
        coef = Bc[0].T @ ((Bc[0] @ row[:n]) / den[0])  # O(m^2)
        direction = g / damp - Gw.T @ coef  # F^{-1} g = g / damp - G^T B^T diag(1/den) B G g
        offset = 0
        for p in params:
            k = p.numel()
            p.add_(direction[offset : offset + k].view_as(p).to(p.dtype), alpha=-group["lr"])
            offset += k
        return loss
