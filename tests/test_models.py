"""The models (issue 21 item 3): reference parameter counts, the LSTM equals torch.nn.LSTM, and each
model trained batched across clients equals each client trained alone with torch.optim.SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flagstaff.clients.models import build_model, num_parameters
from flagstaff.clients.models.lstm import LSTM
from flagstaff.clients.plan import make_plan
from flagstaff.clients.trainer import LocalSGD, ParamSpec
from tests.conftest import plain_sgd_params


@pytest.mark.parametrize(
    ("kind", "shape", "classes", "count"),
    [
        # ResNet-18 (CIFAR stem) with GroupNorm: BatchNorm's parameter count, 11.2M
        ("resnet18", (3, 32, 32), 10, 11_173_962),
        # torchvision's resnet18 as FL-Simulator builds it (ImageNet stem, GroupNorm(2), 10-way fc):
        # torchvision's documented 11,689,512 less 513 * 990 for the head
        ("resnet18_imagenet", (3, 32, 32), 10, 11_181_642),
        # McMahan et al. 2017 give 1,663,370 for MNIST's 10 classes; FEMNIST has 62
        ("cnn_femnist", (1, 28, 28), 10, 1_663_370),
        ("cnn_femnist", (1, 28, 28), 62, 1_690_046),
        # LEAF's Shakespeare LSTM with PyTorch's two biases per layer (TensorFlow's one: 817,872)
        ("lstm", (80,), 80, 819_920),
        # He et al. 2016's CIFAR ResNets with projection shortcuts (option B)
        ("resnet20", (3, 32, 32), 10, 272_474),
        ("resnet8", (3, 32, 32), 10, 78_042),
    ],
)
def test_parameter_counts_match_the_reference_architectures(kind, shape, classes, count) -> None:
    model = build(kind, shape, classes)
    assert num_parameters(model) == count
    assert model(torch.zeros(2, *shape)).shape == (2, classes)


def build(name: str, *args, **kw) -> nn.Module:
    """build_model for the test names: ``<resnet>_imagenet`` is that ResNet with model.stem=imagenet."""
    if name.endswith("_imagenet"):
        kw["stem"] = "imagenet"
    return build_model(name.removesuffix("_imagenet"), *args, **kw)


def test_imagenet_stem_is_torchvisions_and_keeps_cifar_default() -> None:
    """model.stem=imagenet: 7x7/2 conv (padding 3) and 3x3/2 max pool (padding 1) in front of the
    same stages, so a 32x32 image enters the first stage at 8x8; the default stays the CIFAR
    stem; an unknown stem is one line naming the choices."""
    cifar, imnet = build("resnet18", (3, 32, 32), 10), build("resnet18_imagenet", (3, 32, 32), 10)
    assert (cifar.conv1.kernel_size, cifar.conv1.stride, cifar.conv1.padding) == (
        (3, 3),
        (1, 1),
        (1, 1),
    )
    c = imnet.conv1
    assert (c.kernel_size, c.stride, c.padding) == ((7, 7), (2, 2), (3, 3))
    seen = []
    imnet.layers[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    assert imnet(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert seen == [(2, 64, 8, 8)]
    with pytest.raises(ValueError, match="model.stem='x': choose one of cifar, imagenet"):
        build_model("resnet8", (3, 32, 32), 10, stem="x")


def test_torchvision_init_is_kaiming_normal_fan_out_and_the_default_is_unchanged() -> None:
    """model.init=torchvision: every convolution kaiming_normal_(mode="fan_out", relu), std
    sqrt(2 / (c_out k k)), as torchvision's ResNet initializes the resnet18 FL-Simulator builds
    (pytorch/vision torchvision/models/resnet.py; its GroupNorms weight 1, bias 0; its head a fresh
    nn.Linear); the default keeps torch's own init (kaiming_uniform_(a=sqrt(5)): std
    sqrt(1 / (3 c_in k k))), the same parameters as before; an unknown init is one line."""
    tv = build("resnet18_imagenet", (3, 32, 32), 10, init="torchvision")
    default = build("resnet18_imagenet", (3, 32, 32), 10)
    same = build("resnet18_imagenet", (3, 32, 32), 10, init="default")
    convs = [(n, m) for n, m in tv.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20  # the stem, 16 in the blocks, 3 projection shortcuts
    for name, m in convs:
        w = m.weight.detach()
        c_out, c_in, k, _ = w.shape
        want = (2.0 / (c_out * k * k)) ** 0.5
        assert abs(w.std().item() / want - 1) < 0.05, name  # >= 9,408 weights: sd of std < 1%
        assert abs(w.mean().item()) < 5 * want / w.numel() ** 0.5, name
        d = dict(default.named_modules())[name].weight.detach()
        assert abs(d.std().item() / (1.0 / (3 * c_in * k * k)) ** 0.5 - 1) < 0.05, name
    for m in tv.modules():
        if isinstance(m, nn.GroupNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert tv.head.weight.abs().max() <= 512**-0.5  # nn.Linear's own init (FL-Simulator's fc)
    for a, b in zip(default.parameters(), same.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="model.init='x': choose default .*or torchvision"):
        build_model("resnet8", (3, 32, 32), 10, init="x")


@pytest.mark.parametrize("kind", ["resnet8_imagenet", "resnet18_imagenet"])
def test_imagenet_stem_stacked_forward_equals_each_clients_module(kind: str, monkeypatch) -> None:
    """K clients' stacked forward (im2col stem, and each client's native path) equals each
    client's own module forward with its parameters."""
    from torch.func import functional_call

    import flagstaff.clients.models.stacked as stacked

    torch.set_num_threads(1)
    model = build(kind, (3, 32, 32), 10, seed=0)
    g = torch.Generator().manual_seed(1)
    names = [n for n, _ in model.named_parameters()]
    params = {
        n: p.detach() + 0.05 * torch.randn(3, *p.shape, generator=g)
        for n, p in model.named_parameters()
    }
    x = torch.randn(3, 2, 3, 32, 32, generator=g)
    want = torch.stack(
        [functional_call(model, {n: params[n][k] for n in names}, (x[k],)) for k in range(3)]
    )
    assert not model.per_client(x)  # 2 images: the stem runs as im2col over the 3 clients
    torch.testing.assert_close(model.forward_clients(params, x), want, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(stacked, "IM2COL_MAX", 0)  # every convolution native, per client
    torch.testing.assert_close(model.stacked_forward(params, x), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.forward_clients(params, x), want, atol=1e-4, rtol=1e-4)


def test_resnets_use_groupnorm_and_no_model_has_batchnorm() -> None:
    for kind in ("resnet8", "resnet20", "resnet18"):
        model = build_model(kind, (3, 16, 16), 10)
        kinds = {type(m) for m in model.modules()}
        assert nn.GroupNorm in kinds
        assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)


