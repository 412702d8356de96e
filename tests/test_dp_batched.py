"""Batched DP-SGD (per-sample clipping under vmap) against Opacus' own optimizer and accountant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flagstaff.clients.data import load_digits
from flagstaff.clients.dp_batched import BatchedDPSGDTrainer, poisson_plan
from flagstaff.clients.models import build_model
from flagstaff.clients.trainer import ParamSpec
from flagstaff.system.runner import train
from tests.conftest import compose


def _setup(n_clients: int = 3, n: int = 20):
    ds = load_digits()
    model = build_model("mlp", (64,), 10, hidden=(16,), seed=0)
    spec = ParamSpec.of(model)
    g0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    for p in model.parameters():
        p.requires_grad_(False)
    sizes = np.full(n_clients, n)
    offsets = np.cumsum(sizes) - sizes
    return ds, model, spec, g0, sizes, offsets


def _trainer(**kw) -> BatchedDPSGDTrainer:
    base = dict(
        lr=0.1,
        batch_size=5,
        max_grad_norm=0.5,
        noise_multiplier=0.0,
        delta=1e-5,
        accountant="rdp",
        seed=3,
    )
    return BatchedDPSGDTrainer(**{**base, **kw})


def test_poisson_plan_rates_and_independence() -> None:
    sizes = np.array([40, 40])
    plan = poisson_plan(
        np.array([0, 40]),
        sizes,
        np.array([5, 6]),
        np.array([0.25, 0.25]),
        np.array([400, 400]),
        seed=0,
        round_idx=0,
    )
    rate = float(plan.mask.sum()) / (2 * 400 * 40)
    assert abs(rate - 0.25) < 0.01  # Poisson sample rate
    alone = poisson_plan(
        np.array([40]),
        sizes[:1],
        np.array([6]),
        np.array([0.25]),
        np.array([400]),
        seed=0,
        round_idx=0,
    )
    a = sorted(alone.idx[3, 0][alone.mask[3, 0] > 0].tolist())
    b = sorted(plan.idx[3, 1][plan.mask[3, 1] > 0].tolist())
    assert a == b  # a client's batches do not depend on its neighbours


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_batched_equals_opacus_dp_optimizer_on_the_same_batches(momentum) -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    ds, model, spec, g0, sizes, offsets = _setup()
    x, y = ds.x_train[:60], ds.y_train[:60]
    tr = _trainer(momentum=momentum)
    res = tr.train(
        model,
        spec,
        g0,
        x,
        y,
        None,
        10,
        torch.as_tensor(sizes),
        client_ids=np.arange(3),
        offsets=offsets,
        round_idx=0,
    )
    q = np.array([tr.sample_rate(20)] * 3)
    steps = np.array([tr.steps_per_round(20)] * 3)
    plan = poisson_plan(offsets, sizes, np.arange(3), q, steps, tr.seed, 0)
    for k in range(3):
        m = build_model("mlp", (64,), 10, hidden=(16,), seed=0)
        gsm = GradSampleModule(m)
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=0.1, momentum=momentum),
            noise_multiplier=0.0,
            max_grad_norm=0.5,
            expected_batch_size=int(20 * q[k]),
        )
        for t in range(plan.num_steps):
            rows = plan.idx[t, k][plan.mask[t, k] > 0]
            opt.zero_grad()
            if len(rows) == 0:
                for p in gsm.parameters():
                    p.grad_sample = torch.zeros(0, *p.shape)
            else:
                torch.nn.functional.cross_entropy(gsm(x[rows]), y[rows]).backward()
            opt.step()
        ref = torch.nn.utils.parameters_to_vector(gsm._module.parameters()).detach() - g0
        assert torch.allclose(res.updates[k], ref, atol=1e-6), k


def test_epsilon_is_opacus_accountant_and_grows_across_rounds() -> None:
    from opacus.accountants import RDPAccountant

    ds, model, spec, g0, sizes, offsets = _setup(n_clients=1)
    tr = _trainer(noise_multiplier=1.0)
    eps = []
    for r in range(3):
        res = tr.train(
            model,
            spec,
            g0,
            ds.x_train[:20],
            ds.y_train[:20],
            None,
            10,
            torch.as_tensor(sizes),
            client_ids=np.array([7]),
            offsets=offsets,
            round_idx=r,
        )
        eps.append(float(res.metrics["epsilon"][0]))
    acc = RDPAccountant()
    for _ in range(3 * tr.steps_per_round(20)):
        acc.step(noise_multiplier=1.0, sample_rate=tr.sample_rate(20))
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    assert tr.history(7) == acc.history
    # checkpoint round trip keeps composing
    other = _trainer(noise_multiplier=1.0)
    other.load_state_dict(tr.state_dict())
    assert other.epsilon(7) == pytest.approx(eps[2])


def test_noise_is_seeded_per_client_and_round() -> None:
    ds, model, spec, g0, sizes, offsets = _setup()
    args = (model, spec, g0, ds.x_train[:60], ds.y_train[:60], None, 10, torch.as_tensor(sizes))
    a = _trainer(noise_multiplier=1.0).train(*args, client_ids=np.arange(3), offsets=offsets)
    b = _trainer(noise_multiplier=1.0).train(*args, client_ids=np.arange(3), offsets=offsets)
    c = _trainer(noise_multiplier=1.0).train(
        *args, client_ids=np.arange(3), offsets=offsets, round_idx=1
    )
    assert torch.equal(a.updates, b.updates) and not torch.equal(a.updates, c.updates)


def test_runs_from_the_runner_with_epsilon_per_round(tmp_path) -> None:
    res = train(compose("experiment=smoke", "client=dpsgd_batched"), run_dir=str(tmp_path))
    eps = [r["epsilon"] for r in res["metrics"]]
    assert len(eps) == 3 and eps[0] > 0 and eps == sorted(eps)


def _lora_setup():
    """A LoRA MLP whose clients train B (A frozen, as FedSVD / FFA-LoRA), B started generic."""
    from flagstaff.clients.lora import LoRALinear, build_lora_model, client_frozen_names

    model = build_lora_model("mlp", (64,), 10, rank=2, hidden=(16,), train=["B"], seed=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    spec = ParamSpec.of(model)
    g0 = spec.flatten(dict(model.named_parameters())).detach().clone()
    frozen = client_frozen_names(model)
    mask = torch.cat(
        [
            torch.full((int(np.prod(sh)),), n not in frozen)
            for n, sh in zip(spec.names, spec.shapes, strict=True)
        ]
    )
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec, g0, mask


def test_frozen_factor_gets_no_gradient_noise_or_update() -> None:
    """Issue 18 item 2: A (frozen) stays exactly where it was under noise and weight decay, and
    with noise 0 the update equals Opacus' DPOptimizer over the trainable parameters only."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from flagstaff.clients.lora import client_frozen_names

    ds = load_digits()
    x, y = ds.x_train[:60], ds.y_train[:60]
    model, spec, g0, mask = _lora_setup()
    assert int((~mask).sum()) == 2 * 64  # A: rank 2 x 64 inputs
    sizes, offsets = np.full(3, 20), np.array([0, 20, 40])
    args = (model, spec, g0, x, y, None, 10, torch.as_tensor(sizes))
    noisy = _trainer(noise_multiplier=1.0, weight_decay=0.01, momentum=0.9).train(
        *args, client_ids=np.arange(3), offsets=offsets
    )
    assert torch.count_nonzero(noisy.updates[:, ~mask]) == 0
    assert bool((noisy.updates[:, mask] != 0).all())  # every trainable coordinate is noised
    tr = _trainer(weight_decay=0.01)
    res = tr.train(*args, client_ids=np.arange(3), offsets=offsets)
    q = np.array([tr.sample_rate(20)] * 3)
    plan = poisson_plan(
        offsets, sizes, np.arange(3), q, np.array([tr.steps_per_round(20)] * 3), 3, 0
    )
    for k in range(3):
        ref, _, _, _ = _lora_setup()
        frozen = client_frozen_names(ref)
        for name, p in ref.named_parameters():
            p.requires_grad_(name in spec.names and name not in frozen)
        gsm = GradSampleModule(ref)
        live = [p for p in gsm.parameters() if p.requires_grad]
        opt = DPOptimizer(
            torch.optim.SGD(live, lr=0.1, weight_decay=0.01),
            noise_multiplier=0.0,
            max_grad_norm=0.5,
            expected_batch_size=int(20 * q[k]),
        )
        for t in range(plan.num_steps):
            rows = plan.idx[t, k][plan.mask[t, k] > 0]
            opt.zero_grad()
            if len(rows) == 0:
                for p in live:
                    p.grad_sample = torch.zeros(0, *p.shape)
            else:
                torch.nn.functional.cross_entropy(gsm(x[rows]), y[rows]).backward()
            opt.step()
        named = dict(gsm._module.named_parameters())
        want = torch.cat([named[n].detach().reshape(-1) for n in spec.names]) - g0
        torch.testing.assert_close(res.updates[k], want, atol=1e-6, rtol=0)


