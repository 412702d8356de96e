"""Properties only a correct implementation of each local rule / server rule has."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flagstaff.clients.models import build_model
from flagstaff.clients.plan import make_plan
from flagstaff.clients.rules import Context
from flagstaff.clients.trainer import LocalSGD, ParamSpec
from flagstaff.strategies.base import RoundExtras
from flagstaff.strategies.fedadam import FedAdam
from flagstaff.strategies.fedavg import FedAvg
from flagstaff.strategies.feddyn import FedDyn
from flagstaff.strategies.fedprox import Prox
from flagstaff.strategies.fedsam import SAM, sam_perturbation
from flagstaff.strategies.fedspeed import FedSpeed, FedSpeedRule
from flagstaff.strategies.scaffold import SCAFFOLD, Scaffold
from flagstaff.system.server import sample_clients

D_IN, C = 5, 3


def _task(sizes=(9, 14, 5), seed=0, dtype=torch.float32, num_classes=C, batch_size=4, **plan_kw):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, D_IN, generator=g, dtype=dtype)
    if num_classes == 1:
        y = torch.randn(n, generator=g, dtype=dtype)
        model = build_model("logistic", (D_IN,), 1, seed=seed).to(dtype)
    else:
        y = torch.randint(0, num_classes, (n,), generator=g)
        model = build_model("mlp", (D_IN,), num_classes, hidden=(4,), seed=seed)
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    sizes = np.asarray(sizes)
    plan_kw = plan_kw or {"epochs": 2}
    plan = make_plan(
        np.cumsum(sizes) - sizes, sizes, np.arange(len(sizes)), batch_size, seed, 1, **plan_kw
    )
    flat = nn.utils.parameters_to_vector(model.parameters()).detach()
    return model, spec, flat, x, y, plan, torch.as_tensor(sizes)


# -- FedProx ---------------------------------------------------------------------------------------
def test_fedprox_mu_zero_is_fedavg_exactly() -> None:
    model, spec, flat, x, y, plan, sizes = _task()
    tr = LocalSGD(lr=0.1, momentum=0.9, weight_decay=0.01, batched="true")
    plain = tr.train(model, spec, flat, x, y, plan, C, sizes)
    prox0 = tr.train(model, spec, flat, x, y, plan, C, sizes, rule=Prox(0.0))
    assert torch.equal(plain.updates, prox0.updates)
    prox = tr.train(model, spec, flat, x, y, plan, C, sizes, rule=Prox(1.0))
    assert not torch.allclose(plain.updates, prox.updates)
    # the prox term pulls towards x_t: smaller updates
    assert (prox.updates.norm(dim=1) < plain.updates.norm(dim=1)).all()


def test_fedprox_direction_adds_mu_times_distance() -> None:
    X = torch.randn(3, 7)
    x0 = torch.randn(7)
    G = torch.randn(3, 7)
    d, _ = Prox(0.25).direction(lambda P: (G, torch.zeros(3)), X, Context(x0, {}))
    torch.testing.assert_close(d, G + 0.25 * (X - x0))


# -- FedSAM ----------------------------------------------------------------------------------------
def test_sam_ascent_has_norm_exactly_rho() -> None:
    g = (
        torch.randn(6, 50, dtype=torch.float64)
        * torch.logspace(-4, 4, 6, dtype=torch.float64)[:, None]
    )
    e = sam_perturbation(g, 0.07)
    torch.testing.assert_close(e.norm(dim=1), torch.full((6,), 0.07, dtype=torch.float64))
    torch.testing.assert_close(e / e.norm(dim=1, keepdim=True), g / g.norm(dim=1, keepdim=True))
    assert torch.equal(sam_perturbation(torch.zeros(2, 4), 0.1), torch.zeros(2, 4))


def test_sam_gradient_at_perturbed_point_weights_restored() -> None:
    model, spec, flat, x, y, plan, sizes = _task(sizes=(9,), steps=1, batch_size=9)
    X = flat.unsqueeze(0).clone()
    X_before = X.clone()
    calls: list[torch.Tensor] = []

    def grad_fn(P):
        calls.append(P.clone())
        out = []
        for row in P:
            ref = build_model("mlp", (D_IN,), C, hidden=(4,), seed=0)
            nn.utils.vector_to_parameters(row, ref.parameters())
            loss = F.cross_entropy(ref(x), y)
            g = torch.autograd.grad(loss, list(ref.parameters()))
            out.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(out), torch.zeros(len(P))

    rho = 0.3
    d, _ = SAM(rho).direction(grad_fn, X, Context(flat, {}))
    assert torch.equal(X, X_before)  # weights restored (never moved)
    assert torch.equal(calls[0], X_before)
    step = calls[1] - calls[0]
    assert step.norm().item() == pytest.approx(rho, rel=1e-6)
    g1, _ = grad_fn(X_before)
    torch.testing.assert_close(step, rho * g1 / g1.norm())
    g2, _ = grad_fn(X_before + step)
    torch.testing.assert_close(d, g2)
    # and the trainer's one full-batch SAM step is x - lr * grad f(x + e)
    res = LocalSGD(lr=0.2, steps=1, batch_size=9, batched="true").train(
        model, spec, flat, x, y, plan, C, sizes, rule=SAM(rho)
    )
    torch.testing.assert_close(res.updates, -0.2 * g2, atol=1e-6, rtol=1e-5)


# -- SCAFFOLD --------------------------------------------------------------------------------------
def test_scaffold_control_variate_update_option_ii() -> None:
    """c_i+ = c_i - c + (x_t - y_i)/(K_i eta) with each client's own K_i and the round's eta."""
    model, spec, flat, x, y, plan, sizes = _task(sizes=(9, 14, 5))
    K, d = len(sizes), spec.numel
    g = torch.Generator().manual_seed(3)
    c_i = 0.1 * torch.randn(K, d, generator=g)
    c = 0.1 * torch.randn(d, generator=g)
    tr = LocalSGD(lr=0.1, lr_decay=0.9, momentum=0.5, batched="true")
    res = tr.train(
        model, spec, flat, x, y, plan, C, sizes,
        rule=Scaffold(), state={"c_i": c_i}, broadcast={"c": c}, round_idx=4,
    )  # fmt: skip
    eta = 0.1 * 0.9**4
    steps = plan.steps.to(torch.float32)[:, None]
    want = c_i - c + (-res.updates) / (steps * eta)
    torch.testing.assert_close(res.state["c_i"], want)
    torch.testing.assert_close(res.extras["delta_c"], want - c_i)
    assert len(set(plan.steps.tolist())) > 1  # unequal K_i really exercised


def test_scaffold_without_drift_is_fedavg_and_c_i_is_mean_gradient() -> None:
    """c_i = c gives plain local SGD; then (plain SGD) c_i+ - c_i + c = mean of the path's gradients."""
    model, spec, flat, x, y, plan, sizes = _task(sizes=(8, 8), batch_size=8, steps=3)
    d = spec.numel
    v = torch.randn(d)
    tr = LocalSGD(lr=0.05, batched="true")
    plain = tr.train(model, spec, flat, x, y, plan, C, sizes)
    res = tr.train(
        model, spec, flat, x, y, plan, C, sizes,
        rule=Scaffold(), state={"c_i": v.expand(2, d).clone()}, broadcast={"c": v},
    )  # fmt: skip
    torch.testing.assert_close(res.updates, plain.updates)
    # full-batch gradients along the path of client 0, recomputed independently
    ref = build_model("mlp", (D_IN,), C, hidden=(4,), seed=0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    grads = []
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(ref(x[:8]), y[:8]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in ref.parameters()]))
        opt.step()
    torch.testing.assert_close(
        res.state["c_i"][0], torch.stack(grads).mean(0), atol=1e-5, rtol=1e-4
    )


