"""What every compression method shares: load a model, enumerate and replace its linear and conv
layers, calibration statistics (layer inputs, mini-batch gradients, Fisher row sums on Ray actors),
accuracy, parameter counts, and the compressed checkpoint format (:func:`save_compressed`,
:func:`load_compressed`).

A layer's weight is handled as a matrix ``(out, in * prod(kernel))`` (conv kernels flattened in
PyTorch's ``(in, kh, kw)`` order, which is also ``F.unfold``'s patch order, so ``W @ patch`` is the
conv output). A rank-r factorization ``W ~ U V`` becomes two layers (``V``: in -> r with the
original kernel, stride and padding; ``U``: r -> out, 1x1 for conv, holding the bias), so the
parameters really drop to ``r (out + in k) + bias``.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CompressedLayer",
    "Context",
    "LowRankLayer",
    "find_layers",
    "layer_matrix",
    "apply_compression",
    "collect_inputs",
    "batch_gradients",
    "fisher_row_sums",
    "fisher_row_sums_sharded",
    "FISHER_AXES",
    "accuracy",
    "count_params",
    "rank_for_ratio",
    "load_model",
    "load_data",
    "train_model",
    "save_compressed",
    "load_compressed",
    "build_text_classifier",
]

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class CompressedLayer:
    """One compressed layer: dense reconstruction, the stored factors, its cost and error.

    ``factors``: ``{"U": (out, r), "V": (r, in k)}`` with ``W ~ U V`` for a two-layer
    factorization (low rank; a CoSpaDi dictionary with its sparse codes has ``U = C^T`` sparse,
    ``V = D^T``), ``{"mask": bool}`` for a pruned dense layer, ``{}`` for a layer kept dense.
    ``params`` counts what the compressed layer stores (bias included; for sparse codes and masks
    as the methods' own helpers count them).
    """

    name: str
    weight_hat: torch.Tensor
    factors: dict[str, torch.Tensor]
    params: int
    rel_error: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if "U" in self.factors:
            return "lowrank"
        return "dense"


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F (in float64)."""
    W64 = W.double()
    return float(torch.linalg.norm(W64 - W_hat.double()) / torch.linalg.norm(W64).clamp_min(1e-300))


# -- layers ------------------------------------------------------------------------------------


def find_layers(model: nn.Module, targets: Sequence[str] = ("*",)) -> dict[str, nn.Module]:
    """Linear and (ungrouped) Conv1d/Conv2d modules whose names match a glob in ``targets``."""
    every = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, LAYER_TYPES) and getattr(m, "groups", 1) == 1
    }
    out = {n: m for n, m in every.items() if any(fnmatch.fnmatch(n, t) for t in targets)}
    if not out:
        names = list(every)
        more = f" (and {len(names) - 25} more)" if len(names) > 25 else ""
        raise ValueError(
            f"job.targets={list(targets)} matches no linear or conv layer; the model has "
            f"{names[:25]}{more}; use globs such as 'net.*' or '*.intermediate.dense'"
        )
    for n, m in out.items():
        if not bool(torch.isfinite(m.weight).all()):
            bad = int((~torch.isfinite(m.weight)).sum())
            raise ValueError(
                f"layer {n!r} has {bad} non-finite weights (NaN/inf); the checkpoint is corrupt "
                "or diverged: use an earlier checkpoint, or exclude the layer from job.targets"
            )
    return out


