"""ParameterServer: global state, strategy and aggregator; runs one federated round at a time.

One round (DESIGN.md "Runtime"): sample clients -> broadcast once -> hosts train -> gather the
replies -> the server step (``strategies.server_step``: sort by client id, drop non-finite rows,
decode, adversary on updates and extras, aggregate, strategy update, privacy metrics) -> evaluate.
This module adds what only a server with hosts has: sampling, placement on the hosts, bytes, the
hosts' faults, the sample-level budget stop (asking the hosts' accountants), checkpoints of the
hosts' per-client state. Plain Python; the ``ray`` backend may run it as an actor, the ``local``
backend in-process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from flagstaff.clients.seeds import stream
from flagstaff.clients.trainer import ParamSpec, loss_fn_for
from flagstaff.strategies.attacks import Adversary
from flagstaff.strategies.base import RoundExtras
from flagstaff.strategies.server_step import HostSum, Replies, ServerStep, skip_reason
from flagstaff.system.codecs import build_codec
from flagstaff.system.eval import combine
from flagstaff.system.host import HostReply
from flagstaff.system.specs import Federated

__all__ = [
    "ParameterServer",
    "ServerSettings",
    "can_reduce_on_hosts",
    "client_replies",
    "evaluate_model",
    "sample_clients",
]

log = logging.getLogger("flagstaff")


def sample_clients(
    num_clients: int, per_round: int, seed: int, round_idx: int, kind: str = "fixed"
) -> np.ndarray:
    """Clients of round ``round_idx``, seeded by (seed, round); sorted ids.

    ``fixed``: ``per_round`` clients uniformly without replacement. ``bernoulli``: each client
    independently with probability per_round / num_clients (the count varies, may be 0).
    """
    if kind not in ("fixed", "bernoulli"):
        raise ValueError(f"sampling={kind!r}: choose fixed or bernoulli")
    if per_round >= num_clients:
        return np.arange(num_clients)
    rng = stream(seed, round_idx, 0x5A3, kind="numpy")
    if kind == "bernoulli":
        return np.flatnonzero(rng.random(num_clients) < per_round / num_clients)
    return np.sort(rng.choice(num_clients, size=per_round, replace=False))


def can_reduce_on_hosts(aggregator: Any, strategy: Any, adversary: Adversary) -> bool:
    """Whether hosts may send sum_i w_i u_i instead of every u_i (``ServerStep.can_reduce``)."""
    return ServerStep(strategy, aggregator, adversary).can_reduce()


def client_replies(replies: list[HostReply], width: int) -> Replies:
    """The hosts' per-client replies as the server step's rows (host order; the step sorts)."""
    return Replies.concat(
        [
            Replies(
                rep.client_ids,
                rep.updates,
                rep.weights,
                rep.losses,
                rep.extras,
                rep.metrics.get("epsilon"),
            )
            for rep in replies
        ],
        width,
    )


def host_sums(replies: list[HostReply]) -> list[HostSum]:
    """The hosts' reduced replies (one weighted sum each) as the server step's reduced input."""
    return [
        HostSum(
            rep.host_id,
            rep.client_ids,
            rep.updates[0],
            float(rep.weights[0]),
            rep.finite,
            rep.losses,
            rep.metrics.get("epsilon"),
        )
        for rep in replies
    ]


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    spec: ParamSpec,
    params: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    batch: int = 4096,
) -> dict[str, float]:
    """Test loss (and accuracy, for classification) of ``model`` with the flat ``params``."""
    p = spec.unflatten(params)
    loss_fn = loss_fn_for(num_classes)
    correct, total_loss = 0.0, 0.0
    n = len(y_test)
    for i in range(0, n, batch):
        xb, yb = x_test[i : i + batch], y_test[i : i + batch]
        out = functional_call(model, p, (xb,))
        total_loss += float(loss_fn(out, yb).sum())
        if num_classes > 1:
            correct += float((out.argmax(1) == yb).sum())
    res = {"loss": total_loss / n}
    if num_classes > 1:
        res["accuracy"] = correct / n
    return res


@dataclass(frozen=True)
class ServerSettings:
    """The few settings a parameter server reads (not the config dict): client sampling, the
    privacy budget, the round deadline (for skipped-round reasons), host-side reduction, torch
    threads and the codec spec (``comm`` group)."""

    num_clients: int
    clients_per_round: int
    seed: int
    sampling: str = "fixed"
    target_epsilon: float | None = None
    delta: float | None = None
    round_deadline_s: float | None = None
    host_reduce: bool = True
    threads: int = 1
    comm: dict[str, Any] | None = None
    #: the hosts hold the test set (and, for natural partitions, their clients' held-out samples)
    #: and evaluate on it (system/eval.py); False: ``evaluate_model`` in the server's process
    host_eval: bool = False

    @classmethod
    def of(cls, c: dict[str, Any]) -> ServerSettings:
        """The settings of a validated plain config."""
        cl, privacy = c["cluster"], c.get("privacy") or {}
        return cls(
            num_clients=int(c["num_clients"]),
            clients_per_round=int(c["clients_per_round"]),
            seed=int(c["seed"]),
            sampling=str(c.get("sampling", "fixed")),
            target_epsilon=privacy.get("target_epsilon"),
            delta=privacy.get("delta"),
            round_deadline_s=cl.get("round_deadline_s"),
            host_reduce=bool(cl.get("host_reduce", True)),
            threads=int(cl.get("threads_per_host", 1)),
            comm=c.get("comm"),
        )


class ParameterServer:
    """Holds the global parameters and strategy state; ``round(r)`` runs round r."""

    def __init__(
        self,
        fed: Federated,
        pool: Any,
        owner: np.ndarray,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        settings: ServerSettings,
    ) -> None:
        torch.set_num_threads(max(1, int(settings.threads)))
        self.settings = settings
        self.pool = pool
        self.owner = owner
        self.seed = settings.seed
        self.num_clients = settings.num_clients
        self.per_round = settings.clients_per_round
        self.sampling = settings.sampling
        self.model, self.spec = fed.model, fed.spec
        # the trainable parameters only (a LoRA model's frozen base does not travel)
        self.params = self.spec.flatten(dict(self.model.named_parameters())).detach().clone()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.strategy = fed.strategy  # bound to the model's layout by system.build
        self.state = self.strategy.init(self.params)
        self.target_epsilon = settings.target_epsilon
        self.delta = settings.delta
        self.adversary = fed.adversary
        self.aggregator = fed.aggregator
        # compressed communication (system/codecs.py): hosts encode, the server decodes each
        # client's payload, so hosts cannot pre-sum (the sum of payloads is not a payload)
        self.codec = build_codec(settings.comm, self.spec, self.seed)
        if self.codec is not None and self.codec.payload_numel >= self.params.numel():
            log.warning(
                "comm=%s sends %d numbers per client for %d parameters (nothing is compressed: "
                "lower comm.min_compress_numel or comm.rank)",
                self.codec.name,
                self.codec.payload_numel,
                self.params.numel(),
            )
        # the server half of every round (strategies/server_step.py); under DP, metrics hold only
        # what epsilon covers: no un-noised train loss (docs/privacy.md)
        self.step = ServerStep(
            self.strategy,
            self.aggregator,
            self.adversary,
            num_clients=self.num_clients,
            private=bool(fed.kinds),
            decoder=self.codec,
            delta=self.delta,
        )
        self.reduce_on_hosts = settings.host_reduce and self.step.can_reduce()
        self.x_test, self.y_test = x_test, y_test
        num_classes = fed.host.model.num_classes
        self.num_classes = num_classes
        self.private = bool(fed.kinds)  # per-client accuracies are not covered by epsilon
        self.round_idx = 0

    # -- one round -------------------------------------------------------------------------------
    def round(self, r: int, evaluate: bool = True) -> dict[str, Any]:
        """Run round ``r`` and return its metrics."""
        t0 = time.perf_counter()
        sampled = sample_clients(self.num_clients, self.per_round, self.seed, r, self.sampling)
        assignment: dict[int, list[int]] = {}
        for c in sampled.tolist():
            assignment.setdefault(int(self.owner[c]), []).append(c)
        # clients of a lost host train where their data moved, or are out (system/pool.py)
        assignment, out = self.pool.place(assignment, r)
        stop = self._budget_stop(assignment, r)
        if stop:  # nothing trained: the runner writes the final checkpoint and ends the run
            return {"round": r + 1, "stopped": "privacy budget", "message": stop}
        bcast = self.strategy.broadcast(self.params, self.state)
        got = self.pool.train(self.params, assignment, r, bcast, self.reduce_on_hosts)
        metrics: dict[str, Any] = {"round": r + 1, "clients": len(sampled)}
        # what travels: the parameters and server vectors to every sampled client, and what the
        # clients that answered sent back (docs/communication.md)
        down = self.params.numel() * self.params.element_size()
        down += sum(v.numel() * v.element_size() for v in (bcast or {}).values())
        metrics["bytes_down"] = down * len(sampled)
        metrics["bytes_up"] = sum(rep.bytes_up for rep in got.replies)
        metrics["dropped_failed"] = len(got.dropped) + len(out)
        metrics["dropped_late"] = len(got.late)
        # the slowest host's local training (round_time_s minus this: transport and aggregation)
        metrics["host_train_s"] = max((rep.train_time_s for rep in got.replies), default=0.0)
        if got.retried_hosts:
            metrics["retried_hosts"] = got.retried_hosts
        metrics.update(self.pool.take_events())  # lost_hosts, lost_state_clients
        if self.reduce_on_hosts:
            res = self.step.reduced(self.params, self.state, host_sums(got.replies), r)
            metrics.update(res.metrics)
            skipped, nonfinite = res.skipped, res.nonfinite
        else:
            agg, extras = self._aggregate(got, metrics, r)
            res = self.step.apply(self.params, self.state, agg, extras, r)
            skipped, nonfinite = res.skipped, self._nonfinite
        if skipped:  # no usable update: keep the model, say why (the run loop stops after K)
            deadline = self.settings.round_deadline_s
            failed = [int(c) for c in [*got.dropped, *out]]
            metrics["skipped"], metrics["skipped_clients"] = skip_reason(
                len(sampled), [int(c) for c in got.late], failed, nonfinite.tolist(), deadline
            )
        else:
            self.params, self.state = res.params, res.state
        self.round_idx = r + 1
        metrics.update(self.privacy_metrics())
        metrics["round_time_s"] = time.perf_counter() - t0
        if evaluate:
            metrics.update(self.evaluate())
        return metrics

    def _aggregate(
        self, got: Any, metrics: dict[str, Any], r: int
    ) -> tuple[torch.Tensor | None, RoundExtras | None]:
        """The hosts' per-client replies through the server step's aggregation (sort, drop
        non-finite, decode, attack, pre-aggregate, aggregate); keeps the state pre-aggregation
        left and the dropped clients' ids (for a skipped round's reason)."""
        width = self.codec.payload_numel if self.codec else self.params.numel()
        a = self.step.aggregate(
            self.state, client_replies(got.replies, width), r, self.params.numel()
        )
        metrics.update(a.metrics)
        self.state, self._nonfinite = a.state, a.nonfinite
        return a.aggregate, a.extras

    def faults(self) -> dict[str, list]:
        """What host faults lost so far (system/pool.py ``faults``): for summary.json."""
        return self.pool.faults()

    # -- privacy ---------------------------------------------------------------------------------
    def privacy_metrics(self) -> dict[str, Any]:
        """epsilon (worst client), epsilon_mean, epsilon_kind, delta (``ServerStep``)."""
        return self.step.privacy_metrics(self.state)

    def privacy_summary(self) -> dict[str, Any] | None:
        """summary.json's ``privacy`` (epsilon and, for client-level DP, the mechanism)."""
        return self.step.privacy_summary(self.state)

    @property
    def client_epsilon(self) -> torch.Tensor:
        """Each client's sample-level epsilon so far (0 before its first round)."""
        return self.step.ledger.client_epsilon

    def _budget_stop(self, assignment: dict[int, list[int]], r: int) -> str | None:
        """A message if round r would take a client (or the run) past privacy.target_epsilon."""
        if self.target_epsilon is None:
            return None
        target = float(self.target_epsilon)
        stop = self.step.budget_stop(self.state, r, target)  # client-level DP (the strategy's)
        if stop:
            return stop
        after: dict[int, float] = {}
        asked = self.pool.call("epsilon_after", {h: (c,) for h, c in assignment.items()})
        for part in asked.values():
            after.update(part)
        over = {c: e for c, e in after.items() if e > target}
        if over:
            worst = max(over, key=over.get)
            return (
                f"privacy budget: round {r + 1} would raise client {worst}'s epsilon to "
                f"{over[worst]:.4g} > privacy.target_epsilon={target:g} (delta={self.delta:g}; "
                f"{len(over)} sampled client(s) over budget); stopping after {r} rounds"
            )
        return None

    def evaluate(self) -> dict[str, float]:
        """Test accuracy and loss of the global model: the hosts' sums (system/eval.py) where they
        hold the test set, with the per-client accuracy distribution where they hold held-out
        samples (not under DP: epsilon does not cover it, docs/privacy.md); else in this process,
        also when a lost host's test slice is gone."""
        if self.settings.host_eval:
            parts = self.pool.evaluate(self.params)
            if sum(p.count for p in parts) == len(self.y_test):
                return combine(parts, self.num_classes, per_client=not self.private)
            log.warning("part of the test set was lost with a host: evaluating in the server")
        return evaluate_model(
            self.model, self.spec, self.params, self.x_test, self.y_test, self.num_classes
        )

    # -- state -----------------------------------------------------------------------------------
    def get_params(self) -> torch.Tensor:
        return self.params

    def state_dict(self) -> dict[str, Any]:
        step = self.step.state_dict()
        return {
            "round": self.round_idx,
            "params": self.params.clone(),
            "strategy": self.strategy.state_dict(self.state),
            "aggregator": step["aggregator"],
            "extras_aggregation": step["extras_aggregation"],
            "adversary": step["adversary"],
            "clients": self.pool.state_dict(),  # per-client state of the local rule, on the hosts
            "faults": self.pool.faults(),  # lost hosts, lost client state, clients out of the run
            "privacy": {**step["privacy"], "trainers": self._privacy_state()},
        }

    def _privacy_state(self) -> dict[str, Any]:
        """The hosts' accountant histories (sample-level DP)."""
        merged: dict[str, Any] = {}
        for part in self.pool.call("privacy_state").values():
            if part:
                merged.setdefault("accountant", part.get("accountant"))
                merged.setdefault("histories", {}).update(part.get("histories", {}))
        return merged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = state["params"]
        if params.shape != self.params.shape:
            raise ValueError(
                f"checkpoint holds {params.numel()} parameters, the configured model has "
                f"{self.params.numel()}; resume with the config the checkpoint was written with"
            )
        self.params = params.clone()
        self.state = self.strategy.load_state(state["strategy"])
        self.round_idx = int(state["round"])
        privacy = state.get("privacy") or {}
        self.step.load_state_dict({**state, "privacy": privacy})
        self.pool.load_state_dict(state.get("clients", {}))
        self.pool.load_faults(state.get("faults", {}))
        if privacy.get("trainers"):
            trainers = privacy["trainers"]
            self.pool.call("load_privacy_state", {h: (trainers,) for h in range(len(self.pool))})

    def ping(self) -> bool:
        return True