def test_scaffold_server_keeps_c_the_mean_of_all_c_i() -> None:
    N, d = 10, 4
    s = SCAFFOLD()
    st = s.init(torch.zeros(d))
    c_all = torch.zeros(N, d)
    g = torch.Generator().manual_seed(0)
    for r in range(5):
        ids = np.sort(np.random.default_rng(r).choice(N, 4, replace=False))
        delta = torch.randn(4, d, generator=g)
        c_all[ids] += delta
        _, st = s.update(
            torch.zeros(d), torch.zeros(d), st, r, RoundExtras({"delta_c": delta}, ids, N)
        )
        torch.testing.assert_close(st["scaffold"].c, c_all.mean(0))
    assert torch.equal(s.broadcast(torch.zeros(d), st)["c"], st["scaffold"].c)


# -- FedSpeed --------------------------------------------------------------------------------------
def _quadratic_reference(A, yv, theta_t, ghat, lr, lamb, K):
    """Closed form of K full-batch steps of x <- x - lr (grad f(x) - ghat + lamb (x - x_t)),
    f(x) = mean((A x - y)^2): x_K = x* + (I - lr M)^K (x_t - x*), M = (2/n) A^T A + lamb I."""
    n, p = A.shape
    M = (2.0 / n) * A.T @ A + lamb * torch.eye(p, dtype=A.dtype)
    c = (2.0 / n) * A.T @ yv + ghat + lamb * theta_t
    star = torch.linalg.solve(M, c)
    step = torch.linalg.matrix_power(torch.eye(p, dtype=A.dtype) - lr * M, K)
    return star + step @ (theta_t - star)


