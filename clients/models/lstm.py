"""LEAF's character LSTM for Shakespeare: next-character prediction over an 80-character vocabulary.

Embedding of 8, a 2-layer LSTM with 256 units, a linear output on the last position (Caldas et al.
2018, LEAF's ``shakespeare/stacked_lstm``): 819,920 parameters with PyTorch's two bias vectors per
layer (LEAF's TensorFlow cell has one: 817,872). The LSTM is written as explicit matrix products
(Hochreiter and Schmidhuber 1997, in ``torch.nn.LSTM``'s gate order i, f, g, o and parameter names),
because ``torch.func.vmap`` has no batching rule for ``torch.nn.LSTM``'s fused kernel: written this
way it runs under vmap (per-sample gradients of DP-SGD, any vmap-batched trainer) and equals
``torch.nn.LSTM`` given the same weights (tested). The batched host trainer runs each client through
the fused kernel instead (:meth:`CharLSTM.forward_clients`), which measured fastest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flagstaff.clients.models.stacked import StackedModel

__all__ = ["LSTM", "CharLSTM"]


class LSTM(nn.Module):
    """A multi-layer LSTM (batch first, zero initial state) as explicit matmuls; the parameters
    are named and initialized as ``torch.nn.LSTM``'s (uniform in +-1/sqrt(hidden))."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        bound = 1.0 / math.sqrt(hidden_size)
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            for name, shape in (
                (f"weight_ih_l{k}", (4 * hidden_size, n_in)),
                (f"weight_hh_l{k}", (4 * hidden_size, hidden_size)),
                (f"bias_ih_l{k}", (4 * hidden_size,)),
                (f"bias_hh_l{k}", (4 * hidden_size,)),
            ):
                self.register_parameter(
                    name, nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, input) -> outputs of the last layer at every position (B, T, hidden)."""
        for k in range(self.num_layers):
            x = lstm_layer(
                x,
                getattr(self, f"weight_ih_l{k}"),
                getattr(self, f"weight_hh_l{k}"),
                getattr(self, f"bias_ih_l{k}") + getattr(self, f"bias_hh_l{k}"),
            )
        return x


def lstm_layer(
    x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """One LSTM layer over (..., T, input) with zero initial state; ``w_ih`` (4H, input), ``w_hh``
    (4H, H), ``bias`` (4H,); leading dimensions of ``x`` are batch dimensions."""
    return recurrence(F.linear(x, w_ih, bias), w_hh)  # all positions' input products at once


def recurrence(xw: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:
    """The LSTM recurrence over input products ``xw`` (..., T, 4H) with zero initial state and
    recurrent weights ``w_hh`` (4H, H) -> outputs (..., T, H)."""
    H = w_hh.shape[-1]
    w = w_hh.transpose(-1, -2)
    h = c = xw.new_zeros(*xw.shape[:-2], H)
    outs = []
    for t in range(xw.shape[-2]):
        gates = xw[..., t, :] + h @ w
        s = torch.sigmoid(gates)
        i, f, o = s[..., :H], s[..., H : 2 * H], s[..., 3 * H :]
        c = f * c + i * torch.tanh(gates[..., 2 * H : 3 * H])
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=-2)


class CharLSTM(StackedModel):
    """Embedding - LSTM - linear head on the last position; input (B, T) character indices (any
    numeric dtype: a data set stored as float32 indices works as it is)."""

    stacked_modules = (LSTM,)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        vocab_size: int = 80,
        embed_dim: int = 8,
        hidden: int = 256,
        layers: int = 2,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(
                f"model=lstm_shakespeare needs character sequences (T,) as input, got "
                f"{tuple(input_shape)}; use a next-character data set (Shakespeare: 80 characters)"
            )
        if num_classes > vocab_size:
            raise ValueError(
                f"the data has {num_classes} classes but model.vocab_size={vocab_size}; set "
                f"model.vocab_size={num_classes} (or more)"
            )
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = LSTM(embed_dim, hidden, layers)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lstm(self.embed(x.long()))
        return self.head(h[..., -1, :])

    def forward_clients(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """K clients, each through PyTorch's fused LSTM kernel (``torch.lstm``, the same function
        as :class:`LSTM`): per client, its 1 MB recurrent weights stay in cache over the 80
        positions, where the recurrence batched over clients (one ``bmm`` per position) reads K
        clients' weights from memory at every position and measured slower (docs/models.md)."""
        L, H = self.lstm.num_layers, self.lstm.hidden_size
        names = [
            f"lstm.{w}_l{k}"
            for k in range(L)
            for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        ]
        per = [params[n].unbind(0) for n in ("embed.weight", "head.weight", "head.bias", *names)]
        outs = []
        for xk, emb, hw, hb, *weights in zip(x.unbind(0), *per, strict=True):
            h = F.embedding(xk.long(), emb)
            zero = h.new_zeros(L, h.shape[0], H)
            out = torch.lstm(h, (zero, zero), weights, True, L, 0.0, True, False, True)[0]
            outs.append(F.linear(out[:, -1], hw, hb))
        return torch.stack(outs)
