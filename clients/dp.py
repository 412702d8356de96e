"""Sample-level DP-SGD clients through Opacus (Abadi et al., CCS 2016, "Deep Learning with
Differential Privacy"; Opacus: Yousefpour et al. 2021).

:class:`DPSGDTrainer` has the interface of :class:`clients.trainer.LocalSGD` but trains the sampled
clients one at a time with Opacus' ``PrivacyEngine``: per-sample gradients clipped to
``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm``, Poisson sampling of each
client's local batches (sample rate ``1 / ceil(n_i / batch_size)``).

Every client gets its own ``PrivacyEngine`` and ``make_private`` is called **once per client**, the
first time it is sampled; the wrapped module, the ``DPOptimizer``, the Poisson data loader and the
accountant stay on the host that owns the client for the whole run (STYLE.md point 6, opacus issue
608), so the client's epsilon composes over all the rounds it takes part in. The accountant (``prv``
or ``rdp``) is chosen once and used both to calibrate the noise (``get_noise_multiplier``) and to
report epsilon. Accountant histories are checkpointed (``state_dict``) and restored.

A strategy's local rule (``clients.rules``: FedProx, SCAFFOLD, FedDyn, FedSAM, FedSpeed) composes
with the private gradient: the rule's ``direction`` is called with a gradient function that returns
Opacus' privatized gradient (clipped, noised, divided by the expected batch size) at the asked point,
and the direction it returns is what the SGD step takes. Terms that act on the client's own state and
the current iterate (SCAFFOLD's c - c_i, FedProx's and FedDyn's proximal and linear terms, FedSpeed's
correction) are post-processing. A rule that asks for a second gradient per step (FedSAM's ascent
point, FedSpeed's quasi-gradient with alpha > 0) gets a second private release on the same Poisson
batch; the k releases of one step are one Gaussian mechanism with sensitivity sqrt(k) C on one
subsample, accounted as one sampled-Gaussian step with noise multiplier sigma / sqrt(k)
(:func:`effective_noise_multiplier`; docs/privacy.md, "Local rules under DP-SGD").

A model's regularizer (``model.penalty``, e.g. SORSA's orthonormal one) is added to the privatized
gradient before the SGD step: it does not touch data, so it is neither clipped nor noised.

The per-client modules share the frozen parameters of the host's model (a pretrained encoder is not
copied per client); only the trainable parameters are per client.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flagstaff.clients.lora import client_frozen_names
from flagstaff.clients.plan import BatchPlan
from flagstaff.clients.rules import Context, Finish, LocalRule
from flagstaff.clients.seeds import stream
from flagstaff.clients.trainer import ParamSpec, Trainer, TrainResult, loss_fn_for

__all__ = [
    "DPSGDTrainer",
    "effective_noise_multiplier",
    "epsilon_of_history",
    "private_kinds",
    "private_partition",
]

_ACCOUNTANTS = ("prv", "rdp")
_PLAIN = LocalRule()


def epsilon_of_history(history: list[tuple[float, float, int]], delta: float, kind: str) -> float:
    """Epsilon that Opacus' ``kind`` accountant reports for a history of (sigma, q, steps).

    Memoized on the history: clients of equal size share histories, and Opacus' RDP/PRV
    computations cost up to a second each."""
    key = tuple((float(s), float(q), int(n)) for s, q, n in history)
    return _epsilon_cached(key, float(delta), kind)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(
    history: tuple[tuple[float, float, int], ...], delta: float, kind: str
) -> float:
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(kind)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def private_kinds(*components: Any) -> list[str]:
    """The kinds of DP a run's built components give ("sample-level", "client-level"): each
    component's declared ``epsilon_kind`` (client trainer, strategy); empty without DP."""
    kinds: list[str] = []
    for obj in components:
        kind = obj.epsilon_kind if obj is not None else None
        if isinstance(kind, str) and kind not in kinds:
            kinds.append(kind)
    return kinds