# -- local rules under DP-SGD (issue 20 item 7): both trainers == Opacus + the rule's algebra ------
D_RULE = 64 * 16 + 16 + 16 * 10 + 10  # the MLP 64-16-10 of _setup


def _rules():
    from flagstaff.clients.rules import LocalRule
    from flagstaff.strategies.feddyn import FedDynRule
    from flagstaff.strategies.fedprox import Prox
    from flagstaff.strategies.fedsam import SAM
    from flagstaff.strategies.fedspeed import FedSpeedRule
    from flagstaff.strategies.scaffold import Scaffold

    return {
        "sgd": LocalRule(),
        "prox": Prox(0.3),
        "scaffold": Scaffold(),
        "feddyn": FedDynRule(0.05),
        "sam": SAM(0.05),
        "fedspeed": FedSpeedRule(0.05, 0.7, 0.1),
        "fedspeed_alpha0": FedSpeedRule(0.05, 0.0, 0.1),
        "fedspeed_all": FedSpeedRule(0.05, 1.0, 0.1, average="all"),
    }


def _rule_inputs(rule, K: int = 3, d: int = D_RULE):
    g = torch.Generator().manual_seed(11)
    state = {n: 0.1 * torch.randn(K, d, generator=g) for n in rule.client_state}
    bcast = {"c": 0.1 * torch.randn(d, generator=g)} if rule.name == "scaffold" else {}
    return state, bcast


