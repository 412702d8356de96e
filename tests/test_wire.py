"""Tensors across Ray as numpy arrays (system/wire.py): exact round trips, writable results."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from flagstaff.system.host import HostReply
from flagstaff.system.wire import from_wire, to_wire


def _reply() -> HostReply:
    g = torch.Generator().manual_seed(0)
    return HostReply(
        host_id=1,
        client_ids=np.array([3, 5, 9]),
        updates=torch.randn(3, 7, generator=g, dtype=torch.float64),
        weights=torch.tensor([1.0, 2.0, 3.0]),
        losses=torch.randn(3, generator=g),
        train_time_s=0.25,
        extras={"delta_c": torch.randn(3, 7, generator=g)},
        metrics={"epsilon": torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64)},
        finite=torch.tensor([True, False, True]),
        bytes_up=84,
    )


def test_host_reply_pickles_bit_exactly_through_numpy() -> None:
    a = _reply()
    blob = pickle.dumps(a, protocol=5)
    assert b"torch._utils" not in blob  # no torch reducer on the wire
    b = pickle.loads(blob)
    assert isinstance(b.client_ids, np.ndarray) and np.array_equal(b.client_ids, a.client_ids)
    for name in ("updates", "weights", "losses", "finite"):
        x, y = getattr(a, name), getattr(b, name)
        assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and torch.equal(x, y)
    assert torch.equal(b.extras["delta_c"], a.extras["delta_c"])
    assert torch.equal(b.metrics["epsilon"], a.metrics["epsilon"])
    assert (b.host_id, b.train_time_s, b.bytes_up, b.reduced) == (1, 0.25, 84, False)


def test_read_only_arrays_become_writable_tensors_and_bfloat16_stays_a_tensor() -> None:
    arr = np.arange(4, dtype=np.float32)
    arr.flags.writeable = False  # as Ray hands out a received buffer
    t = from_wire(arr)
    t += 1  # a copy: writable, the buffer untouched
    assert arr.tolist() == [0, 1, 2, 3] and t.tolist() == [1, 2, 3, 4]
    bf = torch.ones(3, dtype=torch.bfloat16)
    assert to_wire(bf) is bf and from_wire(to_wire({"b": bf}))["b"] is bf
    assert from_wire(None) is None and to_wire(None) is None


def test_host_shard_pickles_through_numpy_and_views_read_only_samples_without_a_copy() -> None:
    from flagstaff.system.host import HostShard
    from flagstaff.system.wire import shared_from_wire

    x = torch.randn(6, 3)
    shard = HostShard(np.array([2, 7]), np.array([0, 4]), np.array([4, 2]), x, torch.arange(6))
    back = pickle.loads(pickle.dumps(shard, protocol=5))
    assert torch.equal(back.x, x) and torch.equal(back.y, torch.arange(6))
    assert np.array_equal(back.sizes, [4, 2])
    arr = x.numpy().copy()
    arr.flags.writeable = False  # as Ray hands out an object-store buffer
    view = shared_from_wire(arr)
    assert view.data_ptr() == arr.ctypes.data  # the same memory: no copy per host
