"""K clients' forward pass as one computation: layers on stacked parameters, without ``vmap``.

``torch.func.vmap`` turns each client's layer into a batched call, op by op; for small convolutional
and recurrent clients its dispatch, layout conversions and generic backward formulas cost several
times the arithmetic (a host round of mnist1d's small CNN was mostly overhead). The functions here
take parameters stacked over clients, ``(K, *shape)``, and activations client-major and
channels-last, ``(K, B, *spatial, C)``, and pick per layer the form that measured fastest on CPU:

* small convolutions (a client's im2col matrix up to :data:`IM2COL_MAX` entries): im2col and one
  batched matrix product for all K clients (``torch.baddbmm``), fused with ReLU and 2x2 max pooling,
  with a hand-written backward (:class:`_ConvIm2col`; max pooling reads the phases of the pooling
  window as contiguous blocks, so neither pass touches strided memory);
* larger convolutions: each client's native convolution in channels-last memory (oneDNN's direct
  kernels), which beat one grouped convolution over K clients and the channels-first layout;
* GroupNorm, pooling, ReLU, residual adds and linear layers batched over clients (``torch.bmm``;
  Wu and He 2018 for GroupNorm).

A client's numbers never depend on the other clients of the call (no reduction crosses clients;
tested bit for bit), and equal the module's own forward up to float rounding (tested against a
plain ``torch.optim.SGD`` loop). Models opt in by deriving from :class:`StackedModel`; a model
whose modules were replaced (e.g. by LoRA adapters) is not stackable and trains through ``vmap``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IM2COL_MAX",
    "first_conv_large",
    "StackedModel",
    "conv",
    "conv_chain_loss_grad",
    "conv_pool_head",
    "cross_entropy_grad",
    "group_norm",
    "linear",
    "linear_chain",
    "linear_chain_loss_grad",
    "head_weight",
    "max_pool",
    "max_pool2",
    "to_channels_last",
]

Params = dict[str, torch.Tensor]

#: entries of one client's im2col matrix (batch x output positions x kernel x input channels) up to
#: which a convolution runs as im2col + batched matmul; larger ones run oneDNN per client
IM2COL_MAX = 1 << 17

#: column padding of :func:`cross_entropy_grad`: a multiple of every SIMD width torch's CPU kernels
#: use for float32 (16 lanes with AVX-512) and of their unrolled loops
_LANES = 64

#: module types a :class:`StackedModel` may contain (anything else, e.g. a LoRA layer, means vmap)
_LEAVES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    nn.GroupNorm,
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.Embedding,
    nn.Flatten,
    nn.Sequential,
)


class StackedModel(nn.Module):
    """A model with a forward pass over K clients' stacked parameters (see the module docstring).

    Subclasses implement :meth:`stacked_forward`; ``stackable`` says whether it applies to this
    instance (only the module types it was written for, e.g. no adapters swapped in).
    """

    #: extra module classes a subclass's stacked forward knows (e.g. its own blocks)
    stacked_modules: tuple[type[nn.Module], ...] = ()

    def forward_clients(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """K clients' logits (K, B, classes): ``params`` name -> (K, *shape) as in
        ``named_parameters``, ``x`` (K, B, *input). The stacked layers, or, where
        :meth:`per_client` says so, each client's own forward in channels-last memory."""
        if self.per_client(x):
            return _each_client(self, params, x)
        return self.stacked_forward(params, x)

    def stacked_forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_clients` through the stacked layers of this module."""
        raise NotImplementedError

    def per_client(self, x: torch.Tensor) -> bool:
        """Whether K clients' batch ``x`` trains faster one client at a time (large convolutions:
        one grouped or im2col convolution over K clients measured slower than K oneDNN calls)."""
        return False

    def loss_grad(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, Params] | None:
        """Per-sample cross-entropy (K, B) of K clients and the gradients, name -> (K, *shape), of
        sum_b weight[k, b] * loss[k, b], computed without autograd; None where this model has no
        such pass for ``x`` (then the trainer differentiates :meth:`forward_clients`)."""
        return None

    def stackable(self) -> bool:
        known = (*_LEAVES, *self.stacked_modules, type(self))
        return all(type(m) in known for m in self.modules())


def _each_client(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Each client's own forward (``functional_call``), images in channels-last memory."""
    from torch.func import functional_call

    names = list(params)
    outs = []
    for xk, *ps in zip(x.unbind(0), *(params[n].unbind(0) for n in names), strict=True):
        if xk.dim() == 4:
            xk = xk.contiguous(memory_format=torch.channels_last)
        outs.append(functional_call(model, dict(zip(names, ps, strict=True)), (xk,)))
    return torch.stack(outs)


def first_conv_large(x: torch.Tensor, conv: nn.Conv1d | nn.Conv2d) -> bool:
    """Whether a client's im2col matrix for ``conv`` on batch ``x`` (K, B, C, *S) exceeds
    :data:`IM2COL_MAX` (then its convolutions run faster per client, natively)."""
    B, S = x.shape[1], x.shape[3:]
    out = [
        _out_size(s, k, st, p)
        for s, k, st, p in zip(S, conv.kernel_size, conv.stride, conv.padding, strict=True)
    ]
    return B * math.prod(out) * math.prod(conv.kernel_size) * conv.in_channels > IM2COL_MAX


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(K, B, C, *spatial) -> (K, B, *spatial, C) (a view)."""
    return x.movedim(2, -1)


def head_weight(w: torch.Tensor, channels: int) -> torch.Tensor:
    """A linear layer's weight (K, O, C * prod(S)) that reads ``flatten(1)`` of channels-first
    maps, with its columns reordered for flattened channels-last maps (K, O, prod(S) * C)."""
    K, O, F_ = w.shape
    return w.view(K, O, channels, F_ // channels).transpose(2, 3).reshape(K, O, F_)


def conv_pool_head(
    params: Params, x: torch.Tensor, convs: Sequence[str], head: str, padding: int
) -> torch.Tensor:
    """``conv -> ReLU -> 2x2 max pool`` blocks (``convs``: parameter prefixes, e.g. ``features.0``)
    on channels-first ``x`` (K, B, C, *S), then the linear layer ``head`` on their flattened
    channels-first maps: (K, B, out). The stacked forward of the small CNN and FedAvg's CNN."""
    h = to_channels_last(x)
    for name in convs:
        h = conv(
            h,
            params[f"{name}.weight"],
            params[f"{name}.bias"],
            padding=padding,
            relu=True,
            pool=True,
        )
    K, B, C = h.shape[0], h.shape[1], h.shape[-1]
    return linear(
        h.reshape(K, B, -1), head_weight(params[f"{head}.weight"], C), params[f"{head}.bias"]
    )


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (K, N, F) @ w (K, O, F)^T + b (K, O) -> (K, N, O)."""
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def linear_chain(params: Params, x: torch.Tensor, layers: Sequence[str]) -> torch.Tensor:
    """Linear layers (``layers``: parameter prefixes, e.g. ``net.0``) with ReLU between them on
    K clients' flattened inputs ``x`` (K, B, F) -> (K, B, out): the stacked MLP and logistic
    regression."""
    h = x
    for i, name in enumerate(layers):
        h = linear(h, params[f"{name}.weight"], params.get(f"{name}.bias"))
        if i + 1 < len(layers):
            h = F.relu(h)
    return h


def linear_chain_loss_grad(
    layers: Sequence[str], params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, Params]:
    """Per-sample cross-entropy (K, B) of :func:`linear_chain` and the gradients of
    sum_b weight[k, b] * loss[k, b], by hand (backpropagation through linear and ReLU layers,
    Rumelhart et al. 1986): per layer two batched matrix products and a bias sum, without vmap or
    the autograd engine, whose per-op dispatch and gradient copies cost more than the arithmetic
    for an MLP of 100 clients (W1: digits, 64-64-10)."""
    hs = [x]
    for i, name in enumerate(layers):
        h = linear(hs[-1], params[f"{name}.weight"], params.get(f"{name}.bias"))
        hs.append(h.clamp_min_(0) if i + 1 < len(layers) else h)  # ReLU in place on a fresh output
    per, g = cross_entropy_grad(hs[-1], y, weight)
    grads: Params = {}
    for i in reversed(range(len(layers))):
        name = layers[i]
        grads[f"{name}.weight"] = torch.bmm(g.transpose(1, 2), hs[i])
        if f"{name}.bias" in params:
            grads[f"{name}.bias"] = g.sum(1)
        if i:  # through the layer, then the ReLU that made its input
            g = torch.bmm(g, params[f"{name}.weight"])
            g = torch.ops.aten.threshold_backward(g, hs[i], 0)
    return per, {n: grads[n] for n in params}


def cross_entropy_grad(
    out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy (K, B) of logits ``out`` (K, B, O) and its gradient with respect to
    ``out`` weighted per sample: (softmax - one_hot(y)) * weight. The log-softmax runs over the
    first dimension of a transposed copy: torch's CPU kernel over a short last dimension (10
    classes) takes a scalar path, 7x slower for W1's 800 rows (same loss values; the softmax from
    exp(log_softmax) may differ from torch.softmax's in the last bit). The columns are padded to a
    multiple of :data:`_LANES`, so every sample runs in the kernel's vector lanes, never its scalar
    tail: a sample's numbers do not depend on how many others share the call (STYLE.md point 10)."""
    K, B, O = out.shape
    N = K * B
    cols = out.new_zeros(O, -(-N // _LANES) * _LANES)
    cols[:, :N] = out.reshape(N, O).t()
    logp = torch.log_softmax(cols, 0)[:, :N]  # (O, K * B)
    per = logp.gather(0, y.reshape(1, N)).neg_().view(K, B)
    g = logp.exp().t().reshape(K, B, O)
    g.scatter_add_(-1, y.unsqueeze(-1), g.new_full((K, B, 1), -1.0))
    return per, g.mul_(weight.unsqueeze(-1))


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def conv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    stride: int = 1,
    padding: int = 0,
    relu: bool = False,
    pool: bool = False,
) -> torch.Tensor:
    """Convolution of channels-last ``x`` (K, B, *S, C) with ``w`` (K, O, C, *k) (+ ``b`` (K, O)),
    optionally followed by ReLU and 2x2 max pooling (floor mode) -> (K, B, *S', O)."""
    K, B, *S, C = x.shape
    ks = w.shape[3:]
    out = [_out_size(s, k, stride, padding) for s, k in zip(S, ks, strict=True)]
    if B * math.prod(out) * math.prod(ks) * C <= IM2COL_MAX:
        if b is None:
            b = w.new_zeros(K, w.shape[1])
        return _ConvIm2col.apply(x, w, b, stride, padding, relu, pool)
    y = _conv_native(x, w, b, stride, padding)
    if relu:
        y = F.relu(y)
    return max_pool2(y) if pool else y


def _im2col_sized(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> bool:
    """Whether :func:`conv` runs this convolution as im2col (see :data:`IM2COL_MAX`)."""
    _, B, *S, C = x.shape
    ks = w.shape[3:]
    out = [_out_size(s, k, stride, padding) for s, k in zip(S, ks, strict=True)]
    return B * math.prod(out) * math.prod(ks) * C <= IM2COL_MAX


class _Saved:
    """What :class:`_ConvIm2col`'s passes need from an autograd context, for calling them
    directly (:func:`conv_chain_loss_grad`)."""

    def __init__(self, need_x: bool) -> None:
        self.needs_input_grad = (need_x, True, True)

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


def conv_chain_loss_grad(
    convs: Sequence[tuple[str, str, int, int]],
    head: tuple[str, str],
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, Params] | None:
    """Loss and gradients of ``conv -> ReLU -> 2x2 max pool`` blocks (``convs``: weight name,
    bias name, stride, padding), a flatten and a linear ``head`` under per-sample cross-entropy,
    by hand: the blocks' own backward passes called in reverse order, the head's and the loss's
    gradients written out (softmax minus one-hot, times the sample weight). Same arithmetic as
    differentiating :func:`conv` with autograd, without the engine's bookkeeping (about 30% of a
    small CNN's step). None unless every block is im2col-sized (see :func:`conv`)."""
    h = to_channels_last(x)
    saved = []
    for wn, bn, stride, padding in convs:
        if not _im2col_sized(h, params[wn], stride, padding):
            return None
        ctx = _Saved(need_x=bool(saved))
        h = _ConvIm2col.forward(ctx, h, params[wn], params[bn], stride, padding, True, True)
        saved.append(ctx)
    K, B, C = h.shape[0], h.shape[1], h.shape[-1]
    wn, bn = head
    W = head_weight(params[wn], C)
    f = h.reshape(K, B, -1)
    out = linear(f, W, params[bn])
    per = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(K, B)
    g = torch.softmax(out, -1)
    g.scatter_add_(-1, y.unsqueeze(-1), g.new_full((K, B, 1), -1.0))
    g.mul_(weight.unsqueeze(-1))
    O = g.shape[-1]
    gw = torch.bmm(g.transpose(1, 2), f)  # columns in channels-last order: back to channels-first
    grads = {wn: gw.view(K, O, -1, C).transpose(2, 3).reshape(K, O, -1), bn: g.sum(1)}
    g = torch.bmm(g, W).view(h.shape)
    for ctx, (wn, bn, _, _) in zip(reversed(saved), reversed(convs), strict=True):
        g, grads[wn], grads[bn], *_ = _ConvIm2col.backward(ctx, g)
    return per, grads


def _conv_native(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """Each client's own convolution, in channels-last memory (oneDNN's direct kernels)."""
    fn = F.conv1d if w.dim() == 4 else F.conv2d
    bs = [None] * x.shape[0] if b is None else b.unbind(0)
    outs = [  # unbind, not x[k]: the backward of K selects would add K zero-filled (K, ...) tensors
        fn(xk.movedim(-1, 1), wk, bk, stride=stride, padding=padding).movedim(1, -1)
        for xk, wk, bk in zip(x.unbind(0), w.unbind(0), bs, strict=True)
    ]  # movedim: (B, C, *S) with channels-last strides, no copy
    return torch.stack(outs)


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 (or 2) max pooling, floor mode, of channels-last (K, B, *S, C)."""
    K, B, *S, C = x.shape
    fn = F.max_pool1d if len(S) == 1 else F.max_pool2d
    y = fn(x.reshape(K * B, *S, C).movedim(-1, 1), 2)
    return y.movedim(1, -1).reshape(K, B, *y.shape[2:], C)


def max_pool(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """``kernel`` x ``kernel`` max pooling of channels-last (K, B, H, W, C) with ``stride`` and
    ``padding`` (padded positions never win), e.g. ResNet's 3x3/2 stem pool (He et al. 2016)."""
    K, B, *S, C = x.shape
    y = F.max_pool2d(x.reshape(K * B, *S, C).movedim(-1, 1), kernel, stride, padding)
    return y.movedim(1, -1).reshape(K, B, *y.shape[2:], C)


def group_norm(
    x: torch.Tensor, groups: int, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """GroupNorm of channels-last (K, B, *S, C) with per-client affine ``w``, ``b`` (K, C)."""
    K, B, *S, C = x.shape
    y = F.group_norm(x.reshape(K * B, *S, C).movedim(-1, 1), groups, eps=eps)
    y = y.movedim(1, -1).reshape(x.shape)
    shape = (K, *[1] * (len(S) + 1), C)
    return torch.addcmul(b.view(shape), y, w.view(shape))


class _ConvIm2col(torch.autograd.Function):
    """Convolution (+ ReLU + 2x2 max pooling) of K clients as im2col and one batched matmul.

    The im2col matrix is one strided view of the padded input, copied once: rows ordered (pool
    phase, sample, pooled position), so the P phases of each pooling window are P contiguous blocks
    of the product (max pooling is a running maximum over them; its backward routes each gradient
    to its phase), columns ordered (kernel offset, channel), so the copy reads runs of channels.
    The backward adds each kernel offset's columns back through the same kind of view (one add per
    offset, every phase at once).
    """

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, relu, pool):  # type: ignore[override]
        K, B, *S, C = x.shape
        O, ks = w.shape[1], tuple(w.shape[3:])
        d = len(S)
        out = [_out_size(s, k, stride, padding) for s, k in zip(S, ks, strict=True)]
        n = [o // 2 for o in out] if pool else out
        step = 2 * stride if pool else stride
        xp = F.pad(x, (0, 0) + (padding, padding) * d) if padding else x
        sK, sB, *sS, sC = xp.stride()
        phases = [2] * d if pool else []
        P, J = 2**d if pool else 1, math.prod(ks)
        view = xp.as_strided(
            (K, *phases, B, *n, *ks, C),
            (sK, *[stride * s for s in sS][: len(phases)], sB, *[step * s for s in sS], *sS, sC),
            xp.storage_offset(),
        )
        cols = view.reshape(K, P * B * math.prod(n), J * C)
        wm = w.movedim(2, -1).reshape(K, O, J * C)  # (K, O, *k, C): the columns' order
        z = torch.baddbmm(b.unsqueeze(1), cols, wm.transpose(1, 2))
        arg = None
        if pool:  # running maximum over the phases; the first maximum wins, as in max_pool
            phase = z.view(K, P, -1, O).unbind(1)
            z = phase[0]
            for i in range(1, P):
                take = phase[i] > z
                z = torch.maximum(z, phase[i])
                arg = take if arg is None else torch.where(take, i, arg)
        if relu:
            z = z.clamp_min_(0)
        ctx.save_for_backward(cols, wm, z if relu else None, arg)
        ctx.geometry = (x.shape, xp.shape, ks, n, stride, step, padding, pool)
        ctx.need_x = ctx.needs_input_grad[0]
        return z.view(K, B, *n, O)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        cols, wm, z, arg = ctx.saved_tensors
        shape, pshape, ks, n, stride, step, padding, pool = ctx.geometry
        K, B, *S, C = shape
        d, O = len(S), wm.shape[1]
        P = 2**d if pool else 1
        g = g.reshape(K, -1, O)
        if z is not None:
            g = torch.ops.aten.threshold_backward(g, z, 0)
        if P == 2:  # arg: whether phase 1 held the maximum
            routed = g.new_empty(K, 2, *g.shape[1:])
            torch.mul(g, arg, out=routed[:, 1])
            torch.sub(g, routed[:, 1], out=routed[:, 0])
            g = routed
        elif P > 2:
            g = g.new_zeros(K, P, g.shape[1], O).scatter_(1, arg.unsqueeze(1), g.unsqueeze(1))
        g = g.view(K, -1, O)
        gw = torch.bmm(g.transpose(1, 2), cols).view(K, O, *ks, C).movedim(-1, 2)
        gb = g.sum(1)
        gx = None
        if ctx.need_x:
            phases = [2] * d if pool else []
            gcols = torch.bmm(g, wm).view(K, *phases, B, *n, *ks, C)
            gxp = gcols.new_zeros(pshape)
            sK, sB, *sS, sC = gxp.stride()
            lead = (slice(None),) * (1 + len(phases) + 1 + d)  # K, phases, B, positions
            if pool:  # target (K, B, n_1, phase_1, ..., n_d, phase_d, C)
                size = (K, B, *[v for m in n for v in (m, 2)], C)
                strides = (sK, sB, *[v for s in sS for v in (step * s, stride * s)], sC)
                order = [0, d + 1, *[v for i in range(d) for v in (d + 2 + i, 1 + i)], -1]
            else:
                size, strides = (K, B, *n, C), (sK, sB, *[step * s for s in sS], sC)
                order = [0, 1, *range(2, 2 + d), -1]
            for off in itertools.product(*[range(k) for k in ks]):
                target = gxp.as_strided(
                    size, strides, sum(o * s for o, s in zip(off, sS, strict=True))
                )
                target.add_(gcols[lead + off].permute(*order))
            gx = gxp[(slice(None), slice(None), *[slice(padding, padding + s) for s in S])]
        return gx, gw, gb, None, None, None, None
