"""Batched local SGD equals one-client-at-a-time training and a plain torch.optim.SGD loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flagstaff.clients.data import load_digits
from flagstaff.clients.models import build_model
from flagstaff.clients.partition import partition
from flagstaff.clients.plan import make_plan
from flagstaff.clients.trainer import LocalSGD, ParamSpec


def _reference(plan, x, y, g0, lr, momentum, wd, clip, kind="mlp", shape=(64,)):
    """Each client alone with nn.Module + torch.optim.SGD on the planned batches."""
    out = []
    for k in range(plan.idx.shape[1]):
        model = build_model(kind, shape, 10, hidden=(16,), seed=0)
        torch.nn.utils.vector_to_parameters(g0.clone(), model.parameters())
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
        sub = plan.select(k)
        for t in range(sub.num_steps):
            rows = sub.idx[t, 0][sub.mask[t, 0] > 0]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        out.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach() - g0)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("momentum", "wd", "clip", "kind"),
    [(0.0, 0.0, 0.0, "mlp"), (0.9, 1e-3, 0.5, "mlp"), (0.5, 0.0, 0.0, "cnn")],
)
def test_batched_equals_sequential_equals_torch(momentum, wd, clip, kind) -> None:
    torch.set_num_threads(1)
    ds = load_digits(image=kind == "cnn")
    y_np = ds.y_train.numpy()
    parts = partition(y_np, 30, "iid", size_sigma=0.8)[:6]  # unequal sizes: unequal step counts
    order = np.concatenate(parts)
    sizes = np.array([len(p) for p in parts])
    x, y = ds.x_train[order], ds.y_train[order]
    if kind == "cnn":
        # digits' constant background makes max-pooling windows whose maxima tie to within
        # rounding; the batched CNN (clients.models.stacked) rounds differently from oneDNN and
        # may route such a window's gradient to the other element (equally valid): noise breaks
        # the near-ties, so the comparison with torch.optim.SGD checks the arithmetic
        x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    plan = make_plan(np.cumsum(sizes) - sizes, sizes, np.arange(6), 8, 0, 0, epochs=2)
    assert len(set(plan.steps.tolist())) > 1
    model = build_model(kind, ds.input_shape, 10, hidden=(16,), seed=0)
    spec = ParamSpec.of(model)
    g0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    for p in model.parameters():
        p.requires_grad_(False)
    common = dict(lr=0.05, momentum=momentum, weight_decay=wd, grad_clip=clip, epochs=2)
    sz = torch.as_tensor(sizes)
    batched = LocalSGD(batched="true", **common).train(model, spec, g0, x, y, plan, 10, sz)
    seq = LocalSGD(batched="false", **common).train(model, spec, g0, x, y, plan, 10, sz)
    ref = _reference(plan, x, y, g0, 0.05, momentum, wd, clip, kind, ds.input_shape)
    assert torch.allclose(batched.updates, seq.updates, atol=1e-6)
    assert torch.allclose(batched.updates, ref, atol=1e-5)
    assert batched.weights.tolist() == sizes.tolist()
    assert torch.isfinite(batched.losses).all()


def test_memory_budget_chunks_clients() -> None:
    model = build_model("mlp", (64,), 10)
    tiny = LocalSGD(memory_budget_mb=0.05)
    assert tiny.chunk_size(model, torch.zeros(1, 64), 100) < 100
    assert LocalSGD(batched="false").chunk_size(model, torch.zeros(1, 64), 100) == 1
    assert LocalSGD(batched="true").chunk_size(model, torch.zeros(1, 64), 100) == 100


def test_bad_hyperparameters_raise() -> None:
    for kwargs in ({"lr": 0}, {"momentum": 1.0}, {"batched": "sometimes"}):
        with pytest.raises(ValueError):
            LocalSGD(**kwargs)


class _TorchLSTM(torch.nn.Module):
    """torch.nn.LSTM's fused kernel has no vmap batching rule (clients.models.lstm's has none)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 6, batch_first=True)
        self.head = torch.nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x.view(-1, 8, 8))[0][:, -1])


def test_auto_falls_back_to_sequential_for_models_vmap_cannot_batch() -> None:
    torch.manual_seed(0)
    model = _TorchLSTM()
    spec = ParamSpec.of(model)
    g0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    for p in model.parameters():
        p.requires_grad_(False)
    ds = load_digits()
    sizes = np.array([16, 16, 16])
    plan = make_plan(np.cumsum(sizes) - sizes, sizes, np.arange(3), 8, 0, 0)
    trainer = LocalSGD(batched="auto")
    with pytest.warns(UserWarning, match="cannot be trained batched"):
        assert trainer.chunk_size(model, ds.x_train[:1], 3) == 1
    res = trainer.train(
        model, spec, g0, ds.x_train[:48], ds.y_train[:48], plan, 10, torch.as_tensor(sizes)
    )
    assert res.updates.shape == (3, g0.numel()) and torch.isfinite(res.updates).all()
    assert (
        LocalSGD(batched="auto").chunk_size(build_model("mlp", (64,), 10), ds.x_train[:1], 3) == 3
    )