def private_partition(summary: dict[str, Any], kinds: list[str]) -> dict[str, Any]:
    """partition.json under DP: only what the guarantee does not need to hide.

    Label histograms are data and no mechanism releases them: always withheld under DP. Client
    sizes are public by assumption under sample-level DP (Opacus' sample rate 1 / ceil(n_i / B)
    and the expected batch q n_i, hence each client's noise and epsilon, are computed from them),
    but a client's data set is the protected unit of client-level DP, so its size is withheld
    there (the number of clients N stays: q = m / N is public)."""
    if not kinds:
        return summary
    out: dict[str, Any] = {"num_clients": summary["num_clients"], "dp": kinds}
    if "client-level" in kinds:
        out["withheld"] = "per-client sizes and label histograms (client-level DP)"
        return out
    out["withheld"] = "per-client label histograms (sample-level DP; sizes are public)"
    out["clients"] = [{"client": c["client"], "samples": c["samples"]} for c in summary["clients"]]
    return out


def releases_per_step(rule: LocalRule | None) -> int:
    """Private gradients a local step of ``rule`` takes on its batch (``grads_per_step``: 1 for
    SGD, FedProx, SCAFFOLD, FedDyn; 2 for FedSAM and FedSpeed with alpha, rho > 0)."""
    return 1 if rule is None else int(rule.grads_per_step)


def effective_noise_multiplier(sigma: float, releases: int) -> float:
    """The noise multiplier of ``releases`` Gaussian releases on one Poisson batch, as one release.

    Each release sum_{j in S} clip_C(g_j(x_r)) + N(0, (sigma C)^2 I) has sensitivity C (one sample
    added or removed moves it by at most C; x_r may depend on the earlier releases), so the k
    releases together are a Gaussian mechanism with sensitivity sqrt(k) C and noise sigma C
    (adaptive composition of Gaussian mechanisms; Dong, Roth, Su 2022), applied to one subsample
    S: one sampled-Gaussian step with multiplier sigma / sqrt(k) (Mironov, Talwar, Zhang 2019; Zhu,
    Dong, Wang 2022 for subsampling a mechanism through its dominating pair). Counting them as k
    independent sampled-Gaussian steps would under-report epsilon for q < 1: the k releases share
    the subsample, so a sample is in all of them or in none."""
    return sigma if releases == 1 else sigma / math.sqrt(releases)


def check_dp_call(rule: LocalRule | None, state: Any, client_ids: Any, offsets: Any) -> None:
    """DP-SGD trainers need the host's client ids and data offsets, and the rule's client state."""
    if client_ids is None or offsets is None:
        raise ValueError("DP-SGD trainers need client_ids and offsets (the host passes them)")
    missing = [n for n in (rule.client_state if rule else ()) if n not in (state or {})]
    if missing:
        raise ValueError(f"local rule {rule.name} needs per-client state {missing}")


def check_releases(rule: LocalRule | None, taken: int) -> None:
    """A rule must take the private gradients it declares: calibration and the budget stop
    (``epsilon_after``) count ``grads_per_step`` releases per step before the step runs."""
    if taken != releases_per_step(rule):
        raise ValueError(
            f"local rule {rule.name if rule else 'sgd'} declares grads_per_step="
            f"{releases_per_step(rule)} but took {taken} private gradients in a step; under DP-SGD "
            "every gradient is a release that must be accounted: declare the right grads_per_step"
        )


