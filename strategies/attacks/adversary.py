"""Adversary: the run's threat model, applied where the round's updates meet (the server step).

Threat model (DESIGN.md "Adversary", ../shared/specs/robust.md):

* **Who.** The Byzantine clients are the ``attack.f`` clients with the lowest ids (0..f-1). With a
  random partition (``partition=iid`` or ``dirichlet``) this is a random set of data shards. With
  partial participation only the sampled ones act in a round.
* **Model poisoning** (sign flip, reversed, ALIE, FOE/IPM, Gaussian, uniform, mimic, inf/NaN,
  crash) is applied here, on the server, after the round's updates are gathered and before the
  aggregator sees them. The adversary is omniscient: it sees every honest update of the round,
  and the adaptive attacks (``alie_adaptive``, ``foe_adaptive``) also probe the aggregation rule
  itself: exactly the rule of the run, with the same weights and row order, but on a deep copy, so
  probing a stateful rule (centered clipping's centre, bucketing's random stream) never advances
  the state the real aggregation uses. The Byzantine clients still train (their honest work is
  what the omniscient adversary replaces).
* **Data poisoning** (label flip, noisy data) acts in the client: the runner poisons the Byzantine
  clients' shards once, at placement (``poison_data``); their updates then pass here unchanged.
* **Crash**: the Byzantine clients send nothing, so the aggregator receives ``n - f`` inputs;
  ``inputs_per_round`` gives that count so the rule's precondition is checked against it.
* **Non-finite vectors** (``attack=inf_vector``, ``attack=nan_vector``): a row with NaN or +-inf is dropped before
  aggregation, as the server drops non-finite honest updates, and counted: ``last_dropped_nonfinite``
  (the server adds it to the round's ``dropped_nonfinite`` metric). The aggregator therefore gets
  ``n - f`` inputs, as under crash, and its precondition is checked against that count.
* **Per-client extras** (SCAFFOLD's delta c_i, FedDyn's delta grad_i, FedSpeed's delta ghat_i):
  Byzantine clients corrupt them too. A model attack replaces each extra's Byzantine rows with
  the same rule as the update's, computed from that extra's honest rows (``Attack.extra``: sign
  flip sends minus the honest extras' mean, ALIE their mean - z std, uniform/Gaussian fresh draws
  of the extra's length, mimic the copied client's extras, the adaptive attacks line-search
  against the rule that aggregates the extra); crash sends no extras either; a non-finite row
  leaves update and extras together. Data poisoning leaves extras as the client computed them
  (on its poisoned data).
* **No honest update in a round** (partial participation that samples only Byzantine clients):
  attacks built from honest statistics cannot be crafted, so the Byzantine rows are dropped and the
  round has no usable update (the server then keeps the model and reports ``skipped``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from flagstaff.clients.byzantine import Attack
from flagstaff.clients.seeds import stream
from flagstaff.strategies.attacks.model import Crash, InfAttack, NaNAttack
from flagstaff.strategies.attacks.round import AttackedRound, attack_round

__all__ = ["Adversary"]


class Adversary:
    """Wraps one attack with the Byzantine client set {0, ..., f-1} (or ``byzantine``).

    ``attack``: the run's attack object (``conf/attack``, built once by ``system.build``);
    ``num_clients``: the total number of clients (f must be smaller; None: not known, e.g. in a
    Flower app); ``byzantine``: the Byzantine
    client ids when they are not the f lowest (e.g. a Flower app's choice), default ``range(f)``.
    """

    #: attacks whose Byzantine vectors never reach the aggregator (sent nothing, or dropped)
    REMOVED: tuple[type, ...] = (Crash, InfAttack, NaNAttack)

    def __init__(
        self, attack: Attack, num_clients: int | None, byzantine: Iterable[int] | None = None
    ) -> None:
        self.attack = attack
        self.f = int(attack.f)
        if self.f < 0 or (num_clients is not None and self.f >= num_clients):
            raise ValueError(
                f"attack.f={self.f} must be in [0, num_clients={num_clients}); it counts the "
                "Byzantine clients"
            )
        self.name = str(attack.name)
        self.kind = attack.kind
        self.seed = int(attack.seed)
        ids = np.arange(self.f) if byzantine is None else np.asarray(list(byzantine), np.int64)
        self._byzantine = np.unique(ids.astype(np.int64))
        #: non-finite Byzantine rows dropped by the last ``apply`` call
        self.last_dropped_nonfinite = 0

    @property
    def byzantine(self) -> np.ndarray:
        """The Byzantine client ids (sorted), whether or not the attack is active."""
        return self._byzantine

    @property
    def active(self) -> bool:
        """Whether any client misbehaves (f > 0 and an attack other than ``none``)."""
        return self.f > 0 and self.name != "none"

    def is_byzantine(self, client_ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``client_ids`` are Byzantine (ids below f by default, when active)."""
        ids = np.asarray(client_ids)
        return np.isin(ids, self._byzantine) if self.active else np.zeros(len(ids), bool)

    def inputs_per_round(self, per_round: int) -> int:
        """How many vectors reach the aggregator when every sampled client answers.

        Crash removes the (up to) f Byzantine clients, and so do the non-finite attacks (inf,
        NaN), whose vectors are dropped before aggregation; every other attack keeps
        n = per_round. The rule's precondition (e.g. Bulyan's n >= 4f + 3) is checked against it.
        """
        removes = self.active and isinstance(self.attack, self.REMOVED)
        return per_round - min(self.f, per_round) if removes else per_round

    def check(self, per_round: int) -> None:
        """Raise ``ValueError`` if the attack cannot run with ``per_round`` sampled clients.

        E.g. ALIE's z formula needs f < n/2. Called by ``system.build`` so such a configuration
        fails before any work starts.
        """
        if self.active and self.kind == "model":
            self.attack.check(per_round)

    def apply(
        self,
        U: torch.Tensor,
        w: torch.Tensor,
        client_ids: np.ndarray,
        aggregator: Any,
        round_idx: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's updates after the attack (:meth:`attack_round` without extras).

        ``U`` (n, d) and ``w`` (n,) are the gathered finite updates and sample counts in client-id
        order, ``client_ids`` their ids, ``aggregator`` the run's rule (only deep copies of it are
        called). Returns the (possibly shorter) ``(U, w)`` the aggregator receives. Crafted
        non-finite rows are dropped and counted in ``last_dropped_nonfinite``.
        """
        out = self.attack_round(U, w, client_ids, aggregator, round_idx)
        return out.U, out.w

    def attack_round(
        self,
        U: torch.Tensor,
        w: torch.Tensor,
        client_ids: np.ndarray,
        aggregator: Any,
        round_idx: int = 0,
        extras: dict[str, torch.Tensor] | None = None,
        extras_rule: Any = None,
    ) -> AttackedRound:
        """Everything the round's clients sent, after the attack: updates and per-client extras.

        ``extras`` (name -> (n, e) rows, same order as ``U``): SCAFFOLD's delta c_i, FedDyn's delta
        grad_i, FedSpeed's delta ghat_i. A model attack replaces the Byzantine rows of each with
        the same rule as the update's, computed from that extra's honest rows; crash removes the
        Byzantine rows everywhere; non-finite rows leave update and extras together
        (``strategies.attacks.round.attack_round``). ``extras_rule(name)`` is the rule the strategy
        aggregates that extra with (what adaptive attacks probe). Data attacks and rounds without
        a sampled Byzantine client return the inputs unchanged.
        """
        self.last_dropped_nonfinite = 0
        byz = torch.as_tensor(self.is_byzantine(client_ids), dtype=torch.bool)
        if not self.active or self.kind != "model" or not bool(byz.any()):
            keep = torch.ones(len(U), dtype=torch.bool)
            return AttackedRound(U, w, dict(extras or {}), keep)
        gen = stream(self.seed, round_idx, scheme="attack")
        out = attack_round(self.attack, U, w, byz, aggregator, gen, extras, extras_rule)
        self.last_dropped_nonfinite = out.dropped_nonfinite
        return out

    def poison_data(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, client: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data-poisoning attacks transform a Byzantine client's shard once, at placement."""
        if not self.active or self.kind != "data" or not self.is_byzantine([client])[0]:
            return x, y
        gen = stream(self.seed, client, scheme="poison")
        return self.attack.poison(x, y, num_classes, gen)

    def state_dict(self) -> dict[str, Any]:
        """The attack's checkpointable state (e.g. mimic's direction estimate)."""
        return self.attack.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            self.attack.load_state_dict(state)
