"""ParameterServer: global state, strategy and aggregator; runs one federated round at a time.

One round (DESIGN.md "Runtime"): sample clients -> broadcast once -> hosts train -> gather updates
(sorted by client id, so the result does not depend on arrival order) -> drop non-finite updates ->
adversary (on the updates and the per-client extras) -> aggregate -> strategy update (extras
aggregated with the same rule) -> evaluate. Plain Python; the ``ray`` backend runs it as
an actor, the ``local`` backend in-process.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from clients.dp import privacy_kinds
from clients.seeds import stream
from clients.trainer import ParamSpec, loss_fn_for
from strategies.attacks import Adversary
from strategies.base import ExtrasAggregation, RoundExtras
from system.codecs import build_codec
from system.host import build_from

__all__ = ["ParameterServer", "sample_clients"]

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
    """Whether hosts may send sum_i w_i u_i instead of every u_i: the aggregator is a weighted
    mean, no model-poisoning attack needs the honest updates, the strategy neither transforms
    individual updates (client-level DP clipping) nor collects per-client extras (SCAFFOLD, ...)."""
    rule = getattr(strategy, "client_rule", None)
    return (
        getattr(aggregator, "decomposable", False)
        and not (adversary.active and adversary.kind == "model")
        and not strategy.transforms_updates
        and not getattr(rule, "client_state", ())
    )


class ParameterServer:
    """Holds the global parameters and strategy state; ``round(r)`` runs round r."""

    def __init__(
        self,
        cfg: dict[str, Any],
        pool: Any,
        owner: np.ndarray,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        input_shape: tuple[int, ...],
        num_classes: int,
    ) -> None:
        torch.set_num_threads(max(1, int(cfg["cluster"].get("threads_per_host", 1))))
        self.cfg = cfg
        self.pool = pool
        self.owner = owner
        self.seed = int(cfg["seed"])
        self.num_clients = int(cfg["num_clients"])
        self.per_round = int(cfg["clients_per_round"])
        self.sampling = str(cfg.get("sampling", "fixed"))
        self.model = build_from(
            cfg["model"], input_shape=input_shape, num_classes=num_classes, seed=self.seed
        )
        self.spec = ParamSpec.of(self.model)
        # the trainable parameters only (a LoRA model's frozen base does not travel)
        self.params = self.spec.flatten(dict(self.model.named_parameters())).detach().clone()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.strategy = build_from(cfg["strategy"])
        if hasattr(self.strategy, "bind"):  # strategies that need the parameter layout (FedSVD)
            self.strategy.bind(self.model, self.spec)
        self.state = self.strategy.init(self.params)
        privacy = cfg.get("privacy") or {}
        self.target_epsilon = privacy.get("target_epsilon")
        self.delta = privacy.get("delta")
        self.client_epsilon = torch.zeros(self.num_clients, dtype=torch.float64)
        # under DP, metrics hold only what epsilon covers: no un-noised train loss (docs/privacy.md)
        self.private = bool(privacy_kinds(cfg["client"], cfg["strategy"]))
        self.adversary = Adversary(build_from(cfg["attack"]), self.num_clients)
        n_agg = self.adversary.inputs_per_round(self.per_round)
        self.aggregator = build_from(cfg["aggregator"], f=self.adversary.f, n=n_agg)
        # the per-client extras (SCAFFOLD's delta c_i, ...) go through the same rule (own state)
        self.extras_aggregation = ExtrasAggregation(self.aggregator)
        # compressed communication (system/codecs.py): hosts encode, the server decodes each
        # client's payload, so hosts cannot pre-sum (the sum of payloads is not a payload)
        self.codec = build_codec(cfg.get("comm"), self.spec, self.seed)
        if self.codec is not None and self.codec.payload_numel >= self.params.numel():
            log.warning(
                "comm=%s sends %d numbers per client for %d parameters (nothing is compressed: "
                "lower comm.min_compress_numel or comm.rank)",
                self.codec.name,
                self.codec.payload_numel,
                self.params.numel(),
            )
        self.reduce_on_hosts = (
            bool(cfg["cluster"].get("host_reduce", True))
            and self.codec is None
            and can_reduce_on_hosts(self.aggregator, self.strategy, self.adversary)
        )
        self.x_test, self.y_test = x_test, y_test
        self.loss = loss_fn_for(num_classes)
        self.num_classes = num_classes
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
        self._nonfinite = np.empty(0, np.int64)  # set by the aggregation, for a skipped round
        if self.reduce_on_hosts:
            agg, extras = self._reduced_aggregate(got, metrics), None
        else:
            agg, extras = self._aggregate(got, metrics, r)
        if agg is None:  # no usable update: keep the model, say why (the runner stops after K)
            metrics["skipped"], metrics["skipped_clients"] = self._skip_reason(sampled, got, out)
        else:
            if not torch.isfinite(agg).all():
                raise FloatingPointError(
                    f"round {r + 1}: the aggregate is not finite; lower client.lr or use a "
                    "robust aggregator"
                )
            self.params, self.state = self.strategy.update(
                self.params, agg, self.state, r, extras=extras
            )
        self.round_idx = r + 1
        metrics.update(self.privacy_metrics())
        metrics["round_time_s"] = time.perf_counter() - t0
        if evaluate:
            metrics.update(self.evaluate())
        return metrics

    def _aggregate(
        self, got: Any, metrics: dict[str, Any], r: int
    ) -> tuple[torch.Tensor | None, RoundExtras]:
        """Per-client replies: sort by client id, decode payloads, drop clients whose update or extras
        are not finite, adversary (on updates and extras), aggregate."""
        width = self.codec.payload_numel if self.codec else self.params.numel()
        if got.replies:
            cids = np.concatenate([rep.client_ids for rep in got.replies])
            order = np.argsort(cids, kind="stable")
            cids = cids[order]
            U = torch.cat([rep.updates for rep in got.replies])[order]
            w = torch.cat([rep.weights for rep in got.replies])[order]
            losses = torch.cat([rep.losses for rep in got.replies])[order]
            extra = {
                n: torch.cat([rep.extras[n] for rep in got.replies])[order]
                for n in got.replies[0].extras
            }
            eps = [rep.metrics["epsilon"] for rep in got.replies if "epsilon" in rep.metrics]
            if eps:  # sample-level DP clients report their accountant's epsilon
                self.client_epsilon[torch.as_tensor(cids)] = torch.cat(eps)[order]
        else:
            cids, U = np.empty(0, np.int64), torch.empty(0, width)
            w, losses, extra = torch.empty(0), torch.empty(0), {}
        if U.shape[1:] != (width,):
            what = f"{self.codec.name} payloads of length {width}" if self.codec else "updates"
            raise ValueError(
                f"round {r + 1}: hosts returned rows of length {U.shape[1]}, expected {what} for "
                f"the model's {self.params.numel()} parameters; every host must run the same "
                "model and comm config"
            )
        finite = torch.isfinite(U).all(dim=1)
        for v in extra.values():  # a client is dropped whole: update and extras together
            finite &= torch.isfinite(v).all(dim=1)
        if self.codec is not None:  # decode every payload; non-finite ones (or decodes) dropped
            U = self.codec.decode(torch.where(finite[:, None], U, 0.0), r)
            finite &= torch.isfinite(U).all(dim=1)
        metrics["dropped_nonfinite"] = int((~finite).sum())
        self._nonfinite = cids[~finite.numpy()]
        honest_loss = losses[finite & ~torch.as_tensor(self.adversary.is_byzantine(cids))]
        if len(honest_loss) and not self.private:
            metrics["train_loss"] = float(honest_loss.mean())
        U, w, cids = U[finite], w[finite], cids[finite]
        extra = {n: v[finite] for n, v in extra.items()}
        # Byzantine clients corrupt everything they send: updates and extras (strategies/attacks/)
        att = self.adversary.attack_round(
            U, w, cids, self.aggregator, r, extra, self.extras_aggregation.rule
        )
        U, w, cids = att.U, att.w, cids[att.keep.cpu().numpy()]
        extras = RoundExtras(att.extras, cids, self.num_clients, self.extras_aggregation)
        metrics["dropped_nonfinite"] += att.dropped_nonfinite  # inf/NaN attacks
        if hasattr(self.strategy, "pre_aggregate") and len(U):  # e.g. client-level DP clipping
            U, w, self.state = self.strategy.pre_aggregate(U, w, self.state, r)
        if len(U) == 0:
            return None, extras
        return self.aggregator(U, w), extras

    def _reduced_aggregate(self, got: Any, metrics: dict[str, Any]) -> torch.Tensor | None:
        """Hosts sent sum_i w_i u_i and sum_i w_i (a weighted mean needs nothing more): add them in
        host order in float64 and divide."""
        replies = sorted(got.replies, key=lambda rep: rep.host_id)
        finite = [rep.finite for rep in replies]
        metrics["dropped_nonfinite"] = int(sum(int((~f).sum()) for f in finite))
        self._nonfinite = np.concatenate(
            [rep.client_ids[~f.numpy()] for rep, f in zip(replies, finite, strict=True)] or [[]]
        ).astype(np.int64)
        losses = [rep.losses[f] for rep, f in zip(replies, finite, strict=True)]
        losses = torch.cat(losses) if losses else torch.empty(0)  # no host replied in time
        if len(losses) and not self.private:
            metrics["train_loss"] = float(losses.mean())
        for rep in replies:
            if "epsilon" in rep.metrics:
                self.client_epsilon[torch.as_tensor(rep.client_ids)] = rep.metrics["epsilon"]
        wsum = sum(float(rep.weights[0]) for rep in replies)
        if wsum <= 0:
            return None
        total = torch.stack([rep.updates[0] for rep in replies]).sum(0)
        return (total / wsum).to(self.params.dtype)

    def _skip_reason(
        self, sampled: np.ndarray, got: Any, out: list[int]
    ) -> tuple[str, dict[str, list[int]]]:
        """Why the round has no update, in words and as client ids per cause (late, failed,
        nonfinite): the runner's line per skipped round and its stop message use both."""
        who = {
            "late": sorted(int(c) for c in got.late),
            "failed": sorted(int(c) for c in [*got.dropped, *out]),
            "nonfinite": sorted(int(c) for c in self._nonfinite),
        }
        who = {k: v for k, v in who.items() if v}
        deadline = self.cfg["cluster"].get("round_deadline_s")
        words = {
            "late": f"did not reply within cluster.round_deadline_s={deadline}",
            "failed": "were on a failed or lost host",
            "nonfinite": "sent a non-finite update",
        }
        parts = [f"{len(v)} client(s) {words[k]}" for k, v in who.items()]
        if not len(sampled):
            parts.append("no client was sampled")
        if not parts:
            parts.append("the attack removed every update (only Byzantine clients answered)")
        return "no usable update: " + "; ".join(parts), who

    def faults(self) -> dict[str, list]:
        """What host faults lost so far (system/pool.py ``faults``): for summary.json."""
        return self.pool.faults()

    # -- privacy ---------------------------------------------------------------------------------
    def privacy_metrics(self) -> dict[str, Any]:
        """epsilon (worst client), epsilon_mean (over all clients; 0 before a client's first round)
        and epsilon_kind; client-level DP (a strategy wrapper) reports under epsilon_client_level
        when the clients are also sample-level private."""
        out: dict[str, Any] = {}
        if bool((self.client_epsilon > 0).any()):
            out["epsilon"] = float(self.client_epsilon.max())
            out["epsilon_mean"] = float(self.client_epsilon.mean())
            out["epsilon_kind"] = "sample-level"
        eps = self.strategy.epsilon(self.state)
        if eps is not None:
            if out:
                out["epsilon_client_level"] = eps
            else:
                out.update(epsilon=eps, epsilon_kind="client-level")
        if out:
            out["delta"] = self.delta
        return out

    def privacy_summary(self) -> dict[str, Any] | None:
        """summary.json's ``privacy``: the epsilon reported and, for client-level DP, the mechanism
        that was released (``strategy.mechanism``), so that anyone can recompute the epsilon."""
        out = self.privacy_metrics()
        if not out:
            return None
        mechanism = self.strategy.mechanism(self.state)
        if mechanism is not None:
            out["mechanism"] = mechanism
        return out

    def _budget_stop(self, assignment: dict[int, list[int]], r: int) -> str | None:
        """A message if round r would take a client (or the run) past privacy.target_epsilon."""
        if self.target_epsilon is None:
            return None
        target = float(self.target_epsilon)
        eps = self.strategy.epsilon_after(self.state)
        if eps is not None:
            if eps > target:
                return (
                    f"privacy budget: round {r + 1} would raise the client-level epsilon to "
                    f"{eps:.4g} > privacy.target_epsilon={target:g} (delta={self.delta:g}); "
                    f"stopping after {r} rounds"
                )
        after: dict[int, float] = {}
        if not hasattr(self.pool, "call"):
            return None
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

    @torch.no_grad()
    def evaluate(self, batch: int = 4096) -> dict[str, float]:
        """Test accuracy and loss of the global model."""
        p = self.spec.unflatten(self.params)
        correct, total_loss = 0.0, 0.0
        n = len(self.y_test)
        for i in range(0, n, batch):
            xb, yb = self.x_test[i : i + batch], self.y_test[i : i + batch]
            out = functional_call(self.model, p, (xb,))
            total_loss += float(self.loss(out, yb).sum())
            if self.num_classes > 1:
                correct += float((out.argmax(1) == yb).sum())
        res = {"loss": total_loss / n}
        if self.num_classes > 1:
            res["accuracy"] = correct / n
        return res

    # -- state -----------------------------------------------------------------------------------
    def get_params(self) -> torch.Tensor:
        return self.params

    def state_dict(self) -> dict[str, Any]:
        agg_state = getattr(self.aggregator, "state_dict", lambda: {})()
        return {
            "round": self.round_idx,
            "params": self.params.clone(),
            "strategy": self.state,
            "aggregator": agg_state,
            "extras_aggregation": self.extras_aggregation.state_dict(),
            "adversary": self.adversary.state_dict(),
            "clients": self.pool.state_dict(),  # per-client state of the local rule, on the hosts
            "faults": self.pool.faults(),  # lost hosts, lost client state, clients out of the run
            "privacy": self._privacy_state(),
        }

    def _privacy_state(self) -> dict[str, Any]:
        """Per-client epsilons and the hosts' accountant histories (sample-level DP)."""
        merged: dict[str, Any] = {}
        if not hasattr(self.pool, "call"):
            return {"client_epsilon": self.client_epsilon.clone(), "trainers": merged}
        for part in self.pool.call("privacy_state").values():
            if part:
                merged.setdefault("accountant", part.get("accountant"))
                merged.setdefault("histories", {}).update(part.get("histories", {}))
        return {"client_epsilon": self.client_epsilon.clone(), "trainers": merged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = state["params"]
        if params.shape != self.params.shape:
            raise ValueError(
                f"checkpoint holds {params.numel()} parameters, the configured model has "
                f"{self.params.numel()}; resume with the config the checkpoint was written with"
            )
        self.params = params.clone()
        self.state = state["strategy"]
        self.round_idx = int(state["round"])
        if hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(state.get("aggregator", {}))
        self.extras_aggregation.load_state_dict(state.get("extras_aggregation", {}))
        self.adversary.load_state_dict(state.get("adversary", {}))
        self.pool.load_state_dict(state.get("clients", {}))
        self.pool.load_faults(state.get("faults", {}))
        privacy = state.get("privacy") or {}
        if "client_epsilon" in privacy:
            self.client_epsilon = privacy["client_epsilon"].clone()
        if privacy.get("trainers"):
            n = len(getattr(self.pool, "hosts", None) or getattr(self.pool, "actors", []))
            self.pool.call("load_privacy_state", {h: (privacy["trainers"],) for h in range(n)})

    def ping(self) -> bool:
        return True
