"""Flower adapter: any Flagstaff aggregator and server strategy as a flwr 1.41 ``Strategy``.

:class:`FlagstaffStrategy` implements Flower's Message-API strategy (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``, ``summary``) and is run with
``strategy.start(grid=..., initial_arrays=..., num_rounds=...)`` like Flower's own FedAvg. One round:

sample clients -> send the global arrays (+ the strategy's broadcast vectors) -> replies' arrays to
flat vectors -> the server step that the parameter server runs too (``strategies.server_step``:
sorted by client id, non-finite clients dropped, model-poisoning attack on the Byzantine client ids
over updates and per-client extras, pre-aggregation, aggregator, strategy update, privacy metrics),
so any Flagstaff strategy (FedAvg/FedAvgM, FedProx, SCAFFOLD, FedSpeed, FedAdam, FedSVD, client-level
DP ``strategies.dp.ClientLevelDP``, ...) and any aggregator behave as under backend=local and ray.

Replies from Flagstaff's ClientApp (``clients.flower_app``) carry the update itself; replies from a
plain Flower ClientApp (``flwr new``'s template: ``@app.train`` / ``@app.evaluate`` only) carry the
trained model (Flower's convention) and the adapter subtracts the global model.

Client ids: nodes are found with Flower's ``grid.get_node_ids()`` and replies identified by
``message.metadata.src_node_id``. Flower's node ids are random unsigned 64-bit integers, so they are
never used as client ids: a node gets the next free client id 0, 1, ... when it is first seen (the
nodes seen together in node-id order), kept for the run (:meth:`FlagstaffStrategy.client_ids`). A
reply's ``client-id`` metric (Flagstaff's ClientApp reports its partition id) identifies the reply
instead; with ``discover=True`` (off by default: an ordinary ClientApp has no ``query`` handler)
every new node is asked once with a ``query`` message, and the ``client-id`` its ClientApp answers
becomes its client id for sampling too (deterministic across runs; what backend=flower uses).

Byzantine clients in Flower: the ``byzantine`` client ids (default ``0..attack.f-1``, as in the
Ray/local runtimes) train like everyone else; this adapter replaces their replies, extras included,
with the attack's vectors before aggregation (the omniscient adversary of the threat model), and
the strategy combines the extras with the same aggregator (``strategies.base.ExtrasAggregation``),
exactly as the parameter server does. Data-poisoning attacks
act in the ClientApp instead (``clients.flower_app.poison_if_byzantine``).

Reference: Flower 1.41 ``flwr.serverapp.strategy.Strategy``; McMahan et al. 2017 (FedAvg).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from flagstaff.clients.byzantine import NoAttack
from flagstaff.clients.flower_app import (
    BROADCAST_KEY,
    EXTRAS_KEY,
    REPLY_KEY,
    arrays_to_vector,
    record_to_vectors,
    vector_to_arrays,
    vectors_to_record,
)
from flagstaff.clients.seeds import stream
from flagstaff.clients.trainer import ParamSpec
from flagstaff.strategies.attacks import Adversary
from flagstaff.strategies.base import Strategy
from flagstaff.strategies.fedavg import FedAvg
from flagstaff.strategies.server_step import Replies, ServerStep, skip_reason

__all__ = ["FlagstaffStrategy", "Sampler"]

log = logging.getLogger("flwr")

#: ``sampler(client_ids, round_idx) -> chosen client ids`` (0-based round index)
Sampler = Callable[[np.ndarray, int], np.ndarray]


class FlagstaffStrategy(FlowerStrategy):
    """A Flower strategy that aggregates with a Flagstaff aggregator and updates with a Flagstaff
    server strategy.

    ``aggregator``: any ``agg(U (n, d), weights) -> (d,)`` (e.g. ``strategies.aggregators.build(
    rule="flag", f=3, pre=["nnm"])``); ``strategy``: a Flagstaff server strategy (default FedAvg);
    ``attack``: a ``strategies.attacks`` attack (model attacks are applied here; data attacks are
    the ClientApp's); ``byzantine``: Byzantine client ids (default ``range(attack.f)``).
    ``fraction_train``/``min_train_nodes``/``min_available_nodes``: Flower-style sampling, or
    ``sampler`` for an exact rule; ``fraction_evaluate=0`` disables federated evaluation (use
    ``start(..., evaluate_fn=...)`` for central evaluation). ``discover``: ask every new node for
    its ``client-id`` with a ``query`` message before sampling (only for ClientApps with a ``query``
    handler, e.g. ``clients.flower_app.make_client_app``; a node that answers with an error keeps
    its node-order id). ``round_offset``: Flagstaff round index
    of Flower's round 1 (resumed runs). ``model``: the global model, for strategies that need
    the parameter layout (``bind``; FedSVD). ``private``: the clients or the strategy are
    differentially private (no train loss in the metrics; clients that report an ``epsilon`` make
    the round private too); ``delta``: reported beside epsilon.
    """

    def __init__(
        self,
        aggregator: Callable[..., torch.Tensor],
        strategy: Any | None = None,
        *,
        attack: Any | None = None,
        byzantine: Iterable[int] | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 2,
        sampler: Sampler | None = None,
        seed: int = 0,
        discover: bool = False,
        weighted_by_key: str = "num-examples",
        num_clients: int | None = None,
        round_offset: int = 0,
        timeout: float = 600.0,
        model: torch.nn.Module | None = None,
        private: bool = False,
        delta: float | None = None,
    ) -> None:
        if not 0.0 <= fraction_train <= 1.0 or not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError("fraction_train and fraction_evaluate must be in [0, 1]")
        self.aggregator = aggregator
        self.strategy: Strategy = strategy if strategy is not None else FedAvg()
        self.attack = attack
        self.adversary = Adversary(
            attack if attack is not None else NoAttack(), num_clients, byzantine
        )
        active = self.adversary.active
        self.byzantine = {int(c) for c in self.adversary.byzantine} if active else set()
        # the server half of every round, shared with the parameter server
        self.step = ServerStep(
            self.strategy,
            aggregator,
            self.adversary,
            num_clients=num_clients,
            private=private,
            delta=delta,
        )
        self.extras_aggregation = self.step.extras_aggregation
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_nodes = min_evaluate_nodes
        self.sampler = sampler
        self.seed = int(seed)
        self.discover = discover
        self.weighted_by_key = weighted_by_key
        self.num_clients = num_clients
        self.round_offset = int(round_offset)
        self.timeout = float(timeout)
        if model is not None:  # the parameter layout (FedSVD needs it)
            self.strategy.bind(model, ParamSpec.of(model))
        # global state (set by ``initialize`` or the first ``configure_train``)
        self.names: tuple[str, ...] = ()
        self.shapes: tuple[tuple[int, ...], ...] = ()
        self.dtypes: tuple[str, ...] = ()
        self.params: torch.Tensor | None = None
        self.state: dict[str, Any] = {}
        self.node_to_client: dict[int, int] = {}
        self.last_metrics: dict[str, Any] = {}
        self._t0 = self._t_sent = 0.0
        self._sent = 0

    # -- state -----------------------------------------------------------------------------------
    def initialize(self, arrays: ArrayRecord) -> None:
        """Take the layout and the initial global parameters from ``arrays``; init the strategy."""
        self.names = tuple(arrays.keys())
        self.shapes = tuple(tuple(a.shape) for a in arrays.values())
        self.dtypes = tuple(str(a.dtype) for a in arrays.values())
        self.params = arrays_to_vector(arrays, self.names)
        self.state = self.strategy.init(self.params)

    def arrays(self) -> ArrayRecord:
        """The current global parameters as an ArrayRecord (the layout of the initial arrays)."""
        assert self.params is not None, "call initialize() or start() first"
        return vector_to_arrays(self.params, self.names, self.shapes, self.dtypes)

    def state_dict(self) -> dict[str, Any]:
        """Global parameters, strategy, aggregator and attack state (for checkpoints)."""
        step = self.step.state_dict()
        return {
            "params": None if self.params is None else self.params.clone(),
            "strategy": self.strategy.state_dict(self.state),
            "aggregator": step["aggregator"],
            "extras_aggregation": step["extras_aggregation"],
            "adversary": step["adversary"],
            "privacy": step["privacy"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.params = state["params"].clone()
        self.state = self.strategy.load_state(state["strategy"])
        self.step.load_state_dict(state)

    def privacy_metrics(self) -> dict[str, Any]:
        """epsilon (worst client seen), epsilon_kind, ... as the parameter server reports them
        (``ServerStep.privacy_metrics``)."""
        return self.step.privacy_metrics(self.state)

    def summary(self) -> None:
        """Log the configuration (Flower calls this at ``start``)."""
        log.info("\t├──> Flagstaff aggregator: %r", self.aggregator)
        log.info("\t├──> Flagstaff strategy: %r", self.strategy)
        log.info("\t├──> Attack: %r on client ids %s", self.attack, sorted(self.byzantine))
        log.info(
            "\t└──> Sampling: fraction_train %.2f (min %d), fraction_evaluate %.2f",
            self.fraction_train,
            self.min_train_nodes,
            self.fraction_evaluate,
        )

    # -- node ids -> client ids ------------------------------------------------------------------
    def _wait_nodes(self, grid: Grid, need: int) -> list[int]:
        t_end = time.monotonic() + self.timeout
        while len(nodes := sorted(grid.get_node_ids())) < need:
            if time.monotonic() > t_end:
                raise TimeoutError(f"only {len(nodes)} of {need} nodes connected")
            time.sleep(0.2)
        return nodes

    def client_ids(self, nodes: Iterable[int]) -> dict[int, int]:
        """Client id of every node in ``nodes``: its id so far, else the next free ids 0, 1, ...
        given to the new nodes in node-id order. Node ids stay Python ints (Flower's are unsigned
        64-bit, beyond int64); client ids are small and stable for the run."""
        nodes = [int(n) for n in nodes]
        new = sorted(set(nodes) - self.node_to_client.keys())
        if new:
            used = set(self.node_to_client.values())
            free = (c for c in itertools.count() if c not in used)
            self.node_to_client.update(zip(new, free, strict=False))  # free is endless
        return {n: self.node_to_client[n] for n in nodes}

    def _discover(self, grid: Grid, nodes: list[int]) -> None:
        """Ask the nodes not seen before for their ``client-id`` (one ``query`` message each)."""
        new = [n for n in nodes if n not in self.node_to_client]
        if not new:
            return
        msgs = [Message(RecordDict({"config": ConfigRecord()}), n, MessageType.QUERY) for n in new]
        found: dict[int, int] = {}
        for rep in grid.send_and_receive(msgs, timeout=self.timeout):
            src = int(rep.metadata.src_node_id)
            metrics = {} if rep.has_error() else _metrics(rep)
            if "client-id" in metrics:
                found[src] = int(metrics["client-id"])
            else:
                why = rep.error.reason if rep.has_error() else "no client-id in its reply"
                log.warning("node %d: no client id (%s); it gets the next free id", src, why)
        taken = set(self.node_to_client.values())
        for src, cid in sorted(found.items(), key=lambda kv: kv[1]):
            if cid in taken:
                log.warning("node %d: client id %d is taken; it gets the next free id", src, cid)
                continue
            self.node_to_client[src] = cid
            taken.add(cid)

    def _sample(self, mapping: dict[int, int], round_idx: int) -> list[int]:
        by_client = {c: n for n, c in mapping.items()}
        ids = np.array(sorted(by_client), dtype=np.int64)
        if self.sampler is not None:
            chosen = np.asarray(self.sampler(ids, round_idx), dtype=np.int64)
        else:
            k = max(int(len(ids) * self.fraction_train), self.min_train_nodes)
            k = min(k, len(ids))
            rng = stream(self.seed, round_idx, 0xF1, kind="numpy")
            chosen = np.sort(rng.choice(ids, size=k, replace=False))
        return [by_client[int(c)] for c in chosen]

    # -- training --------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients and send them the global arrays and the strategy's broadcast vectors."""
        self._t0 = time.perf_counter()
        if self.params is None:
            self.initialize(arrays)
        if self.fraction_train == 0.0:
            return []
        nodes = self._wait_nodes(grid, max(self.min_available_nodes, self.min_train_nodes))
        if self.discover:
            self._discover(grid, nodes)
        chosen = self._sample(self.client_ids(nodes), self.round_offset + server_round - 1)
        record = self.train_content(server_round, config)
        self._sent = len(chosen)
        messages = [Message(record, n, MessageType.TRAIN) for n in chosen]
        self._t_sent = time.perf_counter()
        return messages

    def train_content(self, server_round: int, config: ConfigRecord) -> RecordDict:
        """What every sampled client receives: global arrays, config, broadcast vectors."""
        assert self.params is not None
        config["server-round"] = server_round
        config["flagstaff.round"] = self.round_offset + server_round - 1
        content = {"arrays": self.arrays(), "config": config}
        bcast = self.strategy.broadcast(self.params, self.state)
        if bcast:
            content[BROADCAST_KEY] = vectors_to_record(bcast)
        return RecordDict(content)

    def _reply_rows(self, replies: Sequence[Message]) -> Replies:
        """The replies as the server step's rows: client ids, updates (n, d), weights, losses,
        extras and the epsilon of sample-level DP clients (in arrival order; the step sorts)."""
        assert self.params is not None
        cids, rows, weights, losses, extras, eps = [], [], [], [], [], []
        by_node = self.client_ids(m.metadata.src_node_id for m in replies)
        for msg in replies:
            content = msg.content
            metrics = _metrics(msg)
            src = int(msg.metadata.src_node_id)
            cids.append(int(metrics.get("client-id", by_node[src])))
            weights.append(float(metrics.get(self.weighted_by_key, 1.0)))
            losses.append(float(metrics.get("train_loss", float("nan"))))
            if "epsilon" in metrics:  # sample-level DP clients report their accountant's epsilon
                eps.append(float(metrics["epsilon"]))
            arr = content.array_records.get("arrays") or next(iter(content.array_records.values()))
            vec = arrays_to_vector(arr, self.names)
            kind = content.config_records.get(REPLY_KEY, ConfigRecord()).get("payload", "model")
            rows.append(vec if kind == "update" else vec - self.params)
            extras.append(record_to_vectors(content.array_records.get(EXTRAS_KEY)))
        if len(set(cids)) < len(cids):
            dup = sorted({c for c in cids if cids.count(c) > 1})
            raise ValueError(
                f"client ids {dup} came from more than one node in one round: a ClientApp that "
                "reports a client-id metric must report a different one on every node"
            )
        d = self.params.numel()
        U = torch.stack(rows) if rows else torch.empty(0, d)
        names = list(extras[0]) if extras else []
        return Replies(
            np.asarray(cids, dtype=np.int64),
            U,
            torch.tensor(weights, dtype=U.dtype),
            torch.tensor(losses, dtype=U.dtype),
            {n: torch.stack([e[n] for e in extras]) for n in names},
            torch.tensor(eps, dtype=torch.float64) if eps and len(eps) == len(cids) else None,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Stack the replies by client id, apply the attack, aggregate, update the strategy."""
        assert self.params is not None
        t_recv = time.perf_counter()
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        failed_nodes = [m.metadata.src_node_id for m in replies if m.has_error()]
        for m in replies:
            if m.has_error():
                log.warning("node %d failed: %s", m.metadata.src_node_id, m.error.reason)
        r = self.round_offset + server_round - 1
        metrics: dict[str, Any] = {"round": r + 1, "clients": self._sent}
        n_all = self.num_clients or max(len(self.node_to_client), 1)
        res = self.step(self.params, self.state, self._reply_rows(ok), r, num_clients=n_all)
        metrics["dropped_nonfinite"] = res.metrics.pop("dropped_nonfinite")
        metrics["dropped_failed"] = self._sent - len(ok)
        metrics.update(res.metrics)
        if res.skipped:  # no usable update: keep the model, say why
            failed = list(self.client_ids(failed_nodes).values())
            why, _ = skip_reason(self._sent, [], failed, res.nonfinite.tolist())
            metrics["skipped"] = why
        else:
            self.params, self.state = res.params, res.state
        now = time.perf_counter()
        metrics["round_time_s"] = now - self._t0
        # where the time went: Flower's send/receive (client work included) vs. this server
        metrics["clients_time_s"] = t_recv - self._t_sent if self._t_sent else 0.0
        metrics.update(self.privacy_metrics())
        self.last_metrics = metrics
        flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return self.arrays(), MetricRecord(flat)

    # -- federated evaluation ----------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to a random fraction of the nodes (none if fraction is 0)."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._wait_nodes(grid, max(self.min_available_nodes, self.min_evaluate_nodes))
        k = min(len(nodes), max(int(len(nodes) * self.fraction_evaluate), self.min_evaluate_nodes))
        seed = stream(self.seed, server_round, kind="int", scheme="flower_eval")
        chosen = random.Random(seed).sample(nodes, k)
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        return [Message(record, n, MessageType.EVALUATE) for n in chosen]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean (by ``num-examples``) of the numeric metrics the clients report."""
        sums: dict[str, float] = {}
        total = 0.0
        for msg in replies:
            if msg.has_error():
                continue
            metrics = _metrics(msg)
            wt = float(metrics.get(self.weighted_by_key, 1.0))
            total += wt
            for k, v in metrics.items():
                if k not in (self.weighted_by_key, "client-id") and isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + wt * float(v)
        if total == 0:
            return None
        return MetricRecord({k: v / total for k, v in sums.items()})


def _metrics(msg: Message) -> MetricRecord:
    """The reply's metrics: its MetricRecord named ``metrics`` (Flower's convention), else its
    first one, else an empty one."""
    records = msg.content.metric_records
    return records.get("metrics") or next(iter(records.values()), MetricRecord())
