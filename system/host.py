"""ClientHost: a long-lived worker that owns many virtual clients' data and trains them.

A host holds its clients' samples as one contiguous tensor with per-client offsets (placed once, at
start), builds its copy of the model once from the run's :class:`system.build.HostSpec` (model spec,
trainer, local rule, codec spec, seed, threads: objects and small specs, never the config dict), and
per round trains the requested clients from the broadcast global parameters, returning one stacked
(K, d) update tensor. Plain Python: the ``ray`` backend wraps it in an actor, the ``local`` backend
calls it directly.

Everything a host keeps or makes lives on its device (:func:`host_device`: the GPU Ray assigned to
it under ``cluster.gpus_per_host``, else the CPU): its samples (copied there once, at start), its
model copy, the per-client state of the local rule and the codec, each round's batch plan and row
indices, and the trainer's stacked parameters and buffers. Only counts the Python code reads
(sample sizes, steps) stay on the CPU; replies go back to the CPU for the wire.
"""

from __future__ import annotations

import copy
import os
import time
import traceback
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from flagstaff.clients.plan import make_plan
from flagstaff.clients.trainer import ParamSpec
from flagstaff.strategies.server_step import weighted_sum
from flagstaff.system.client_state import ClientStateStore
from flagstaff.system.codecs import build_codec
from flagstaff.system.eval import EvalPart, score
from flagstaff.system.specs import HostSpec
from flagstaff.system.wire import from_wire, shared_from_wire, to_wire

__all__ = [
    "ClientHost",
    "HostShard",
    "ShardRef",
    "host_device",
    "local_host_device",
    "HostReply",
    "ClientError",
    "UnknownClientsError",
    "PRIVACY_STATE",
]

#: the name :meth:`ClientHost.state_kinds` gives the per-client privacy accountants (DP-SGD)
PRIVACY_STATE = "privacy accountant"


