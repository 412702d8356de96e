"""Shared workload definitions for the simulation benchmark (W1, W2, W3, W4, CNN, RESNET8, tiny).

Every implementation compared by ``benchmarks/simulation.py`` (Flower, the plain loop, Flagstaff)
must train the *same* model on the *same* data, so everything that decides the arithmetic lives
here and is shared:

* the data: scikit-learn's digits via ``clients.data.load_digits(seed=0)`` (80/20 stratified
  split, standardized on train);
* the client shards (:func:`make_shards`): an IID split of the train set when
  ``samples_per_client`` is ``None`` (``clients.partition.iid``), else ``samples_per_client``
  indices per client drawn uniformly *with replacement* from the train set (so a client may hold
  a sample twice, and clients overlap; ``clients.partition.with_replacement``), seeded by
  ``Workload.seed``, exactly as Flagstaff's ``partition=iid`` / ``with_replacement`` do;
* the clients sampled in each round (:func:`sample_clients`): all clients when
  ``clients_per_round == num_clients``, else Flagstaff's seeded draw without replacement per round;
* the initial model (:func:`build_model`): ``clients.models.build_model("mlp", ...)``;
* the local rule (:func:`local_train`): ``local_epochs`` epochs of plain SGD (no momentum, no
  weight decay) over a per-epoch random permutation of the client's shard, in batches of
  ``batch_size`` (the last batch may be smaller), cross-entropy loss.  The permutation comes from
  a ``torch.Generator`` seeded by :func:`shuffle_seed` ``(seed, round, client)``, so any two
  implementations using it produce the same client models up to float rounding;
* FedAvg (:func:`fedavg_accumulate`): the new global model is ``sum_i (n_i / sum_j n_j) w_i`` over
  the sampled clients, ``n_i`` the client's sample count.

Nothing here imports Ray or Flower; the module is light enough to import in every Ray worker.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: a Flagstaff run starts Ray while torch
    import torch  # imports (as flagstaff-train does), which a module-level import would prevent
    from torch import nn

__all__ = [
    "Workload",
    "W1",
    "W2",
    "W3",
    "W4",
    "CNN",
    "RESNET8",
    "TINY",
    "WORKLOADS",
    "get_workload",
    "TaskData",
    "load_task",
    "make_shards",
    "sample_clients",
    "shuffle_seed",
    "build_model",
    "local_train",
    "fedavg_accumulate",
    "evaluate",
]


@dataclass(frozen=True)
class Workload:
    """One FedAvg benchmark workload: digits with an MLP, or mnist1d with a small CNN.

    Attributes:
        name: short name used on the command line (``w1``, ``w2``, ``w3``, ``tiny``).
        num_clients: number of registered (virtual) clients.
        clients_per_round: clients sampled per round (``== num_clients``: all participate).
        samples_per_client: ``None`` for an IID split of the train set over the clients, else the
            number of train indices drawn with replacement for each client.
        rounds: number of FedAvg rounds.
        local_epochs: local epochs of SGD per sampled client and round.
        batch_size: local mini-batch size.
        lr: local SGD learning rate.
        hidden: hidden layer widths of the MLP (``(64,)``: MLP 64-64-10 on digits, one hidden layer).
        dataset: ``digits`` (scikit-learn's, bundled), ``mnist1d`` (generated offline, as
            Conv1d input (1, 40) when ``model == "cnn"``) or ``cifar_shaped`` (generated images of
            CIFAR-10's shape, ``clients.generated.cifar_shaped``: 1000 train, 500 test).
        model: ``mlp``, ``cnn`` (``clients.models.SmallCNN`` with ``channels`` channels) or
            ``resnet8`` (``clients.models.resnet``, GroupNorm).
        channels: channels of the CNN's convolutions.
        seed: seed of the model initialisation, shards, client sampling and shuffling.
        experiment: the Flagstaff Hydra experiment that defines the same workload
            (``experiment=<name>``).
    """

    name: str
    num_clients: int
    clients_per_round: int
    samples_per_client: int | None
    rounds: int
    local_epochs: int = 1
    batch_size: int = 8
    lr: float = 0.05
    hidden: tuple[int, ...] = (64,)
    seed: int = 0
    experiment: str = ""
    dataset: str = "digits"
    model: str = "mlp"
    channels: int = 16

    def __post_init__(self) -> None:
        if self.num_clients < 1 or self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(f"workload {self.name!r}: clients, rounds and epochs must be >= 1")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"workload {self.name!r}: clients_per_round={self.clients_per_round} must be in "
                f"1..num_clients={self.num_clients}"
            )
        if self.dataset not in DATASETS or self.model not in MODELS:
            raise ValueError(
                f"workload {self.name!r}: dataset {'|'.join(DATASETS)}, model {'|'.join(MODELS)}"
            )
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"workload {self.name!r}: batch_size must be >= 1 and lr > 0")

    def describe(self) -> str:
        """One-line human description of the workload."""
        data = (
            "IID split of the train set"
            if self.samples_per_client is None
            else f"{self.samples_per_client} samples each, drawn with replacement"
        )
        hidden = "-".join(str(h) for h in self.hidden)
        model = {
            "cnn": f"small CNN ({self.channels} channels)",
            "resnet8": "ResNet-8 with GroupNorm",
            "mlp": f"MLP 64-{hidden}-10 (hidden {hidden})",
        }[self.model]
        dataset = {"cifar_shaped": "generated CIFAR-shaped images (3x32x32, 10 classes)"}
        return (
            f"{self.name.upper()}: {dataset.get(self.dataset, self.dataset)}, "
            f"{self.num_clients} clients ({data}), "
            f"{self.clients_per_round} per round, {self.rounds} rounds, {model}, "
            f"{self.local_epochs} local epoch(s) SGD lr {self.lr} batch {self.batch_size}, "
            f"FedAvg weighted by samples, seed {self.seed}"
        )

    def to_json(self) -> str:
        """Serialise to a JSON string (round-trips through :meth:`from_json`)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Workload:
        """Inverse of :meth:`to_json`."""
        fields: dict[str, Any] = json.loads(text)
        fields["hidden"] = tuple(fields["hidden"])
        return cls(**fields)


#: datasets and models a workload may name
DATASETS = ("digits", "mnist1d", "cifar_shaped")
MODELS = ("mlp", "cnn", "resnet8")

W1 = Workload("w1", 100, 100, None, 20, experiment="sim_w1")
W2 = Workload("w2", 1_000, 100, 40, 10, experiment="sim_w2")
W3 = Workload("w3", 10_000, 1_000, 40, 5, experiment="sim_w3")
#: scale (issue 22 item 4): W3's round (1,000 clients of 40 samples) out of 100,000 clients, so the
#: per-round cost per sampled client should match W3's while data, per-client state and partition
#: grow 10x (peak PSS target < 3 GB; docs/cluster.md "Scale")
W4 = Workload("w4", 100_000, 1_000, 40, 5, experiment="sim_w4")
#: mnist1d (4000 train samples, generated offline) with the small CNN, 100 IID clients, 20 per
#: round: the per-client arithmetic is convolutional, not a few tiny matmuls
CNN = Workload(
    "cnn", 100, 20, None, 20, lr=0.05, experiment="sim_cnn", dataset="mnist1d", model="cnn"
)
#: generated CIFAR-shaped images (clients/generated.py) with a ResNet-8 (GroupNorm), 20 clients of
#: 50 samples, all participating: compute-bound rounds (100 local steps of a ResNet at 32x32)
RESNET8 = Workload(
    "resnet8",
    20,
    20,
    None,
    8,
    batch_size=10,
    lr=0.05,
    experiment="sim_resnet8",
    dataset="cifar_shaped",
    model="resnet8",
)
#: A workload that finishes in seconds, for tests and smoke runs (not part of the benchmark).
TINY = Workload("tiny", 10, 10, None, 2, experiment="smoke")

WORKLOADS: dict[str, Workload] = {w.name: w for w in (W1, W2, W3, W4, CNN, RESNET8, TINY)}


def get_workload(name: str) -> Workload:
    """Look a workload up by name (case-insensitive), naming the valid choices on failure."""
    try:
        return WORKLOADS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose {', '.join(WORKLOADS)}") from None


@dataclass(frozen=True)
class TaskData:
    """The train/test tensors of the task and the per-client shards (train index arrays)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    shards: list[np.ndarray]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(self.x_train.shape[1:])

    def client(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of client ``cid`` (gathered from the train set)."""
        import torch

        idx = torch.from_numpy(self.shards[cid])
        return self.x_train[idx], self.y_train[idx]


def make_shards(workload: Workload, y_train: np.ndarray) -> list[np.ndarray]:
    """Client shards as int64 index arrays into the train set (see the module docstring)."""
    if workload.samples_per_client is None:
        from flagstaff.clients.partition import iid

        return [p.astype(np.int64) for p in iid(y_train, workload.num_clients, workload.seed)]
    try:  # Flagstaff's own partitioner (partition=with_replacement), so the shards match it
        from flagstaff.clients.partition import with_replacement
    except ImportError:  # the same draw, for checkouts that predate it
        rng = np.random.default_rng(workload.seed)
        shape = (workload.num_clients, workload.samples_per_client)
        return list(np.sort(rng.integers(0, len(y_train), size=shape), axis=1).astype(np.int64))
    parts = with_replacement(
        y_train, workload.num_clients, workload.samples_per_client, workload.seed
    )
    return [p.astype(np.int64) for p in parts]


def load_task(workload: Workload) -> TaskData:
    """Load the workload's data and build its shards (deterministic in ``workload.seed``)."""
    from flagstaff.clients.data import load_dataset, load_digits

    if workload.dataset == "mnist1d":  # what Flagstaff's data=mnist1d builds (conf/data/mnist1d)
        ds = load_dataset("mnist1d", seed=workload.seed, image=workload.model == "cnn")
    elif workload.dataset == "cifar_shaped":  # as conf/experiment/sim_resnet8.yaml's data
        from flagstaff.clients.generated import cifar_shaped

        ds = cifar_shaped(n_train=1000, n_test=500, num_classes=10, seed=workload.seed)
    else:
        ds = load_digits(seed=0)
    shards = make_shards(workload, ds.y_train.numpy())
    return TaskData(ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.num_classes, shards)


def sample_clients(workload: Workload, server_round: int) -> np.ndarray:
    """Sorted ids of the clients that train in ``server_round`` (rounds count from 1)."""
    if workload.clients_per_round == workload.num_clients:
        return np.arange(workload.num_clients, dtype=np.int64)
    # Flagstaff's draw (system/server.py sample_clients: the stream (seed, round - 1, 0x5A3) of
    # clients/seeds.py), so every implementation trains the same clients in every round
    rng = np.random.default_rng([workload.seed, server_round - 1, 0x5A3])
    picked = rng.choice(workload.num_clients, size=workload.clients_per_round, replace=False)
    return np.sort(picked).astype(np.int64)


def shuffle_seed(seed: int, server_round: int, cid: int) -> int:
    """Seed of the shuffling generator of client ``cid`` in ``server_round``."""
    return int(np.random.SeedSequence([seed, server_round, cid]).generate_state(1)[0])


def build_model(workload: Workload, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The workload's initial model (same seed, same initial parameters everywhere)."""
    from flagstaff.clients.models import build_model as _build

    if workload.model == "resnet8":
        return _build("resnet8", input_shape, num_classes, seed=workload.seed)
    return _build(
        workload.model,
        input_shape,
        num_classes,
        hidden=workload.hidden,
        channels=workload.channels,
        seed=workload.seed,
    )


def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    workload: Workload,
    server_round: int,
    cid: int,
) -> int:
    """Run the local rule in place on ``model``; return the number of samples (FedAvg weight).

    Plain SGD ``p <- p - lr * grad`` (identical to ``torch.optim.SGD`` without momentum or weight
    decay), batches sliced from a seeded per-epoch permutation (no DataLoader: slicing tensors is
    markedly faster for shards of a few dozen samples).
    """
    import torch
    import torch.nn.functional as F

    n = len(y)
    gen = torch.Generator().manual_seed(shuffle_seed(workload.seed, server_round, cid))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(workload.local_epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, workload.batch_size):
            idx = perm[start : start + workload.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.add_(g, alpha=-workload.lr)
    return n


def fedavg_accumulate(
    acc: dict[str, np.ndarray] | None, state: dict[str, torch.Tensor], factor: float
) -> dict[str, np.ndarray]:
    """Add ``factor * state`` to the running FedAvg sum ``acc`` (float32, like Flower's FedAvg)."""
    if acc is None:
        return {k: v.detach().cpu().numpy() * factor for k, v in state.items()}
    for k, v in state.items():
        acc[k] += v.detach().cpu().numpy() * factor
    return acc


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Test loss and accuracy of ``model`` on ``(x, y)``."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = float(F.cross_entropy(logits, y))
        accuracy = float((logits.argmax(1) == y).float().mean())
    return loss, accuracy
