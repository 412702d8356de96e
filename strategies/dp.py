"""Client-level differential privacy as a strategy wrapper: DP-FedAvg (McMahan, Ramage, Talwar,
Zhang, ICLR 2018, "Learning Differentially Private Recurrent Language Models"), with optional
adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, "Differentially Private
Learning with Adaptive Clipping").

``ClientLevelDP(inner, ...)`` wraps any strategy (STYLE.md point 3) and adds two steps around the
aggregation:

* ``pre_aggregate`` (before the aggregator): clip every client update to norm S
  (u * min(1, S / ||u||)) and give all clients weight 1;
* ``update`` (after it): the mean over the received updates is turned into a fixed-denominator sum
  / m with m = clients_per_round (sensitivity S / m), Gaussian noise N(0, (z S / m)^2 I) is added,
  and the result goes to the inner strategy's update.

The privacy loss is accounted by Opacus' accountant (``rdp`` or ``prv``) as the sampled Gaussian
mechanism with sampling rate q = clients_per_round / num_clients and noise multiplier z, one step
per round (as in McMahan et al.; the server samples a fixed-size subset, which the analysis treats as
Poisson sampling with the same rate). The accountant history is part of the strategy state, so it is
checkpointed and composes over the whole run. The aggregator must be the plain mean.

Adaptive clipping (Andrew et al., Algorithm 1; as TF-Privacy's ``QuantileEstimatorQuery``): each
round the server releases the *centred* count c = sum_i (1[||u_i|| <= S] - 1/2) + N(0, sigma_b^2),
whose sensitivity is 1/2 under adding or removing one client, and b~ = c / m + 1/2 (the fixed
expected denominator m) updates S <- S exp(-eta (b~ - gamma)) for the next round (geometric update towards the gamma-quantile of the norms). The update noise
uses z_u = (z^-2 - (2 sigma_b)^-2)^(-1/2), so that the two Gaussian releases together have noise
multiplier (z_u^-2 + (sigma_b / (1/2))^-2)^(-1/2) = z (Andrew et al., Theorem 1): that effective
multiplier is what the accountant steps with. ``mechanism(state)`` writes all of it out (the runner
puts it in summary.json under ``privacy.mechanism``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from flagstaff.strategies.base import RoundExtras, Strategy

__all__ = ["ClientLevelDP", "COUNT_SENSITIVITY", "DPState"]

#: sensitivity of the centred count sum_i (1[||u_i|| <= S] - 1/2) when one client is added or removed
COUNT_SENSITIVITY = 0.5


def _epsilon(history: list, delta: float, kind: str) -> float:
    """Opacus' epsilon for a history (memoized: the budget check and the report ask the same)."""
    from flagstaff.clients.dp import epsilon_of_history

    return epsilon_of_history(history, delta, kind)


@dataclass(frozen=True)
class DPState:
    """ClientLevelDP's state: the wrapped strategy's, the clip S for the next round, the accountant
    history ([noise multiplier, q, steps] runs), the last round's clip, and this round's clipping
    counts (set by ``pre_aggregate``, used by ``update``; not checkpointed)."""

    inner: Any
    clip: float
    history: list = field(default_factory=list)
    last_clip: float | None = None
    round: dict = field(default_factory=dict)