class _PlanLoader:
    """Stands in for a client's Opacus Poisson loader: yields the batches of a Poisson plan, so the
    Opacus path steps on exactly the batches of the batched path."""

    def __init__(self, plan, k, x, y):
        self.plan, self.k, self.x, self.y = plan, k, x, y
        self.batch_sampler = type("Sampler", (), {"generator": torch.Generator()})()

    def __iter__(self):
        for t in range(self.plan.num_steps):
            rows = self.plan.idx[t, self.k][self.plan.mask[t, self.k] > 0]
            yield self.x[rows], self.y[rows]


def _opacus_path_on_plan(tr, model, spec, g0, x, y, sizes, offsets, plan, **kw):
    """``DPSGDTrainer.train`` with every client's loader replaced by the plan's batches."""
    releases = kw["rule"].grads_per_step
    for k, (off, n) in enumerate(zip(offsets.tolist(), sizes.tolist(), strict=True)):
        c = tr._client(model, spec, k, x[off : off + n], y[off : off + n], releases)
        c.loader = _PlanLoader(plan, k, x, y)
    return tr.train(
        model, spec, g0, x, y, None, 10, torch.as_tensor(sizes),
        client_ids=np.arange(len(sizes)), offsets=offsets, **kw,
    )  # fmt: skip