@pytest.mark.parametrize("average", ["sampled", "all"])
def test_fedspeed_correction_update_closed_form_on_quadratic(average: str) -> None:
    n, K, lr, lamb = 12, 7, 0.05, 0.3
    model, spec, flat, x, y, plan, sizes = _task(
        sizes=(n,), dtype=torch.float64, num_classes=1, batch_size=n, steps=K
    )
    A = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)  # weight then bias = flat order
    ghat = torch.randn(1, spec.numel, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    rule = FedSpeedRule(rho=0.1, alpha=0.0, lamb=lamb, average=average)  # alpha 0: no ascent
    res = LocalSGD(lr=lr, steps=K, batch_size=n, batched="true").train(
        model, spec, flat, x, y, plan, 1, sizes, rule=rule, state={"ghat_i": ghat}
    )
    xK = _quadratic_reference(A, y, flat, ghat[0], lr, lamb, K)
    new = ghat[0] - lamb * (xK - flat)  # ghat_i <- ghat_i - (1/lambda)(x_K - x_t)
    torch.testing.assert_close(res.state["ghat_i"][0], new, atol=1e-10, rtol=1e-9)
    if average == "sampled":  # the client sends x_K - lambda ghat_i
        torch.testing.assert_close(res.updates[0], xK - new / lamb - flat, atol=1e-9, rtol=1e-9)
    else:
        torch.testing.assert_close(res.updates[0], xK - flat, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(
            res.extras["delta_ghat"][0], new - ghat[0], atol=1e-10, rtol=1e-9
        )


def test_fedspeed_quasi_gradient_matches_a_hand_loop_on_quadratic() -> None:
    """alpha in (0,1), rho > 0: g = (1-a) grad f(x) + a grad f(x + rho g1/||g1||), then prox-correction."""
    n, K, lr, lamb, rho, a = 10, 4, 0.05, 0.2, 0.3, 0.6
    model, spec, flat, x, y, plan, sizes = _task(
        sizes=(n,), dtype=torch.float64, num_classes=1, batch_size=n, steps=K
    )
    A = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    ghat = 0.1 * torch.ones(spec.numel, dtype=x.dtype)

    def gf(v):
        return (2.0 / n) * A.T @ (A @ v - y)

    v = flat.clone()
    for _ in range(K):
        g1 = gf(v)
        g = (1 - a) * g1 + a * gf(v + rho * g1 / g1.norm())
        v = v - lr * (g - ghat + lamb * (v - flat))
    res = LocalSGD(lr=lr, steps=K, batch_size=n, batched="true").train(
        model, spec, flat, x, y, plan, 1, sizes,
        rule=FedSpeedRule(rho, a, lamb), state={"ghat_i": ghat[None].clone()},
    )  # fmt: skip
    new = ghat - lamb * (v - flat)
    torch.testing.assert_close(res.state["ghat_i"][0], new, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(res.updates[0], v - new / lamb - flat, atol=1e-9, rtol=1e-9)


def test_fedspeed_prox_in_decay_clips_as_fl_simulator() -> None:
    """strategy.prox=decay (FL-Simulator's client: fedspeed.py clips grad + lamb (h_i - w_t), the
    optimizer adds (wd + lamb) w after the clip): with client.weight_decay = wd the step is
    clip(g - ghat_i - lamb x_t) + (wd + lamb) x, which differs from clipping the whole direction
    g - ghat_i + lamb (x - x_t) whenever the clip is active (REV21b)."""
    n, K, lr, lamb, rho, a, wd, clip = 10, 4, 0.05, 0.2, 0.3, 1.0, 0.01, 0.5
    model, spec, flat, x, y, plan, sizes = _task(
        sizes=(n,), dtype=torch.float64, num_classes=1, batch_size=n, steps=K
    )
    A = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    ghat = 0.1 * torch.ones(spec.numel, dtype=x.dtype)

    def gf(v):
        return (2.0 / n) * A.T @ (A @ v - y)

    def clipped(d):
        return d * (clip / (d.norm() + 1e-6)).clamp(max=1.0)

    v, active = flat.clone(), 0
    for _ in range(K):
        g1 = gf(v)
        g = gf(v + rho * g1 / g1.norm())  # alpha 1: the ascent point's gradient
        d = g - ghat - lamb * flat
        active += int(d.norm() > clip)
        v = v - lr * (clipped(d) + (wd + lamb) * v)
    assert active == K  # the clip acts on every step, so where it sits matters

    def run(prox: str):
        tr = LocalSGD(lr=lr, steps=K, batch_size=n, batched="true", weight_decay=wd,
                      grad_clip=clip)  # fmt: skip
        rule = FedSpeedRule(rho, a, lamb, average="all", prox=prox)
        return tr.train(model, spec, flat, x, y, plan, 1, sizes, rule=rule,
                        state={"ghat_i": ghat[None].clone()})  # fmt: skip

    res = run("decay")
    torch.testing.assert_close(res.updates[0], v - flat, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(
        res.state["ghat_i"][0], ghat - lamb * (v - flat), atol=1e-10, rtol=1e-9
    )
    assert not torch.allclose(run("direction").updates[0], v - flat, atol=1e-6)
    with pytest.raises(ValueError, match="strategy.prox"):
        FedSpeedRule(rho, a, lamb, prox="optimizer")


def test_fedspeed_server_averaging_sets() -> None:
    d, N = 3, 8
    x = torch.zeros(d)
    agg = torch.tensor([1.0, 2.0, 3.0])
    s = FedSpeed(average="sampled")
    nxt, _ = s.update(x, agg, s.init(x), 0)
    assert torch.equal(nxt, agg)  # average of what the sampled clients sent
    s = FedSpeed(average="all", lamb=0.5)
    ids = np.array([1, 4])
    delta = torch.tensor([[0.2, 0.0, 0.0], [0.0, 0.4, 0.0]])
    nxt, st = s.update(x, agg, s.init(x), 0, RoundExtras({"delta_ghat": delta}, ids, N))
    G = delta.sum(0) / N  # mean of ghat_i over all N clients (others still 0)
    torch.testing.assert_close(st["fedspeed"].ghat_mean, G)
    torch.testing.assert_close(nxt, agg - G / 0.5)  # mean_S x_K - lambda mean_all ghat_i


# -- FedDyn, FedAdam, FedAvgM --------------------------------------------------------------------
def test_feddyn_server_rule() -> None:
    d, N, alpha = 3, 5, 0.1
    s = FedDyn(alpha=alpha)
    x = torch.ones(d)
    agg = torch.tensor([0.5, -1.0, 0.0])
    step = torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.1, 0.5]])
    nxt, st = s.update(x, agg, s.init(x), 0, RoundExtras({"delta_grad": step}, np.array([0, 3]), N))
    h = step.sum(0) / N
    torch.testing.assert_close(st["feddyn"].h, h)
    torch.testing.assert_close(nxt, x + agg - h / alpha)


def test_fedadam_matches_hand_computation() -> None:
    s = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = torch.zeros(2, dtype=torch.float64)
    st = s.init(x)
    m = np.zeros(2)
    v = np.full(2, 1e-6)
    xs = np.zeros(2)
    for delta in ([1.0, -2.0], [0.5, 0.5], [-1.0, 3.0]):
        dl = np.array(delta)
        m = 0.9 * m + 0.1 * dl
        v = 0.99 * v + 0.01 * dl**2
        xs = xs + 0.1 * m / (np.sqrt(v) + 1e-3)
        x, st = s.update(x, torch.tensor(delta, dtype=torch.float64), st, 0)
    np.testing.assert_allclose(x.numpy(), xs, rtol=1e-12)


def test_fedavgm_momentum() -> None:
    s = FedAvg(server_lr=0.5, server_momentum=0.9)
    x = torch.zeros(2)
    st = s.init(x)
    x, st = s.update(x, torch.tensor([1.0, 0.0]), st, 0)
    x, st = s.update(x, torch.tensor([0.0, 1.0]), st, 1)
    torch.testing.assert_close(st["momentum"].velocity, torch.tensor([0.9, 1.0]))
    torch.testing.assert_close(x, 0.5 * torch.tensor([1.0, 0.0]) + 0.5 * torch.tensor([0.9, 1.0]))


# -- client sampling -------------------------------------------------------------------------------
def test_sampling_fixed_and_bernoulli() -> None:
    for r in range(20):
        s = sample_clients(100, 10, 0, r, "fixed")
        assert len(s) == 10 and len(set(s.tolist())) == 10 and np.all(np.diff(s) > 0)
    counts = [len(sample_clients(100, 10, 0, r, "bernoulli")) for r in range(2000)]
    assert abs(np.mean(counts) - 10) < 0.3  # E = 100 * 0.1
    assert abs(np.var(counts) - 9.0) < 1.5  # Binomial(100, 0.1) variance
    assert np.array_equal(
        sample_clients(100, 10, 0, 7, "bernoulli"), sample_clients(100, 10, 0, 7, "bernoulli")
    )
    with pytest.raises(ValueError, match="fixed or bernoulli"):
        sample_clients(10, 2, 0, 0, "poisson")


def test_fedspeed_prox_in_decay_is_refused_where_the_trainer_would_drop_it() -> None:
    from flagstaff.system.build import validate
    from flagstaff.system.config import ConfigError
    from tests.conftest import compose

    base = ("experiment=smoke", "strategy=fedspeed", "strategy.prox=decay")
    with pytest.raises(ConfigError, match="strategy.prox=decay.*DP"):
        validate(compose(*base, "client=dpsgd"))
    validate(compose(*base))
