"""Evaluation on the client hosts (issue 21 item 4): the test set split across the hosts, each host
scoring the global parameters on its slice in batches, the server adding the hosts' sums.

At start the test set is cut into one contiguous slice per host (:func:`slice_test_set`) and travels
with the host's shard (:class:`EvalShard`, placed once, like the training samples; a host that takes
over a lost host's clients takes over its slice too). At an evaluation round every host runs its
model copy, without gradients, on its device, over its slice in batches and returns
(correct, loss sum, count) (:func:`score`); the server's top-1 accuracy and mean loss are the sums
over hosts divided by the test-set size (:func:`combine`): the single-process numbers up to the
order of the float additions of the loss.

Natural partitions (``partition=natural``: one client per writer or speaking role) also get the
per-client accuracy distribution. The datasets here have no per-client test data, so each client's
local data is split as LEAF splits it (Caldas et al. 2018, ``split_data.sh``: 90/10 by sample
within each user): a seeded 10% of each client's samples (one at least, for clients of two or more)
is held out and never trained on (:func:`holdout`). Hosts score their clients' held-out samples in
the same batches and return per-client counts; the server writes the mean, the 10th percentile
(numpy's linear interpolation) and the worst client's accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from flagstaff.clients.trainer import ParamSpec, loss_fn_for
from flagstaff.system.wire import shared_from_wire, to_wire

__all__ = [
    "EvalPart",
    "EvalShard",
    "HOLDOUT_FRACTION",
    "attach_eval",
    "split_for_eval",
    "combine",
    "eval_shards",
    "holdout",
    "score",
    "slice_test_set",
]

#: the share of each client's samples held out for its own accuracy under partition=natural
#: (LEAF's per-user sample split keeps 90% for training)
HOLDOUT_FRACTION = 0.1


def slice_test_set(n: int, hosts: int) -> list[slice]:
    """``hosts`` contiguous slices of ``range(n)``, sizes differing by at most one."""
    bounds = (np.arange(hosts + 1) * n) // max(1, hosts)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def holdout(
    parts: list[np.ndarray], seed: int, fraction: float = HOLDOUT_FRACTION
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's indices split into (training, held out): a seeded ``fraction`` of them
    (rounded, one at least for clients of two or more samples, none for one), drawn per
    (seed, client) so the split does not depend on the host layout; both halves sorted."""
    train, held = [], []
    for c, p in enumerate(parts):
        p = np.asarray(p)
        k = max(1, int(round(fraction * len(p)))) if len(p) >= 2 else 0
        rng = np.random.default_rng([int(seed), 0xE7A1, c])
        mask = np.zeros(len(p), dtype=bool)
        mask[rng.choice(len(p), size=k, replace=False)] = True
        train.append(np.sort(p[~mask]))
        held.append(np.sort(p[mask]))
    return train, held


@dataclass
class EvalShard:
    """What a host evaluates: its slice of the test set and its clients' held-out samples
    (contiguous, ``client_sizes[i]`` rows of client ``client_ids[i]`` in turn; empty without)."""

    x: torch.Tensor
    y: torch.Tensor
    client_ids: np.ndarray
    client_sizes: np.ndarray
    client_x: torch.Tensor
    client_y: torch.Tensor

    def __reduce__(self) -> tuple[Any, ...]:
        """Numpy arrays on the wire, viewed in Ray's object store without a copy (system/wire.py)."""
        wire = (to_wire(self.x), to_wire(self.y), self.client_ids, self.client_sizes)
        return (_eval_from_wire, (*wire, to_wire(self.client_x), to_wire(self.client_y)))

    def to(self, device: torch.device | str) -> EvalShard:
        """The same shard with its tensors on ``device``."""
        return EvalShard(
            self.x.to(device),
            self.y.to(device),
            self.client_ids,
            self.client_sizes,
            self.client_x.to(device),
            self.client_y.to(device),
        )

    def concat(self, other: EvalShard) -> EvalShard:
        """This shard followed by ``other`` (a lost host's, taken over with its clients)."""
        return EvalShard(
            torch.cat([self.x, other.x.to(self.x.device)]),
            torch.cat([self.y, other.y.to(self.y.device)]),
            np.concatenate([self.client_ids, other.client_ids]),
            np.concatenate([self.client_sizes, other.client_sizes]),
            torch.cat([self.client_x, other.client_x.to(self.client_x.device)]),
            torch.cat([self.client_y, other.client_y.to(self.client_y.device)]),
        )


def _eval_from_wire(x, y, client_ids, client_sizes, client_x, client_y) -> EvalShard:
    return EvalShard(
        shared_from_wire(x),
        shared_from_wire(y),
        client_ids,
        client_sizes,
        shared_from_wire(client_x),
        shared_from_wire(client_y),
    )


