"""The MLP and logistic regression train through their stacked layers (clients.models.stacked):
a hand-written loss gradient equal to autograd, training equal to a plain torch.optim.SGD loop,
and a client alone equal to the same client among others (bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flagstaff.clients.models import build_model
from flagstaff.clients.models.stacked import StackedModel, cross_entropy_grad
from flagstaff.clients.plan import make_plan
from flagstaff.clients.trainer import LocalSGD, ParamSpec
from tests.conftest import plain_sgd_params


@pytest.mark.parametrize(("kind", "hidden"), [("mlp", (16, 8)), ("mlp", (16,)), ("logistic", ())])
def test_linear_models_loss_grad_equals_autograd(kind: str, hidden: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(kind, (1, 6, 6), 10, hidden=hidden)
    assert isinstance(model, StackedModel) and model.stackable()
    K, B = 3, 5
    params = {
        n: p.detach().unsqueeze(0) + 0.1 * torch.randn(K, *p.shape)
        for n, p in model.named_parameters()
    }
    x, y = torch.randn(K, B, 1, 6, 6), torch.randint(0, 10, (K, B))
    weight = torch.rand(K, B)
    per, grads = model.loss_grad(params, x, y, weight)
    leaves = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    out = model.forward_clients(leaves, x)
    for k in range(K):  # the stacked forward is each client's own module forward
        own = {n: v[k].detach() for n, v in leaves.items()}
        want_k = torch.func.functional_call(model, own, (x[k],))
        torch.testing.assert_close(out[k].detach(), want_k)
    want = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(K, B)
    ref = torch.autograd.grad((want * weight).sum(), list(leaves.values()))
    torch.testing.assert_close(per, want.detach())
    assert set(grads) == set(leaves)
    for n, r in zip(leaves, ref, strict=True):
        torch.testing.assert_close(grads[n], r, atol=1e-6, rtol=1e-5, msg=n)


def test_cross_entropy_grad_is_softmax_minus_one_hot() -> None:
    torch.manual_seed(0)
    out, y, w = torch.randn(4, 6, 10), torch.randint(0, 10, (4, 6)), torch.rand(4, 6)
    per, g = cross_entropy_grad(out, y, w)
    torch.testing.assert_close(
        per, F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(4, 6)
    )
    want = (torch.softmax(out, -1) - F.one_hot(y, 10)) * w[..., None]
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("batched", ["true", "false"])
def test_mlp_training_equals_a_plain_sgd_loop(batched: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    sizes = np.array([7, 4, 10])
    n = int(sizes.sum())
    x, y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    plan = make_plan(np.cumsum(sizes) - sizes, sizes, np.arange(3), 4, 0, 0, epochs=2)
    model = build_model("mlp", (64,), 10, hidden=(32,), seed=0)
    g0 = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    want = plain_sgd_params(model, g0, x, y, plan, lr=0.05, momentum=0.5) - g0
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    tr = LocalSGD(lr=0.05, momentum=0.5, batch_size=4, batched=batched, epochs=2)
    res = tr.train(model, spec, g0, x, y, plan, 10, torch.as_tensor(sizes))
    torch.testing.assert_close(res.updates, want, atol=2e-5, rtol=1e-4)
    alone = tr.train(model, spec, g0, x, y, plan.select(2), 10, torch.as_tensor([10]))
    assert torch.equal(alone.updates[0], res.updates[2])


def test_cross_entropy_grad_of_a_client_does_not_depend_on_the_others() -> None:
    """Bit for bit, whatever the clients' count and position in the call (STYLE.md point 10):
    unpadded, the kernel's scalar tail rounded the last samples differently from its vector lanes."""
    torch.manual_seed(0)
    out, y, w = 3 * torch.randn(100, 8, 10), torch.randint(0, 10, (100, 8)), torch.rand(100, 8)
    per, g = cross_entropy_grad(out, y, w)
    for a, b in [(0, 33), (33, 66), (5, 6), (99, 100), (3, 97), (1, 100)]:
        per_ab, g_ab = cross_entropy_grad(out[a:b], y[a:b], w[a:b])
        assert torch.equal(per_ab, per[a:b]) and torch.equal(g_ab, g[a:b]), (a, b)


def test_float64_mlp_trains_in_float64() -> None:
    """A float64 model's stacked step weighs its samples in float64: equal to a float64
    torch.optim.SGD loop to float64 rounding (float32 weights made it 1e-8 relative)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    sizes = np.array([7, 4, 10])
    n = int(sizes.sum())
    x = torch.randn(n, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    plan = make_plan(np.cumsum(sizes) - sizes, sizes, np.arange(3), 3, 0, 0)
    model = build_model("mlp", (64,), 10, hidden=(32,), seed=0).double()
    g0 = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    want = plain_sgd_params(model, g0, x, y, plan, lr=0.05) - g0
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    res = LocalSGD(lr=0.05, batch_size=3).train(
        model, spec, g0, x, y, plan, 10, torch.as_tensor(sizes)
    )
    err = (res.updates - want).abs().max() / want.abs().max()
    assert res.updates.dtype == torch.float64 and err < 1e-12, float(err)
