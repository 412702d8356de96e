"""Flagstaff clients as a Flower ClientApp (flwr 1.41 Message API).

``make_client_app(setup)`` returns a :class:`flwr.clientapp.ClientApp` whose ``train`` handler runs a
Flagstaff local trainer (``clients.trainer.LocalSGD`` or any object with the same ``train``
signature, e.g. a DP-SGD trainer) with the strategy's local rule, ``evaluate`` reports loss and
accuracy of the received model on the client's evaluation data, and ``query`` tells the server the
client id, its partition id (asked before round 1 by ``FlagstaffStrategy(..., discover=True)``, so
sampling and the Byzantine ids follow partition ids, not Flower's random node ids); every train and
evaluate reply carries it too (metric ``client-id``).

Byzantine behaviour in Flower (DESIGN.md "Adversary"): the Byzantine clients are the ``attack.f``
clients with the lowest ids. Data poisoning (label flip, noisy data) happens here, in the client,
via :func:`poison_if_byzantine` when the client's data is loaded. Model poisoning (sign flip, ALIE,
IPM, ...) needs every honest update of the round, so the server-side adapter
(``strategies.flower.FlagstaffStrategy``) replaces the replies of the Byzantine client ids before
aggregation; those clients train honestly here.

Per-client state of the local rule (SCAFFOLD's c_i, FedSpeed's ghat_i) persists across rounds in
``context.state`` (an ArrayRecord under ``flagstaff.client_state``), so a client keeps it for the
whole run on its SuperNode; so does a DP-SGD client's Opacus accountant history
(``clients.dp.DPSGDTrainer``; ConfigRecord ``flagstaff.accountant``), whose epsilon is reported
with every reply (metric ``epsilon``, sample-level). Message layout (what ``strategies.flower`` sends and expects):

* train instruction: ``arrays`` (global model, one array per trainable parameter), ``config``
  (``server-round``, ``flagstaff.round``), ``flagstaff.broadcast`` (server vectors, e.g. SCAFFOLD's c);
* train reply: ``arrays`` (the update x_K - x_t in the model's layout, or the trained model for
  plain Flower clients), ``metrics`` (``num-examples``, ``client-id``, ``train_loss`` unless the
  trainer is differentially private, ``epsilon`` when it is),
  ``flagstaff.reply`` (``payload = "update"``) and ``flagstaff.extras`` (per-client extra vectors).

Reference: Flower 1.41 ClientApp (``@app.train``, ``@app.evaluate``, ``@app.query``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.func import functional_call

from flagstaff.clients.plan import make_plan
from flagstaff.clients.rules import LocalRule
from flagstaff.clients.seeds import stream
from flagstaff.clients.trainer import ParamSpec, loss_fn_for

__all__ = [
    "ClientSetup",
    "make_client_app",
    "model_to_arrays",
    "arrays_to_vector",
    "vector_to_arrays",
    "poison_if_byzantine",
    "record_to_vectors",
    "vectors_to_record",
    "BROADCAST_KEY",
    "EXTRAS_KEY",
    "REPLY_KEY",
    "STATE_KEY",
]

BROADCAST_KEY = "flagstaff.broadcast"
EXTRAS_KEY = "flagstaff.extras"
REPLY_KEY = "flagstaff.reply"
STATE_KEY = "flagstaff.client_state"
ACCOUNTANT_KEY = "flagstaff.accountant"


# -- ArrayRecord <-> flat vectors ------------------------------------------------------------------
def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's trainable parameters as an ArrayRecord (one array per parameter, in order)."""
    return ArrayRecord(
        {n: Array(p.detach().cpu().numpy()) for n, p in model.named_parameters() if p.requires_grad}
    )


def arrays_to_vector(record: ArrayRecord, names: tuple[str, ...] | None = None) -> torch.Tensor:
    """Concatenate the arrays ``names`` (default: the record's order) into one float32 vector."""
    names = tuple(record.keys()) if names is None else names
    missing = [n for n in names if n not in record]
    if missing:
        raise KeyError(f"ArrayRecord lacks arrays {missing[:5]}; it holds {list(record)[:5]}...")
    parts = [np.asarray(record[n].numpy(), dtype=np.float32).reshape(-1) for n in names]
    flat = np.concatenate(parts) if parts else np.empty(0, np.float32)
    return torch.from_numpy(flat)


