"""Local training of many clients at once: stacked parameters, ``vmap(functional_call)`` + one backward.

The sampled clients of a host train in lockstep (one batched computation per local step); clients with
fewer steps are gated by ``plan.active`` so that each does exactly the steps it would do alone, and
padded samples are masked out of the loss. ``batched=False`` runs the same step one client at a time.
The update rule follows ``torch.optim.SGD`` (momentum without dampening, coupled weight decay), so a
client equals a plain PyTorch loop on the same batches (tested). Parameters are kept as one stacked
flat tensor (K, d); the local direction comes from a rule in ``clients.rules`` (plain gradient,
FedProx, SCAFFOLD, FedDyn, FedSAM, FedSpeed), whose per-client state the host passes in and keeps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from flagstaff.clients.lora import trainable_mask
from flagstaff.clients.models.stacked import StackedModel
from flagstaff.clients.plan import BatchPlan
from flagstaff.clients.rules import Context, Finish, LocalRule

__all__ = [
    "LocalSGD",
    "ParamSpec",
    "TrainResult",
    "Trainer",
    "chunk_for",
    "client_step_bytes",
    "loss_fn_for",
    "refuse_batchnorm",
    "saved_bytes",
]

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a model's trainable parameters, in ``parameters_to_vector`` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamSpec:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def unflatten(self, flat: torch.Tensor) -> Params:
        """(..., d) -> dict of (..., *shape) views."""
        lead = flat.shape[:-1]
        out, i = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = math.prod(shape)
            out[name] = flat[..., i : i + n].reshape(*lead, *shape)
            i += n
        return out

    def flatten(self, params: Params, lead: int = 0) -> torch.Tensor:
        """dict of (*lead, *shape) -> (*lead, d)."""
        parts = [params[n] for n in self.names]
        if lead == 0:
            return torch.cat([p.reshape(-1) for p in parts])
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def loss_fn_for(num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-sample loss: cross-entropy for classification, squared error for regression (K=1)."""
    if num_classes == 1:
        return lambda out, y: (out.squeeze(-1) - y) ** 2
    return lambda out, y: F.cross_entropy(out, y, reduction="none")


@dataclass
class TrainResult:
    """What a host returns for its clients: updates (K, d), sample counts, mean train losses, and,
    for rules with per-client state, the new state and the extra vectors for the server."""

    updates: torch.Tensor
    weights: torch.Tensor
    losses: torch.Tensor
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (K, d)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (K, d)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (K,), e.g. epsilon


