"""Skeptic review of issue 22's round speed changes (REV22), against references we did not write:
the stacked linear models' hand-written loss gradient against torch.autograd on the plain
nn.Module (nn.Linear, nn.ReLU, F.cross_entropy), their training against a torch.optim.SGD loop,
"a client alone == among others" under other client counts, thread counts and chunk splits, and
the host's blocked float64 weighted sum against numpy's float64 sum of the weighted rows.
Two findings (float64 sample weights; the blocked sum at 2 threads) failed here at 86346fa and are
fixed by PERF22 in 0c1c488."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flagstaff.clients.models import build_model
from flagstaff.clients.models.stacked import cross_entropy_grad
from flagstaff.clients.plan import make_plan
from flagstaff.clients.trainer import LocalSGD, ParamSpec
from flagstaff.strategies.server_step import weighted_sum
from tests.conftest import plain_sgd_params


@pytest.fixture
def threads() -> Iterator[None]:
    """Restore torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _model(kind: str, features: int, classes: int, hidden: tuple[int, ...], dtype: torch.dtype):
    if kind == "cnn":  # the small CNN on 8x8 images of the same features
        return build_model(kind, (1, 8, 8), classes, seed=0).to(dtype)
    return build_model(kind, (features,), classes, hidden=hidden, seed=0).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("kind", "hidden", "classes"),
    [("logistic", (), 2), ("mlp", (5,), 63), ("mlp", (64,), 65), ("mlp", (7, 13), 129)],
)
def test_loss_grad_equals_autograd_on_each_clients_own_module(
    kind: str, hidden: tuple[int, ...], classes: int, dtype: torch.dtype
) -> None:
    """K clients with their own weights, batches of 1..9 partly masked, classes on both sides of
    the 64-column padding: loss and gradients equal autograd through each client's nn.Module."""
    g = torch.Generator().manual_seed(classes)
    K, features = 4, 11
    mods = [_model(kind, features, classes, hidden, dtype) for _ in range(K)]
    for i, m in enumerate(mods):  # different weights per client
        torch.manual_seed(i)
        for p in m.parameters():
            p.data.add_(0.3 * torch.randn_like(p))
    for B in (1, 9):
        params = {
            n: torch.stack([dict(m.named_parameters())[n].detach() for m in mods])
            for n, _ in mods[0].named_parameters()
        }
        x = 3 * torch.randn(K, B, features, generator=g, dtype=dtype)
        y = torch.randint(0, classes, (K, B), generator=g)
        mb = (torch.rand(K, B, generator=g) < 0.6).to(dtype)
        mb[:, 0] = 1
        weight = mb / mb.sum(1, keepdim=True)
        per, grads = mods[0].loss_grad(params, x, y, weight)
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
        for k, m in enumerate(mods):
            m.zero_grad()
            want = F.cross_entropy(m(x[k]), y[k], reduction="none")
            (want * weight[k]).sum().backward()
            torch.testing.assert_close(per[k], want.detach(), **tol)
            for n, p in m.named_parameters():
                scale = p.grad.abs().max().clamp(min=1e-30)
                err = float((grads[n][k] - p.grad).abs().max() / scale)
                assert err < (2e-5 if dtype == torch.float32 else 1e-12), (n, k, B, err)


