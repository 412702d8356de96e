"""The task of the example: digits split IID over the clients, an MLP 64-64-10, local SGD.

Every process (ServerApp, each ClientApp worker) builds the data once and caches it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from flwr.app import Context

from flagstaff.clients.data import Dataset, load_digits
from flagstaff.clients.flower_app import ClientSetup, poison_if_byzantine
from flagstaff.clients.models import build_model
from flagstaff.clients.partition import iid
from flagstaff.clients.trainer import LocalSGD
from flagstaff.strategies.attacks import build_attack


@lru_cache(maxsize=4)
def dataset(seed: int) -> Dataset:
    return load_digits(seed=seed)


def model(seed: int) -> torch.nn.Module:
    ds = dataset(seed)
    return build_model("mlp", ds.input_shape, ds.num_classes, hidden=(64, 64), seed=seed)


def attack(cfg: dict[str, Any]):
    """The configured Byzantine behaviour (clients 0..byzantine-1)."""
    name = str(cfg.get("attack", "none"))
    f = int(cfg.get("byzantine", 0)) if name != "none" else 0
    return build_attack(name, f=f, seed=int(cfg.get("seed", 0)))


@lru_cache(maxsize=256)
def _client(cid: int, num_clients: int, seed: int, items: tuple) -> ClientSetup:
    cfg = dict(items)
    ds = dataset(seed)
    part = iid(ds.y_train.numpy(), num_clients, seed)[cid]
    x, y = poison_if_byzantine(ds.x_train[part], ds.y_train[part], attack(cfg), cid, 10)
    trainer = LocalSGD(
        lr=float(cfg["lr"]), epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"])
    )
    return ClientSetup(cid, x, y, ds.num_classes, model(seed), trainer, seed=seed)


def setup(context: Context) -> ClientSetup:
    """The ClientSetup of this node (its partition id is its Flagstaff client id)."""
    cfg = dict(context.run_config)
    num = int(context.node_config.get("num-partitions", cfg.get("num-clients", 15)))
    cid = int(context.node_config["partition-id"])
    return _client(cid, num, int(cfg.get("seed", 0)), tuple(sorted(cfg.items())))
