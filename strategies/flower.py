"""Flower adapter: any Flagstaff aggregator and server strategy as a flwr 1.41 ``Strategy``.

:class:`FlagstaffStrategy` implements Flower's Message-API strategy (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``, ``summary``) and is run with
``strategy.start(grid=..., initial_arrays=..., num_rounds=...)`` like Flower's own FedAvg. One round
follows Flagstaff's reference semantics (``system.server.ParameterServer.round``):

sample clients -> send the global arrays (+ the strategy's broadcast vectors) -> replies' arrays to
flat vectors, stacked (n, d) and sorted by client id -> drop clients whose update or extras are not
finite -> model-poisoning attack on the Byzantine client ids (updates and per-client extras, e.g.
SCAFFOLD's delta c_i; ``strategies.attacks.round.attack_round``) -> aggregator (with its pre-aggregation, e.g. NNM) -> strategy
update (FedAvg/FedAvgM, FedProx, SCAFFOLD, FedSpeed, FedAdam, FedSVD, ... any
``init/broadcast/update``; ``bind(model, spec)`` and ``pre_aggregate`` hooks are honoured, so the
client-level DP wrapper ``strategies.dp.ClientLevelDP`` clips before and noises after aggregation).

Replies from Flagstaff's ClientApp (``clients.flower_app``) carry the update itself; replies from a
plain Flower ClientApp carry the trained model (Flower's convention) and the adapter subtracts the
global model. Client ids come from a ``client-id`` metric (Flagstaff's ClientApp reports its
partition id; ``discover=True`` asks every node once with a ``query`` message), else the node id.

Byzantine clients in Flower: the ``byzantine`` client ids (default ``0..attack.f-1``, as in the
Ray/local runtimes) train like everyone else; this adapter replaces their replies, extras included,
with the attack's vectors before aggregation (the omniscient adversary of the threat model), and
the strategy combines the extras with the same aggregator (``strategies.base.ExtrasAggregation``),
exactly as the parameter server does. Data-poisoning attacks
act in the ClientApp instead (``clients.flower_app.poison_if_byzantine``).

Reference: Flower 1.41 ``flwr.serverapp.strategy.Strategy``; McMahan et al. 2017 (FedAvg).
"""

from __future__ import annotations

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

