"""Batch plans: which samples every client uses at every local step, reproducible per client.

A plan for K clients is three tensors: ``idx`` (T, K, B) row indices into the host's contiguous data,
``mask`` (T, K, B) marking real samples (partial last batches are padded), and ``active`` (T, K)
marking the steps a client really takes (clients with fewer steps idle, gated, at the end).
Shuffling uses a counter-based hash of (seed, round, client id, epoch, position), so a client's batches
do not depend on which host trains it or which other clients share the round (STYLE.md point 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clients.seeds import mix64

__all__ = ["BatchPlan", "make_plan", "mix64"]


@dataclass(frozen=True)
class BatchPlan:
    """Lockstep schedule of local steps for K clients (see module docstring)."""

    idx: torch.Tensor  # (T, K, B) int64
    mask: torch.Tensor  # (T, K, B) float32
    active: torch.Tensor  # (T, K) bool
    steps: torch.Tensor  # (K,) int64, steps each client takes

    @property
    def num_steps(self) -> int:
        return int(self.idx.shape[0])

    def select(self, k: int) -> BatchPlan:
        """The plan of client k alone, cut to its own number of steps."""
        t = int(self.steps[k])
        return BatchPlan(
            self.idx[:t, k : k + 1],
            self.mask[:t, k : k + 1],
            self.active[:t, k : k + 1],
            self.steps[k : k + 1],
        )


def make_plan(
    offsets: np.ndarray,
    sizes: np.ndarray,
    client_ids: np.ndarray,
    batch_size: int,
    seed: int,
    round_idx: int,
    epochs: int = 1,
    steps: int | None = None,
) -> BatchPlan:
    """Plan ``epochs`` passes (or exactly ``steps`` steps) of shuffled mini-batches per client.

    Matches a DataLoader with shuffle=True, drop_last=False: each epoch is a fresh permutation
    cut into ceil(n/B) batches, the last one possibly partial.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    client_ids = np.asarray(client_ids, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"client.batch_size must be >= 1, got {batch_size}")
    if (sizes < 1).any():
        empty = client_ids[sizes < 1].tolist()
        raise ValueError(
            f"clients {empty} hold no samples; use a partition that gives every "
            "client data (e.g. raise partition.alpha or lower num_clients)"
        )
    K, B = len(sizes), batch_size
    per_epoch = -(-sizes // B)  # ceil
    if steps is not None:
        if steps < 1:
            raise ValueError(f"client.steps must be >= 1, got {steps}")
        total = np.full(K, steps, dtype=np.int64)
        n_epochs = -(-total // per_epoch)
    else:
        if epochs < 1:
            raise ValueError(f"client.epochs must be >= 1, got {epochs}")
        total = per_epoch * epochs
        n_epochs = np.full(K, epochs, dtype=np.int64)
    T = int(total.max())

    # one entry per (client, epoch, position-in-client)
    reps = sizes * n_epochs
    k_of = np.repeat(np.arange(K), reps)
    start = np.repeat(np.cumsum(reps) - reps, reps)
    flat = np.arange(len(k_of)) - start  # running index within client
    e_of = flat // sizes[k_of]
    j_of = flat % sizes[k_of]
    key = mix64(seed, round_idx, client_ids[k_of], e_of, j_of)
    order = np.lexsort((key, e_of, k_of))  # sort by client, epoch, then random key
    sample = j_of[order]  # the permuted sample index at each (client, epoch, position)
    pos = j_of  # after sorting, positions run 0..n-1 within each (client, epoch) block
    k_s, e_s = k_of, e_of  # order preserves the (client, epoch) blocks
    t = e_s * per_epoch[k_s] + pos // B
    slot = pos % B
    keep = t < total[k_s]

    idx = torch.zeros((T, K, B), dtype=torch.int64)
    mask = torch.zeros((T, K, B), dtype=torch.float32)
    tt, kk, ss = (torch.from_numpy(a[keep]) for a in (t, k_s, slot))
    idx[tt, kk, ss] = torch.from_numpy((offsets[k_s] + sample)[keep])
    mask[tt, kk, ss] = 1.0
    steps_t = torch.from_numpy(total)
    active = torch.arange(T)[:, None] < steps_t[None, :]
    return BatchPlan(idx, mask, active, steps_t)