def test_lstm_equals_torch_lstm_with_the_same_weights() -> None:
    """The explicit-matmul LSTM computes what torch.nn.LSTM computes (outputs and gradients)."""
    torch.manual_seed(0)
    ours, ref = LSTM(5, 7, 2), nn.LSTM(5, 7, 2, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 11, 5)
    out, (h, _) = ref(x)
    torch.testing.assert_close(ours(x), out)
    g_ours = torch.autograd.grad(ours(x).square().sum(), list(ours.parameters()))
    g_ref = torch.autograd.grad(ref(x)[0].square().sum(), list(ref.parameters()))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b)


# tiny instances: the real architectures at small inputs (ResNet-18 at 8x8), 3 clients of unequal
# size (unequal step counts, a partial last batch)
TINY = {
    "cnn": dict(shape=(1, 40), classes=10, kw={}),
    "resnet8": dict(shape=(3, 8, 8), classes=10, kw={}),
    "resnet20": dict(shape=(3, 8, 8), classes=10, kw={}),
    "resnet18": dict(shape=(3, 8, 8), classes=10, kw={}),
    "resnet8_imagenet": dict(shape=(3, 16, 16), classes=10, kw={}),
    "resnet18_imagenet": dict(shape=(3, 16, 16), classes=10, kw={}),
    "cnn_femnist": dict(shape=(1, 12, 12), classes=62, kw={"hidden": 32}),
    "lstm": dict(shape=(12,), classes=20, kw={"hidden": 16, "vocab_size": 20}),
}


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=pytest.mark.slow) if "resnet18" in k else k for k in TINY]
)  # ResNet-18 (11M parameters) takes 10-20 s: resnet8/20 are the fast variants
@pytest.mark.parametrize("batched", ["true", "false"])
def test_batched_training_equals_a_plain_sgd_loop(kind: str, batched: str) -> None:
    torch.set_num_threads(1)
    cfg = TINY[kind]
    g = torch.Generator().manual_seed(0)
    sizes = np.array([7, 4, 10])
    n = int(sizes.sum())
    if kind == "lstm":
        x = torch.randint(0, cfg["classes"], (n, *cfg["shape"]), generator=g).float()
    else:
        x = torch.randn(n, *cfg["shape"], generator=g)
    y = torch.randint(0, cfg["classes"], (n,), generator=g)
    plan = make_plan(np.cumsum(sizes) - sizes, sizes, np.arange(3), 4, 0, 0, epochs=1)
    model = build(kind, cfg["shape"], cfg["classes"], seed=0, **cfg["kw"])
    spec = ParamSpec.of(model)
    g0 = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    want = plain_sgd_params(model, g0, x, y, plan, lr=0.05, momentum=0.5) - g0
    nn.utils.vector_to_parameters(g0.clone(), model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    tr = LocalSGD(lr=0.05, momentum=0.5, batch_size=4, batched=batched)
    res = tr.train(model, spec, g0, x, y, plan, cfg["classes"], torch.as_tensor(sizes))
    assert res.updates.abs().max() > 0
    torch.testing.assert_close(res.updates, want, atol=2e-5, rtol=1e-4)
    # a client's numbers do not depend on the clients it shares a host with (bit for bit)
    alone = tr.train(model, spec, g0, x, y, plan.select(2), cfg["classes"], torch.as_tensor([10]))
    assert torch.equal(alone.updates[0], res.updates[2])


@pytest.mark.parametrize("kind", ["cnn", "cnn_femnist", "resnet8", "resnet8_imagenet"])
def test_native_convolution_paths_equal_a_plain_sgd_loop(kind: str, monkeypatch) -> None:
    """With every convolution above the im2col size, SmallCNN runs oneDNN per client inside its
    stacked layers and the FedAvg CNN / ResNet-8 run each client's own forward in channels-last
    memory: still each client's own SGD, and a client alone equals the client among others."""
    import flagstaff.clients.models.stacked as stacked

    monkeypatch.setattr(stacked, "IM2COL_MAX", 0)
    torch.set_num_threads(1)
    shape, classes, kw = {
        "cnn": ((1, 40), 10, {}),
        "cnn_femnist": ((1, 12, 12), 62, {"hidden": 32}),
        "resnet8": ((3, 8, 8), 10, {}),
        "resnet8_imagenet": ((3, 16, 16), 10, {}),
    }[kind]
    g = torch.Generator().manual_seed(0)
    sizes = np.array([7, 4, 10])
    x, y = torch.randn(21, *shape, generator=g), torch.randint(0, classes, (21,), generator=g)
    plan = make_plan(np.cumsum(sizes) - sizes, sizes, np.arange(3), 4, 0, 0)
    model = build(kind, shape, classes, seed=0, **kw)
    spec = ParamSpec.of(model)
    g0 = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    want = plain_sgd_params(model, g0, x, y, plan, lr=0.05, momentum=0.0) - g0
    for p in model.parameters():
        p.requires_grad_(False)
    tr = LocalSGD(lr=0.05, batch_size=4, batched="true")
    res = tr.train(model, spec, g0, x, y, plan, classes, torch.as_tensor(sizes))
    torch.testing.assert_close(res.updates, want, atol=2e-5, rtol=1e-4)
    alone = tr.train(model, spec, g0, x, y, plan.select(2), classes, torch.as_tensor(sizes[2:]))
    assert torch.equal(alone.updates[0], res.updates[2])


@pytest.mark.parametrize("shape", [(1, 40), (1, 8, 8)])
def test_small_cnn_loss_grad_equals_autograd(shape) -> None:
    """SmallCNN's hand-written loss gradient (clients.models.stacked.conv_chain_loss_grad) equals
    autograd through its stacked forward: weighted per-sample cross-entropy, 3 clients."""
    torch.manual_seed(0)
    model = build_model("cnn", shape, 10)
    K, B = 3, 5
    params = {
        n: p.detach().unsqueeze(0) + 0.01 * torch.randn(K, *p.shape)
        for n, p in model.named_parameters()
    }
    x, y = torch.randn(K, B, *shape), torch.randint(0, 10, (K, B))
    weight = torch.rand(K, B)
    per, grads = model.loss_grad(params, x, y, weight)
    leaves = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    out = model.forward_clients(leaves, x)
    want = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(K, B)
    ref = torch.autograd.grad((want * weight).sum(), list(leaves.values()))
    torch.testing.assert_close(per, want.detach())
    assert set(grads) == set(leaves)
    for n, r in zip(leaves, ref, strict=True):
        torch.testing.assert_close(grads[n], r, atol=1e-6, rtol=1e-5, msg=n)


def test_batchnorm_model_is_refused_with_one_line() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 5, 5))
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    g0 = nn.utils.parameters_to_vector(model.parameters())
    sizes = np.array([4, 4])
    plan = make_plan(np.array([0, 4]), sizes, np.arange(2), 2, 0, 0)
    x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))
    for batched in ("auto", "false"):
        tr = LocalSGD(batched=batched)
        with pytest.raises(ValueError, match="BatchNorm layers \\(1\\).*use GroupNorm") as err:
            tr.train(model, spec, g0, x, y, plan, 3, torch.as_tensor(sizes))
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="GroupNorm"):
            tr.check_model(model)
    LocalSGD().check_model(build_model("resnet8", (3, 8, 8), 10))  # GroupNorm passes