def _reference_with_rule(name, rule, plan, x, y, g0, state, bcast, k, lr, momentum, wd, q):
    """Client k by hand: Opacus' GradSampleModule + DPOptimizer (noise 0) on the plan's batches,
    with each rule's algebra written out here (not through clients.rules)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    m = build_model("mlp", (64,), 10, hidden=(16,), seed=0)
    gsm = GradSampleModule(m)
    params = list(gsm.parameters())
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd),
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        expected_batch_size=int(20 * q),
    )
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    split = lambda v: [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params)]  # noqa: E731,B905

    def private_grad(rows):
        opt.zero_grad()
        if len(rows) == 0:
            for p in params:
                p.grad_sample = torch.zeros(0, *p.shape)
        else:
            torch.nn.functional.cross_entropy(gsm(x[rows]), y[rows]).backward()
        opt.pre_step()
        return flat([p.grad for p in params]).clone()

    x0 = g0
    for t in range(plan.num_steps):
        rows = plan.idx[t, k][plan.mask[t, k] > 0]
        X = flat([p.detach() for p in params]).clone()
        g = private_grad(rows)
        if name in ("sam", "fedspeed", "fedspeed_all"):
            rho = rule.rho
            e = rho * g / g.norm()
            with torch.no_grad():
                for p, v in zip(params, split(X + e), strict=True):
                    p.copy_(v)
            g2 = private_grad(rows)
            with torch.no_grad():
                for p, v in zip(params, split(X), strict=True):
                    p.copy_(v)
            g = g2 if name != "fedspeed" else (1 - rule.alpha) * g + rule.alpha * g2
        if name == "prox":
            g = g + rule.mu * (X - x0)
        elif name == "scaffold":
            g = g - state["c_i"][k] + bcast["c"]
        elif name == "feddyn":
            g = g - state["grad_i"][k] + rule.alpha * (X - x0)
        elif name.startswith("fedspeed"):
            g = g - state["ghat_i"][k] + rule.lamb * (X - x0)
        for p, v in zip(params, split(g), strict=True):
            p.grad = v.clone()
        opt.original_optimizer.step()
    return flat([p.detach() for p in params]) - x0


@pytest.mark.parametrize("name", list(_rules()))
def test_every_rule_dp_trainers_equal_opacus_with_the_rules_algebra(name) -> None:
    """Issue 20 item 7: batched DP-SGD == the Opacus path (DPSGDTrainer on the same batches) ==
    Opacus' DPOptimizer with the rule's terms added to its private gradient, for every local rule
    (noise 0, momentum, weight decay); both trainers return the same rule state and extras."""
    from flagstaff.clients.dp import DPSGDTrainer

    rule = _rules()[name]
    ds, model, spec, g0, sizes, offsets = _setup()
    x, y = ds.x_train[:60], ds.y_train[:60]
    state, bcast = _rule_inputs(rule)
    kw = dict(rule=rule, state=state, broadcast=bcast, round_idx=0)
    common = dict(momentum=0.5, weight_decay=0.01)
    batched = _trainer(**common)
    res = batched.train(
        model, spec, g0, x, y, None, 10, torch.as_tensor(sizes),
        client_ids=np.arange(3), offsets=offsets, **kw,
    )  # fmt: skip
    q = batched.sample_rate(20)
    steps = np.array([batched.steps_per_round(20)] * 3)
    plan = poisson_plan(offsets, sizes, np.arange(3), np.full(3, q), steps, batched.seed, 0)
    opacus_tr = DPSGDTrainer(
        lr=0.1, batch_size=5, max_grad_norm=0.5, noise_multiplier=0.0, seed=3, **common
    )
    res_o = _opacus_path_on_plan(opacus_tr, model, spec, g0, x, y, sizes, offsets, plan, **kw)
    for k in range(3):
        ref = _reference_with_rule(name, rule, plan, x, y, g0, state, bcast, k, 0.1, 0.5, 0.01, q)
        if rule.name == "fedspeed" and rule.average == "sampled":  # message x_K - lambda ghat_i
            ref = ref - (state["ghat_i"][k] - rule.lamb * ref) / rule.lamb
        torch.testing.assert_close(res.updates[k], ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(res_o.updates[k], ref, atol=1e-6, rtol=0)
    assert res.state.keys() == res_o.state.keys() == set(rule.client_state)
    assert res.extras.keys() == res_o.extras.keys()
    for part in ("state", "extras"):
        for n, v in getattr(res, part).items():
            torch.testing.assert_close(v, getattr(res_o, part)[n], atol=1e-5, rtol=0)
    plain = _trainer(**common).train(
        model, spec, g0, x, y, None, 10, torch.as_tensor(sizes),
        client_ids=np.arange(3), offsets=offsets,
    )  # fmt: skip
    assert (name == "sgd") == torch.equal(res.updates, plain.updates)  # the rule did something


def test_a_rule_that_takes_undeclared_private_gradients_is_refused() -> None:
    """Calibration and the budget stop count ``grads_per_step`` releases before the step runs: a
    rule that takes more is refused with a message, on both trainers."""
    from flagstaff.clients.dp import DPSGDTrainer
    from flagstaff.strategies.fedsam import SAM

    class Liar(SAM):
        grads_per_step = 1

    ds, model, spec, g0, sizes, offsets = _setup(n_clients=1)
    args = (model, spec, g0, ds.x_train[:20], ds.y_train[:20], None, 10, torch.as_tensor(sizes))
    for tr in (_trainer(), DPSGDTrainer(batch_size=5, noise_multiplier=0.0)):
        with pytest.raises(ValueError, match="grads_per_step=1 but took 2"):
            tr.train(*args, client_ids=np.arange(1), offsets=offsets, rule=Liar(0.1))
