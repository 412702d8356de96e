"""The server half of a federated round, written once, on plain tensors and states (no Ray, no Flower).

Every runtime calls it: the parameter server (``system.server.ParameterServer``, backends local and
ray), the Flower adapter (``strategies.flower.FlagstaffStrategy``, backend flower and Flower apps)
and, for its aggregation part (:func:`finite_rows`), the peer-to-peer mode. One round's server half
(McMahan et al. 2017 Alg. 1, server side; the omniscient adversary of the threat model,
docs/robustness.md):

1. :class:`Replies` sorted by client id (the result does not depend on arrival order);
2. clients whose update or any extra is not finite are dropped whole; codec payloads are decoded
   (``decoder``, ``system.codecs``) and non-finite decodes dropped;
3. the mean train loss of the honest finite clients, unless the run is private (un-noised client
   statistics are not covered by epsilon, docs/privacy.md);
4. the adversary replaces the Byzantine rows of the updates and of every extra
   (``strategies.attacks``);
5. the strategy's ``pre_aggregate`` (client-level DP clips there), the aggregator, a finiteness check,
   the strategy's ``update`` (extras combined with the same rule: ``ExtrasAggregation``);
6. privacy metrics: the worst and mean sample-level epsilon reported by the clients
   (:class:`PrivacyLedger`) and the strategy's client-level epsilon.

A round without any usable update keeps the parameters and says why (:func:`skip_reason`), except
under client-level DP (``Strategy.releases_empty_rounds``): every round is one release of the
sampled Gaussian mechanism, so a round with nobody sampled, or no finite update, runs the noisy
update on a zero sum and is accounted, and the metrics log the expected number of clients m and
its bytes, not the realised ones (docs/privacy.md).
The second entry, :meth:`ServerStep.reduced`, is the host-reduced path: when the aggregator is a
weighted mean and nothing needs individual updates (:meth:`ServerStep.can_reduce`), each host sends
``sum_i w_i u_i`` in float64 (:func:`weighted_sum`) and the server adds them in host order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flagstaff.strategies.aggregators.base import as_aggregator
from flagstaff.strategies.attacks import Adversary
from flagstaff.strategies.base import ExtrasAggregation, RoundExtras, State, Strategy

__all__ = [
    "Aggregated",
    "HostSum",
    "PrivacyLedger",
    "Replies",
    "ServerStep",
    "StepResult",
    "finite_rows",
    "skip_reason",
    "weighted_sum",
]


@dataclass
class Replies:
    """What a round's clients sent, one row per client, in any order.

    ``updates`` (n, w): x_i - x (or a codec's payload of width w); ``weights`` (n,) sample counts;
    ``losses`` (n,) mean train losses (NaN where unknown); ``extras`` name -> (n, e) per-client extra
    vectors (SCAFFOLD's delta c_i, ...); ``epsilon`` (n,) the sample-level epsilon each client's
    accountant reports so far, or None for non-private clients.
    """

    client_ids: np.ndarray
    updates: torch.Tensor
    weights: torch.Tensor
    losses: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    epsilon: torch.Tensor | None = None

    @classmethod
    def empty(cls, width: int) -> Replies:
        """No reply at all (every host late or failed)."""
        e = torch.empty(0)
        return cls(np.empty(0, np.int64), torch.empty(0, width), e, e, {})

    @classmethod
    def concat(cls, parts: list[Replies], width: int) -> Replies:
        """The rows of several groups (e.g. hosts) together, group order kept."""
        if not parts:
            return cls.empty(width)
        eps = [p.epsilon for p in parts if p.epsilon is not None]
        return cls(
            np.concatenate([p.client_ids for p in parts]),
            torch.cat([p.updates for p in parts]),
            torch.cat([p.weights for p in parts]),
            torch.cat([p.losses for p in parts]),
            {n: torch.cat([p.extras[n] for p in parts]) for n in parts[0].extras},
            torch.cat(eps) if eps else None,
        )

    def sorted(self) -> Replies:
        """The rows in client-id order (a stable sort: the result does not depend on arrival)."""
        order = np.argsort(self.client_ids, kind="stable")
        return Replies(
            self.client_ids[order],
            self.updates[order],
            self.weights[order],
            self.losses[order],
            {n: v[order] for n, v in self.extras.items()},
            None if self.epsilon is None else self.epsilon[order],
        )


@dataclass
class HostSum:
    """What one host sends on the reduced path: ``total`` = sum_i w_i u_i (float64) over its finite
    updates, ``weight`` = sum_i w_i, ``finite`` (K,) which of its clients entered the sum."""

    host_id: int
    client_ids: np.ndarray
    total: torch.Tensor
    weight: float
    finite: torch.Tensor
    losses: torch.Tensor
    epsilon: torch.Tensor | None = None


@dataclass
class Aggregated:
    """The aggregation part of a round: the aggregate (None: no usable update), the round's extras
    after the attack, the strategy state after ``pre_aggregate``, the metrics and the ids of the
    clients dropped for non-finite vectors."""

    aggregate: torch.Tensor | None
    extras: RoundExtras | None
    state: State
    metrics: dict[str, Any]
    nonfinite: np.ndarray


@dataclass
class StepResult:
    """A whole server step: the new parameters and state (unchanged when ``skipped``)."""

    params: torch.Tensor
    state: State
    metrics: dict[str, Any]
    nonfinite: np.ndarray
    skipped: bool


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """(n,) True where every row of every (n, .) tensor is finite: a client (or a peer's message)
    is dropped whole when anything it sent is not."""
    keep = torch.isfinite(tensors[0]).all(dim=1)
    for t in tensors[1:]:
        keep &= torch.isfinite(t).all(dim=1)
    return keep


def weighted_sum(
    updates: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A host's reduced message: (sum_i w_i u_i over the finite rows in float64, sum_i w_i (1,),
    finite (K,)). Float64 accumulation makes the float32 aggregate independent of how clients are
    grouped into hosts in practice (any difference would sit below float32 rounding)."""
    finite = torch.isfinite(updates.sum(dim=1))  # finite sum: every entry finite (one cheap pass)
    if not bool(finite.all()):  # a float32 sum can overflow on finite entries: look at those rows
        finite = torch.isfinite(updates).all(dim=1)
    w = torch.where(finite, weights, 0.0).double()
    if not bool(finite.all()):
        updates = torch.where(finite[:, None], updates, 0.0)
    # column blocks converted to float64 one at a time stay in cache (all of (K, d) at once writes
    # and re-reads twice its size: 370 -> 190 us for a W1 host of 50 clients); each block in the
    # whole copy's column-major layout and widths a multiple of 64, so every coordinate's sum runs
    # the same kernel path as one whole mv, bit for bit (tested) on one CPU thread; with more
    # threads (or on a GPU) the kernel splits the sum differently: one whole mv there
    d = updates.shape[1]
    step = max(512, -(-d // 64 // 64) * 64)  # at most about 64 blocks
    if updates.device.type != "cpu" or torch.get_num_threads() > 1 or d <= step:
        return torch.mv(updates.t().double(), w)[None], w.sum()[None], finite
    out = torch.empty(d, dtype=torch.float64, device=updates.device)
    for j in range(0, d, step):
        torch.mv(updates[:, j : j + step].double().t(), w, out=out[j : j + step])
    return out[None], w.sum()[None], finite


def skip_reason(
    sampled: int,
    late: list[int],
    failed: list[int],
    nonfinite: list[int],
    deadline: float | None = None,
) -> tuple[str, dict[str, list[int]]]:
    """Why a round has no usable update, in words and as client ids per cause (late, failed,
    nonfinite): the run loop's line per skipped round and its stop message use both."""
    who = {"late": sorted(late), "failed": sorted(failed), "nonfinite": sorted(nonfinite)}
    who = {k: v for k, v in who.items() if v}
    words = {
        "late": f"did not reply within cluster.round_deadline_s={deadline}",
        "failed": "were on a failed or lost host",
        "nonfinite": "sent a non-finite update",
    }
    parts = [f"{len(v)} client(s) {words[k]}" for k, v in who.items()]
    if not sampled:
        parts.append("no client was sampled")
    if not parts:
        parts.append("the attack removed every update (only Byzantine clients answered)")
    return "no usable update: " + "; ".join(parts), who


class PrivacyLedger:
    """The sample-level epsilon each client's accountant reported last (``num_clients`` known: a
    tensor over all clients, 0 before a client's first round; else grown by client id)."""

    def __init__(self, num_clients: int | None = None) -> None:
        self.num_clients = num_clients
        self.client_epsilon = torch.zeros(num_clients or 0, dtype=torch.float64)
        self.seen: set[int] = set()

    def record(self, client_ids: np.ndarray, epsilon: torch.Tensor) -> None:
        ids = torch.as_tensor(np.asarray(client_ids, dtype=np.int64))
        if len(ids) and int(ids.max()) >= len(self.client_epsilon):
            grown = torch.zeros(int(ids.max()) + 1, dtype=torch.float64)
            grown[: len(self.client_epsilon)] = self.client_epsilon
            self.client_epsilon = grown
        self.client_epsilon[ids] = epsilon.to(torch.float64)
        self.seen.update(int(c) for c in ids.tolist())

    def metrics(self, client_level: float | None) -> dict[str, Any]:
        """epsilon (worst client), epsilon_mean (over all clients; with ``num_clients`` known) and
        epsilon_kind; the client-level epsilon of a DP strategy goes under epsilon_client_level
        when the clients are also sample-level private."""
        out: dict[str, Any] = {}
        if bool((self.client_epsilon > 0).any()):
            out["epsilon"] = float(self.client_epsilon.max())
            if self.num_clients:
                out["epsilon_mean"] = float(self.client_epsilon.mean())
            out["epsilon_kind"] = "sample-level"
        if client_level is not None:
            if out:
                out["epsilon_client_level"] = client_level
            else:
                out.update(epsilon=client_level, epsilon_kind="client-level")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"client_epsilon": self.client_epsilon.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "client_epsilon" in state:
            self.client_epsilon = state["client_epsilon"].clone()


class ServerStep:
    """The server half of a round for one run's strategy, aggregator and adversary.

    ``num_clients``: N, every client of the run (averages over all clients, epsilon_mean; None in
    a Flower app that does not know it); ``private``: the run is differentially private (no train
    loss in the metrics; replies that carry an epsilon make it private too); ``decoder``: a codec
    (``decode(payloads, round_idx)`` and ``payload_numel``) when clients send compressed updates;
    ``delta``: the DP delta reported beside epsilon.
    """

    def __init__(
        self,
        strategy: Strategy,
        aggregator: Any,
        adversary: Adversary,
        *,
        num_clients: int | None = None,
        private: bool = False,
        decoder: Any = None,
        delta: float | None = None,
    ) -> None:
        self.strategy = strategy
        self.aggregator = as_aggregator(aggregator)  # any fn(U, weights) works, asked as a rule
        self.adversary = adversary
        self.num_clients = num_clients
        self.private = bool(private) or strategy.epsilon_kind is not None
        self.decoder = decoder
        self.delta = delta
        # the per-client extras (SCAFFOLD's delta c_i, ...) go through the same rule (own state)
        self.extras_aggregation = ExtrasAggregation(aggregator)
        self.ledger = PrivacyLedger(num_clients)

    # -- the round's aggregation ---------------------------------------------------------------
    def can_reduce(self) -> bool:
        """Whether hosts may send sum_i w_i u_i instead of every u_i: the aggregator is a weighted
        mean, no model-poisoning attack needs the honest updates, the strategy neither transforms
        individual updates (client-level DP clipping) nor collects per-client extras (SCAFFOLD,
        ...), and no codec payload needs decoding."""
        rule = self.strategy.client_rule
        adv = self.adversary
        return (
            self.decoder is None
            and self.aggregator.decomposable
            and not (adv.active and adv.kind == "model")
            and not self.strategy.transforms_updates
            and not (rule.client_state if rule is not None else ())
        )

    def aggregate(
        self,
        state: State,
        replies: Replies,
        round_idx: int,
        num_params: int,
        num_clients: int | None = None,
    ) -> Aggregated:
        """Steps 1-5 up to the aggregate (see the module docstring); ``num_params``: d, the model's
        parameters; ``num_clients``: overrides N for this round (a Flower app learning its nodes)."""
        r = round_idx
        rep = replies.sorted()
        cids, U, w, losses, extra = rep.client_ids, rep.updates, rep.weights, rep.losses, rep.extras
        if rep.epsilon is not None:  # sample-level DP clients report their accountant's epsilon
            self.ledger.record(cids, rep.epsilon)
        width = self.decoder.payload_numel if self.decoder is not None else num_params
        if U.shape[1:] != (width,):
            what = f"{self.decoder.name} payloads of length {width}" if self.decoder else "updates"
            raise ValueError(
                f"round {r + 1}: clients returned rows of length {U.shape[1]}, expected {what} for "
                f"the model's {num_params} parameters; every client must run the same model and "
                "comm config"
            )
        metrics: dict[str, Any] = {}
        finite = finite_rows(U, *extra.values())
        if self.decoder is not None:  # decode every payload; non-finite ones (or decodes) dropped
            U = self.decoder.decode(torch.where(finite[:, None], U, 0.0), r)
            finite &= torch.isfinite(U).all(dim=1)
        metrics["dropped_nonfinite"] = int((~finite).sum())
        nonfinite = cids[~finite.numpy()]
        honest_loss = losses[finite & ~torch.as_tensor(self.adversary.is_byzantine(cids))]
        if len(honest_loss) and not (self.private or rep.epsilon is not None):
            metrics["train_loss"] = float(honest_loss.mean())
        U, w, cids = U[finite], w[finite], cids[finite.numpy()]
        extra = {n: v[finite] for n, v in extra.items()}
        # Byzantine clients corrupt everything they send: updates and extras (strategies/attacks/)
        att = self.adversary.attack_round(
            U, w, cids, self.aggregator, r, extra, self.extras_aggregation.rule
        )
        U, w, cids = att.U, att.w, cids[att.keep.cpu().numpy()]
        n_all = num_clients or self.num_clients or 1
        extras = RoundExtras(att.extras, cids, n_all, self.extras_aggregation)
        metrics["dropped_nonfinite"] += att.dropped_nonfinite  # inf/NaN attacks
        if extras.values and self.strategy.epsilon_kind == "client-level":
            raise ValueError(client_level_extras_message(self.strategy))
        release = self.strategy.releases_empty_rounds  # client-level DP: every round is released
        if len(U) or release:  # e.g. client-level DP clipping
            U, w, state = self.strategy.pre_aggregate(U, w, state, r)
        agg = self.aggregator(U, w) if len(U) else None
        if agg is None and release:  # nobody sampled or usable: the noise on a zero sum
            agg = torch.zeros(num_params, dtype=rep.updates.dtype)
        if self.strategy.epsilon_kind == "client-level":
            metrics.update(self._expected_counts(state, rep.updates, num_params))
        return Aggregated(agg, extras, state, metrics, nonfinite)

    def _expected_counts(
        self, state: State, updates: torch.Tensor, num_params: int
    ) -> dict[str, Any]:
        """Under client-level DP the number of sampled clients is what the fixed denominator m
        hides: ``clients`` is m and ``bytes_up``/``bytes_down`` are what m clients move (one
        payload up, the parameters down; such strategies broadcast nothing else), replacing the
        runtime's realised counts (the runtimes merge the step's metrics after their own)."""
        m = int(self.strategy.mechanism(state)["clients_per_round"])
        size = updates.element_size()
        return {
            "clients": m,
            "bytes_up": m * updates.shape[1] * size,
            "bytes_down": m * num_params * size,
        }

    def __call__(
        self,
        params: torch.Tensor,
        state: State,
        replies: Replies,
        round_idx: int,
        num_clients: int | None = None,
    ) -> StepResult:
        """One round's server half: aggregate, check, update (see the module docstring)."""
        a = self.aggregate(state, replies, round_idx, params.numel(), num_clients)
        res = self.apply(params, a.state, a.aggregate, a.extras, round_idx)
        return StepResult(res.params, res.state, a.metrics, a.nonfinite, res.skipped)

    def reduced(
        self, params: torch.Tensor, state: State, sums: list[HostSum], round_idx: int
    ) -> StepResult:
        """The host-reduced path: add the hosts' weighted sums in host order in float64, divide by
        the summed weight, then the same check and update as :meth:`__call__` (no extras)."""
        sums = sorted(sums, key=lambda s: s.host_id)
        metrics: dict[str, Any] = {}
        metrics["dropped_nonfinite"] = int(sum(int((~s.finite).sum()) for s in sums))
        nonfinite = np.concatenate([s.client_ids[~s.finite.numpy()] for s in sums] or [[]]).astype(
            np.int64
        )
        losses = [s.losses[s.finite] for s in sums]
        losses = torch.cat(losses) if losses else torch.empty(0)  # no host replied in time
        private = self.private or any(s.epsilon is not None for s in sums)
        if len(losses) and not private:
            metrics["train_loss"] = float(losses.mean())
        for s in sums:
            if s.epsilon is not None:
                self.ledger.record(s.client_ids, s.epsilon)
        wsum = sum(float(s.weight) for s in sums)
        agg = None
        if wsum > 0:
            total = torch.stack([s.total for s in sums]).sum(0)
            agg = (total / wsum).to(params.dtype)
        res = self.apply(params, state, agg, None, round_idx)
        return StepResult(res.params, res.state, metrics, nonfinite, res.skipped)

    def apply(
        self,
        params: torch.Tensor,
        state: State,
        aggregate: torch.Tensor | None,
        extras: RoundExtras | None,
        round_idx: int,
    ) -> StepResult:
        """Step 5's end: check the aggregate and let the strategy update the parameters and its
        state; ``aggregate`` None (no usable update) keeps both (the caller says why), unless the
        strategy ``releases_empty_rounds`` (client-level DP): then it updates on a zero aggregate."""
        none = np.empty(0, np.int64)
        if aggregate is None and self.strategy.releases_empty_rounds:  # released all the same
            empty = params.new_zeros(0, params.numel())
            _, _, state = self.strategy.pre_aggregate(empty, params.new_zeros(0), state, round_idx)
            aggregate = torch.zeros_like(params)
        if aggregate is None:
            return StepResult(params, state, {}, none, skipped=True)
        if not torch.isfinite(aggregate).all():
            raise FloatingPointError(
                f"round {round_idx + 1}: the aggregate is not finite; lower client.lr or use a "
                "robust aggregator"
            )
        params, state = self.strategy.update(params, aggregate, state, round_idx, extras=extras)
        return StepResult(params, state, {}, none, skipped=False)

    # -- privacy ---------------------------------------------------------------------------------
    def privacy_metrics(self, state: State) -> dict[str, Any]:
        """epsilon, epsilon_mean, epsilon_kind (and epsilon_client_level), delta; {} without DP."""
        out = self.ledger.metrics(self.strategy.epsilon(state))
        if out and self.delta is not None:
            out["delta"] = self.delta
        return out

    def privacy_summary(self, state: State) -> dict[str, Any] | None:
        """summary.json's ``privacy``: the epsilon reported and, for client-level DP, the mechanism
        that was released (``strategy.mechanism``), so that anyone can recompute the epsilon."""
        out = self.privacy_metrics(state)
        if not out:
            return None
        mechanism = self.strategy.mechanism(state)
        if mechanism is not None:
            out["mechanism"] = mechanism
        return out

    def budget_stop(self, state: State, round_idx: int, target: float | None) -> str | None:
        """A message if round ``round_idx`` would raise the strategy's client-level epsilon past
        ``target`` (privacy.target_epsilon); None otherwise (or without a budget)."""
        if target is None:
            return None
        eps = self.strategy.epsilon_after(state)
        if eps is None or eps <= float(target):
            return None
        delta = f" (delta={self.delta:g})" if self.delta is not None else ""
        return (
            f"privacy budget: round {round_idx + 1} would raise the client-level epsilon to "
            f"{eps:.4g} > privacy.target_epsilon={float(target):g}{delta}; stopping after "
            f"{round_idx} rounds"
        )

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the step keeps besides the strategy state: the aggregator's, the extras' rules',
        the adversary's and the clients' epsilons."""
        return {
            "aggregator": self.aggregator.state_dict(),
            "extras_aggregation": self.extras_aggregation.state_dict(),
            "adversary": self.adversary.state_dict(),
            "privacy": self.ledger.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state.get("aggregator", {}))
        self.extras_aggregation.load_state_dict(state.get("extras_aggregation", {}))
        self.adversary.load_state_dict(state.get("adversary", {}))
        self.ledger.load_state_dict(state.get("privacy") or {})


def client_level_extras_message(strategy: Strategy) -> str:
    """Why client-level DP around a strategy whose clients send extras is refused (one line)."""
    rule = strategy.client_rule
    names = list(rule.client_state) if rule is not None else []
    return (
        f"strategy={strategy.name}: client-level DP clips and noises the clients' updates only, "
        f"but this strategy's clients also send per-client extras {names} that would reach the "
        "server state unclipped and un-noised (the reported epsilon would not cover them); wrap a "
        "strategy without per-client state (fedavg, fedavgm, fedadam, fedprox, fedsam, fedsvd) "
        "or use sample-level DP (client=dpsgd) with this strategy"
    )