def layer_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in * prod(kernel)) matrix (a detached view)."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def layer_params(module: nn.Module) -> int:
    """Weight plus bias parameters of a layer."""
    return sum(p.numel() for p in module.parameters(recurse=False))


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Largest rank whose factor pair costs at most ``ratio`` of the dense m x n weight
    (``r (m + n) <= ratio m n``), at least 1 and at most min(m, n)."""
    return max(1, min(min(m, n), int(math.floor(ratio * m * n / (m + n) + 1e-9))))


class LowRankLayer(nn.Module):
    """``W ~ U V`` as two layers: ``first`` (V, in -> r; the original kernel/stride/padding for
    conv) and ``second`` (U, r -> out; 1x1 for conv; holds the bias)."""

    def __init__(self, like: nn.Module, rank: int) -> None:
        super().__init__()
        bias = like.bias is not None
        if isinstance(like, nn.Linear):
            self.first = nn.Linear(like.in_features, rank, bias=False)
            self.second = nn.Linear(rank, like.out_features, bias=bias)
        else:
            conv = type(like)
            self.first = conv(
                like.in_channels,
                rank,
                like.kernel_size,
                stride=like.stride,
                padding=like.padding,
                dilation=like.dilation,
                bias=False,
                padding_mode=like.padding_mode,
            )
            self.second = conv(rank, like.out_channels, 1, bias=bias)
        self.rank = int(rank)

    def set_factors(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.first.weight.copy_(V.reshape(self.first.weight.shape))
            self.second.weight.copy_(U.reshape(self.second.weight.shape))
            if bias is not None:
                self.second.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_compression(model: nn.Module, layers: dict[str, CompressedLayer]) -> dict[str, Any]:
    """Put the compressed layers into ``model`` (in place); returns the structure description
    that :func:`load_compressed` needs to rebuild the module tree."""
    structure: dict[str, Any] = {}
    for name, rec in layers.items():
        old = model.get_submodule(name)
        bias = None if old.bias is None else old.bias.detach().clone()
        if "U" in rec.factors:
            U, V = rec.factors["U"], rec.factors["V"]
            new = LowRankLayer(old, U.shape[1])
            new.set_factors(U.float(), V.float(), bias)
            _set_module(model, name, new)
            structure[name] = {"type": "lowrank", "rank": int(U.shape[1])}
        else:
            with torch.no_grad():
                old.weight.copy_(rec.weight_hat.reshape(old.weight.shape).to(old.weight.dtype))
            structure[name] = {"type": "dense"}
    return structure


def count_params(model: nn.Module) -> int:
    """All parameters of the model (trainable or frozen)."""
    return sum(p.numel() for p in model.parameters())


# -- data, models, training, evaluation --------------------------------------------------------


def build_text_classifier(num_classes: int, path: str | None = None, **_: Any) -> nn.Module:
    """all-MiniLM-L6-v2 (offline, clients.lora.load_minilm) + mean pooling + a linear head."""
    from flagstaff.clients.lora import TextClassifier, load_minilm

    return TextClassifier(load_minilm(path), num_classes)


def _instantiate(spec: dict[str, Any], **kwargs: Any) -> Any:
    from flagstaff.system.specs import build_from

    return build_from(spec, **kwargs)


def load_data(spec: dict[str, Any]):
    """A clients.data.Dataset from a ``_target_`` spec (what checkpoints store)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _instantiate(spec)


def data_spec(data: Any, seed: int) -> dict[str, Any]:
    """The ``_target_`` spec of ``job.data`` (digits, mnist1d, synthetic or text_reviews)."""
    name = data.name.value if hasattr(data.name, "value") else str(data.name)
    if name == "text_reviews":
        return {
            "_target_": "flagstaff.clients.text.load_text_dataset",
            "name": "reviews",
            "n_samples": int(data.n_samples),
            "max_length": int(data.max_length),
            "seed": int(data.seed if data.seed is not None else seed),
        }
    return {
        "_target_": "flagstaff.clients.data.load_dataset",
        "name": name,
        "seed": int(data.seed if data.seed is not None else seed),
        "image": bool(data.image),
    }


def model_spec(model: Any, input_shape: Sequence[int], num_classes: int, seed: int) -> dict:
    """The ``_target_`` spec of ``job.model`` for a data set's input shape and classes."""
    kind = _name(model.kind)
    if kind == "minilm":
        return {
            "_target_": "flagstaff.jobs.compress.core.build_text_classifier",
            "num_classes": int(num_classes),
            "path": model.path,
            "seed": int(seed),
        }
    if kind not in ("mlp", "logistic", "cnn"):
        raise ValueError(f"job.model.kind={kind!r}: choose mlp, logistic, cnn or minilm")
    return {
        "_target_": "flagstaff.clients.models.build_model",
        "kind": kind,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
        "hidden": [int(h) for h in model.hidden],
        "channels": int(model.channels),
        "seed": int(seed),
    }


