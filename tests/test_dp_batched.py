"""Batched DP-SGD (per-sample clipping under vmap) against Opacus' own optimizer and accountant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.data import load_digits
from clients.dp_batched import BatchedDPSGDTrainer, poisson_plan
from clients.models import build_model
from clients.trainer import ParamSpec
from system.runner import train
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
    from clients.lora import LoRALinear, build_lora_model, client_frozen_names

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

    from clients.lora import client_frozen_names

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