# -- one round through the runner (backend=local) for each model config, on generated data in the
# real on-disk layouts (tests/test_hf_data.py's builders: CIFAR-10 save_to_disk folder, FEMNIST
# parquet clone, Shakespeare records)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    from tests.test_hf_data import make_cifar, make_femnist, make_shakespeare

    root = tmp_path_factory.mktemp("layouts")
    return {
        "cifar10": make_cifar(root / "cifar10", n_train=24, n_test=10),
        "femnist": make_femnist(root / "femnist", writers=3, per_writer=8),
        "shakespeare": make_shakespeare(root / "shakespeare.parquet", roles=3, per_role=8),
    }


@pytest.mark.parametrize(
    ("model", "data", "classes"),
    [
        ("resnet8", "cifar10", 10),
        ("resnet20", "cifar10", 10),
        pytest.param("resnet18", "cifar10", 10, marks=pytest.mark.slow),
        ("cnn_femnist", "femnist", 62),
        ("lstm_shakespeare", "shakespeare", 80),
    ],
)
def test_model_config_runs_one_round_through_the_runner(tmp_path, layouts, model, data, classes):
    from flagstaff.system.runner import train
    from tests.conftest import compose

    cfg = compose(
        "experiment=smoke", "rounds=1", f"model={model}", f"data={data}",
        f"data.path={layouts[data]}", "num_clients=3", "clients_per_round=2",
        "client.batch_size=4", "client.steps=2",
    )  # fmt: skip
    res = train(cfg, run_dir=str(tmp_path / "run"))
    assert res["params"].numel() == num_parameters(
        build_model(
            cfg.model.kind,
            {"cifar10": (3, 32, 32), "femnist": (1, 28, 28), "shakespeare": (80,)}[data],
            classes,
        )
    )
    assert torch.isfinite(res["params"]).all() and np.isfinite(res["loss"])