def host_device(requested: str | torch.device = "cpu") -> torch.device:
    """The device of a host asked to run on ``requested``: ``cuda`` (no index) is the GPU Ray
    assigned to this actor (:func:`visible_index`), cuda:0 outside Ray; anything else as given
    (``cpu``, ``cuda:1``, ``meta`` in tests). A CUDA device torch cannot see is refused."""
    dev = torch.device(requested)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(
            f"a client host was asked to run on {dev} but torch {torch.__version__} sees no CUDA "
            "device here; set cluster.gpus_per_host=0 to run hosts on CPU"
        )
    if dev.index is not None:
        return dev
    return torch.device(
        "cuda", visible_index(_ray_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    )


def visible_index(gpu_ids: list[Any], visible: str | None) -> int:
    """torch's index of the first GPU Ray assigned (``ray.get_gpu_ids()``): its place in
    ``CUDA_VISIBLE_DEVICES``, which Ray sets to the assigned ids (so 0), or the id itself when the
    variable is unset (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``); 0 without an assignment."""
    if not gpu_ids:
        return 0
    gid = str(gpu_ids[0]).strip()
    if visible:
        ids = [v.strip() for v in visible.split(",")]
        return ids.index(gid) if gid in ids else 0
    return int(gid)


def local_host_device(host_id: int, gpus_per_host: float) -> str:
    """The device of in-process host ``host_id`` (backend=local): the CPU without GPUs, else the
    GPU its share falls on, hosts packed ``1 / gpus_per_host`` to a GPU, round-robin past the last."""
    if gpus_per_host <= 0:
        return "cpu"
    return f"cuda:{int(host_id * gpus_per_host) % max(1, torch.cuda.device_count())}"


def _ray_gpu_ids() -> list[Any]:
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - not inside Ray
        return []


class ClientError(RuntimeError):
    """A client raised during local training; carries its id and the traceback."""


class UnknownClientsError(ValueError):
    """A host was asked to train clients it does not hold (e.g. a restarted host that had taken
    over a lost host's clients: the pool gives them back and asks again)."""


@dataclass
class HostShard:
    """The data of a host's clients: contiguous samples plus per-client offsets and sizes.

    With ``index`` (clients that share samples, e.g. ``partition=with_replacement``: 100,000
    clients of 40 samples from 1,437), ``x``/``y`` are the whole train set, stored once, and each
    client's samples are the rows ``index[offsets[i] : offsets[i] + sizes[i]]`` of it; a round
    gathers only its clients' rows (:meth:`rows`). Without it, ``x``/``y`` hold each client's
    samples contiguously at ``offsets``.
    """

    client_ids: np.ndarray  # (C,) global ids, sorted (within each block a host adopted)
    offsets: np.ndarray  # (C,)
    sizes: np.ndarray  # (C,)
    x: torch.Tensor
    y: torch.Tensor
    #: the data's per-batch transform (``Dataset.transform``, e.g. uint8 images -> normalized and
    #: augmented floats), applied by the trainer per step; None: samples are used as stored
    transform: Any = None
    #: what the host evaluates (``system.eval.EvalShard``: its test-set slice, its clients'
    #: held-out samples); None: the server evaluates in its own process
    eval: Any = None
    #: per-client rows of ``x``/``y`` (see above); None: ``x``/``y`` are the clients' own samples
    index: np.ndarray | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the samples as numpy arrays; the receiving host views them in Ray's object store
        without a copy (system/wire.py; hosts only read their samples)."""
        wire = (self.client_ids, self.offsets, self.sizes, to_wire(self.x), to_wire(self.y))
        return (_shard_from_wire, (*wire, self.transform, self.eval, self.index))

    def rows(self, pos: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """For the clients at positions ``pos``: the rows of ``x`` that hold their samples, one
        client after the other (None: they already lie at ``offsets``), and each client's offset
        into those gathered rows (its offset in ``x`` when the rows are None)."""
        offsets, sizes = self.offsets[pos], self.sizes[pos]
        if self.index is None:
            return None, offsets
        starts = np.cumsum(sizes) - sizes  # where each client begins among the gathered rows
        at = np.repeat(offsets - starts, sizes) + np.arange(int(sizes.sum()))
        return self.index[at].astype(np.int64), starts


def _shard_from_wire(
    client_ids: np.ndarray,
    offsets: np.ndarray,
    sizes: np.ndarray,
    x: Any,
    y: Any,
    transform=None,
    eval=None,  # noqa: A002 - the field's name
    index: np.ndarray | None = None,
) -> HostShard:
    return HostShard(
        client_ids,
        offsets,
        sizes,
        shared_from_wire(x),
        shared_from_wire(y),
        transform,
        eval,
        index,
    )


class ShardRef:
    """A host's shard as a Ray object reference inside a plain (inline) constructor argument.

    Ray re-runs an actor's constructor with the same arguments when it restarts the actor, so a
    restarted host fetches the same shard (the driver keeps the reference for the whole run). A
    shard passed as a top-level reference would be a constructor argument in the object store, which
    Ray's core worker reports on the console for every actor with ``max_restarts > 0``
    (github.com/ray-project/ray/issues/53727); a reference nested in an argument is not."""

    __slots__ = ("ref",)

    def __init__(self, ref: Any) -> None:
        import ray

        # serialized out of band, so Ray sees bytes, not a reference, in the constructor's
        # arguments; Ray then pins the shard until its owner (the driver) ends, a little longer
        # than the run's own reference (docs.ray.io, ray-core/patterns/out-of-band-object-ref-
        # serialization). Where that is turned off (RAY_allow_out_of_band_object_ref_serialization
        # =0) or through Ray Client (``ray://``, whose references live on the client's proxy), the
        # reference goes as it is (and Ray logs its line).
        self.ref = ref
        if ray.util.client.ray.is_connected():
            return
        try:
            self.ref = ray.cloudpickle.dumps(ref)
        except Exception:  # noqa: BLE001 - Ray refuses out-of-band references: pass it as is
            pass

    def get(self) -> HostShard:
        """The shard (from the object store; zero-copy for its tensors)."""
        import ray

        ref = ray.cloudpickle.loads(self.ref) if isinstance(self.ref, bytes) else self.ref
        return ray.get(ref)


@dataclass
class HostReply:
    """One host's answer for one round (one tensor for all its clients)."""

    host_id: int
    client_ids: np.ndarray
    updates: torch.Tensor  # (K, d)
    weights: torch.Tensor  # (K,)
    losses: torch.Tensor  # (K,)
    train_time_s: float
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (K, d), per client
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (K,), e.g. epsilon
    #: reduced replies carry one row, sum_i w_i u_i in float64 over the finite updates, and
    #: weights = [sum_i w_i]; ``finite`` (K,) marks the clients whose update entered the sum
    reduced: bool = False
    finite: torch.Tensor | None = None
    #: bytes the clients sent (update or codec payload, plus extras, in their dtype; docs/communication.md)
    bytes_up: int = 0
    #: ``updates`` holds the codec's (K, p) payload, which the server decodes (system/codecs.py)
    encoded: bool = False
    #: a random number drawn when the host process started: a new value means Ray restarted the
    #: host, so the per-client state it held is gone (the pool names the clients, system/pool.py)
    incarnation: int = 0

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the tensor fields as numpy arrays (fast through Ray: system/wire.py)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _TENSOR_FIELDS:
            state[name] = to_wire(state[name])
        return (_reply_from_wire, (state,))


_TENSOR_FIELDS = ("updates", "weights", "losses", "extras", "metrics", "finite")


def _reply_from_wire(state: dict[str, Any]) -> HostReply:
    for name in _TENSOR_FIELDS:
        state[name] = from_wire(state[name])
    return HostReply(**state)


class ClientHost:
    """Owns a slice of the clients; trains any subset of them per round."""

    def __init__(
        self,
        host_id: int,
        shard: HostShard | ShardRef,
        spec: HostSpec,
        device: str = "cpu",
        delay_s: float = 0.0,
    ) -> None:
        self.delay_s = float(delay_s)  # chaos testing (cluster.slow_hosts): a deliberate straggler
        self._incarnation = int.from_bytes(os.urandom(6), "big")
        torch.set_num_threads(max(1, int(spec.threads)))
        self.host_id = host_id
        self.device = host_device(device)
        shard = shard.get() if isinstance(shard, ShardRef) else shard  # backend=ray: by reference
        self.shard = shard
        self.x = shard.x.to(self.device)  # the host's samples move to its device once, here
        self.y = shard.y.to(self.device)
        self.evalset = shard.eval.to(self.device) if shard.eval is not None else None
        self.position = {int(c): i for i, c in enumerate(shard.client_ids)}
        self.num_classes = spec.model.num_classes
        self.seed = seed = spec.seed
        self.model = spec.model.build().to(self.device)
        self.spec = ParamSpec.of(self.model)
        for p in self.model.parameters():
            p.requires_grad_(
                False
            )  # parameters are passed functionally; grads come from torch.func
        # this host's own trainer and local rule (per-client objects such as DP accountants live
        # in the trainer: hosts in one process must not share it)
        self.trainer = copy.deepcopy(spec.trainer)
        if shard.transform is not None and not self.trainer.accepts_transform:
            raise ValueError(
                f"client: {type(self.trainer).__name__} does not apply the data's per-batch "
                "transform (uint8 images normalized and augmented per step); use client=sgd or "
                "client=momentum"
            )
        # the strategy's local rule and its per-client state (only for rules that keep state)
        self.rule = copy.deepcopy(spec.rule)
        d, C = self.spec.numel, len(shard.client_ids)
        names = self.rule.client_state if self.rule is not None else ()
        # rows only for clients that have state; mapped to a file in the run directory when the
        # dense table would be large (system/client_state.py, docs/cluster.md "Scale")
        self.client_state = ClientStateStore(names, C, d, self.device, spec.state_dir)
        # compressed communication: the codec and its per-client state (error-feedback residual,
        # PowerSGD's warm-start Q), kept here and checkpointed with the rule's state
        self.codec = build_codec(spec.comm, self.spec, seed)
        self.comm_state = self.codec.init_state(C, self.device) if self.codec else {}
        if not self.trainer.per_client:  # DP-SGD clients do not use torch.func
            self._warmup()

    def _warmup(self) -> None:
        """One batched forward/backward at start-up, so round 1 does not pay first-call costs."""
        from torch.func import functional_call, vmap

        with torch.enable_grad():
            flat = self.spec.flatten(dict(self.model.named_parameters())).detach()
            P = flat.unsqueeze(0).requires_grad_(True)
            x0 = self.x[:1] if self.shard.transform is None else self.shard.transform(self.x[:1])
            out = vmap(lambda q, xb: functional_call(self.model, q, (xb,)))(
                self.spec.unflatten(P), x0.unsqueeze(0)
            )
            torch.autograd.grad(out.sum(), P)

    def ping(self) -> int:
        return self.host_id

    def incarnation(self) -> int:
        """A random number drawn when this host process started (see ``HostReply.incarnation``)."""
        return self._incarnation

    def state_kinds(self) -> list[str]:
        """The per-client state this host keeps for its clients, by name (lost if the host dies):
        the local rule's (e.g. SCAFFOLD's ``c_i``), the codec's (``comm.*``) and the DP-SGD
        accountants (:data:`PRIVACY_STATE`)."""
        kinds = [*self.client_state, *(f"comm.{n}" for n in self.comm_state)]
        if self.trainer.epsilon_kind is not None:  # DP: per-client accountants
            kinds.append(PRIVACY_STATE)
        return kinds

    def adopt(self, shard: HostShard) -> list[int]:
        """Take over the clients of ``shard`` (a lost host's; issue 19 item 4): append their samples
        and give them fresh per-client state (zeros; the codec's initial state). Returns the ids
        taken; a shard whose clients this host already holds is ignored (the call is idempotent).
        Refused for trainers with per-client privacy accountants: a fresh accountant would
        under-count the epsilon the clients already spent."""
        if PRIVACY_STATE in self.state_kinds():
            raise ValueError(
                f"host {self.host_id}: clients with DP-SGD accountants cannot move to another host "
                "(their privacy history stayed on the lost host)"
            )
        ids = np.asarray(shard.client_ids, dtype=np.int64)
        if len(ids) == 0 or int(ids[0]) in self.position:
            return []
        old = self.shard
        if (old.index is None) != (shard.index is None):
            raise ValueError(f"host {self.host_id}: the shard to adopt is laid out differently")
        if old.index is not None:  # both index the same train set: only the row lists join
            base, index = len(old.index), np.concatenate([old.index, shard.index])
        else:
            base, index = self.x.shape[0], None
            self.x = torch.cat([self.x, shard.x.to(self.device)])
            self.y = torch.cat([self.y, shard.y.to(self.device)])
        self.shard = HostShard(
            np.concatenate([old.client_ids, ids]),
            np.concatenate([old.offsets, np.asarray(shard.offsets) + base]),
            np.concatenate([old.sizes, shard.sizes]),
            self.x,
            self.y,
            old.transform,
            index=index,
        )
        self.position.update({int(c): len(old.client_ids) + i for i, c in enumerate(ids)})
        C = len(ids)
        self.client_state.extend(C)  # fresh clients hold no state (zeros)
        fresh = self.codec.init_state(C, self.device) if self.codec else {}
        for n, v in self.comm_state.items():
            self.comm_state[n] = torch.cat([v, fresh[n]])
        if shard.eval is not None:  # the lost host's test slice and held-out samples come along
            got = shard.eval.to(self.device)
            self.evalset = got if self.evalset is None else self.evalset.concat(got)
        return ids.tolist()

    def node_id(self) -> str:
        """The Ray node this host runs on ("local" outside Ray)."""
        try:
            import ray

            return ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - not inside Ray
            return "local"

    def num_samples(self) -> int:
        return int(self.shard.sizes.sum())

    def train(
        self,
        global_flat: torch.Tensor,
        client_ids: list[int],
        round_idx: int,
        broadcast: dict[str, torch.Tensor] | None = None,
        reduce: bool = False,
    ) -> HostReply:
        """Train ``client_ids`` (all owned by this host) for one round from ``global_flat``;
        ``broadcast``: the strategy's server vectors for the local rule (e.g. SCAFFOLD's c)."""
        t0 = time.perf_counter()
        global_flat = from_wire(global_flat)  # the Ray pool sends numpy arrays (system/wire.py)
        broadcast = from_wire(broadcast)
        if self.delay_s:
            time.sleep(self.delay_s)
        missing = [c for c in client_ids if c not in self.position]
        if missing:
            raise UnknownClientsError(f"host {self.host_id} does not own clients {missing}")
        if global_flat.numel() != self.spec.numel:
            raise ValueError(
                f"host {self.host_id}: the server sent {global_flat.numel()} parameters, this host's "
                f"model has {self.spec.numel}; every host must run the same model config"
            )
        pos = np.array([self.position[c] for c in client_ids], dtype=np.int64)
        tr = self.trainer
        rows = torch.as_tensor(pos, device=self.device)
        sizes = torch.as_tensor(self.shard.sizes[pos], device="cpu")  # counts the trainer reads
        take, offsets = self.shard.rows(pos)  # shared samples: gather this round's rows only
        x, y = self.x, self.y
        if take is not None:
            at = torch.as_tensor(take, device=self.device)
            x, y = x[at], y[at]
        try:
            plan = make_plan(
                offsets,
                self.shard.sizes[pos],
                np.asarray(client_ids),
                tr.batch_size,
                self.seed,
                round_idx,
                epochs=tr.epochs,
                steps=tr.steps,
                device=self.device,
            )
            # trainers with per-client objects (DP-SGD: one PrivacyEngine per client) get ids, offsets
            per_client = (
                {"client_ids": np.asarray(client_ids), "offsets": offsets} if tr.per_client else {}
            )
            if self.shard.transform is not None:  # bound to the round: clients.augment
                per_client["transform"] = self.shard.transform.bind(
                    self.seed, round_idx, client_ids, offsets
                )
            res = tr.train(
                self.model,
                self.spec,
                global_flat.to(self.device),
                x,
                y,
                plan,
                self.num_classes,
                sizes,
                rule=self.rule,
                state=self.client_state.gather(pos),
                broadcast={n: v.to(self.device) for n, v in (broadcast or {}).items()},
                round_idx=round_idx,
                **per_client,
            )
            if res.state:
                self.client_state.scatter(pos, res.state)
            updates = res.updates
            if self.codec is not None:  # encode after local training; the server decodes
                updates, new = self.codec.encode(
                    updates, {n: v[rows] for n, v in self.comm_state.items()}, round_idx
                )
                for n, v in new.items():
                    self.comm_state[n][rows] = v
        except Exception as err:
            raise ClientError(
                f"host {self.host_id} failed training clients {list(client_ids)[:10]}"
                f"{'...' if len(client_ids) > 10 else ''} in round {round_idx}:\n"
                + traceback.format_exc()
            ) from err
        reply = HostReply(
            self.host_id,
            np.asarray(client_ids, dtype=np.int64),
            updates.cpu(),
            res.weights.cpu(),
            res.losses.cpu(),
            time.perf_counter() - t0,
            {n: v.cpu() for n, v in res.extras.items()},
            {n: v.cpu() for n, v in res.metrics.items()},
            bytes_up=_nbytes(updates) + sum(_nbytes(v) for v in res.extras.values()),
            encoded=self.codec is not None,
            incarnation=self._incarnation,
        )
        return reduce_reply(reply) if reduce else reply

    def evaluate(self, global_flat: torch.Tensor) -> EvalPart:
        """This host's evaluation sums for the global parameters ``global_flat``: its test-set
        slice and its clients' held-out samples, in batches, without gradients, on its device
        (``system.eval.score``; the server adds the hosts' parts)."""
        if self.evalset is None:
            raise ValueError(f"host {self.host_id} was placed without evaluation data")
        params = from_wire(global_flat).to(self.device)
        return score(self.model, self.spec, params, self.evalset, self.num_classes)

    # -- privacy (sample-level DP trainers keep one accountant per client on this host) ------------
    def epsilon_after(self, client_ids: list[int]) -> dict[int, float]:
        """Each client's epsilon after one more round, or {} for a non-private trainer."""
        if self.trainer.epsilon_kind is None:  # not private (clients.trainer.Trainer)
            return {}
        fn = self.trainer.epsilon_after  # with the local rule: its private gradients per step
        return {
            int(c): fn(int(c), int(self.shard.sizes[self.position[c]]), self.rule)
            for c in client_ids
        }

    def privacy_state(self) -> dict[str, Any]:
        """The trainer's accountant state ({} for a non-private trainer)."""
        return self.trainer.state_dict()

    def load_privacy_state(self, state: dict[str, Any]) -> None:
        if state:
            own = {int(c) for c in self.shard.client_ids}
            hist = {c: h for c, h in state.get("histories", {}).items() if int(c) in own}
            self.trainer.load_state_dict({**state, "histories": hist})

    def state_dict(self) -> dict[str, Any]:
        """Per-client state of the local rule (e.g. SCAFFOLD's c_i) and of the codec (``comm.*``:
        error-feedback residual, PowerSGD's Q), rows in client-id order."""
        if not self.comm_state:  # only the clients that have state (the others hold zeros)
            return self.client_state.state_dict(self.shard.client_ids)
        every = np.arange(len(self.shard.client_ids))
        return {
            # a copy: arrays of shards that came through Ray's object store are read-only
            "client_ids": torch.tensor(self.shard.client_ids, device="cpu"),
            **{n: v.cpu().clone() for n, v in self.client_state.gather(every).items()},
            **{f"comm.{n}": v.cpu().clone() for n, v in self.comm_state.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this host's rows from a state over any set of clients (any host layout)."""
        if not self.client_state and not self.comm_state:
            return
        ids = np.asarray(state.get("client_ids", np.empty(0, np.int64)), dtype=np.int64)
        own = np.asarray(self.shard.client_ids, dtype=np.int64)
        # a checkpoint holds the clients that had state; the others held zeros (client_state.py)
        order = np.argsort(ids, kind="stable")
        at = np.searchsorted(ids[order], own) if len(ids) else np.zeros(len(own), np.int64)
        found = (at < len(ids)) & (ids[order][np.minimum(at, max(len(ids) - 1, 0))] == own)
        if not len(ids):
            found[:] = False
        pos = np.flatnonzero(found)  # this host's positions the checkpoint has rows for
        src = torch.as_tensor(order[at[pos]], device="cpu")
        for n in self.client_state:
            if n not in state:
                raise ValueError(f"host {self.host_id}: checkpoint has no client state {n!r}")
        self.client_state.load(pos, {n: state[n][src] for n in self.client_state})
        if self.comm_state and not found.all():
            missing = own[~found].tolist()
            raise ValueError(
                f"host {self.host_id}: the checkpoint holds no state for clients {missing[:5]}; "
                "resume with the num_clients and comm config the checkpoint was written with"
            )
        rows = torch.as_tensor(order[at], device="cpu") if self.comm_state else None
        for n in self.comm_state:
            if f"comm.{n}" not in state:
                raise ValueError(
                    f"host {self.host_id}: checkpoint has no codec state {n!r}; resume with the "
                    "comm config the checkpoint was written with"
                )
            self.comm_state[n] = state[f"comm.{n}"][rows].to(self.device).clone()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def reduce_reply(reply: HostReply) -> HostReply:
    """Replace a host's (K, d) updates by their weighted sum over the finite ones (float64; the
    server step's reduced path, ``strategies.server_step.weighted_sum``).

    Used when the aggregator is a weighted mean and nothing else needs individual updates: one
    d-vector per host travels instead of K (about 8 ms saved per MB on a 2-core machine).
    """
    reply.updates, reply.weights, reply.finite = weighted_sum(reply.updates, reply.weights)
    reply.reduced = True
    return reply