def _merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into their base layers (W + (alpha/r) B A): one plain nn.Linear each."""
    from flagstaff.clients.lora import LoRALinear

    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            lin = nn.Linear(m.base.in_features, m.base.out_features, bias=m.base.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.base.weight + m.scaling * m.lora_B.weight @ m.lora_A.weight)
                if m.base.bias is not None:
                    lin.bias.copy_(m.base.bias)
            _set_module(model, name, lin)
    return model


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a model spec (``merge_lora``: fold adapters after building)."""
    spec = dict(spec)
    merge = bool(spec.pop("merge_lora", False))
    with torch.random.fork_rng(devices=[]):  # new layers (a text head) seeded, not process-random
        torch.manual_seed(int(spec.get("seed", 0)))
        model = _instantiate(spec)
    if merge:
        _merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` on (x, y)."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / max(1, len(y))


def train_model(
    model: nn.Module,
    ds: Any,
    seed: int,
    epochs: int = 30,
    lr: float = 1e-3,
    batch: int = 64,
) -> nn.Module:
    """Deterministic Adam training from ``seed``; a TextClassifier trains only its head, on
    pooled features of the frozen encoder computed once."""
    from flagstaff.clients.lora import TextClassifier

    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model, TextClassifier):
            feats = _pooled_features(model, ds.x_train)
            trainable, net = list(model.head.parameters()), model.head
            x, epochs = feats, epochs * 4  # a linear head on fixed features: cheap steps
        else:
            trainable, net, x = list(model.parameters()), model, ds.x_train
        for p in trainable:
            p.requires_grad_(True)
        fit(net, x, ds.y_train, torch.optim.Adam(trainable, lr=lr), epochs, batch, g)
        for p in model.parameters():
            p.requires_grad_(False)
    return model.eval()


def fit(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    epochs: int,
    batch: int,
    generator: torch.Generator,
    scheduler: Any = None,
) -> None:
    """Minibatch cross-entropy training: ``epochs`` passes over (x, y) in an order drawn from
    ``generator``, one optimizer (and scheduler) step per batch."""
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()


@torch.no_grad()
def _pooled_features(model: nn.Module, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Mean-pooled encoder outputs of a TextClassifier (its head's input)."""
    head, out = model.head, []
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
            out.append(captured.pop())
    finally:
        hook.remove()
    return torch.cat(out)


@dataclass
class Loaded:
    """A model ready to compress, its data set, and the specs that rebuild both."""

    model: nn.Module
    data: Any
    model_spec: dict[str, Any]
    data_spec: dict[str, Any]
    source: str


def load_model(job: Any, seed: int) -> Loaded:
    """The model of ``job.checkpoint``: a Flagstaff run dir or its checkpoint.pt (config from
    .hydra/config.yaml), any torch state dict (architecture from ``job.model``), or None: a model
    of ``job.model`` trained here on ``job.data``, deterministic from ``seed``."""
    path = job.checkpoint
    if path is not None and path != "":
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(
                f"job.checkpoint={path!r} does not exist; pass a Flagstaff run directory, its "
                "checkpoint.pt, or a torch state dict file (or null to train a demo model)"
            )
        run_dir = p if p.is_dir() else p.parent
        if (run_dir / ".hydra" / "config.yaml").exists() and (
            p.is_dir() or p.name == "checkpoint.pt"
        ):
            return _load_flagstaff(run_dir)
        if p.is_dir():
            raise FileNotFoundError(
                f"job.checkpoint={path!r} is a directory without .hydra/config.yaml and "
                "checkpoint.pt; pass a Flagstaff run directory or a state dict file"
            )
        return _load_state_dict(p, job, seed)
    dspec = data_spec(job.data, seed)
    ds = load_data(dspec)
    mspec = model_spec(job.model, ds.input_shape, ds.num_classes, seed)
    model = build_model(mspec)
    train_model(model, ds, seed, epochs=job.model.epochs, lr=job.model.lr)
    return Loaded(model, ds, mspec, dspec, f"trained here ({_name(job.model.kind)}, seed {seed})")


def _load_flagstaff(run_dir: Path) -> Loaded:
    from omegaconf import OmegaConf

    from flagstaff.clients.trainer import ParamSpec

    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"{run_dir} has no checkpoint.pt; train with checkpoint_every>=0")
    c = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "params" not in state:
        raise ValueError(f"{ckpt} is not a Flagstaff checkpoint (no 'params')")
    dspec = dict(c["data"])
    ds = load_data(dspec)
    base = dict(c["model"])
    base.update(input_shape=list(ds.input_shape), num_classes=ds.num_classes, seed=c["seed"])
    model = _instantiate(base)
    spec = ParamSpec.of(model)
    flat = state["params"]
    if flat.numel() != spec.numel:
        raise ValueError(
            f"{ckpt} holds {flat.numel()} parameters, the model of {run_dir}/.hydra/config.yaml "
            f"has {spec.numel}; the run directory and checkpoint do not belong together"
        )
    with torch.no_grad():
        for name, t in spec.unflatten(flat).items():
            model.get_parameter(name).copy_(t)
    _merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    # rebuilding from model_spec gives the same frozen base; the state dict overrides the rest
    return Loaded(model.eval(), ds, {**base, "merge_lora": True}, dspec, f"flagstaff run {run_dir}")


def _load_state_dict(path: Path, job: Any, seed: int) -> Loaded:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(
            f"job.checkpoint={str(path)!r} is not a readable torch file ({type(err).__name__}: "
            f"{err}); save the model with torch.save(model.state_dict(), path)"
        ) from err
    if isinstance(sd, dict) and "params" in sd and "round" in sd:
        raise ValueError(
            f"{path} is a Flagstaff checkpoint outside its run directory; pass the run directory "
            "(it holds .hydra/config.yaml, which says how to rebuild the model)"
        )
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor)")
    dspec = data_spec(job.data, seed)
    ds = load_data(dspec)
    mspec = model_spec(job.model, ds.input_shape, ds.num_classes, seed)
    model = build_model(mspec)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"the state dict in {path} does not match job.model={_describe(job.model)} on "
            f"job.data={_name(job.data.name)}: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"shape mismatches {shapes[:6]}; set job.model.kind/hidden/channels (and job.data) "
            "to the architecture that wrote the file"
        )
    model.load_state_dict(sd)
    return Loaded(model.eval(), ds, mspec, dspec, f"state dict {path}")


def _name(x: Any) -> str:
    return x.value if hasattr(x, "value") else str(x)


def _describe(m: Any) -> str:
    if _name(m.kind) == "minilm":
        return "{kind: minilm}"
    return f"{{kind: {_name(m.kind)}, hidden: {list(m.hidden)}, channels: {m.channels}}}"


# -- calibration statistics --------------------------------------------------------------------


def _patches(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """Rows that the layer's weight matrix multiplies: (N*, in * prod(kernel))."""
    if isinstance(module, nn.Linear):
        return inp.reshape(-1, inp.shape[-1])
    if isinstance(module, nn.Conv1d):
        inp = inp.unsqueeze(-2)
        k, s, p, d = (
            (1, module.kernel_size[0]),
            (1, module.stride[0]),
            (0, module.padding[0]),
            (1, module.dilation[0]),
        )
    else:
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
    cols = F.unfold(inp, k, dilation=d, padding=p, stride=s)  # (N, C k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@torch.no_grad()
def collect_inputs(
    model: nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    batch: int = 256,
    max_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Calibration inputs of each named layer on ``x`` (forward hooks): ``(N, in)`` for a linear
    layer (tokens flattened into rows), ``(N L, in k)`` patches for a conv; at most ``max_rows``
    rows each (the first ones). A model with ``token_mask(x)`` (N, L) (a text classifier) gives
    only its real tokens' rows: padding never reaches the output, so it is not calibration data."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []
    token_mask = getattr(model, "token_mask", None)
    keep: list[torch.Tensor | None] = [None]  # the current batch's token mask

    def rows(m: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        k = keep[0]
        if k is not None and isinstance(m, nn.Linear) and inp.shape[:-1] == k.shape:
            return inp[k]
        return _patches(m, inp)

    for n in names:
        mod = model.get_submodule(n)

        def hook(m, args, _n=n):
            store[_n].append(rows(m, args[0].detach()).float())

        hooks.append(mod.register_forward_pre_hook(hook))
    model.eval()
    try:
        for i in range(0, len(x), batch):
            if token_mask is not None:
                keep[0] = token_mask(x[i : i + batch])
            model(x[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, parts in store.items():
        X = torch.cat(parts)
        out[n] = X[:max_rows] if max_rows else X
    return out


def batch_gradients(
    model: nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Gradients of the mean cross-entropy of each mini-batch w.r.t. each named layer's weight:
    ``(m, out * in k)`` per layer, m = ceil(N / batch_size) (batch_size=1: per-sample)."""
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for g in _iter_batch_grads(model, names, x, y, batch_size):
        for n in names:
            grads[n].append(g[n].reshape(-1))
    return {n: torch.stack(v) for n, v in grads.items()}


def _iter_batch_grads(model, names, x, y, batch_size):
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {n: w.requires_grad for n, w in weights.items()}
    model.eval()
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for i in range(0, len(y), batch_size):
            loss = F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size])
            gs = torch.autograd.grad(loss, list(weights.values()))
            yield {n: g.detach().reshape(g.shape[0], -1) for n, g in zip(weights, gs, strict=True)}
    finally:
        for n, w in weights.items():
            w.requires_grad_(flags[n])


FISHER_AXES = ("input", "output")


def fisher_row_sums(
    model: nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    axis: str = "input",
) -> dict[str, torch.Tensor]:
    """FWSVD row importances (Hsu et al., ICLR 2022): I_i = sum_j sum_batches (dL/dW_ij)^2,
    float64 per layer; batches are consecutive ``batch_size`` slices of ``x``.

    Hsu et al. write a layer as ``y = x W`` with W (in x out), so their rows are the layer's
    inputs: ``axis="input"`` sums over outputs, one importance per input feature (``in * k``
    for a conv kernel), as their code and its successors do; ``"output"`` sums over inputs,
    one importance per output unit (the rows of torch's ``(out, in)`` weight)."""
    if axis not in FISHER_AXES:
        raise ValueError(f"Fisher axis {axis!r}: choose one of {FISHER_AXES}")
    dim = 0 if axis == "input" else 1  # the gradient is (out, in * k): sum over the other axis
    out = {
        n: torch.zeros(layer_matrix(model.get_submodule(n)).shape[1 - dim], dtype=torch.float64)
        for n in names
    }
    for g in _iter_batch_grads(model, names, x, y, batch_size):
        for n in names:
            out[n] += g[n].double().square().sum(dim)
    return out


class FisherShard:
    """Holds a model and one shard of calibration data; returns its Fisher row sums."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.model, self.x, self.y = model, x, y

    def row_sums(self, names: list[str], batch_size: int, axis: str) -> dict[str, torch.Tensor]:
        return fisher_row_sums(self.model, names, self.x, self.y, batch_size, axis)

    def node(self) -> str:
        import socket

        return socket.gethostname()


def shard_bounds(n: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous sample ranges of whole batches, one per shard (empty shards dropped)."""
    n_batches = math.ceil(n / batch_size)
    shards = max(1, min(shards, n_batches))
    cuts = [round(i * n_batches / shards) for i in range(shards + 1)]
    return [(cuts[i] * batch_size, min(n, cuts[i + 1] * batch_size)) for i in range(shards)]


def fisher_row_sums_sharded(
    model: nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    backend: str = "local",
    shards: int = 1,
    axis: str = "input",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fisher row sums as a data-parallel sum: the calibration batches are split into ``shards``
    contiguous shards, each summed by one Ray actor (``backend="ray"``) or in this process
    (``"local"``); the driver adds the per-layer row sums. Returns (sums, info)."""
    names = list(names)
    bounds = shard_bounds(len(y), batch_size, shards)
    if backend == "ray":
        import ray

        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        actor = ray.remote(num_cpus=min(1.0, cpus / len(bounds)))(FisherShard)
        model_ref = ray.put(model)
        handles = [actor.remote(model_ref, x[a:b], y[a:b]) for a, b in bounds]
        try:
            parts = ray.get([h.row_sums.remote(names, batch_size, axis) for h in handles])
            nodes = ray.get([h.node.remote() for h in handles])
        finally:
            for h in handles:
                ray.kill(h)
    else:
        parts = [fisher_row_sums(model, names, x[a:b], y[a:b], batch_size, axis) for a, b in bounds]
        nodes = ["local"] * len(bounds)
    total = {n: torch.stack([p[n] for p in parts]).sum(0) for n in names}
    info = {
        "shards": [list(b) for b in bounds],
        "shard_nodes": nodes,
        "backend": backend,
        "axis": axis,
    }
    return total, info


# -- the job's context and checkpoints ---------------------------------------------------------


@dataclass
class Context:
    """What a method sees: the model, the target layers as matrices, calibration data, backend."""

    model: nn.Module
    layers: dict[str, nn.Module]
    x_calib: torch.Tensor
    y_calib: torch.Tensor
    job: Any
    seed: int
    backend: str = "local"
    hosts: int = 1
    cache: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str], None] = lambda _msg: None

    @property
    def matrices(self) -> dict[str, torch.Tensor]:
        return {n: layer_matrix(m) for n, m in self.layers.items()}

    def bias_params(self, name: str) -> int:
        b = self.layers[name].bias
        return 0 if b is None else b.numel()

    def inputs(self) -> dict[str, torch.Tensor]:
        """Calibration inputs per target layer (cached)."""
        if "inputs" not in self.cache:
            self.cache["inputs"] = collect_inputs(self.model, list(self.layers), self.x_calib)
        return self.cache["inputs"]


def save_compressed(
    path: str | Path,
    model: nn.Module,
    structure: dict[str, Any],
    loaded: Loaded,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the compressed model: state dict, layer structure, and the specs that rebuild it."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "structure": structure,
            "model_spec": loaded.model_spec,
            "data_spec": loaded.data_spec,
            "extra": extra or {},
        },
        path,
    )


def load_compressed(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by a compression job; returns (model, metadata). The data set it
    was evaluated on is ``load_data(metadata["data_spec"])``."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ck["model_spec"])
    for name, s in ck["structure"].items():
        if s["type"] == "lowrank":
            _set_module(model, name, LowRankLayer(model.get_submodule(name), int(s["rank"])))
    model.load_state_dict(ck["state_dict"])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), {k: v for k, v in ck.items() if k != "state_dict"}


# -- method registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A parameter budget: one ``rank`` for every target layer (> 0), else ``ratio`` of the
    target layers' parameters kept; WeLore may instead get a global ``threshold``."""

    ratio: float = 0.5
    rank: int = 0
    threshold: float | None = None

    def rank_of(self, name: str, W: torch.Tensor) -> int:
        """The rank of layer ``name`` (out x in) under this budget; ValueError if impossible."""
        m, n = W.shape
        if self.rank > 0:
            if self.rank > min(m, n):
                raise ValueError(
                    f"job.rank={self.rank} exceeds min(out, in)={min(m, n)} of layer {name!r} "
                    f"({m} x {n}); lower job.rank, use job.ratio (per-layer ranks), or exclude "
                    "the layer from job.targets"
                )
            return self.rank
        return rank_for_ratio(m, n, self.ratio)


Method = Callable[[Context, Budget], dict[str, CompressedLayer]]
METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
    """Decorator adding a method ``fn(ctx, budget) -> {layer: CompressedLayer}`` to METHODS."""

    def deco(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Method:
    """The registered method (its module imported on first use)."""
    import importlib

    if name not in METHODS:
        importlib.import_module(f"flagstaff.jobs.compress.{_MODULES.get(name, name)}")
    if name not in METHODS:
        raise ValueError(f"unknown compression method {name!r}; choose {sorted(_MODULES)}")
    return METHODS[name]


# the method -> module that registers it (CoSpaDi and M-FAC adapters live in jobs.compress.run)
_MODULES = {"svd": "svd", "fwsvd": "fwsvd", "welore": "welore", "cospadi": "run", "mfac": "run"}
