"""Peer-to-peer mode (MoNNA): no server; nodes train, exchange half-step models, robustly average.

Layout. The n nodes have ids 0..n-1 and data shards from the configured partition. As in the server
mode's adversary, the **Byzantine nodes are the f lowest ids** (0..f-1) when an attack is active.
*Training nodes* run the protocol on client hosts: the honest nodes, plus, for a data attack (label
flip), the Byzantine nodes, which follow the protocol on poisoned data (their half-steps are their
Byzantine messages). For a model attack the Byzantine nodes do not train; the omniscient adversary
(on the driver) crafts their messages from the honest half-steps, **per target node** with the
attack's ``per_target``/``targeted`` against that node's own aggregation (``strategy.adversary:
per_target``, the default), or, with ``strategy.adversary: broadcast``, one set of vectors for every
node, line-searched against the mean of the honest nodes' aggregations (the MoNNA reference code's
adversary, weaker).

Training nodes are spread over hosts in contiguous id blocks; a host keeps its K nodes' parameters
and momenta stacked (K, d) and computes their gradients over chunks of nodes (a model with its own
stacked layers, ``clients.models.stacked``, through ``forward_clients`` as the federated trainer
does, whose numbers per node do not depend on how many share the call; other models with
``vmap(grad(...))``), as many as ``client.memory_budget_mb`` holds at the federated trainer's per-client estimate
(``clients.trainer.chunk_for`` / ``client_step_bytes``; ``client.batched``: auto, true = all K in
one call, false = one node at a time); the aggregation of step 3 and the evaluation go by chunks too.
Per-node gradients and aggregates are independent, so the chunking does not change a result (tested).
One step t = one exchange:

1. every host: one stochastic gradient per node (batch from :func:`clients.plan.make_plan`, seeded
   by (seed, t, node id)), ``m = beta m + (1 - beta) (g + wd theta)``, ``half = theta - gamma_t m``;
   the host's (K, d) half-steps go to the object store once (the task's return value);
2. the driver crafts the Byzantine vectors per target (model attacks only; this is the one place
   where it reads the half-steps);
3. every host gets all half-steps (Ray resolves the object references) and each of its nodes
   replaces theta by the peer aggregate of what it received: its own half, its in-neighbours'
   halves, and the Byzantine vectors addressed to it. Non-finite received vectors are dropped.

Who receives what is decided by the driver from the seed (:meth:`PeerNetwork.inboxes`):
topology in-neighbours plus self; with ``asynchronous: true`` a node waits for only
``deg + 1 - f`` messages (``n - f`` on the complete graph), and the ones that arrive are, in the
worst case of the asynchrony model, all of its Byzantine neighbours' plus a seeded uniformly random
subset of its honest neighbours'. Real arrival order is *not* used: the subsets come from the seed,
so runs are reproducible and the ``local`` and ``ray`` backends give identical results (tested).

Hosts are plain Python (``PeerHost``); ``backend=ray`` wraps them in actors, ``backend=local`` calls
them in-process. A lost host is not recovered mid-run (its nodes' state lives only there); resume
from the last checkpoint instead.

This module keeps the peer hosts and the network; ``system.build`` builds the settings and the
topology once (:class:`PeerTopology`: who trains, who receives what, the rule's precondition),
and the run loop (``system.loop``) drives the :class:`PeerNetwork` like any other stepper.
Configured with ``mode=p2p p2p=monna`` (or ``p2p=dsgd``); the older spelling ``strategy=monna`` /
``strategy=dsgd`` still works. The groups this mode does not use (``aggregator``, ``client``,
``strategy`` under ``mode=p2p``, a ``clients_per_round`` below ``num_clients``, a privacy budget)
are refused with one line instead of being ignored (:func:`check_unused`).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from flagstaff.clients.models.stacked import StackedModel
from flagstaff.clients.plan import make_plan
from flagstaff.clients.seeds import stream
from flagstaff.clients.trainer import ParamSpec, chunk_for, client_step_bytes, loss_fn_for
from flagstaff.strategies.peer import PeerTraining, make_topology
from flagstaff.strategies.server_step import finite_rows
from flagstaff.system.config import ConfigError
from flagstaff.system.host import HostShard
from flagstaff.system.wire import from_wire, to_wire

__all__ = [
    "PeerHost",
    "PeerNetwork",
    "PeerTopology",
    "check_unused",
    "consensus_distance",
    "start_p2p",
]

log = logging.getLogger("flagstaff")

#: the client group's keys the peer hosts use: their memory bound (the other client keys are refused)
MEMORY_KEYS = ("batched", "memory_budget_mb")


def consensus_distance(P: torch.Tensor) -> float:
    """Largest pairwise Euclidean distance between the rows of P (centred first, no matmul trick)."""
    if P.shape[0] < 2:
        return 0.0
    C = (P - P.mean(dim=0)).double()
    D = torch.cdist(C, C, compute_mode="donot_use_mm_for_euclid_dist")
    return float(D.max())


# ----------------------------------------------------------------------------------------------
# hosts
# ----------------------------------------------------------------------------------------------


class PeerHost:
    """Owns K training nodes: their data, stacked parameters and momenta; runs their steps."""

    def __init__(
        self,
        host_id: int,
        shard: HostShard,
        model: Any,
        settings: PeerTraining,
        f: int,
        seed: int,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        threads: int = 1,
        batched: str | bool = "auto",
        memory_budget_mb: float = 1024.0,
    ) -> None:
        """``model``: the run's ``system.build.ModelSpec`` (this host builds its copy);
        ``settings``: the peer settings (built once by ``system.build``); ``batched`` and
        ``memory_budget_mb``: the memory bound (``client.batched``, ``client.memory_budget_mb``)."""
        torch.set_num_threads(max(1, int(threads)))
        self.host_id = host_id
        self.shard = shard
        self.node_ids = np.asarray(shard.client_ids, dtype=np.int64)
        self.cfg = settings
        self.rule = self.cfg.build_rule(f)
        self.seed = int(seed)
        self.num_classes = num_classes = model.num_classes
        self.model = model.build()
        self.spec = ParamSpec.of(self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)  # parameters are passed functionally (torch.func)
        init = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach()
        K = len(self.node_ids)
        self.params = init.unsqueeze(0).repeat(K, 1)  # every node starts from the same model
        self.momentum = torch.zeros_like(self.params)
        self.half: torch.Tensor | None = None
        self.x_test, self.y_test = x_test, y_test
        self.loss = loss_fn_for(num_classes)
        self.grad_evals = 0  # gradients computed so far, one per node per step
        self.train_losses = torch.zeros(K)

        def node_loss(p, xb, yb, mb):
            per = self.loss(functional_call(self.model, p, (xb,)), yb)
            total = (per * mb).sum() / mb.sum().clamp(min=1.0)
            return total, total.detach()

        self._vmap_grad = vmap(grad(node_loss, has_aux=True))
        # its own K-node layers: a node's numbers do not depend on how many share the call
        self.stacked = isinstance(self.model, StackedModel) and self.model.stackable()
        self.batched, self.memory_budget_mb = batched, float(memory_budget_mb)
        example = shard.x[:1]
        self.chunk = chunk_for(
            K, batched, self.memory_budget_mb,
            lambda: client_step_bytes(self.model, example, settings.batch_size),
        )  # fmt: skip
        if self.chunk < K and str(batched).lower() == "auto":
            warnings.warn(
                f"client.batched=auto: host {host_id} computes the gradients of {self.chunk} of "
                f"its {K} nodes at a time to stay within client.memory_budget_mb="
                f"{self.memory_budget_mb}",
                stacklevel=2,
            )

    def _node_grads(
        self, P: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, mb: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each node's gradient (name -> (k, *shape)) and mean masked loss (k,) at its parameters
        ``P`` on its batch ``xb`` (k, B, ...): for a stacked model through ``forward_clients`` and
        one backward of the nodes' summed losses (they are independent), else ``vmap(grad)``."""
        if not self.stacked:
            return self._vmap_grad(P, xb, yb, mb)
        with torch.enable_grad():
            params = {n: v.detach().requires_grad_(True) for n, v in P.items()}
            out = self.model.forward_clients(params, xb)
            per = self.loss(out.flatten(0, 1), yb.flatten(0, 1)).view(mb.shape)
            total = (per * mb).sum(dim=1) / mb.sum(dim=1).clamp(min=1.0)
            grads = torch.autograd.grad(total.sum(), list(params.values()), materialize_grads=True)
        return dict(zip(params, grads, strict=True)), total.detach()

    def _forward(self, P: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        """The logits (k, b, C) of the nodes whose parameters are ``P`` on one batch ``xb``."""
        if self.stacked:
            k = next(iter(P.values())).shape[0]
            return self.model.forward_clients(P, xb.unsqueeze(0).expand(k, *xb.shape))

        def fwd(p, x):
            return functional_call(self.model, p, (x,))

        return vmap(fwd, in_dims=(0, None))(P, xb)

    def _chunks(self, size: int) -> list[slice]:
        """The host's K nodes in consecutive slices of ``size`` nodes."""
        K = len(self.node_ids)
        return [slice(s, min(K, s + size)) for s in range(0, K, max(1, size))]

    def ping(self) -> int:
        return self.host_id

    def half_step(self, t: int) -> torch.Tensor:
        """Local momentum half step of all K nodes at step t: returns half-steps (K, d)."""
        cfg = self.cfg
        plan = make_plan(
            self.shard.offsets,
            self.shard.sizes,
            self.node_ids,
            cfg.batch_size,
            self.seed,
            t,
            steps=1,
        )
        idx, mb = plan.idx[0], plan.mask[0]
        P = self.spec.unflatten(self.params)
        g = torch.empty_like(self.params)
        losses = self.params.new_empty(len(self.node_ids))
        for sl in self._chunks(self.chunk):  # nodes' gradients are independent: same numbers
            i = idx[sl]
            gk, losses[sl] = self._node_grads(
                {n: v[sl] for n, v in P.items()}, self.shard.x[i], self.shard.y[i], mb[sl]
            )
            g[sl] = self.spec.flatten(gk, lead=1)
            del gk
        self.grad_evals += g.shape[0]
        # in place where a (K, d) temporary would be; the same operations, so the same numbers
        if cfg.weight_decay:
            g.add_(cfg.weight_decay * self.params)
        beta = cfg.momentum
        if beta:
            self.momentum = self.momentum.mul_(beta).add_(g.mul_(1.0 - beta))
        else:
            self.momentum = g
        del g
        self.half = self.params - cfg.lr_at(t) * self.momentum
        self.train_losses = losses
        return to_wire(self.half)  # numpy: fast through Ray (system/wire.py)

    def mix(
        self,
        t: int,
        inbox: list[np.ndarray],
        byz: list[torch.Tensor | None],
        *halves: torch.Tensor,
    ) -> dict[str, Any]:
        """Replace each node's parameters by its peer aggregate of what it received.

        ``halves``: every host's half-steps in host order (the training nodes' stack);
        ``inbox[k]``: rows of that stack node k receives (its own included); ``byz[k]``: the
        Byzantine vectors addressed to node k, (b, d), or None.
        """
        H = torch.cat([from_wire(h) for h in halves])
        byz = [from_wire(b) for b in byz]
        own = self.half
        assert own is not None, "mix before half_step"
        m = max(len(inbox[k]) + (0 if byz[k] is None else len(byz[k])) for k in range(len(own)))
        # a node's received stack (m, d) and the rule's working copies (NNA: the centred stack)
        chunk = chunk_for(
            len(own), self.batched, self.memory_budget_mb, lambda: 3 * m * H[0].nbytes
        )
        new = torch.empty_like(own)
        for sl in self._chunks(chunk):
            new[sl] = self._aggregate(H, inbox, byz, own, sl)
        self.params = new
        return {"grad_evals": self.grad_evals, "train_loss": self.train_losses.clone()}

    def _aggregate(
        self,
        H: torch.Tensor,
        inbox: list[np.ndarray],
        byz: list[torch.Tensor | None],
        own: torch.Tensor,
        sl: slice,
    ) -> torch.Tensor:
        """The peer aggregates of the nodes ``sl``, (k, d): one batched rule call on their
        received stack (k, m, d), filled in place, when they receive equally many vectors, all
        finite; else node by node."""
        ks = range(sl.start, sl.stop)
        sizes = [len(inbox[k]) + (0 if byz[k] is None else len(byz[k])) for k in ks]
        R = None
        if len(set(sizes)) == 1:
            R = H.new_empty((len(ks), sizes[0], H.shape[1]))
            for i, k in enumerate(ks):
                _received(H, inbox[k], byz[k], R[i])
            if bool(finite_rows(R.flatten(0, 1)).all()):
                return self.rule.batch(R, own[sl])
        # different in-degrees, or non-finite vectors to drop (as the server step does): node by node
        rows = []
        for i, k in enumerate(ks):
            Rk = R[i] if R is not None else _received(H, inbox[k], byz[k])
            rows.append(self.rule(Rk[finite_rows(Rk)], own[k]))
        return torch.stack(rows)

    @torch.no_grad()
    def evaluate(self, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Test accuracy and mean loss of each node's model: two (K,) tensors."""
        P = self.spec.unflatten(self.params)
        K, n = len(self.node_ids), len(self.y_test)
        correct, loss = torch.zeros(K), torch.zeros(K)
        for sl in self._chunks(self.chunk):  # the gradients' chunks of nodes
            Pk, k = {name: v[sl] for name, v in P.items()}, sl.stop - sl.start
            for i in range(0, n, batch):
                xb, yb = self.x_test[i : i + batch], self.y_test[i : i + batch]
                out = self._forward(Pk, xb)  # (k, b, C)
                loss[sl] += self.loss(out.flatten(0, 1), yb.repeat(k)).view(k, -1).sum(dim=1)
                if self.num_classes > 1:
                    correct[sl] += (out.argmax(dim=2) == yb).sum(dim=1)
        return correct / n, loss / n

    def get_params(self) -> torch.Tensor:
        return self.params

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "node_ids": torch.as_tensor(self.node_ids),
            "params": self.params.clone(),
            "momentum": self.momentum.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        where = {int(c): i for i, c in enumerate(state["node_ids"].tolist())}
        missing = [int(c) for c in self.node_ids if int(c) not in where]
        if missing:
            raise ValueError(f"host {self.host_id}: checkpoint has no state for nodes {missing}")
        rows = torch.as_tensor([where[int(c)] for c in self.node_ids])
        self.params = state["params"][rows].clone()
        self.momentum = state["momentum"][rows].clone()


def _received(
    H: torch.Tensor,
    rows: np.ndarray,
    byz: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """What one node receives, (m, d): the rows ``rows`` of the half-step stack ``H`` and the
    Byzantine vectors ``byz`` addressed to it, written into ``out`` (a fresh tensor if None)
    without an intermediate copy."""
    idx = torch.from_numpy(np.array(rows, dtype=np.int64))  # writable copy of the indices
    b = 0 if byz is None else len(byz)
    if out is None:
        out = H.new_empty((len(idx) + b, H.shape[1]))
    torch.index_select(H, 0, idx, out=out[: len(idx)])
    if b:
        out[len(idx) :] = byz
    return out


# ----------------------------------------------------------------------------------------------
# the network (driver side)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Backend:
    """How the driver reaches hosts: in-process or Ray actors (same calls, same results)."""

    hosts: list[Any]
    remote: bool

    def call(self, h: int, method: str, *args: Any) -> Any:
        fn = getattr(self.hosts[h], method)
        return fn.remote(*args) if self.remote else fn(*args)

    def get(self, refs: Any) -> Any:
        if not self.remote:
            return refs
        import ray

        return ray.get(refs)

    def close(self) -> None:
        """End the hosts (Ray actors are killed; in-process hosts are dropped)."""
        if self.remote:
            import ray

            for a in self.hosts:
                ray.kill(a)
        self.hosts = []


class PeerTopology:
    """Who trains and who receives what, decided once on the driver from the seed (no hosts): the
    Byzantine node mask, the training nodes and their stack order, the topology and each node's
    inbox per step; its construction checks the inputs (``f < n``, every training node holds
    samples, the peer rule's precondition for what a node receives) so that ``system.build``
    refuses an impossible setting before any work.

    ``settings``: the peer settings; ``n``: the nodes; ``attack``: the run's attack (the
    Byzantine nodes are its f lowest ids); ``parts``: each node's sample indices; ``group``: the
    config group named in errors (``p2p``, or ``strategy`` in the older spelling).
    """

    def __init__(
        self,
        settings: PeerTraining,
        n: int,
        attack: Any,
        seed: int,
        parts: list[np.ndarray],
        group: str = "p2p",
    ) -> None:
        self.cfg, self.n, self.seed, self.group = settings, int(n), int(seed), group
        self.attack = attack.for_models()  # the exchanged vectors are models (adaptive FOE)
        self.f = int(attack.f)
        if not 0 <= self.f < self.n:
            raise ConfigError(f"attack.f={self.f} must be in [0, num_clients={self.n})")
        active = self.f > 0 and attack.name != "none"
        self.active = active
        self.byzantine = np.arange(n) < self.f if active else np.zeros(n, bool)
        self.model_attack = active and attack.kind == "model"
        self.poison = active and attack.kind == "data"
        # for a model attack the Byzantine nodes do not train (the adversary crafts their vectors)
        self.train_ids = np.arange(self.f if self.model_attack else 0, n)
        sizes = np.array([len(parts[c]) for c in self.train_ids.tolist()], dtype=np.int64)
        if (sizes < 1).any():
            raise ConfigError(
                f"nodes {self.train_ids[sizes < 1].tolist()} hold no samples; raise "
                "partition.alpha or lower num_clients"
            )
        self.rule = self.cfg.build_rule(self.f)
        self.adj = make_topology(
            self.cfg.topology, n, self.seed, degree=self.cfg.degree, edge_prob=self.cfg.edge_prob
        )
        self.pos = {int(c): i for i, c in enumerate(self.train_ids)}
        self.honest_pos = np.array(
            [i for i, c in enumerate(self.train_ids) if not self.byzantine[c]], dtype=np.int64
        )
        self.complete_sync = self.cfg.topology == "complete" and not self.cfg.asynchronous
        self._static = self._inboxes(0) if not self.cfg.asynchronous else None
        self._check()

    # -- who receives what ------------------------------------------------------------------------
    def _inboxes(self, t: int) -> list[tuple[np.ndarray, int]]:
        """Per training node (stack order): (rows of the half-step stack it receives, number of
        crafted Byzantine vectors it receives)."""
        rng = stream(self.seed, int(t), 0xA51C, kind="numpy")
        out = []
        for i in self.train_ids.tolist():
            nbrs = np.flatnonzero(self.adj[i])
            crafted = int(self.byzantine[nbrs].sum()) if self.model_attack else 0
            senders = np.array([j for j in nbrs if j in self.pos], dtype=np.int64)
            if self.cfg.asynchronous:
                want = len(nbrs) + 1 - self.f  # messages a node waits for, own included
                byz_in = senders[self.byzantine[senders]] if len(senders) else senders
                hon_in = senders[~self.byzantine[senders]] if len(senders) else senders
                crafted = min(crafted, max(want - 1, 0))
                bad = byz_in[: max(want - 1 - crafted, 0)]
                room = max(want - 1 - crafted - len(bad), 0)
                good = np.sort(rng.choice(hon_in, size=min(room, len(hon_in)), replace=False))
                senders = np.sort(np.concatenate([bad, good]).astype(np.int64))
            rows = np.array([self.pos[i]] + [self.pos[int(j)] for j in senders], dtype=np.int64)
            out.append((rows, crafted))
        return out

    def inboxes(self, t: int) -> list[tuple[np.ndarray, int]]:
        return self._static if self._static is not None else self._inboxes(t)

    def _check(self) -> None:
        for rows, crafted in self._inboxes(0):
            msg = self.rule.requirement(len(rows) + crafted)
            if msg is not None:
                raise ConfigError(
                    f"{self.group}.rule={self.cfg.rule}: a node receives {len(rows) + crafted} "
                    f"vectors (topology {self.cfg.topology}, asynchronous="
                    f"{self.cfg.asynchronous}) and the rule {msg}; use more nodes, a denser "
                    "topology or a smaller attack.f"
                )


class PeerNetwork:
    """The driver of the peer-to-peer mode (a ``system.loop`` stepper): the topology's inboxes,
    the adversary, one ``round`` (exchange) at a time over the peer hosts."""

    unit = "steps"

    def __init__(
        self, topology: PeerTopology, backend: _Backend, host_nodes: list[np.ndarray]
    ) -> None:
        self.topology = top = topology
        self.cfg, self.seed, self.n, self.f = top.cfg, top.seed, top.n, top.f
        self.attack, self.rule, self.byzantine = top.attack, top.rule, top.byzantine
        self.model_attack, self.complete_sync = top.model_attack, top.complete_sync
        self.backend = backend
        self.host_nodes = host_nodes
        self.train_ids = np.concatenate(host_nodes)  # the stack order of half-steps
        assert np.array_equal(self.train_ids, top.train_ids), "hosts hold the training nodes"
        self.pos, self.honest_pos = top.pos, top.honest_pos
        self.inboxes = top.inboxes
        self._evals = 0  # gradient evaluations reported by the hosts so far
        self._step = 0  # exchanges done (the checkpoint's round)
        self._closed = False

    # -- the adversary ----------------------------------------------------------------------------
    def _craft(self, t: int, H: torch.Tensor, inbox: list[tuple[np.ndarray, int]]):
        """Byzantine vectors per training node (stack order): (b_i, d) tensors or None."""
        none: list[torch.Tensor | None] = [None] * len(self.train_ids)
        if not self.model_attack or not any(b for _, b in inbox):
            return none
        gen = stream(int(self.attack.seed), t, scheme="attack")
        if self.cfg.adversary == "broadcast":  # one set of vectors for every honest node
            out = self.attack(H, aggregator=self._mean_aggregation(H), generator=gen)
            if out is None:
                return none
            return [out[:b] if b else None for _, b in inbox]
        adaptive = self.attack.adaptive
        if self.complete_sync and adaptive and self.rule.centre_free:
            # every node aggregates the same vectors with the same rule: one search serves all
            # (centred on the honest mean, as the rule centres on its own vector, for precision)
            out = self.attack(H, aggregator=self.rule.for_node(H.mean(dim=0)), generator=gen)
            if out is None:
                return none
            return [out[:b] for _, b in inbox]
        if self.complete_sync:  # every node holds all honest half-steps: the attack's per_target
            aggs = [self.rule.for_node(H[i]) for i in range(len(H))]
            out = self.attack.per_target(H, aggregators=aggs, generator=gen)
            if out is None:
                return none
            return [out[i, :b] for i, (_, b) in enumerate(inbox)]
        if not adaptive:
            self.attack(H, generator=gen)  # advance stateful attacks (mimic) once per step
        res: list[torch.Tensor | None] = []
        for i, (rows, b) in enumerate(inbox):
            if b == 0:
                res.append(None)
                continue
            v = self.attack.targeted(
                H[torch.as_tensor(rows)], H[i], aggregator=self.rule.for_node(H[i]), generator=gen
            )
            res.append(None if v is None else v[:b])
        return res

    def _mean_aggregation(self, H: torch.Tensor):
        """The broadcast adversary's objective: the mean over honest nodes i of node i's
        aggregation of all vectors (the honest half-steps ``H`` and the Byzantine rows), as in the
        MoNNA reference code (one vector for everyone, line-searched against that mean)."""
        K = H.shape[0]

        def agg(U: torch.Tensor) -> torch.Tensor:
            return self.rule.batch(U.unsqueeze(0).expand(K, -1, -1), H).mean(dim=0)

        return agg

    # -- one step ---------------------------------------------------------------------------------
    def round(self, t: int, evaluate: bool) -> dict[str, Any]:
        """Exchange t (the run loop's round): see :meth:`step`."""
        return self.step(t, evaluate)

    def step(self, t: int, evaluate: bool) -> dict[str, Any]:
        """Exchange t: half steps, Byzantine crafting, aggregation; metrics when ``evaluate``."""
        t0 = time.perf_counter()
        be, nh = self.backend, len(self.backend.hosts)
        half_refs = [be.call(h, "half_step", t) for h in range(nh)]
        inbox = self.inboxes(t)
        byz = [None] * len(self.train_ids)
        if self.model_attack:
            byz = self._craft(t, torch.cat([from_wire(h) for h in be.get(half_refs)]), inbox)
        mix_refs, start = [], 0
        for h in range(nh):
            k = len(self.host_nodes[h])
            sl = slice(start, start + k)
            rows = [r for r, _ in inbox[sl]]
            mix_refs.append(be.call(h, "mix", t, rows, [to_wire(b) for b in byz[sl]], *half_refs))
            start += k
        stats = be.get(mix_refs)
        metrics: dict[str, Any] = {"step": t + 1, "round": t + 1, "lr": self.cfg.lr_at(t)}
        evals = sum(int(s["grad_evals"]) for s in stats)
        metrics["grads_per_node"] = (evals - self._evals) / len(self.train_ids)
        self._evals = evals
        losses = torch.cat([s["train_loss"] for s in stats])
        metrics["train_loss"] = float(losses[torch.as_tensor(self.honest_pos)].mean())
        metrics["round_time_s"] = time.perf_counter() - t0
        self._step = t + 1
        if evaluate:
            metrics.update(self.evaluate())
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Mean and worst honest test accuracy, mean honest test loss, honest consensus distance."""
        be = self.backend
        res = be.get([be.call(h, "evaluate") for h in range(len(be.hosts))])
        P = torch.cat(be.get([be.call(h, "get_params") for h in range(len(be.hosts))]))
        hp = torch.as_tensor(self.honest_pos)
        acc = torch.cat([a for a, _ in res])[hp]
        loss = torch.cat([lo for _, lo in res])[hp]
        out = {"loss": float(loss.mean()), "consensus_distance": consensus_distance(P[hp])}
        if self.n and acc.numel():
            out["accuracy"] = float(acc.mean())
            out["accuracy_worst"] = float(acc.min())
        return out

    def honest_params(self) -> torch.Tensor:
        be = self.backend
        P = torch.cat(be.get([be.call(h, "get_params") for h in range(len(be.hosts))]))
        return P[torch.as_tensor(self.honest_pos)]

    def final_params(self) -> torch.Tensor:
        """The honest nodes' parameters (h, d), the run's result."""
        return self.honest_params()

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """summary.json's peer-to-peer fields: the worst honest node's accuracy, the consensus
        distance, nodes, Byzantine nodes, hosts."""
        final = next((r for r in reversed(rows) if "loss" in r), {})
        return {
            "mode": "p2p",
            "rule": self.cfg.rule,
            "accuracy_worst": final.get("accuracy_worst"),
            "consensus_distance": final.get("consensus_distance"),
            "nodes": self.n,
            "byzantine": self.f if self.topology.active else 0,
            "hosts": len(self.backend.hosts),
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.backend.close()

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        be = self.backend
        parts = be.get([be.call(h, "state_dict") for h in range(len(be.hosts))])
        return {
            "round": self._step,
            "node_ids": torch.cat([p["node_ids"] for p in parts]),
            "params": torch.cat([p["params"] for p in parts]),
            "momentum": torch.cat([p["momentum"] for p in parts]),
            "adversary": self.attack.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        be = self.backend
        be.get([be.call(h, "load_state_dict", state) for h in range(len(be.hosts))])
        self._step = int(state["round"])
        if state.get("adversary"):
            self.attack.load_state_dict(state["adversary"])


# ----------------------------------------------------------------------------------------------
# starting the hosts
# ----------------------------------------------------------------------------------------------


def _place(parts, ds, topology: PeerTopology, hosts: int) -> list[HostShard]:
    """Contiguous blocks of training nodes per host; label-flip poisoning applied at placement."""
    train_ids, attack = topology.train_ids, topology.attack
    owner = (np.arange(len(train_ids)) * hosts) // len(train_ids)
    shards = []
    for h in range(hosts):
        ids = train_ids[owner == h]
        xs, ys = [], []
        for c in ids.tolist():
            x, y = ds.x_train[parts[c]], ds.y_train[parts[c]]
            if topology.poison and c < topology.f:
                gen = stream(int(attack.seed), c, scheme="poison")
                x, y = attack.poison(x, y, ds.num_classes, gen)
            xs.append(x)
            ys.append(y)
        sizes = np.array([len(parts[c]) for c in ids.tolist()], dtype=np.int64)
        shards.append(HostShard(ids, np.cumsum(sizes) - sizes, sizes, torch.cat(xs), torch.cat(ys)))
    return shards


def start_p2p(run: Any, stack: ExitStack) -> PeerNetwork:
    """The peer network of a built run (``system.build.Run`` in mode p2p) on its backend: peer
    hosts in-process (local) or as Ray actors (ray); a Ray it starts ends with ``stack``."""
    c, peer, ds = run.config, run.peer, run.data
    cl = c["cluster"]
    n_train = len(peer.topology.train_ids)
    if c["backend"] not in ("local", "ray"):
        raise NotImplementedError(
            f"backend={c['backend']} has no peer-to-peer mode; use local or ray"
        )
    if c["backend"] == "local":
        hosts = min(cl["hosts"] or 1, n_train)
    else:
        from flagstaff.system.ray_start import init_ray, shutdown_ray

        if init_ray(cl):  # as the federated runner: a new local Ray unless cluster.address is set
            stack.callback(shutdown_ray)
        import ray  # after init_ray: Ray reads its private-start settings when it is imported

        cpus = ray.cluster_resources().get("CPU", 1.0)
        per = cl["cpus_per_host"]
        hosts = min(cl["hosts"] or max(1, int(cpus // per) if per > 0 else int(cpus)), n_train)
    shards = _place(run.parts, ds, peer.topology, hosts)
    args = dict(model=peer.model, settings=peer.settings, f=peer.f, seed=c["seed"])
    args["threads"] = cl["threads_per_host"]
    args["batched"] = c["client"]["batched"]  # the federated hosts' memory bound (check_unused)
    args["memory_budget_mb"] = c["client"]["memory_budget_mb"]
    if c["backend"] == "local":
        torch.set_num_threads(cl["threads_per_host"])
        backend = _Backend(
            [
                PeerHost(h, s, x_test=ds.x_test, y_test=ds.y_test, **args)
                for h, s in enumerate(shards)
            ],
            remote=False,
        )
    else:
        Host = ray.remote(PeerHost)
        xt, yt = ray.put(ds.x_test), ray.put(ds.y_test)
        tag = f"{os.getpid()}-{time.time_ns()}"
        actors = [
            Host.options(
                name=f"flagstaff-peer-host-{h}-{tag}",
                num_cpus=cl["cpus_per_host"],
                num_gpus=0,
                resources=cl["resources"] or None,
                max_restarts=0,
            ).remote(h, ray.put(s), x_test=xt, y_test=yt, **args)
            for h, s in enumerate(shards)
        ]
        ray.get([a.ping.remote() for a in actors])
        backend = _Backend(actors, remote=True)
    return PeerNetwork(peer.topology, backend, [s.client_ids for s in shards])


# ----------------------------------------------------------------------------------------------
# the groups this mode does not use
# ----------------------------------------------------------------------------------------------


def check_unused(c: dict[str, Any], private_client: bool = False) -> None:
    """mode=p2p trains every node with the peer settings (``p2p.lr``, ``p2p.batch_size``,
    ``p2p.momentum``, ``p2p.weight_decay``, ``p2p.rule``): a config that sets what this mode does
    not use (another aggregator or client trainer, a server strategy, partial participation, a
    privacy budget) is refused with one line instead of being ignored. The older spelling
    (``strategy=monna``), which documented that it ignores them, logs one line naming them,
    except for differential privacy: a private client trainer (``private_client``) or a privacy
    budget is refused in both spellings (the mode would train without any DP). The client group's
    memory bound, ``client.batched`` and ``client.memory_budget_mb`` (:data:`MEMORY_KEYS`), does
    take effect: the peer hosts chunk their nodes by it as the federated hosts chunk clients."""
    if private_client or (c.get("privacy") or {}).get("target_epsilon") is not None:
        what = "a differentially private client" if private_client else "privacy.target_epsilon"
        raise ConfigError(
            f"the peer-to-peer mode has no differential privacy: {what} would be ignored and the "
            "nodes would train without DP; remove it, or train federated (mode=federated) with "
            "client=dpsgd or strategy=dp_fedavg"
        )
    model = c.get("model") or {}
    if str(model.get("_target_", "")).endswith("build_lora_model"):
        raise ConfigError(
            f"the peer-to-peer mode trains and averages every parameter of the model, and "
            f"model=lora_{model.get('kind', 'mlp')} freezes the base weights (adapter "
            "fine-tuning): train adapters in the federated mode (mode=federated, e.g. "
            "strategy=fedsvd or ffa_lora), or use a model without adapters here"
        )
    batched = c["client"].get("batched", "auto")
    if str(batched).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"client.batched must be auto, true or false, got {batched!r}")
    unused = []
    if c["clients_per_round"] != c["num_clients"]:
        unused.append(f"clients_per_round={c['clients_per_round']} (every node takes every step)")
    agg = c["aggregator"]
    if agg.get("rule") != "mean" or agg.get("pre"):
        unused.append(f"aggregator={agg.get('rule')} (each node aggregates with p2p.rule)")
    if not _is_default(c["client"], "client", "sgd", skip=MEMORY_KEYS):
        unused.append("client=... (local steps use p2p.lr, p2p.batch_size, p2p.momentum)")
    if c.get("mode") == "p2p" and not _is_default(c["strategy"], "strategy", "fedavg"):
        unused.append("strategy=... (there is no server; the peer settings are p2p=...)")
    if not unused:
        return
    if c.get("mode") == "p2p":
        raise ConfigError(
            "the peer-to-peer mode does not use " + "; ".join(unused) + ": remove these settings"
        )
    # the older spelling (strategy=monna) documented that it ignores them: say so, once
    name = "dsgd" if c["strategy"].get("rule") == "mean" else "monna"
    log.warning(
        "strategy=%s (the older spelling of mode=p2p p2p=%s) ignores %s",
        name,
        name,
        "; ".join(unused),
    )


def _is_default(value: dict[str, Any], group: str, name: str, skip: tuple[str, ...] = ()) -> bool:
    """Whether a composed group still has every setting of ``conf/<group>/<name>.yaml`` (keys its
    own defaults list adds, e.g. a strategy's ``server_opt``, and the keys ``skip`` are not
    compared)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from flagstaff import conf

    node = OmegaConf.load(Path(conf.__file__).parent / group / f"{name}.yaml")
    default = OmegaConf.to_container(node, resolve=True)
    default.pop("defaults", None)
    return all(value.get(k) == v for k, v in default.items() if k not in skip)