class ClientLevelDP(Strategy):
    """DP-FedAvg around ``inner`` (see the module docstring).

    ``clip`` S (initial S when ``adaptive``), ``noise_multiplier`` z (null: calibrated with
    ``get_noise_multiplier`` for ``target_epsilon`` over ``rounds`` rounds, same accountant),
    ``target_quantile`` gamma, ``clip_lr`` eta, ``count_stddev`` sigma_b (null: m / 20, Andrew et
    al.'s recommendation), ``num_clients`` N and ``clients_per_round`` m (q = m / N), ``delta``,
    ``accountant`` (rdp | prv), ``seed`` (noise: one generator per round derived from it).
    """

    epsilon_kind = "client-level"
    transforms_updates = True  # pre_aggregate clips each update: hosts cannot pre-sum
    releases_empty_rounds = True  # a round with nobody sampled or usable is released and accounted

    def __init__(
        self,
        inner: Strategy,
        clip: float = 1.0,
        noise_multiplier: float | None = 1.0,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_stddev: float | None = None,
        num_clients: int = 1,
        clients_per_round: int = 1,
        rounds: int = 1,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        accountant: str = "rdp",
        seed: int = 0,
        sampling: str = "fixed",
    ) -> None:
        sampling = str(getattr(sampling, "value", sampling))  # the config's enum or its name
        if sampling != "bernoulli" and clients_per_round != num_clients:
            raise ValueError(
                f"strategy=dp_fedavg needs sampling=bernoulli, got sampling={sampling}: its "
                "accountant analyses Poisson sampling of clients (each independently with "
                "probability q = clients_per_round/num_clients) under adding or removing one "
                f"client, and sampling=fixed (exactly {clients_per_round} of {num_clients} "
                "without replacement) is another mechanism with a larger epsilon"
            )
        if clip <= 0:
            raise ValueError(f"strategy.clip must be > 0, got {clip}")
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError("clients_per_round must be between 1 and num_clients")
        if accountant not in ("rdp", "prv"):
            raise ValueError(f"privacy.accountant={accountant!r}: choose rdp or prv")
        if not 0 < delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {delta}")
        if not 0 < target_quantile < 1 or clip_lr <= 0:
            raise ValueError("strategy.target_quantile must be in (0, 1) and strategy.clip_lr > 0")
        self.inner = inner
        self.clip = float(clip)
        self.m, self.num_clients = int(clients_per_round), int(num_clients)
        self.sample_rate = self.m / self.num_clients
        self.delta, self.accountant, self.seed = float(delta), accountant, int(seed)
        self.target_epsilon = target_epsilon
        if noise_multiplier is None:
            if target_epsilon is None:
                raise ValueError(
                    "strategy=dp_fedavg needs strategy.noise_multiplier or privacy.target_epsilon"
                )
            from opacus.accountants.utils import get_noise_multiplier

            noise_multiplier = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=self.sample_rate,
                steps=int(rounds),
                accountant=accountant,
            )
        if noise_multiplier < 0:
            raise ValueError(f"strategy.noise_multiplier must be >= 0, got {noise_multiplier}")
        self.noise_multiplier = float(noise_multiplier)
        self.adaptive = bool(adaptive)
        self.target_quantile, self.clip_lr = float(target_quantile), float(clip_lr)
        self.count_stddev = float(count_stddev) if count_stddev is not None else self.m / 20.0
        self.update_noise_multiplier = self.noise_multiplier
        if self.adaptive and self.noise_multiplier > 0:
            z, sb = self.noise_multiplier, self.count_stddev
            if sb <= 0 or z**-2 <= (2 * sb) ** -2:
                raise ValueError(
                    f"adaptive clipping with noise_multiplier={z} needs strategy.count_stddev > "
                    f"z/2 = {z / 2:.3g} (got {sb}); raise count_stddev or lower the noise"
                )
            self.update_noise_multiplier = (z**-2 - (sb / COUNT_SENSITIVITY) ** -2) ** -0.5

    @property
    def effective_noise_multiplier(self) -> float:
        """The noise multiplier of everything released per round, which the accountant uses: the
        update's z_u alone, or with adaptive clipping the composition of the update and the count
        releases, (z_u^-2 + (sigma_b / Delta_count)^-2)^(-1/2) (Gaussian mechanisms compose by
        adding their inverse squared multipliers; Andrew et al., Theorem 1)."""
        zu = self.update_noise_multiplier
        if not self.adaptive or zu == 0:
            return zu
        return (zu**-2 + (self.count_stddev / COUNT_SENSITIVITY) ** -2) ** -0.5

    # -- delegation -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"dp({self.inner.name})"

    @property
    def client_rule(self) -> Any:
        return self.inner.client_rule

    def bind(self, model, spec) -> None:
        self.inner.bind(model, spec)

    def init(self, params: torch.Tensor) -> DPState:
        return DPState(self.inner.init(params), self.clip)

    def broadcast(self, params: torch.Tensor, state: DPState) -> dict[str, torch.Tensor]:
        return self.inner.broadcast(params, state.inner)

    # -- the two DP steps -------------------------------------------------------------------------
    def pre_aggregate(
        self, U: torch.Tensor, weights: torch.Tensor, state: DPState, round_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, DPState]:
        """Clip each update to the current S; equal weights; remember the unclipped count."""
        clip = float(state.clip)
        norms = U.norm(dim=1)
        factor = torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)
        info = {"n": len(U), "unclipped": int((norms <= clip).sum())}
        return U * factor[:, None], torch.ones_like(weights), replace(state, round=info)

    def update(
        self,
        params: torch.Tensor,
        aggregate: torch.Tensor,
        state: DPState,
        round_idx: int,
        extras: RoundExtras | None = None,
    ) -> tuple[torch.Tensor, DPState]:
        info = state.round or {"n": self.m, "unclipped": 0}
        clip = float(state.clip)
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, round_idx, 0xC11]).generate_state(1)[0])
        )
        total = aggregate * (info["n"] / self.m)  # fixed denominator m: sensitivity S / m
        std = self.update_noise_multiplier * clip / self.m
        noise = torch.randn(total.shape, generator=gen, dtype=torch.float64) * std
        noised = total + noise.to(total.dtype)
        history = self._step_history(state.history)
        if self.adaptive:
            # centred count (sensitivity 1/2), fixed expected denominator m (Andrew et al., Alg. 1)
            count = info["unclipped"] - info["n"] / 2
            count += float(torch.randn((), generator=gen)) * self.count_stddev
            # b~ estimates a fraction: clamped to [0, 1] (post-processing, as TF-Privacy does)
            frac = min(max(count / self.m + 0.5, 0.0), 1.0)
            clip = clip * math.exp(-self.clip_lr * (frac - self.target_quantile))
        params, inner_state = self.inner.update(params, noised, state.inner, round_idx, extras)
        used = float(state.clip)  # this round's clip (the next one is in "clip")
        return params, DPState(inner_state, clip, history, last_clip=used)

    def _step_history(self, history: list) -> list:
        """The accountant history (noise multiplier, q, steps) after one more round."""
        history = [list(h) for h in history]
        z = self.effective_noise_multiplier
        if z > 0:
            if history and history[-1][:2] == [z, self.sample_rate]:
                history[-1][2] += 1
            else:
                history.append([z, self.sample_rate, 1])
        return history

    # -- accounting -------------------------------------------------------------------------------
    def epsilon(self, state: DPState) -> float:
        """Client-level epsilon spent so far (inf without noise)."""
        if self.noise_multiplier == 0:
            return math.inf
        return _epsilon(state.history, self.delta, self.accountant)

    def epsilon_after(self, state: DPState) -> float:
        """Epsilon after one more round (for the budget stop)."""
        if self.noise_multiplier == 0:
            return math.inf
        return _epsilon(self._step_history(state.history), self.delta, self.accountant)

    def mechanism(self, state: DPState) -> dict[str, Any]:
        """What was released and how it is accounted, for summary.json (``privacy.mechanism``).

        Per round: the clipped sum / m plus N(0, update_noise_std^2 I) (sensitivity clip / m) and,
        with adaptive clipping, the centred count plus N(0, count_noise_std^2) (sensitivity
        count_sensitivity); the accountant composes ``steps`` sampled-Gaussian steps with the
        effective noise multiplier at ``sampling_rate``. ``clip`` is the clip of the last round
        (with adaptive clipping it changes every round; the noise scales with it)."""
        clip = float(state.clip if state.last_clip is None else state.last_clip)
        return {
            "kind": "client-level",
            "algorithm": "DP-FedAvg (McMahan et al. 2018)"
            + (", adaptive clipping (Andrew et al. 2021)" if self.adaptive else ""),
            "clients_per_round": self.m,
            "clip": clip,
            "update_sensitivity": clip / self.m,
            "update_noise_multiplier": self.update_noise_multiplier,
            "update_noise_std": self.update_noise_multiplier * clip / self.m,
            "count_noise_std": self.count_stddev if self.adaptive else None,
            "count_sensitivity": COUNT_SENSITIVITY if self.adaptive else None,
            "effective_noise_multiplier": self.effective_noise_multiplier,
            "sampling": "poisson",  # each client independently with probability sampling_rate
            "sampling_rate": self.sample_rate,
            "adjacency": "add or remove one client",
            "secure_rng": False,  # seeded torch generators: reproducible, not a secure RNG
            "steps": int(sum(h[2] for h in state.history)),
            "accountant": self.accountant,
            "delta": self.delta,
        }

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self, state: DPState) -> dict[str, Any]:
        """``{"dp": {clip, last_clip, history}, "inner": <the wrapped strategy's parts>}``."""
        own = {"clip": state.clip, "last_clip": state.last_clip, "history": state.history}
        return {"dp": own, "inner": self.inner.state_dict(state.inner)}

    def load_state(self, d: dict[str, Any]) -> DPState:
        own = d.get("dp", d)  # the earlier flat format held clip/history beside "inner"
        if "clip" not in own or "history" not in own or "inner" not in d:
            raise ValueError(
                f"the checkpoint's strategy state (keys {sorted(d)}) is not client-level DP's "
                "(dp, inner): resume with the config the checkpoint was written with"
            )
        history = [list(h) for h in own["history"]]
        inner = self.inner.load_state(d["inner"])
        return DPState(inner, own["clip"], history, last_clip=own.get("last_clip"))

    def __repr__(self) -> str:
        return (
            f"ClientLevelDP({self.inner!r}, clip={self.clip}, z={self.noise_multiplier:.4g}, "
            f"q={self.sample_rate:.4g}, adaptive={self.adaptive})"
        )