def _penalty_hook(penalty: Any, module: nn.Module, names: set[str]) -> Any:
    """A step pre-hook for the DP optimizer's inner SGD: add the gradient of the model's
    regularizer ``penalty(params)`` (e.g. SORSA's) to the privatized gradient.

    The hook runs after Opacus has clipped the per-sample gradients, added the noise and divided by
    the batch size: the regularizer depends on the parameters only, never on data, so its gradient
    needs no clipping or noise (post-processing of already private parameters)."""

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = {n: p for n, p in module.named_parameters() if n in names}
        live = [p for p in params.values() if p.requires_grad]
        with torch.enable_grad():
            grads = torch.autograd.grad(penalty(params), live, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(live, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g

    return hook


@dataclass
class _Client:
    """One client's private training objects, created once (make_private) and kept for the run."""

    engine: Any
    module: nn.Module
    optimizer: Any
    loader: DataLoader
    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class DPSGDTrainer(Trainer):
    """DP-SGD on each client with Opacus (see the module docstring).

    ``noise_multiplier``: sigma; null: calibrated per client with ``get_noise_multiplier`` (same
    accountant) so that ``target_epsilon`` is reached after the client's planned steps:
    ``steps_per_round * planned_rounds``, where ``planned_rounds`` is ``rounds`` (``calibrate=all``,
    a client sampled every round) or ``ceil(rounds * clients_per_round / num_clients)``
    (``calibrate=expected``, the expected number of participations). Local optimizer: SGD with
    ``lr``, ``momentum``, ``weight_decay`` (reset every round, as in LocalSGD). A local rule that
    takes k private gradients per step (``grads_per_step``) gets sigma = sqrt(k) times the
    calibrated one, so that its effective multiplier sigma / sqrt(k) reaches the same target.
    """

    lr: float = 0.05
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 8
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    calibrate: str = "expected"
    rounds: int = 1
    num_clients: int = 1
    clients_per_round: int = 1
    grad_sample_mode: str = "hooks"
    seed: int = 0
    #: the host passes client ids and data offsets (this trainer keeps per-client objects)
    per_client: ClassVar[bool] = True
    epsilon_kind: ClassVar[str | None] = "sample-level"

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 < self.lr_decay <= 1:
            raise ValueError("client.lr must be > 0 and client.lr_decay in (0, 1]")
        if self.max_grad_norm <= 0:
            raise ValueError(f"client.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in _ACCOUNTANTS:
            raise ValueError(f"privacy.accountant={self.accountant!r}: choose prv or rdp")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                "client=dpsgd needs client.noise_multiplier or privacy.target_epsilon "
                "(the noise is then calibrated to reach it)"
            )
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"client.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.calibrate not in ("expected", "all"):
            raise ValueError(f"client.calibrate={self.calibrate!r}: choose expected or all")
        if self.batch_size < 1 or self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError("client.batch_size, client.epochs and client.steps must be >= 1")
        self._clients: dict[int, _Client] = {}
        self._restored: dict[int, list] = {}
        self._sigma: dict[tuple[int, int], float] = {}  # calibrated sigma per (size, releases)

    # -- privacy parameters of a client ---------------------------------------------------------
    def sample_rate(self, size: int) -> float:
        """Poisson sample rate of a client with ``size`` samples: 1 / (batches per epoch)."""
        return 1.0 / math.ceil(size / self.batch_size)

    def steps_per_round(self, size: int) -> int:
        return (
            self.steps
            if self.steps is not None
            else self.epochs * math.ceil(size / self.batch_size)
        )

    def planned_rounds(self) -> int:
        if self.calibrate == "all":
            return self.rounds
        return max(1, math.ceil(self.rounds * self.clients_per_round / self.num_clients))

    def sigma_for(self, size: int, releases: int = 1) -> float:
        """The noise multiplier of each private gradient of a client with ``size`` samples whose
        steps take ``releases`` gradients (configured, or calibrated: sqrt(releases) times the
        multiplier that reaches ``target_epsilon`` with one release per step)."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        key = (int(size), int(releases))
        if key in self._sigma:
            return self._sigma[key]
        from opacus.accountants.utils import get_noise_multiplier

        one = float(
            get_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=self.sample_rate(size),
                steps=self.steps_per_round(size) * self.planned_rounds(),
                accountant=self.accountant,
            )
        )
        self._sigma[key] = one if releases == 1 else one * math.sqrt(releases)
        return self._sigma[key]

    def history(self, client_id: int) -> list[tuple[float, float, int]]:
        """The accountant history (sigma, q, steps) of a client (empty before its first round)."""
        c = self._clients.get(int(client_id))
        if c is not None:
            return list(c.engine.accountant.history)
        return list(self._restored.get(int(client_id), []))

    def epsilon(self, client_id: int) -> float:
        """The client's epsilon so far, from its own accountant."""
        return epsilon_of_history(self.history(client_id), self.delta, self.accountant)

    def epsilon_after(self, client_id: int, size: int, rule: LocalRule | None = None) -> float:
        """Epsilon the client would have after one more round with ``rule`` (its history plus this
        round's planned steps, each with the rule's releases, asked of the same accountant type);
        for the budget stop."""
        k = releases_per_step(rule)
        c = self._clients.get(int(client_id))
        sigma = c.noise_multiplier if c is not None else self.sigma_for(size, k)
        z = effective_noise_multiplier(sigma, k)
        planned = (z, self.sample_rate(size), self.steps_per_round(size))
        return epsilon_of_history(self.history(client_id) + [planned], self.delta, self.accountant)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Accountant histories per client id (plain lists: loadable with weights_only=True)."""
        ids = set(self._clients) | set(self._restored)
        return {
            "accountant": self.accountant,
            "histories": {int(c): [list(h) for h in self.history(c)] for c in sorted(ids)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("accountant", self.accountant) != self.accountant:
            raise ValueError(
                f"checkpoint accountant {state['accountant']!r} != privacy.accountant "
                f"{self.accountant!r}; resume with the accountant the run started with"
            )
        hist = {
            int(c): [(float(s), float(q), int(n)) for s, q, n in h]
            for c, h in state.get("histories", {}).items()
        }
        for cid, h in hist.items():
            if cid in self._clients:
                self._clients[cid].engine.accountant.history = list(h)
            else:
                self._restored[cid] = h

    # -- training -------------------------------------------------------------------------------------
    def lr_at(self, round_idx: int) -> float:
        return self.lr * self.lr_decay**round_idx

    def _client(
        self,
        model: nn.Module,
        spec: ParamSpec,
        cid: int,
        x: torch.Tensor,
        y: torch.Tensor,
        releases: int = 1,
    ) -> _Client:
        """The client's objects; built with make_private the first time the client is sampled
        (with the noise multiplier of a rule taking ``releases`` private gradients per step)."""
        if cid in self._clients:
            return self._clients[cid]
        from opacus import PrivacyEngine

        frozen = client_frozen_names(model)
        trainable = set(spec.names) - frozen
        params = dict(model.named_parameters())
        # share everything that is not trained locally (a pretrained encoder is not copied)
        memo = {id(p): p for n, p in params.items() if n not in trainable}
        memo.update({id(b): b for b in model.buffers()})
        module = copy.deepcopy(model, memo)
        for n, p in module.named_parameters():
            p.requires_grad_(n in trainable)
        opt = torch.optim.SGD(
            [p for p in module.parameters() if p.requires_grad],
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        loader = DataLoader(TensorDataset(x, y), batch_size=self.batch_size)
        sigma = self.sigma_for(len(x), releases)
        with warnings.catch_warnings():  # secure_mode=False is deliberate (seeded, fast)
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=self.accountant)
        module, opt, loader = engine.make_private(
            module=module,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=True,
            clipping="flat",
            grad_sample_mode=self.grad_sample_mode,
            noise_generator=torch.Generator(),
        )
        loader.batch_sampler.generator = torch.Generator()
        penalty = getattr(model, "penalty", None)
        if penalty is not None:  # added to the privatized gradient, after clipping and noise
            opt.original_optimizer.register_step_pre_hook(
                _penalty_hook(penalty, module._module, set(spec.names))
            )
        if cid in self._restored:
            engine.accountant.history = list(self._restored.pop(cid))
        c = _Client(
            engine,
            module,
            opt,
            loader,
            sigma,
            self.sample_rate(len(x)),
            self.steps_per_round(len(x)),
        )
        self._clients[cid] = c
        return c

    def train(
        self,
        model: nn.Module,
        spec: ParamSpec,
        global_flat: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        plan: BatchPlan,
        num_classes: int,
        sizes: torch.Tensor,
        *,
        client_ids: np.ndarray | None = None,
        offsets: np.ndarray | None = None,
        rule: LocalRule | None = None,
        state: dict[str, torch.Tensor] | None = None,
        broadcast: dict[str, torch.Tensor] | None = None,
        round_idx: int = 0,
    ) -> TrainResult:
        """One round of DP-SGD with ``rule`` (plain DP-SGD if None) for each client in
        ``client_ids`` (data ``x[offsets:offsets+sizes]``), from ``global_flat``. ``plan`` is
        ignored: Opacus' Poisson sampler draws the batches. ``state``: the clients' per-client
        state of the rule, name -> (K, d); ``broadcast``: the server's vectors (e.g. SCAFFOLD's c).
        Returns messages (K, d), the rule's new state and extras, and ``metrics["epsilon"]`` (K,),
        each client's epsilon so far."""
        check_dp_call(rule, state, client_ids, offsets)
        rule = rule or _PLAIN
        state = state or {}
        bcast = {n: v.to(global_flat) for n, v in (broadcast or {}).items()}
        loss = loss_fn_for(num_classes)
        fins, losses, eps = [], [], []
        lr = self.lr_at(round_idx)
        k_rel = releases_per_step(rule)
        for k, (cid, off, n) in enumerate(
            zip(client_ids.tolist(), offsets.tolist(), sizes.tolist(), strict=True)
        ):
            c = self._client(model, spec, int(cid), x[off : off + n], y[off : off + n], k_rel)
            ctx = Context(global_flat, {m: state[m][k : k + 1] for m in rule.client_state}, bcast)
            fin, mean_loss = self._train_one(c, spec, loss, lr, int(cid), round_idx, rule, ctx)
            fins.append(fin)
            losses.append(mean_loss)
            eps.append(self.epsilon(int(cid)))
        return TrainResult(
            torch.cat([f.message for f in fins]),
            sizes.to(global_flat.dtype),
            torch.tensor(losses, dtype=global_flat.dtype),
            {m: torch.cat([f.state[m] for f in fins]) for m in fins[0].state},
            {m: torch.cat([f.extras[m] for f in fins]) for m in fins[0].extras},
            metrics={"epsilon": torch.tensor(eps, dtype=torch.float64)},
        )

    def _train_one(
        self,
        c: _Client,
        spec: ParamSpec,
        loss,
        lr: float,
        cid: int,
        round_idx: int,
        rule: LocalRule,
        ctx: Context,
    ) -> tuple[Finish, float]:
        """One client's round: at every step Opacus privatizes the batch's gradient (its
        ``pre_step``: clip, noise, scale), the rule turns it into the step's direction (asking for a
        second private gradient on the same batch if it needs one), and the inner SGD steps."""
        inner = c.module._module
        named = dict(inner.named_parameters())
        global_flat = ctx.x0
        with torch.no_grad():
            for name, value in spec.unflatten(global_flat).items():
                named[name].copy_(value)
        live = [(n, named[n]) for n in spec.names if named[n].requires_grad]
        # per (seed, round, client) randomness: independent of hosts and of the other clients
        key = stream(self.seed, round_idx, cid, 0xD95, kind="int", scheme="mix64")
        c.loader.batch_sampler.generator.manual_seed(key)
        c.optimizer.generator.manual_seed(key + 1)
        c.optimizer.original_optimizer.state.clear()  # momentum restarts every round
        for g in c.optimizer.param_groups:
            g["lr"] = lr
        c.module.train()
        releases = releases_per_step(rule)
        plain = type(rule) is LocalRule  # the direction is the private gradient itself
        total, done = 0.0, 0
        while done < c.steps:
            for xb, yb in c.loader:
                if plain:
                    lval = self._private_grad(c, xb, yb, loss)
                else:
                    lval = self._apply_rule(c, spec, named, live, xb, yb, loss, rule, ctx)
                if lval is not None:
                    total += lval
                if releases > 1:  # the step's releases, accounted as one Gaussian step
                    z = effective_noise_multiplier(c.noise_multiplier, releases)
                    c.engine.accountant.step(noise_multiplier=z, sample_rate=c.sample_rate)
                c.optimizer.original_optimizer.step()
                done += 1
                if done == c.steps:
                    break
        c.optimizer.zero_grad(set_to_none=True)
        X = torch.cat([named[n].detach().reshape(1, -1) for n in spec.names], dim=1)
        steps = torch.tensor([done], device=X.device)
        return rule.finish(X, ctx, steps, lr), total / max(1, done)

    @staticmethod
    def _private_grad(
        c: _Client, xb: torch.Tensor, yb: torch.Tensor, loss, accounted: bool = True
    ) -> float | None:
        """Opacus' private gradient of the batch at the module's current parameters, left in
        ``p.grad``: per-sample gradients, clipped, summed, noised, divided by the expected batch
        size (``DPOptimizer.pre_step``); ``accounted=False`` keeps it out of the accountant (the
        caller accounts the step's releases together). Returns the batch's mean loss (None for an
        empty Poisson batch)."""
        c.optimizer.zero_grad(set_to_none=True)
        lval = None
        if len(xb) == 0:  # empty Poisson batch: the gradient is pure noise
            for p in c.optimizer.params:
                p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
        else:
            value = loss(c.module(xb), yb).mean()
            with warnings.catch_warnings():  # inputs need no grad: expected with hooks
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                value.backward()
            lval = float(value.detach())
        hook = c.optimizer.step_hook
        if not accounted:
            c.optimizer.step_hook = None
        try:
            c.optimizer.pre_step()
        finally:
            c.optimizer.step_hook = hook
        return lval

    def _apply_rule(
        self,
        c: _Client,
        spec: ParamSpec,
        named: dict[str, nn.Parameter],
        live: list[tuple[str, nn.Parameter]],
        xb: torch.Tensor,
        yb: torch.Tensor,
        loss,
        rule: LocalRule,
        ctx: Context,
    ) -> float | None:
        """Leave the rule's direction in ``p.grad``, the rule asking for private gradients (each one
        an Opacus ``pre_step`` on this batch at the point it names) as on the batched path.
        Coordinates the client keeps fixed are not in ``live`` and never move. Returns the batch's
        mean loss at the current parameters (None for an empty batch)."""

        def flat_grad() -> torch.Tensor:
            parts = [
                p.grad.reshape(1, -1)
                if p.requires_grad and p.grad is not None
                else torch.zeros(1, p.numel(), dtype=p.dtype, device=p.device)
                for p in (named[n] for n in spec.names)
            ]
            return torch.cat(parts, dim=1)

        def load(flat: torch.Tensor) -> None:
            with torch.no_grad():
                for (_, p), v in zip(live, _live_views(spec, flat, live), strict=True):
                    p.copy_(v)

        X = torch.cat([named[n].detach().reshape(1, -1) for n in spec.names], dim=1)
        one = releases_per_step(rule) == 1  # else the caller accounts the step's releases
        losses: list[float | None] = []

        def grad_fn(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            moved = not torch.equal(P, X)
            if moved:  # e.g. SAM's ascent point: a release on the same batch at P
                load(P)
            losses.append(self._private_grad(c, xb, yb, loss, accounted=one))
            g = flat_grad()
            if moved:
                load(X)
            return g, torch.zeros(1, dtype=X.dtype)

        direction, _ = rule.direction(grad_fn, X, ctx)
        check_releases(rule, len(losses))
        with torch.no_grad():
            for (_, p), v in zip(live, _live_views(spec, direction, live), strict=True):
                p.grad = v.clone()
        return losses[0]


def _live_views(
    spec: ParamSpec, flat: torch.Tensor, live: list[tuple[str, nn.Parameter]]
) -> list[torch.Tensor]:
    """The trained parameters' blocks of a flat (1, d) vector, shaped like the parameters."""
    parts = spec.unflatten(flat[0])
    return [parts[n] for n, _ in live]
