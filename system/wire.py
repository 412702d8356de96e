"""Tensors across Ray as numpy arrays.

Ray serializes numpy arrays as pickle-5 out-of-band buffers, while a torch tensor goes through
torch's own reducer (``torch.save`` into bytes and ``torch.load`` back). For the small tensors of a
simulation round that reducer dominates: on W1 (benchmarks/simulation.py) an actor call that takes
a 4,810-float parameter vector and returns four small tensors cost about 1.9 + 1.6 ms with tensors
and 1.0 + 0.9 ms with arrays. The host pool sends parameters and the hosts send replies through
these helpers; the local backend never serializes and does not use them.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["INLINE_BYTES", "from_wire", "shared_from_wire", "to_wire"]

#: objects up to this size travel inside the task message; larger ones go through the object store
#: once per round (Ray's own ``max_direct_call_object_size`` is 100 KiB)
INLINE_BYTES = 100 * 1024


def to_wire(x: Any) -> Any:
    """A CPU tensor as a numpy array (shares memory); a dict of tensors value by value; other
    objects, and tensors whose dtype numpy lacks (bfloat16), unchanged."""
    if isinstance(x, dict):
        return {k: to_wire(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.dtype != torch.bfloat16:
        return x.detach().cpu().numpy()
    return x


def from_wire(x: Any) -> Any:
    """Inverse of :func:`to_wire`: arrays back to tensors. Arrays Ray hands out read-only (views of
    the received buffer) are copied, so the tensor is writable like one torch.load returns."""
    if isinstance(x, dict):
        return {k: from_wire(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x if x.flags.writeable else x.copy())
    return x


def shared_from_wire(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor viewing the received array without a copy, for data the receiver only reads (a
    host's client samples): a read-only array stays backed by Ray's object store, so the samples
    are in memory once per node instead of once more per host. Never write into the result."""
    if isinstance(x, torch.Tensor):
        return x
    if x.flags.writeable:
        return torch.from_numpy(x)
    with warnings.catch_warnings():  # torch warns that it cannot mark a tensor read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)