class Trainer:
    """What a client host may ask of a local trainer: ``train`` and the hooks below, each declared
    here with its default, so that a host calls them instead of probing for them.

    A trainer's numbers must not depend on which host trains a client or on the other clients of
    the round (STYLE.md point 10); ``LocalSGD``, ``clients.dp.DPSGDTrainer`` and
    ``clients.dp_batched.BatchedDPSGDTrainer`` implement it. The hooks (Opacus' accountant
    interface is the model: optional behaviour as methods with defaults, DESIGN.md):

    * ``batch_size``, ``epochs``, ``steps``: what the host's batch plan (``clients.plan.make_plan``)
      is made of; ``steps`` (if not None) overrides ``epochs``.
    * ``per_client`` (default False): the trainer keeps objects per client (DP-SGD: a
      ``PrivacyEngine`` or an accountant history), so ``train`` needs the keyword arguments
      ``client_ids`` and ``offsets`` (each client's rows in ``x``), which the host then passes.
    * ``epsilon_kind`` (default None): the kind of differential privacy the trainer gives
      ("sample-level"), None for a non-private trainer. A private trainer reports each trained
      client's epsilon so far in ``TrainResult.metrics["epsilon"]`` and keeps per-client
      accountants, which cannot move to another host.
    * ``epsilon_after(client_id, size, rule)`` (default None): the epsilon the client would have
      after one more round with the local rule ``rule``, for the budget stop; None: not private.
    * ``state_dict()`` / ``load_state_dict(state)`` (default ``{}`` / nothing to restore): the
      trainer's own checkpointed state (DP: the accountant histories); plain JSON-like values
      (loadable with ``torch.load(weights_only=True)``).
    * ``lr_at(round_idx)``: the learning rate of a round.
    * ``accepts_transform`` (default False): ``train`` takes ``transform``, the data's per-batch
      transform bound to the round (``clients.augment.RoundTransform``: uint8 images -> normalized,
      augmented floats), and applies it to each step's gathered batch, ``transform(x[idx], idx, t)``.
    * ``check_model(model)``: raises ValueError for a model the trainer cannot train per client
      (default: BatchNorm, :func:`refuse_batchnorm`), so a run can refuse it before any work.

    Everything a trainer returns per client (updates, losses, the rule's state and extras, metrics
    such as epsilon) is in its :class:`TrainResult`.
    """

    batch_size: int
    epochs: int
    steps: int | None
    per_client: ClassVar[bool] = False
    epsilon_kind: ClassVar[str | None] = None
    accepts_transform: ClassVar[bool] = False

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
        rule: LocalRule | None = None,
        state: dict[str, torch.Tensor] | None = None,
        broadcast: dict[str, torch.Tensor] | None = None,
        round_idx: int = 0,
        transform: Callable[..., torch.Tensor] | None = None,
    ) -> TrainResult:
        """Train the plan's clients for one round from ``global_flat`` (see ``LocalSGD.train``)."""
        raise NotImplementedError

    def lr_at(self, round_idx: int) -> float:
        """Learning rate of round ``round_idx`` (0-based)."""
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError (one line naming the fix) for a model this trainer cannot train per
        client; the default refuses BatchNorm (:func:`refuse_batchnorm`)."""
        refuse_batchnorm(model)

    def epsilon_after(
        self, client_id: int, size: int, rule: LocalRule | None = None
    ) -> float | None:
        """The client's epsilon after one more round with ``rule``; None for a non-private trainer."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The trainer's checkpointed state ({}: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (a trainer without state has nothing to restore)."""
        return None


_PLAIN = LocalRule()


def refuse_batchnorm(model: nn.Module) -> None:
    """ValueError for a model with BatchNorm layers: their batch statistics mix a client's samples
    with the padding of a lockstep step, and their running statistics are buffers that federated
    averaging never averages, so per-client training and FedAvg both break (GroupNorm does
    neither: Wu and He 2018; Hsieh et al. 2020 for federated learning)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ValueError(
            f"model {type(model).__name__} has BatchNorm layers ({shown}): their batch statistics "
            "mix clients' samples with padding and their running statistics are not averaged "
            "across clients; use GroupNorm instead (torch.nn.GroupNorm(2, channels), as "
            "model=resnet8|resnet20|resnet18 do)"
        )


@dataclass
class LocalSGD(Trainer):
    """Mini-batch SGD on each client (``torch.optim.SGD`` semantics), batched across clients; a
    :class:`Trainer` with the default (non-private, stateless) hooks.

    Hyperparameters: ``lr``, ``lr_decay`` (round r uses lr * lr_decay**r, the reference's exponential
    schedule), ``momentum`` (heavy ball, no dampening), ``weight_decay`` (L2 added to the gradient),
    ``grad_clip`` (per-client norm bound on the local direction, 0 = off), ``epochs`` or ``steps``,
    ``batch_size``. ``batched``: "auto" (batch up to the memory budget), "true", "false".

    The local direction comes from a :class:`clients.rules.LocalRule` (plain gradient by default;
    FedProx, SCAFFOLD, FedDyn, FedSAM, FedSpeed add their terms); each step is then
    ``d = clip(direction) + weight_decay * x``, ``b = momentum * b + d``, ``x = x - lr * b``, every
    part gated by ``plan.active`` so that a client with fewer steps does exactly its own steps.
    Coordinates clients keep fixed (a frozen LoRA factor, ``clients.lora.trainable_mask``) get no
    direction, no weight decay and no update: the step is masked to the trainable coordinates.
    A model with a ``penalty`` attribute (a pure function of the named trainable parameters, e.g.
    SORSA's orthonormal regularizer) has it added to each client's objective inside the same
    batched backward; models without one take the unchanged path.
    """

    lr: float = 0.05
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 8
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    lr_decay: float = 1.0
    batched: str | bool = "auto"
    memory_budget_mb: float = 1024.0
    _warned: bool = field(default=False, repr=False)
    _batchable: bool | None = field(default=None, repr=False)
    _client_bytes: int | None = field(default=None, repr=False)
    accepts_transform: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"client.lr must be > 0, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"client.lr_decay must be in (0, 1], got {self.lr_decay}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"client.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("client.weight_decay and client.grad_clip must be >= 0")
        if str(self.batched).lower() not in ("auto", "true", "false"):
            raise ValueError(f"client.batched must be auto, true or false, got {self.batched!r}")

    def lr_at(self, round_idx: int) -> float:
        """Learning rate of round ``round_idx`` (0-based): lr * lr_decay**round_idx."""
        return self.lr * self.lr_decay**round_idx

    # -- sizing ---------------------------------------------------------------------------------
    def chunk_size(self, model: nn.Module, example: torch.Tensor, num_clients: int) -> int:
        """How many clients train in one lockstep computation (1 = sequential): :func:`chunk_for`
        with this trainer's ``batched`` and ``memory_budget_mb``, 1 for a model vmap cannot batch."""
        if not self._can_batch(model, example):
            return 1
        return chunk_for(
            num_clients, self.batched, self.memory_budget_mb, lambda: self._bytes(model, example)
        )

    def _bytes(self, model: nn.Module, example: torch.Tensor) -> int:
        """:func:`client_step_bytes` at this trainer's batch size, computed once."""
        if self._client_bytes is None:
            self._client_bytes = client_step_bytes(model, example, self.batch_size)
        return self._client_bytes

    def _can_batch(self, model: nn.Module, example: torch.Tensor) -> bool:
        """Probe once whether the model runs under vmap; if not, say so once and train clients
        one at a time with plain calls (whatever ``batched`` says)."""
        if self._batchable is None and isinstance(model, StackedModel) and model.stackable():
            self._batchable = True  # batched through its own stacked layers, not vmap
        if self._batchable is None:
            try:
                params = {
                    n: p.detach().unsqueeze(0).expand(2, *p.shape)
                    for n, p in model.named_parameters()
                }
                vmap(lambda q, xb: functional_call(model, q, (xb,)))(
                    params, example[:1].unsqueeze(0).expand(2, *example[:1].shape)
                )
                self._batchable = True
            except Exception as err:  # noqa: BLE001 - any failure means "cannot batch"
                warnings.warn(
                    f"client.batched={self.batched}: {type(model).__name__} cannot be trained batched "
                    f"across clients ({type(err).__name__}: {err}); training clients one at a "
                    "time",
                    stacklevel=3,
                )
                self._batchable = False
        return self._batchable

    # -- training -------------------------------------------------------------------------------
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
        rule: LocalRule | None = None,
        state: dict[str, torch.Tensor] | None = None,
        broadcast: dict[str, torch.Tensor] | None = None,
        round_idx: int = 0,
        transform: Callable[..., torch.Tensor] | None = None,
    ) -> TrainResult:
        """Train the plan's K clients from ``global_flat`` with ``rule`` (plain SGD if None).

        ``state``: the clients' per-client state, name -> (K, d) (zeros for a new client);
        ``broadcast``: the server's vectors for the rule (e.g. SCAFFOLD's c). Returns the messages
        (updates relative to ``global_flat``; x_K - x_0 for plain SGD), new state and extras.
        """
        rule = rule or _PLAIN
        state = state or {}
        self.check_model(model)
        missing = [n for n in rule.client_state if n not in state]
        if missing:
            raise ValueError(f"local rule {rule.name} needs per-client state {missing}")
        K = plan.idx.shape[1]
        chunk = self.chunk_size(model, x[:1] if transform is None else transform(x[:1]), K)
        if chunk < K and str(self.batched).lower() == "auto" and not self._warned:
            warnings.warn(
                f"client.batched=auto: training {chunk} of {K} clients at a time to stay within "
                f"client.memory_budget_mb={self.memory_budget_mb}",
                stacklevel=2,
            )
            self._warned = True
        loss = loss_fn_for(num_classes)
        lr = self.lr_at(round_idx)
        bcast = {n: v.to(global_flat) for n, v in (broadcast or {}).items()}
        mask = trainable_mask(model, spec.names, spec.shapes)
        mask = None if mask is None else mask.to(global_flat)
        parts: list[tuple[torch.Tensor, torch.Tensor, Finish]] = []
        for start in range(0, K, chunk):
            ks = range(start, min(K, start + chunk))
            sub = _sub_plan(plan, ks)
            ctx = Context(
                global_flat, {n: state[n][start : ks.stop] for n in rule.client_state}, bcast
            )
            parts.append(
                self._train_chunk(
                    model, spec, x, y, sub, loss, rule, ctx, lr, mask, transform, num_classes > 1
                )
            )
        fin = [f for _, _, f in parts]
        if len(parts) == 1:  # one chunk: its tensors as they are (a cat would copy (K, d))
            return TrainResult(
                fin[0].message, sizes.to(global_flat), parts[0][1], fin[0].state, fin[0].extras
            )
        return TrainResult(
            torch.cat([f.message for f in fin]),
            sizes.to(global_flat),
            torch.cat([lo for _, lo, _ in parts]),
            {n: torch.cat([f.state[n] for f in fin]) for n in fin[0].state},
            {n: torch.cat([f.extras[n] for f in fin]) for n in fin[0].extras},
        )

    def _train_chunk(
        self,
        model: nn.Module,
        spec: ParamSpec,
        x: torch.Tensor,
        y: torch.Tensor,
        plan: BatchPlan,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        rule: LocalRule,
        ctx: Context,
        lr: float,
        mask: torch.Tensor | None = None,
        transform: Callable[..., torch.Tensor] | None = None,
        cross_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Finish]:
        K = plan.idx.shape[1]
        X = ctx.x0.unsqueeze(0).expand(K, -1).clone()
        buf = torch.zeros_like(X) if self.momentum else None

        # Per-client gradients as one backward pass: clients' losses are independent, so the
        # gradient of their sum w.r.t. the stacked (K, d) parameters has each client's own gradient
        # in its row. (Same numbers as vmap(grad(...)), without torch.func.grad, whose first call
        # imports torch._dynamo: seconds of start-up in every host process.)
        stacked = _stacked(model, spec)
        if stacked:  # its own K-client layers (clients.models.stacked), any K
            forward = model.forward_clients
        elif self._batchable is False:  # a model vmap cannot batch: plain calls, one client

            def forward(p: Params, xb: torch.Tensor) -> torch.Tensor:
                return functional_call(model, {n: v[0] for n, v in p.items()}, (xb[0],))[None]

        else:  # vmap also for K = 1: a client's numbers never depend on who shares its host
            forward = vmap(lambda p, xb: functional_call(model, p, (xb,)))
        # a model's regularizer (e.g. SORSA's): a pure function of the named parameters, added to
        # each client's objective; reported losses stay the data loss
        penalty = getattr(model, "penalty", None)
        if penalty is not None:
            penalize = vmap(penalty) if self._batchable is not False else _first_client(penalty)
        loss_sum = torch.zeros(K, dtype=X.dtype, device=X.device)
        counts = plan.mask.sum(2).clamp(min=1.0)  # (T, K) real samples per step, at least 1
        full = plan.full_steps  # steps every client takes: no gating (read on the CPU, no sync)
        own = type(rule) is LocalRule  # its direction is batch_grad's fresh tensor, kept by no one
        for t in range(plan.num_steps):
            idx, mb = plan.idx[t], plan.mask[t]
            xb, yb = x[idx] if transform is None else transform(x[idx], idx, t), y[idx]

            def batch_grad(
                P: torch.Tensor, xb=xb, yb=yb, mb=mb, count=counts[t]
            ) -> tuple[torch.Tensor, torch.Tensor]:
                if stacked and cross_entropy and penalty is None:  # the model's own pass, if any
                    # the sample weights in the parameters' dtype (a float64 model: float64)
                    weight = mb.to(P.dtype) / count.to(P.dtype)[:, None]
                    fast = model.loss_grad(spec.unflatten(P), xb, yb, weight)
                    if fast is not None:
                        per, grads = fast
                        return spec.flatten(grads, lead=1), (per * mb).sum(1) / count
                with torch.enable_grad():
                    # one leaf per parameter (views of P), gradients concatenated once: a
                    # gradient through P's slices would fill a zero (K, d) tensor per parameter
                    params = {
                        n: v.detach().requires_grad_(True)
                        for n, v in spec.unflatten(P.detach()).items()
                    }
                    out = forward(params, xb)
                    per = loss(out.flatten(0, 1), yb.flatten(0, 1)).view(mb.shape)
                    lval = (per * mb).sum(1) / count
                    obj = lval if penalty is None else lval + penalize(params)
                    grads = torch.autograd.grad(
                        obj.sum(), list(params.values()), materialize_grads=True
                    )  # a parameter the forward does not use gets a zero gradient
                g = spec.flatten(dict(zip(params, grads, strict=True)), lead=1)
                return g, lval.detach()

            direction, lval = rule.direction(batch_grad, X, ctx)
            act = plan.active[t]
            loss_sum += torch.where(act, lval, 0.0)
            X, buf = self._step(
                X, direction, buf, None if t < full else act, lr, mask, own, rule.decay
            )
        steps = plan.steps.to(X.device)
        fin = rule.finish(X, ctx, steps, lr)
        return X, loss_sum / steps.clamp(min=1), fin

    def _step(
        self,
        X: torch.Tensor,
        direction: torch.Tensor,
        buf: torch.Tensor | None,
        act: torch.Tensor | None,
        lr: float,
        mask: torch.Tensor | None = None,
        owned: bool = False,
        decay: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One gated SGD step on stacked flat parameters (inactive clients keep everything;
        coordinates outside ``mask``, the trainable ones, keep their values); ``act`` None: every
        client steps. ``owned``: ``direction`` is the step's own tensor (may be scaled in place).
        ``decay``: the local rule's own weight decay, added after the clip with the client's."""
        g = direction if mask is None else direction * mask
        owned = owned or g is not direction
        if self.grad_clip > 0:
            scale = (self.grad_clip / (g.norm(dim=1) + 1e-6)).clamp(max=1.0)
            g, owned = g * scale[:, None], True
        wd = self.weight_decay + decay
        if wd:
            g, owned = g + wd * (X if mask is None else X * mask), True
        # X and buf belong to this trainer: updated in place (the same arithmetic as X - lr * g,
        # without a fresh (K, d) allocation per operation, which costs page faults for big models)
        if act is None:  # every client steps: no gating needed (the common case)
            if buf is not None:
                return X.sub_(lr * buf.mul_(self.momentum).add_(g)), buf
            # lr * g in g's own memory when no one else holds g: same numbers, one pass fewer
            return X.sub_(g.mul_(lr) if owned else lr * g), buf
        gate = act[:, None]
        if buf is not None:
            buf = torch.where(gate, self.momentum * buf + g, buf)
            g = buf
        return X.sub_(torch.where(gate, lr * g, 0.0)), buf


def chunk_for(
    num_clients: int,
    batched: str | bool,
    memory_budget_mb: float,
    client_bytes: Callable[[], int],
) -> int:
    """How many clients one lockstep computation holds: all (``batched`` true), one (false), or
    (auto) as many as fit in ``memory_budget_mb`` at ``client_bytes()`` each (called only then):
    the memory bound of the federated hosts' trainer and of the peer hosts (``system.p2p``)."""
    mode = str(batched).lower()
    if mode == "false":
        return 1
    if mode == "true":
        return num_clients
    return min(num_clients, max(1, int(memory_budget_mb * 2**20 // client_bytes())))


def client_step_bytes(model: nn.Module, example: torch.Tensor, batch_size: int) -> int:
    """Estimated bytes of one client's training step at ``batch_size``: six model-sized float32
    vectors (parameters, gradient, optimizer and rule state) plus the activations, measured for a
    stackable model (:func:`saved_bytes`), else a rough bound from the linear layers' widths and
    the input's size."""
    d = sum(p.numel() for p in model.parameters())
    if isinstance(model, StackedModel) and model.stackable():
        return 4 * 6 * d + saved_bytes(model, example, batch_size)  # measured activations
    act = sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    act += example[0].numel() * 8  # rough bound on conv activations per sample
    return 4 * (6 * d + 3 * batch_size * act)  # params, grads, state, activations


def saved_bytes(model: StackedModel, example: torch.Tensor, batch_size: int) -> int:
    """Bytes autograd keeps for one client's step of a stacked model: one client's batch of
    ``batch_size`` copies of ``example`` through ``forward_clients``, with saved-tensor hooks
    counting what the backward would need."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    params = {n: p.detach().unsqueeze(0).requires_grad_(True) for n, p in model.named_parameters()}
    xb = example[:1].expand(batch_size, *example.shape[1:]).unsqueeze(0)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.forward_clients(params, xb)
    return total


def _stacked(model: nn.Module, spec: ParamSpec) -> bool:
    """Whether the model trains through its own stacked forward: a :class:`StackedModel` with
    only the modules it was written for and every parameter trained (else vmap)."""
    return (
        isinstance(model, StackedModel)
        and model.stackable()
        and len(spec.names) == sum(1 for _ in model.parameters())
    )


def _first_client(penalty: Callable[[Params], torch.Tensor]) -> Callable[[Params], torch.Tensor]:
    """``penalty`` on stacked parameters of one client (the non-vmap path): (1, ...) -> (1,)."""
    return lambda p: penalty({n: v[0] for n, v in p.items()})[None]


def _sub_plan(plan: BatchPlan, ks: range) -> BatchPlan:
    if len(ks) == plan.idx.shape[1]:
        return plan
    sl = slice(ks.start, ks.stop)
    steps = plan.steps[sl]
    T = int(steps.max())
    return BatchPlan(plan.idx[:T, sl], plan.mask[:T, sl], plan.active[:T, sl], steps)
