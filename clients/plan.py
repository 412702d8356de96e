"""Batch plans: which samples every client uses at every local step, reproducible per client.

A plan for K clients is three tensors: ``idx`` (T, K, B) row indices into the host's contiguous data,
``mask`` (T, K, B) marking real samples (partial last batches are padded), and ``active`` (T, K)
marking the steps a client really takes (clients with fewer steps idle, gated, at the end). They are
made on the host's device (``device=``: the data they index lives there), in one copy each; ``steps``
(K,) stays on the CPU: the Python loop over steps reads it, and a read from a GPU would wait for it.
Shuffling uses a counter-based hash of (seed, round, client id, epoch, position), so a client's batches
do not depend on which host trains it or which other clients share the round (STYLE.md point 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flagstaff.clients.seeds import mix64

__all__ = ["BatchPlan", "make_plan", "mix64", "scatter_plan"]


@dataclass(frozen=True)
class BatchPlan:
    """Lockstep schedule of local steps for K clients (see module docstring)."""

    idx: torch.Tensor  # (T, K, B) int64, on the host's device
    mask: torch.Tensor  # (T, K, B) float32, on the host's device
    active: torch.Tensor  # (T, K) bool, on the host's device
    steps: torch.Tensor  # (K,) int64 on the CPU, steps each client takes

    @property
    def num_steps(self) -> int:
        return int(self.idx.shape[0])

    @property
    def full_steps(self) -> int:
        """How many leading steps every client takes (``active[t].all()`` for t below it), read
        from the CPU's ``steps`` so that the loop needs no value from the device."""
        return int(self.steps.min()) if len(self.steps) else 0

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
    device: torch.device | str = "cpu",
) -> BatchPlan:
    """Plan ``epochs`` passes (or exactly ``steps`` steps) of shuffled mini-batches per client,
    its tensors on ``device`` (``steps`` on the CPU).

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

    where = (t[keep], k_s[keep], slot[keep])
    return scatter_plan(where, (offsets[k_s] + sample)[keep], (T, K, B), total, device)


def scatter_plan(
    where: tuple[np.ndarray, np.ndarray, np.ndarray],
    rows: np.ndarray,
    shape: tuple[int, int, int],
    steps: np.ndarray,
    device: torch.device | str = "cpu",
) -> BatchPlan:
    """The plan whose batch slot ``where = (step, client, slot)`` holds data row ``rows`` (the
    other slots are padding: row 0, mask 0); filled in numpy, copied to ``device`` once."""
    idx = np.zeros(shape, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.float32)
    idx[where] = rows
    mask[where] = 1.0
    steps = np.asarray(steps, dtype=np.int64)
    active = np.arange(shape[0])[:, None] < steps[None, :]
    return BatchPlan(
        torch.as_tensor(idx, device=device),
        torch.as_tensor(mask, device=device),
        torch.as_tensor(active, device=device),
        torch.as_tensor(steps, device="cpu"),
    )