def _sgd_case(kind: str, hidden: tuple[int, ...], classes: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    K = 12
    sizes = np.array([int(s) for s in torch.randint(1, 30, (K,), generator=g)])
    n = int(sizes.sum())
    x = (4 * torch.randn(n, 64, generator=g)).to(dtype)
    if kind == "cnn":
        x = x.view(n, 1, 8, 8)
    y = torch.randint(0, classes, (n,), generator=g)
    plan = make_plan(np.cumsum(sizes) - sizes, sizes, np.arange(K), 8, 0, 0, epochs=1)
    model = _model(kind, 64, classes, hidden, dtype)
    g0 = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    want = plain_sgd_params(model, g0, x, y, plan, 0.05)
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    res = LocalSGD(lr=0.05, batch_size=8).train(
        model, spec, g0, x, y, plan, classes, torch.as_tensor(sizes)
    )
    got = g0 + res.updates
    return float(((got - want).norm(dim=1) / want.norm(dim=1)).max())


@pytest.mark.parametrize(
    ("kind", "hidden", "classes"), [("mlp", (64,), 10), ("logistic", (), 10), ("mlp", (32,), 100)]
)
def test_float32_local_epoch_equals_a_plain_torch_sgd_loop(
    kind: str, hidden: tuple[int, ...], classes: int, threads: None
) -> None:
    """W1's setting (64 features, batch 8, lr 0.05, one epoch, uneven clients): weights after the
    epoch within 1e-6 relative of torch.optim.SGD on the module (measured: 2e-8 .. 2e-7)."""
    torch.set_num_threads(1)
    assert _sgd_case(kind, hidden, classes, torch.float32) < 1e-6


@pytest.mark.parametrize(("kind", "hidden"), [("mlp", (64,)), ("logistic", ()), ("cnn", ())])
def test_float64_local_epoch_equals_a_plain_torch_sgd_loop(
    kind: str, hidden: tuple[int, ...], threads: None
) -> None:
    """REV22 finding (fixed in clients/trainer.py by PERF22): the trainer handed loss_grad the
    sample weights in the plan's float32, so a float64 model's hand-written step (MLP, logistic,
    and the small CNN's since c9b0eb7) was float32-exact only: 3e-8 relative against 1e-16 on the
    autograd path."""
    torch.set_num_threads(1)
    assert _sgd_case(kind, hidden, 10, torch.float64) < 1e-12


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_a_client_alone_equals_the_same_client_among_others(momentum: float, threads: None) -> None:
    """Bit for bit at 2 and 4 threads, 37 uneven clients, whole, chunked by
    client.memory_budget_mb (4 clients per chunk: 10 chunks, the last of 1), and one by one (batched=false)."""
    g = torch.Generator().manual_seed(3)
    K = 37
    sizes = np.array([int(s) for s in torch.randint(1, 30, (K,), generator=g)])
    n = int(sizes.sum())
    x, y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    plan = make_plan(np.cumsum(sizes) - sizes, sizes, np.arange(K), 8, 0, 0, epochs=1)
    model = _model("mlp", 64, 10, (64,), torch.float32)
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    g0 = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    n_sizes = torch.as_tensor(sizes)
    base = LocalSGD(lr=0.05, momentum=momentum, batch_size=8)
    chunked = LocalSGD(lr=0.05, momentum=momentum, batch_size=8, memory_budget_mb=0.5)
    assert chunked.chunk_size(model, x[:1], K) == 4
    results = []
    for th in (2, 4):
        torch.set_num_threads(th)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the chunking warning
            one_by_one = LocalSGD(lr=0.05, momentum=momentum, batch_size=8, batched="false")
            for tr in (base, chunked, one_by_one):
                results.append(tr.train(model, spec, g0, x, y, plan, 10, n_sizes).updates)
    torch.set_num_threads(1)
    alone = torch.stack(
        [
            base.train(model, spec, g0, x, y, plan.select(k), 10, n_sizes[k : k + 1]).updates[0]
            for k in range(K)
        ]
    )
    for r in results:
        assert torch.equal(r, alone)


@pytest.mark.parametrize("classes", [10, 100])
def test_cross_entropy_grad_is_independent_of_the_call_at_two_threads(
    classes: int, threads: None
) -> None:
    """10 and 100 classes (more than the 64-column padding), 2 threads: a client's loss and
    gradient are the same alone, in a group and among 300, and equal softmax - one_hot."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    out, y = 3 * torch.randn(300, 8, classes), torch.randint(0, classes, (300, 8))
    w = torch.rand(300, 8)
    per, g = cross_entropy_grad(out, y, w)
    want = (torch.softmax(out, -1) - F.one_hot(y, classes)) * w[..., None]
    torch.testing.assert_close(g, want)
    for a, b in [(0, 1), (63, 64), (299, 300), (33, 66), (3, 97), (1, 300)]:
        p1, g1 = cross_entropy_grad(out[a:b], y[a:b], w[a:b])
        assert torch.equal(p1, per[a:b]) and torch.equal(g1, g[a:b]), (a, b)


def _weighted_case(K: int, d: int, integer_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(K * 7 + d)
    u = torch.randn(K, d, generator=g) * torch.rand(K, 1, generator=g).exp()
    if K > 2:
        u[1, d // 3], u[2, 0] = float("inf"), float("nan")
    if integer_weights:
        return u, torch.randint(1, 60, (K,), generator=g).float()
    return u, torch.rand(K, generator=g) * 50


@pytest.mark.parametrize(("K", "d"), [(1, 7), (1, 4810), (3, 63), (50, 4810), (100, 40_001)])
@pytest.mark.parametrize("integer_weights", [True, False])
def test_weighted_sum_equals_numpy_float64_sum_of_weighted_rows(
    K: int, d: int, integer_weights: bool, threads: None
) -> None:
    """One thread (a host's default): exactly numpy's float64 sum of w_k * u_k over the finite
    rows (float32 x float32 products are exact in float64, so only the order could differ), with
    an inf row and a NaN row dropped, K = 1, d not a multiple of 64."""
    torch.set_num_threads(1)
    u, w = _weighted_case(K, d, integer_weights)
    total, wsum, finite = weighted_sum(u, w)
    ok = np.isfinite(u.numpy()).all(axis=1)
    assert finite.numpy().tolist() == ok.tolist()
    wn = np.where(ok, w.numpy().astype(np.float64), 0.0)
    rows = np.where(ok[:, None], u.numpy(), 0).astype(np.float64)
    want = (wn[:, None] * rows).sum(axis=0)
    assert np.array_equal(total[0].numpy(), want)
    assert float(wsum[0]) == wn.sum()


def test_blocked_weighted_sum_equals_one_whole_mv_for_many_clients_at_two_threads(
    threads: None,
) -> None:
    """REV22 finding (fixed in strategies/server_step.py by PERF22): at 2 threads with 500-2000
    clients on a host, c68c341's column blocks differed from one whole mv and from numpy's
    sequential float64 sum by 1-4 float64 ulp in 0.02-0.04% of the coordinates (deterministic;
    at 1 thread all three agree), so a host's sum depended on its thread count."""
    torch.set_num_threads(2)
    u, w = _weighted_case(1000, 4810, integer_weights=True)
    u = u.nan_to_num(0.0, 0.0, 0.0)
    total, _, _ = weighted_sum(u, w)
    assert torch.equal(total[0], torch.mv(u.t().double(), w.double()))