def eval_shards(
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    owner: np.ndarray,
    hosts: int,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    held: list[np.ndarray] | None = None,
    transform: Any = None,
) -> list[EvalShard]:
    """One :class:`EvalShard` per host (``owner``: client id -> host id in 0..hosts-1): contiguous
    test slices
    and, with ``held`` (:func:`holdout`), the held-out samples of the host's clients, passed
    through the data's ``transform`` without augmentation (uint8 images -> normalized floats)."""
    out = []
    for h, s in enumerate(slice_test_set(len(y_test), hosts)):
        ids = np.flatnonzero(owner == h) if held is not None else np.empty(0, np.int64)
        rows = [held[c] for c in ids] if held is not None else []
        idx = torch.as_tensor(np.concatenate(rows) if rows else np.empty(0, np.int64))
        cx, cy = x_train[idx], y_train[idx]
        if transform is not None and len(idx):
            cx = transform(cx)
        sizes = np.array([len(r) for r in rows], dtype=np.int64)
        keep = sizes > 0  # a client with nothing held out has no accuracy of its own
        out.append(EvalShard(x_test[s], y_test[s], ids[keep], sizes[keep], cx, cy))
    return out


def split_for_eval(c: dict[str, Any], parts: list[np.ndarray]) -> tuple[list, list | None]:
    """The clients' training indices and, for ``partition=natural``, their held-out ones
    (:func:`holdout`); other partitions train on all their samples (held-out: None)."""
    if (c.get("partition") or {}).get("kind") != "natural":
        return parts, None
    return holdout(parts, int(c["seed"]))


def attach_eval(shards: list[Any], owner: np.ndarray, ds: Any, held: list | None) -> None:
    """Give each host shard (``system.host.HostShard``) its :class:`EvalShard` (``eval``)."""
    evals = eval_shards(
        ds.x_test, ds.y_test, owner, len(shards), ds.x_train, ds.y_train, held, ds.transform
    )
    for shard, ev in zip(shards, evals, strict=True):
        shard.eval = ev


@dataclass
class EvalPart:
    """One host's evaluation sums: test-set (correct, loss sum, count) and, per client with
    held-out samples, (client id, correct, count)."""

    correct: int
    loss_sum: float
    count: int
    client_ids: np.ndarray
    client_correct: np.ndarray
    client_count: np.ndarray


@torch.no_grad()
def score(
    model: torch.nn.Module,
    spec: ParamSpec,
    params: torch.Tensor,
    shard: EvalShard,
    num_classes: int,
    batch: int = 4096,
) -> EvalPart:
    """``shard`` scored with the flat ``params`` in batches of ``batch`` (what
    ``system.server.evaluate_model`` computes for the whole test set in one process)."""
    p = spec.unflatten(params)
    loss_fn = loss_fn_for(num_classes)
    correct, loss_sum = 0, 0.0
    for i in range(0, len(shard.y), batch):
        xb, yb = shard.x[i : i + batch], shard.y[i : i + batch]
        out = functional_call(model, p, (xb,))
        loss_sum += float(loss_fn(out, yb).sum())
        if num_classes > 1:
            correct += int((out.argmax(1) == yb).sum())
    n_own = len(shard.client_ids)
    hits = torch.zeros(n_own, dtype=torch.int64, device=shard.client_y.device)
    if num_classes > 1 and n_own:
        which = torch.repeat_interleave(
            torch.arange(n_own, device=hits.device),
            torch.as_tensor(shard.client_sizes, device=hits.device),
        )
        for i in range(0, len(shard.client_y), batch):  # batched over clients and samples
            xb, yb = shard.client_x[i : i + batch], shard.client_y[i : i + batch]
            ok = (functional_call(model, p, (xb,)).argmax(1) == yb).long()
            hits.index_add_(0, which[i : i + batch], ok)
    return EvalPart(
        correct,
        loss_sum,
        len(shard.y),
        np.asarray(shard.client_ids, dtype=np.int64),
        hits.cpu().numpy(),
        np.asarray(shard.client_sizes, dtype=np.int64),
    )


def combine(parts: list[EvalPart], num_classes: int, per_client: bool = True) -> dict[str, float]:
    """The hosts' sums as metrics: ``loss`` and ``accuracy`` over the test set, and with
    ``per_client`` (and held-out samples) ``accuracy_client_mean``, ``_p10`` and ``_worst``."""
    n = sum(p.count for p in parts)
    res = {"loss": sum(p.loss_sum for p in parts) / n}
    if num_classes > 1:
        res["accuracy"] = sum(p.correct for p in parts) / n
    counts = np.concatenate([p.client_count for p in parts]) if parts else np.empty(0)
    if per_client and num_classes > 1 and len(counts):
        acc = np.concatenate([p.client_correct for p in parts]) / counts
        res["accuracy_client_mean"] = float(acc.mean())
        res["accuracy_client_p10"] = float(np.percentile(acc, 10))
        res["accuracy_client_worst"] = float(acc.min())
    return res
