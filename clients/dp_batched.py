"""DP-SGD for many clients at once: per-sample clipping inside the batched (vmap) path.

The same mechanism as Opacus' ``DPOptimizer`` with flat clipping (Abadi et al., CCS 2016), run for
all of a host's sampled clients in lockstep instead of one ``PrivacyEngine`` at a time:

1. Poisson sampling: at every local step each of a client's n samples joins the batch independently
   with probability q = 1 / ceil(n / batch_size) (Opacus' ``sample_rate`` for its data loader); the
   draw is a counter-based hash of (seed, round, client, step, sample), so it does not depend on the
   host or on the other clients.
2. Per-sample gradients (nested ``torch.func.vmap`` over clients and samples) of the parameters
   clients train, each clipped to norm ``max_grad_norm`` with Opacus' factor
   min(1, C / (||g|| + 1e-6)), summed over the batch.
3. Gaussian noise N(0, (sigma C)^2 I) per client on those coordinates (its own generator, seeded by
   seed/round/client), and division by the expected batch size q * n (Opacus'
   ``loss_reduction="mean"``).
4. The strategy's local rule (``clients.rules``) turns the private gradient into the step's
   direction: steps 2-3 are the gradient function the rule calls (a rule that asks for a second
   gradient, FedSAM's or FedSpeed's at the ascent point, gets a second release on the same batch,
   with fresh noise), and the rule's own terms (SCAFFOLD's c - c_i, FedProx's and FedDyn's, FedSpeed's
   correction) are added to it, as on the Opacus path (``clients.dp``).
5. The SGD step (momentum, weight decay) of ``torch.optim.SGD``, gated by the plan like LocalSGD; a
   model's regularizer (``model.penalty``, e.g. SORSA's) adds its gradient after step 4 (it does not
   touch data, so it is neither clipped nor noised).

Coordinates clients keep fixed (a frozen LoRA factor, ``clients.lora.trainable_mask``: A under
FedSVD / FFA-LoRA) are left out as Opacus leaves them out of its optimizer: no per-sample gradient
(the clip norm is over the trainable coordinates), no noise, no weight decay, no update.

Accounting is Opacus': each client's history of (sigma, q, steps) is exactly what its own
``RDPAccountant``/``PRVAccountant`` would hold after those steps, and epsilon is computed by that
accountant class (``clients.dp.epsilon_of_history``); histories are checkpointed and restored. A
step with k releases is one sampled-Gaussian step with multiplier sigma / sqrt(k)
(``clients.dp.effective_noise_multiplier``).
Tested against an Opacus-wrapped model stepping on the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from flagstaff.clients.dp import (
    DPSGDTrainer,
    check_dp_call,
    check_releases,
    effective_noise_multiplier,
    releases_per_step,
)
from flagstaff.clients.lora import client_frozen_names, trainable_mask
from flagstaff.clients.plan import BatchPlan, scatter_plan
from flagstaff.clients.rules import Context, LocalRule
from flagstaff.clients.seeds import mix64, stream
from flagstaff.clients.trainer import ParamSpec, TrainResult, loss_fn_for

__all__ = ["BatchedDPSGDTrainer", "poisson_plan"]

_PLAIN = LocalRule()


def poisson_plan(
    offsets: np.ndarray,
    sizes: np.ndarray,
    client_ids: np.ndarray,
    sample_rates: np.ndarray,
    steps: np.ndarray,
    seed: int,
    round_idx: int,
    device: torch.device | str = "cpu",
) -> BatchPlan:
    """Poisson batches: sample j of client k is in step t's batch iff u(seed, round, id, t, j) < q_k
    (tensors on ``device``, as ``clients.plan.scatter_plan`` makes them)."""
    K = len(sizes)
    T = int(steps.max())
    reps = sizes * steps
    k_of = np.repeat(np.arange(K), reps)
    start = np.repeat(np.cumsum(reps) - reps, reps)
    flat = np.arange(len(k_of)) - start
    t_of = flat // sizes[k_of]
    j_of = flat % sizes[k_of]
    u = mix64(seed, round_idx, client_ids[k_of], t_of, j_of, 0xD9) >> np.uint64(11)
    keep = (u.astype(np.float64) / 2.0**53) < sample_rates[k_of]
    k_s, t_s, j_s = k_of[keep], t_of[keep], j_of[keep]
    # slot of each kept sample within its (step, client) batch
    group = t_s * K + k_s
    order = np.argsort(group, kind="stable")
    k_s, t_s, j_s, group = k_s[order], t_s[order], j_s[order], group[order]
    first = np.searchsorted(group, group, side="left")
    slot = np.arange(len(group)) - first
    width = max(1, int(slot.max()) + 1) if len(slot) else 1
    return scatter_plan((t_s, k_s, slot), offsets[k_s] + j_s, (T, K, width), steps, device)


@dataclass
class BatchedDPSGDTrainer(DPSGDTrainer):
    """``client=dpsgd client.batched=true``: DP-SGD for a host's clients in one computation.

    Same configuration, privacy parameters, accountant and checkpoints as :class:`DPSGDTrainer`
    (the Opacus path); no per-client ``PrivacyEngine`` objects are built.
    """

    batched: bool = True
    _histories: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict, repr=False)

    def history(self, client_id: int) -> list[tuple[float, float, int]]:
        return list(self._histories.get(int(client_id), self._restored.get(int(client_id), [])))

    def epsilon_after(self, client_id: int, size: int, rule: LocalRule | None = None) -> float:
        from flagstaff.clients.dp import epsilon_of_history

        k = releases_per_step(rule)
        z = effective_noise_multiplier(self.sigma_for(size, k), k)
        planned = (z, self.sample_rate(size), self.steps_per_round(size))
        return epsilon_of_history(self.history(client_id) + [planned], self.delta, self.accountant)

    def state_dict(self) -> dict[str, Any]:
        ids = set(self._histories) | set(self._restored)
        return {
            "accountant": self.accountant,
            "histories": {int(c): [list(h) for h in self.history(c)] for c in sorted(ids)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._histories.update(self._restored)
        self._restored = {}

    def _account(self, cid: int, sigma: float, q: float, steps: int) -> None:
        """Append to the client's history as Opacus' accountant ``step`` does (merging runs)."""
        h = self._histories.setdefault(int(cid), list(self._restored.pop(int(cid), [])))
        if h and h[-1][0] == sigma and h[-1][1] == q:
            h[-1] = (sigma, q, h[-1][2] + steps)
        else:
            h.append((sigma, q, steps))

    def train(
        self,
        model: torch.nn.Module,
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
        """One round of DP-SGD with ``rule`` (plain DP-SGD if None) for all ``client_ids`` at once
        (``plan`` is replaced by Poisson batches); ``state``/``broadcast`` as in ``LocalSGD.train``.
        Returns messages (K, d), the rule's new state and extras, and each client's epsilon so far."""
        check_dp_call(rule, state, client_ids, offsets)
        rule = rule or _PLAIN
        state = state or {}
        releases = releases_per_step(rule)
        n = np.asarray(sizes, dtype=np.int64)
        q = np.array([self.sample_rate(int(s)) for s in n])
        steps = np.array([self.steps_per_round(int(s)) for s in n], dtype=np.int64)
        sigma = [self.sigma_for(int(s), releases) for s in n]
        dev = global_flat.device
        pplan = poisson_plan(
            np.asarray(offsets), n, np.asarray(client_ids), q, steps, self.seed, round_idx, dev
        )
        K = len(n)
        loss = loss_fn_for(num_classes)
        # the coordinates clients train (a frozen factor: no gradient, no noise, no update)
        mask = trainable_mask(model, spec.names, spec.shapes)
        frozen = client_frozen_names(model) & set(spec.names)
        trained = [name for name in spec.names if name not in frozen]
        if mask is not None:
            mask = mask.to(global_flat)
        keep = None if mask is None else torch.nonzero(mask).flatten()

        def sample_loss(p, fixed, xs, ys):
            out = functional_call(model, {**fixed, **p}, (xs.unsqueeze(0),))
            value = loss(out, ys.unsqueeze(0)).sum()
            return value, value.detach()

        # per-sample gradients of the trained parameters: inner vmap over a client's batch, outer
        # vmap over clients
        per_sample = vmap(vmap(grad(sample_loss, has_aux=True), in_dims=(None, None, 0, 0)))
        # a model's regularizer (SORSA): parameters only, no data, so added after clipping + noise
        penalty = getattr(model, "penalty", None)
        if penalty is not None:
            penalty_grad = vmap(grad(lambda flat: penalty(spec.unflatten(flat))))
        X = global_flat.unsqueeze(0).expand(K, -1).clone()
        buf = torch.zeros_like(X) if self.momentum else None
        expected = torch.as_tensor(
            [max(1, int(s * r)) for s, r in zip(n, q, strict=True)], dtype=X.dtype, device=dev
        )
        gens = [stream(self.seed, round_idx, int(c), 0xD15E, scheme="mix64") for c in client_ids]
        noise_std = torch.tensor(sigma, dtype=X.dtype, device=dev) * self.max_grad_norm
        lr = self.lr_at(round_idx)
        C = self.max_grad_norm
        loss_sum = torch.zeros(K, dtype=X.dtype, device=dev)
        d_train = X.shape[1] if keep is None else len(keep)
        bcast = {name: v.to(global_flat) for name, v in (broadcast or {}).items()}
        ctx = Context(global_flat, {name: state[name] for name in rule.client_state}, bcast)
        plain = type(rule) is LocalRule
        for t in range(pplan.num_steps):
            idx, mb = pplan.idx[t], pplan.mask[t]
            taken = 0

            def private_grad(P, idx=idx, mb=mb):
                """The private gradient at P (K, d) on this step's batches, fresh noise per call."""
                nonlocal taken
                taken += 1
                params = spec.unflatten(P)
                p_train = {name: params[name] for name in trained}
                p_fixed = {name: params[name] for name in frozen}
                gs, lval = per_sample(p_train, p_fixed, x[idx], y[idx])
                g = torch.cat([gs[name].flatten(2) for name in trained], dim=2)  # (K, B, d_train)
                norms = g.norm(dim=2)
                factor = (C / (norms + 1e-6)).clamp(max=1.0) * mb
                summed = torch.einsum("kb,kbd->kd", factor, g)
                # drawn from the clients' CPU streams (the same noise on any device), then moved
                noise = torch.stack([torch.randn(d_train, generator=gen) for gen in gens]).to(dev)
                grad_t = (summed + noise_std[:, None] * noise.to(P.dtype)) / expected[:, None]
                if keep is not None:  # back to all d coordinates, zero on the frozen ones
                    grad_t = torch.zeros_like(P).index_copy_(1, keep, grad_t)
                return grad_t, (lval * mb).sum(1) / mb.sum(1).clamp(min=1)

            grad_t, lmean = rule.direction(private_grad, X, ctx)
            check_releases(rule, taken)
            if mask is not None and not plain:  # the rule's terms never move a frozen coordinate
                grad_t = grad_t * mask
            if penalty is not None:
                pg = penalty_grad(X)
                grad_t = grad_t + (pg if mask is None else pg * mask)
            act = pplan.active[t]
            loss_sum += torch.where(act, lmean, 0.0)
            if self.weight_decay:
                grad_t = grad_t + self.weight_decay * (X if mask is None else X * mask)
            gate = act[:, None]
            if buf is not None:
                buf = torch.where(gate, self.momentum * buf + grad_t, buf)
                grad_t = buf
            X = torch.where(gate, X - lr * grad_t, X)
        for cid, s, qq, st in zip(
            client_ids.tolist(), sigma, q.tolist(), steps.tolist(), strict=True
        ):
            self._account(
                int(cid), effective_noise_multiplier(float(s), releases), float(qq), int(st)
            )
        eps = torch.tensor(
            [self.epsilon(int(c)) for c in client_ids], dtype=torch.float64, device=dev
        )
        steps_dev = pplan.steps.to(dev)
        fin = rule.finish(X, ctx, steps_dev, lr)
        return TrainResult(
            fin.message,
            sizes.to(dev, global_flat.dtype),
            loss_sum / steps_dev.clamp(min=1).to(X.dtype),
            fin.state,
            fin.extras,
            metrics={"epsilon": eps},
        )