def vector_to_arrays(
    flat: torch.Tensor,
    names: tuple[str, ...],
    shapes: tuple[tuple[int, ...], ...],
    dtypes: tuple[str, ...] | None = None,
) -> ArrayRecord:
    """Inverse of :func:`arrays_to_vector`: cut ``flat`` into named arrays of the given shapes."""
    data = flat.detach().cpu().numpy()
    out, i = {}, 0
    for k, (name, shape) in enumerate(zip(names, shapes, strict=True)):
        n = int(np.prod(shape)) if shape else 1
        arr = data[i : i + n].reshape(shape)
        if dtypes is not None:
            arr = arr.astype(dtypes[k], copy=False)
        out[name] = Array(np.ascontiguousarray(arr))
        i += n
    if i != data.size:
        raise ValueError(f"vector of length {data.size} does not fit arrays of total size {i}")
    return ArrayRecord(out)


def vectors_to_record(vectors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({n: Array(v.detach().cpu().numpy()) for n, v in vectors.items()})


def record_to_vectors(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    if record is None:
        return {}
    return {n: torch.from_numpy(np.array(a.numpy(), copy=True)) for n, a in record.items()}


# -- Byzantine data poisoning ----------------------------------------------------------------------
def poison_if_byzantine(
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Any,
    client_id: int,
    num_classes: int,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a data-poisoning attack (a ``clients.byzantine.Attack``, or None) to client
    ``client_id``'s data if it is Byzantine (id < f).

    Uses the same generator as the Ray/local runtimes (``clients.seeds.stream(seed, client,
    scheme="poison")``), so a label-flip client trains on the same data under every backend.
    Model attacks: unchanged.
    """
    if attack is None or attack.kind != "data" or attack.name == "none" or client_id >= attack.f:
        return x, y
    gen = stream(int(attack.seed if seed is None else seed), int(client_id), scheme="poison")
    return attack.poison(x, y, num_classes, gen)


# -- the client -------------------------------------------------------------------------------------
@dataclass
class ClientSetup:
    """What one Flagstaff client needs inside a Flower ClientApp.

    ``trainer``: a ``clients.trainer.Trainer`` (``LocalSGD``, a DP-SGD trainer; its declared hooks
    are asked, not probed); ``rule``: the strategy's
    local rule (None: plain SGD); ``seed``: the run's root seed (batch plans depend on it and on the
    client id and round, so a client draws the same batches as under the ray/local backends).
    ``x_eval``/``y_eval``: data for the ``evaluate`` handler (default: the training data).
    """

    client_id: int
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    model: nn.Module
    trainer: Any
    rule: LocalRule | None = None
    seed: int = 0
    x_eval: torch.Tensor | None = None
    y_eval: torch.Tensor | None = None
    spec: ParamSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = ParamSpec.of(self.model)  # the trainer passes parameters functionally
        if self.spec.numel == 0:
            raise ValueError("ClientSetup.model has no trainable parameters (requires_grad=True)")


def _round_idx(config: ConfigRecord) -> int:
    if "flagstaff.round" in config:
        return int(config["flagstaff.round"])
    return int(config.get("server-round", 1)) - 1


def _train(setup: ClientSetup, message: Message, context: Context) -> Message:
    content = message.content
    config = content.config_records.get("config", ConfigRecord())
    r = _round_idx(config)
    spec = setup.spec
    global_flat = arrays_to_vector(content.array_records["arrays"], spec.names)
    n = len(setup.y)
    tr = setup.trainer
    plan = make_plan(
        np.zeros(1, np.int64),
        np.array([n], np.int64),
        np.array([setup.client_id], np.int64),
        tr.batch_size,
        setup.seed,
        r,
        epochs=tr.epochs,
        steps=tr.steps,
    )
    names = setup.rule.client_state if setup.rule is not None else ()
    stored = record_to_vectors(context.state.array_records.get(STATE_KEY))
    state = {nm: stored.get(nm, torch.zeros(spec.numel)).unsqueeze(0) for nm in names}
    bcast = record_to_vectors(content.array_records.get(BROADCAST_KEY))
    per_client = {}
    if tr.per_client:  # DP-SGD: per-client Opacus objects and accountant
        per_client = {"client_ids": np.array([setup.client_id]), "offsets": np.zeros(1, np.int64)}
        _restore_accountant(tr, setup.client_id, context)
    res = tr.train(
        setup.model,
        spec,
        global_flat,
        setup.x,
        setup.y,
        plan,
        setup.num_classes,
        torch.tensor([n]),
        rule=setup.rule,
        state=state,
        broadcast=bcast,
        round_idx=r,
        **per_client,
    )
    if tr.epsilon_kind is not None:
        _save_accountant(tr, setup.client_id, context)
    if names:
        context.state[STATE_KEY] = vectors_to_record({nm: v[0] for nm, v in res.state.items()})
    metrics = {"num-examples": int(n), "client-id": int(setup.client_id)}
    if tr.epsilon_kind is None:  # under DP the un-noised loss is not covered by epsilon
        metrics["train_loss"] = float(res.losses[0])
    metrics.update({k: float(v[0]) for k, v in res.metrics.items()})
    reply = RecordDict(
        {
            "arrays": vector_to_arrays(res.updates[0], spec.names, spec.shapes),
            "metrics": MetricRecord(metrics),
            REPLY_KEY: ConfigRecord({"payload": "update"}),
        }
    )
    if res.extras:
        reply[EXTRAS_KEY] = vectors_to_record({nm: v[0] for nm, v in res.extras.items()})
    return Message(reply, reply_to=message)


def _restore_accountant(trainer: Any, cid: int, context: Context) -> None:
    """Give a DP trainer the client's accountant history kept in ``context.state``: the worker
    process that trains a client may change between rounds, the history must not reset."""
    rec = context.state.config_records.get(ACCOUNTANT_KEY)
    if rec is not None:
        hist = json.loads(str(rec["history"]))
        trainer.load_state_dict({"accountant": rec["accountant"], "histories": {cid: hist}})


def _save_accountant(trainer: Any, cid: int, context: Context) -> None:
    """Keep the client's accountant history (the trainer's declared ``state_dict``) in its node's
    ``context.state``."""
    state = trainer.state_dict()
    hist = state.get("histories", {}).get(int(cid), [])
    context.state[ACCOUNTANT_KEY] = ConfigRecord(
        {"history": json.dumps([list(h) for h in hist]), "accountant": str(state["accountant"])}
    )


@torch.no_grad()
def _evaluate(setup: ClientSetup, message: Message) -> Message:
    x = setup.x if setup.x_eval is None else setup.x_eval
    y = setup.y if setup.y_eval is None else setup.y_eval
    flat = arrays_to_vector(message.content.array_records["arrays"], setup.spec.names)
    out = functional_call(setup.model, setup.spec.unflatten(flat), (x,))
    metrics = {
        "num-examples": len(y),
        "client-id": int(setup.client_id),
        "eval_loss": float(loss_fn_for(setup.num_classes)(out, y).mean()),
    }
    if setup.num_classes > 1:
        metrics["eval_acc"] = float((out.argmax(1) == y).float().mean())
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


def make_client_app(setup: Callable[[Context], ClientSetup]) -> ClientApp:
    """A Flower ClientApp running Flagstaff clients; ``setup(context)`` builds (or returns a
    cached) :class:`ClientSetup` for the node, typically from ``context.node_config["partition-id"]``.

    ``setup`` must be picklable (Flower's simulation ships the app to its Ray actors); cache data
    and models at module level so each worker process builds them once.
    """
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return _train(setup(context), message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return _evaluate(setup(context), message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        s = setup(context)
        metrics = MetricRecord({"client-id": int(s.client_id), "num-examples": len(s.y)})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app
