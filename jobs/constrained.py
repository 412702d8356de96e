"""Equality-constrained optimization by the exact augmented Lagrangian with randomized iterative
sketching (Hong, Na, Mahoney, Kolar, "Constrained optimization via exact augmented Lagrangian and
randomized iterative sketching", ICML 2023).

min_x f(x) s.t. c(x) = C x - e = 0, f a finite sum over the row blocks (least squares or logistic
regression). Each outer step forms the Newton-KKT system K [dx; dl] = -[grad_x L; c],
K = [[H, C^T], [C, 0]], and solves it inexactly with randomized block Kaczmarz (sketch-and-project
with row-subset sketches) to an adaptive accuracy ||K z + r|| <= eta_t ||r||, eta_t = min(eta0,
||r||^{1/2}) (tightening near the solution for a superlinear local rate); raises the merit
parameter mu until the step is a sufficient descent direction of the exact augmented Lagrangian
L_{mu,nu} = f + l^T c + (mu/2)||c||^2 + (nu/2)||grad_x L||^2, and takes an Armijo step on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flagstaff.jobs.blocks import Block, RowBlockMatrix


def block_objective(block: Block, x: np.ndarray, problem: str, hess: bool) -> tuple:
    """Sum over the block of the loss, its gradient and (optionally) Hessian (unnormalised)."""
    A = block.A
    z = A @ x
    if problem == "least_squares":
        r = z - block.b
        f = 0.5 * float(r @ r)
        g = A.T @ r
        H = A.T @ A if hess else 0.0
        return f, g, H
    y = np.where(block.b >= 0, 1.0, -1.0)
    m = -y * z
    f = float(np.logaddexp(0.0, m).sum())
    s = 0.5 * (1.0 + np.tanh(0.5 * m))  # sigmoid(m), stable
    g = A.T @ (-y * s)
    H = (A * (s * (1.0 - s))[:, None]).T @ A if hess else 0.0
    return f, g, H


@dataclass
class Problem:
    """f(x) = (1/n) sum_blocks loss + (l2/2)||x||^2 subject to C x = e."""

    mat: RowBlockMatrix
    kind: str
    C: np.ndarray
    e: np.ndarray
    l2: float = 0.0

    def eval(self, x: np.ndarray, hess: bool = False) -> tuple[float, np.ndarray, np.ndarray]:
        f, g, H = self.mat.sum(block_objective, x, self.kind, hess)
        n = self.mat.n
        f = f / n + 0.5 * self.l2 * float(x @ x)
        g = g / n + self.l2 * x
        if hess:
            H = H / n + self.l2 * np.eye(x.size)
        return f, g, H


def block_kaczmarz(
    K: np.ndarray,
    r: np.ndarray,
    z0: np.ndarray,
    eta: float,
    block: int,
    max_iter: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int, float]:
    """Randomized block Kaczmarz (sketch-and-project, S = random row subset of size `block`):
    z <- z - K_S^T (K_S K_S^T)^+ (K_S z - r_S), until ||K z - r|| <= eta ||r||.

    Returns ``(z, iterations, ||K z - r|| / ||r||)``: at the iteration cap the relative residual
    says by how much the accuracy target ``eta`` was missed (the caller reports it).
    """
    z = z0.copy()
    rn = np.linalg.norm(r)
    n = K.shape[0]
    for j in range(1, max_iter + 1):
        S = rng.choice(n, size=block, replace=False)
        KS = K[S]
        res = KS @ z - r[S]
        z -= KS.T @ np.linalg.lstsq(KS @ KS.T, res, rcond=None)[0]
        if j % 5 == 0:
            rel = float(np.linalg.norm(K @ z - r) / rn)
            if rel <= eta:
                return z, j, rel
    return z, max_iter, float(np.linalg.norm(K @ z - r) / rn)


@dataclass
class ALResult:
    x: np.ndarray
    lam: np.ndarray
    kkt: list[float] = field(default_factory=list)
    inner: list[int] = field(default_factory=list)
    # per outer step: the inner solve's relative KKT residual and its target eta_t
    inner_residual: list[float] = field(default_factory=list)
    inner_target: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    mu: list[float] = field(default_factory=list)
    converged: bool = False

    @property
    def inner_target_missed(self) -> int:
        """Outer steps whose inner solve stopped at the iteration cap above its target eta_t."""
        return sum(r > t for r, t in zip(self.inner_residual, self.inner_target, strict=True))


def exact_al_sketch(
    prob: Problem,
    mu: float = 10.0,
    nu: float = 1e-2,
    tol: float = 1e-8,
    max_outer: int = 30,
    inner_block: int = 0,
    max_inner: int = 400,
    eta0: float = 0.5,
    seed: int = 0,
    progress: Any = None,
) -> ALResult:
    """AdaSketch-Newton-style SQP on the exact augmented Lagrangian (see module docstring)."""
    d, m = prob.C.shape[1], prob.C.shape[0]
    C, e = prob.C, prob.e
    x = np.zeros(d)
    lam = np.zeros(m)
    rng = np.random.default_rng([seed, 61])
    q = inner_block or max(1, (d + m) // 2)
    out = ALResult(x, lam)
    f, g, H = prob.eval(x, hess=True)

    def merit(f_: float, g_: np.ndarray, x_: np.ndarray, l_: np.ndarray, mu_: float) -> float:
        c_ = C @ x_ - e
        gl_ = g_ + C.T @ l_
        return f_ + l_ @ c_ + 0.5 * mu_ * c_ @ c_ + 0.5 * nu * gl_ @ gl_

    for _ in range(max_outer):
        c = C @ x - e
        gl = g + C.T @ lam
        kkt = math.sqrt(gl @ gl + c @ c)
        out.kkt.append(kkt)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(kkt=f"{kkt:.2e}")
        if kkt <= tol:
            out.converged = True
            break
        K = np.block([[H, C.T], [C, np.zeros((m, m))]])
        rhs = -np.concatenate([gl, c])
        eta = min(eta0, math.sqrt(kkt))
        z, it, rel = block_kaczmarz(K, rhs, np.zeros(d + m), eta, q, max_inner, rng)
        out.inner.append(it)
        out.inner_residual.append(rel)
        out.inner_target.append(eta)
        dx, dl = z[:d], z[d:]
        # gradient of the exact augmented Lagrangian (c linear: grad_x c^T l terms vanish)
        gx0 = gl + nu * H @ gl
        gl_lam = c + nu * C @ gl
        for _ in range(30):
            D = (gx0 + mu * C.T @ c) @ dx + gl_lam @ dl
            if D <= -0.5 * (nu * gl @ gl + c @ c):
                break
            mu *= 10.0
        out.mu.append(mu)
        m0 = merit(f, g, x, lam, mu)
        a = 1.0
        while a > 1e-8:
            f1, g1, _ = prob.eval(x + a * dx)
            if merit(f1, g1, x + a * dx, lam + a * dl, mu) <= m0 + 1e-4 * a * min(D, 0.0):
                break
            a *= 0.5
        out.steps.append(a)
        x, lam = x + a * dx, lam + a * dl
        f, g, H = prob.eval(x, hess=True)
    out.x, out.lam = x, lam
    return out


def exact_kkt_solution(prob: Problem, tol: float = 1e-13, max_iter: int = 50) -> np.ndarray:
    """Reference: Newton-SQP with exact (dense) KKT solves and unit steps from a least-squares start."""
    d, m = prob.C.shape[1], prob.C.shape[0]
    x, lam = np.zeros(d), np.zeros(m)
    for _ in range(max_iter):
        f, g, H = prob.eval(x, hess=True)
        c = prob.C @ x - prob.e
        gl = g + prob.C.T @ lam
        if math.sqrt(gl @ gl + c @ c) <= tol:
            break
        K = np.block([[H, prob.C.T], [prob.C, np.zeros((m, m))]])
        z = np.linalg.solve(K, -np.concatenate([gl, c]))
        x, lam = x + z[:d], lam + z[d:]
    return x


def make_constraints(d: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded C (m x d, Gaussian) and e = C x0 for a random x0: a feasible linear constraint."""
    rng = np.random.default_rng([seed, 62])
    C = rng.standard_normal((m, d)) / math.sqrt(d)
    return C, C @ rng.standard_normal(d) * 0.5