from clients.flower_app import (
    BROADCAST_KEY,
    EXTRAS_KEY,
    REPLY_KEY,
    arrays_to_vector,
    record_to_vectors,
    vector_to_arrays,
    vectors_to_record,
)
from clients.seeds import stream
from clients.trainer import ParamSpec
from strategies.attacks.round import AttackedRound, attack_round
from strategies.base import ExtrasAggregation, RoundExtras
from strategies.fedavg import FedAvg

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
    ``start(..., evaluate_fn=...)`` for central evaluation). ``round_offset``: Flagstaff round index
    of Flower's round 1 (resumed runs). ``model``: the global model, for strategies that need
    the parameter layout (``bind``; FedSVD).
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
        discover: bool = True,
        weighted_by_key: str = "num-examples",
        num_clients: int | None = None,
        round_offset: int = 0,
        timeout: float = 600.0,
        model: torch.nn.Module | None = None,
    ) -> None:
        if not 0.0 <= fraction_train <= 1.0 or not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError("fraction_train and fraction_evaluate must be in [0, 1]")
        self.aggregator = aggregator
        self.extras_aggregation = ExtrasAggregation(aggregator)
        self.strategy = strategy if strategy is not None else FedAvg()
        self.attack = attack
        f = int(getattr(attack, "f", 0) or 0)
        active = attack is not None and getattr(attack, "name", "none") != "none" and f > 0
        self.byzantine = set(byzantine if byzantine is not None else range(f)) if active else set()
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
        if model is not None and hasattr(self.strategy, "bind"):  # the layout (FedSVD needs it)
            self.strategy.bind(model, ParamSpec.of(model))
        self.client_epsilon: dict[int, float] = {}  # sample-level DP: latest epsilon per client
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
        return {
            "params": None if self.params is None else self.params.clone(),
            "strategy": self.state,
            "aggregator": getattr(self.aggregator, "state_dict", dict)(),
            "extras_aggregation": self.extras_aggregation.state_dict(),
            "adversary": getattr(self.attack, "state_dict", dict)() if self.attack else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.params = state["params"].clone()
        self.state = state["strategy"]
        if hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(state.get("aggregator", {}))
        self.extras_aggregation.load_state_dict(state.get("extras_aggregation", {}))
        if self.attack is not None and hasattr(self.attack, "load_state_dict"):
            self.attack.load_state_dict(state.get("adversary", {}))

    def privacy_metrics(self) -> dict[str, Any]:
        """epsilon (worst client seen) and epsilon_kind for sample-level DP clients; the
        strategy's epsilon for client-level DP wrappers (as ``ParameterServer.privacy_metrics``)."""
        out: dict[str, Any] = {}
        if self.client_epsilon:
            out.update(epsilon=max(self.client_epsilon.values()), epsilon_kind="sample-level")
        eps = self.strategy.epsilon(self.state)
        if eps is not None:
            eps = float(eps)
            if "epsilon" in out:
                out["epsilon_client_level"] = eps
            else:
                out.update(epsilon=eps, epsilon_kind="client-level")
        return out

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

    def _client_ids(self, grid: Grid, nodes: list[int]) -> dict[int, int]:
        """Client id of every node: asked once per new node (``query``), else the node id."""
        new = [n for n in nodes if n not in self.node_to_client]
        if new and self.discover:
            msgs = [
                Message(RecordDict({"config": ConfigRecord()}), n, MessageType.QUERY) for n in new
            ]
            for rep in grid.send_and_receive(msgs, timeout=self.timeout):
                src = rep.metadata.src_node_id
                if not rep.has_error():
                    metrics = next(iter(rep.content.metric_records.values()), {})
                    if "client-id" in metrics:
                        self.node_to_client[src] = int(metrics["client-id"])
        for n in new:
            self.node_to_client.setdefault(n, n)
        return {n: self.node_to_client[n] for n in nodes}

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
        chosen = self._sample(self._client_ids(grid, nodes), self.round_offset + server_round - 1)
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

    def _reply_rows(
        self, replies: Sequence[Message]
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Client ids, update rows (n, d), weights, losses and extras, sorted by client id."""
        assert self.params is not None
        cids, rows, weights, losses, extras = [], [], [], [], []
        for msg in replies:
            content = msg.content
            metrics = next(iter(content.metric_records.values()), MetricRecord())
            src = msg.metadata.src_node_id
            cids.append(int(metrics.get("client-id", self.node_to_client.get(src, src))))
            weights.append(float(metrics.get(self.weighted_by_key, 1.0)))
            losses.append(float(metrics.get("train_loss", float("nan"))))
            if "epsilon" in metrics:  # sample-level DP clients report their accountant's epsilon
                self.client_epsilon[cids[-1]] = float(metrics["epsilon"])
            arr = content.array_records.get("arrays") or next(iter(content.array_records.values()))
            vec = arrays_to_vector(arr, self.names)
            kind = content.config_records.get(REPLY_KEY, ConfigRecord()).get("payload", "model")
            rows.append(vec if kind == "update" else vec - self.params)
            extras.append(record_to_vectors(content.array_records.get(EXTRAS_KEY)))
        order = np.argsort(np.asarray(cids, dtype=np.int64), kind="stable")
        d = self.params.numel()
        U = torch.stack(rows)[order] if rows else torch.empty(0, d)
        w = torch.tensor(weights, dtype=U.dtype)[order]
        lo = torch.tensor(losses, dtype=U.dtype)[order]
        names = list(extras[0]) if extras else []
        ext = {n: torch.stack([e[n] for e in extras])[order] for n in names}
        return np.asarray(cids, dtype=np.int64)[order], U, w, lo, ext

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Stack the replies by client id, apply the attack, aggregate, update the strategy."""
        assert self.params is not None
        t_recv = time.perf_counter()
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        for m in replies:
            if m.has_error():
                log.warning("node %d failed: %s", m.metadata.src_node_id, m.error.reason)
        r = self.round_offset + server_round - 1
        cids, U, w, losses, extra = self._reply_rows(ok)
        metrics: dict[str, Any] = {"round": r + 1, "clients": self._sent}
        finite = torch.isfinite(U).all(dim=1)
        for v in extra.values():  # a client is dropped whole: update and extras together
            finite &= torch.isfinite(v).all(dim=1)
        metrics["dropped_nonfinite"] = int((~finite).sum())
        metrics["dropped_failed"] = self._sent - len(ok)
        byz = torch.as_tensor([int(c) in self.byzantine for c in cids], dtype=torch.bool)
        honest_loss = losses[finite & ~byz]
        if len(honest_loss):
            metrics["train_loss"] = float(honest_loss.mean())
        U, w, cids, byz = U[finite], w[finite], cids[finite.numpy()], byz[finite]
        att = self._attack(U, w, byz, r, {n: v[finite] for n, v in extra.items()})
        U, w, cids = att.U, att.w, cids[att.keep.cpu().numpy()]
        extras = RoundExtras(
            att.extras,
            cids,
            self.num_clients or max(len(self.node_to_client), 1),
            self.extras_aggregation,
        )
        metrics["dropped_nonfinite"] += self.last_dropped_nonfinite  # inf/NaN attacks
        if hasattr(self.strategy, "pre_aggregate") and len(U):  # e.g. client-level DP clipping
            U, w, self.state = self.strategy.pre_aggregate(U, w, self.state, r)
        if len(U) == 0:
            metrics["skipped"] = True
        else:
            agg = self.aggregator(U, w)
            if not torch.isfinite(agg).all():
                raise FloatingPointError(
                    f"round {r + 1}: the aggregate is not finite; lower the learning rate or "
                    "use a robust aggregator"
                )
            self.params, self.state = self.strategy.update(
                self.params, agg, self.state, r, extras=extras
            )
        now = time.perf_counter()
        metrics["round_time_s"] = now - self._t0
        # where the time went: Flower's send/receive (client work included) vs. this server
        metrics["clients_time_s"] = t_recv - self._t_sent if self._t_sent else 0.0
        metrics.update(self.privacy_metrics())
        self.last_metrics = metrics
        flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return self.arrays(), MetricRecord(flat)

    def _attack(
        self,
        U: torch.Tensor,
        w: torch.Tensor,
        byz: torch.Tensor,
        round_idx: int,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> AttackedRound:
        """Replace the Byzantine rows of the updates and extras with the model attack's vectors
        (crash: remove them), as ``strategies.attacks.Adversary.attack_round`` does."""
        self.last_dropped_nonfinite = 0
        extras = dict(extras or {})
        if not bool(byz.any()) or getattr(self.attack, "kind", "model") != "model":
            return AttackedRound(U, w, extras, torch.ones(len(U), dtype=torch.bool))
        seed = int(getattr(self.attack, "seed", 0) or 0)
        gen = stream(seed, round_idx, scheme="attack")
        out = attack_round(
            self.attack, U, w, byz, self.aggregator, gen, extras, self.extras_aggregation.rule
        )
        self.last_dropped_nonfinite = out.dropped_nonfinite
        return out

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
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            wt = float(metrics.get(self.weighted_by_key, 1.0))
            total += wt
            for k, v in metrics.items():
                if k not in (self.weighted_by_key, "client-id") and isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + wt * float(v)
        if total == 0:
            return None
        return MetricRecord({k: v / total for k, v in sums.items()})
