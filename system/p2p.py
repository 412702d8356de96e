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
and momenta stacked (K, d) and computes their gradients in one ``vmap(grad(...))`` call.
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
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from clients.plan import make_plan
from clients.seeds import stream
from clients.trainer import ParamSpec, loss_fn_for
from strategies.peer import PeerTraining, make_topology
from system.config import ConfigError
from system.host import HostShard, build_from
from system.rundir import RunDir
from system.wire import from_wire, to_wire

__all__ = ["PeerHost", "PeerNetwork", "run_p2p", "consensus_distance"]

log = logging.getLogger("flagstaff")


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
        model_cfg: dict[str, Any],
        peer_cfg: dict[str, Any],
        f: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        seed: int,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(max(1, int(threads)))
        self.host_id = host_id
        self.shard = shard
        self.node_ids = np.asarray(shard.client_ids, dtype=np.int64)
        self.cfg: PeerTraining = build_from(peer_cfg)
        self.rule = self.cfg.build_rule(f)
        self.seed = int(seed)
        self.num_classes = num_classes
        self.model = build_from(
            model_cfg, input_shape=input_shape, num_classes=num_classes, seed=seed
        )
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

        self._grad = vmap(grad(node_loss, has_aux=True))

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
        g, losses = self._grad(
            self.spec.unflatten(self.params), self.shard.x[idx], self.shard.y[idx], mb
        )
        g = self.spec.flatten(g, lead=1)
        self.grad_evals += g.shape[0]
        if cfg.weight_decay:
            g = g + cfg.weight_decay * self.params
        beta = cfg.momentum
        self.momentum = beta * self.momentum + (1.0 - beta) * g if beta else g
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
        R_list = []
        for k in range(len(self.node_ids)):
            parts = [H[torch.from_numpy(np.array(inbox[k], dtype=np.int64))]]  # writable copy
            if byz[k] is not None and len(byz[k]):
                parts.append(byz[k].to(H.dtype))
            R_list.append(torch.cat(parts))
        own = self.half
        assert own is not None, "mix before half_step"
        sizes = {r.shape[0] for r in R_list}
        finite = all(bool(torch.isfinite(r).all()) for r in R_list)
        if len(sizes) == 1 and finite:
            self.params = self.rule.batch(torch.stack(R_list), own)
        else:  # different in-degrees, or non-finite vectors to drop: node by node
            rows = []
            for k, R in enumerate(R_list):
                R = R[torch.isfinite(R).all(dim=1)]
                rows.append(self.rule(R, own[k]))
            self.params = torch.stack(rows)
        return {"grad_evals": self.grad_evals, "train_loss": self.train_losses.clone()}

    @torch.no_grad()
    def evaluate(self, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Test accuracy and mean loss of each node's model: two (K,) tensors."""
        P = self.spec.unflatten(self.params)
        K, n = len(self.node_ids), len(self.y_test)
        correct, loss = torch.zeros(K), torch.zeros(K)

        def fwd(p, xb):
            return functional_call(self.model, p, (xb,))

        for i in range(0, n, batch):
            xb, yb = self.x_test[i : i + batch], self.y_test[i : i + batch]
            out = vmap(fwd, in_dims=(0, None))(P, xb)  # (K, b, C)
            loss += self.loss(out.flatten(0, 1), yb.repeat(K)).view(K, -1).sum(dim=1)
            if self.num_classes > 1:
                correct += (out.argmax(dim=2) == yb).sum(dim=1)
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


class PeerNetwork:
    """The driver of the peer-to-peer mode: topology, inboxes, adversary, one ``step`` per exchange."""

    def __init__(
        self,
        cfg: dict[str, Any],
        backend: _Backend,
        node_ids: list[np.ndarray],
        n: int,
        attack: Any,
    ) -> None:
        self.cfg: PeerTraining = build_from(cfg["strategy"])
        self.seed = int(cfg["seed"])
        self.backend = backend
        self.host_nodes = node_ids
        self.train_ids = np.concatenate(node_ids)  # the stack order of half-steps
        self.n = n
        self.attack = attack.for_models()  # the exchanged vectors are models (adaptive FOE)
        self.f = int(getattr(attack, "f", 0))
        active = self.f > 0 and getattr(attack, "name", "none") != "none"
        self.byzantine = np.arange(n) < self.f if active else np.zeros(n, bool)
        self.model_attack = active and getattr(attack, "kind", "model") == "model"
        self.rule = self.cfg.build_rule(self.f)
        self.adj = make_topology(
            self.cfg.topology, n, self.seed, degree=self.cfg.degree, edge_prob=self.cfg.edge_prob
        )
        self.pos = {int(c): i for i, c in enumerate(self.train_ids)}
        self.honest_pos = np.array(
            [i for i, c in enumerate(self.train_ids) if not self.byzantine[c]], dtype=np.int64
        )
        self.complete_sync = self.cfg.topology == "complete" and not self.cfg.asynchronous
        self._evals = 0  # gradient evaluations reported by the hosts so far
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
        if self.f >= self.n:
            raise ConfigError(f"attack.f={self.f} must be < num_clients={self.n} (the nodes)")
        for rows, crafted in self._inboxes(0):
            msg = self.rule.requirement(len(rows) + crafted)
            if msg is not None:
                raise ConfigError(
                    f"strategy.rule={self.cfg.rule}: a node receives {len(rows) + crafted} "
                    f"vectors (topology {self.cfg.topology}, asynchronous="
                    f"{self.cfg.asynchronous}) and the rule {msg}; use more nodes, a denser "
                    "topology or a smaller attack.f"
                )

    # -- the adversary ----------------------------------------------------------------------------
    def _craft(self, t: int, H: torch.Tensor, inbox: list[tuple[np.ndarray, int]]):
        """Byzantine vectors per training node (stack order): (b_i, d) tensors or None."""
        none: list[torch.Tensor | None] = [None] * len(self.train_ids)
        if not self.model_attack or not any(b for _, b in inbox):
            return none
        gen = stream(int(getattr(self.attack, "seed", 0)), t, scheme="attack")
        if self.cfg.adversary == "broadcast":  # one set of vectors for every honest node
            out = self.attack(H, aggregator=self._mean_aggregation(H), generator=gen)
            if out is None:
                return none
            return [out[:b] if b else None for _, b in inbox]
        adaptive = getattr(self.attack, "adaptive", False)
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

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        be = self.backend
        parts = be.get([be.call(h, "state_dict") for h in range(len(be.hosts))])
        return {
            "round": step,
            "node_ids": torch.cat([p["node_ids"] for p in parts]),
            "params": torch.cat([p["params"] for p in parts]),
            "momentum": torch.cat([p["momentum"] for p in parts]),
            "adversary": getattr(self.attack, "state_dict", lambda: {})(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        be = self.backend
        be.get([be.call(h, "load_state_dict", state) for h in range(len(be.hosts))])
        if hasattr(self.attack, "load_state_dict") and state.get("adversary"):
            self.attack.load_state_dict(state["adversary"])


# ----------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------


def _place(parts, ds, train_ids: np.ndarray, hosts: int, attack: Any) -> list[HostShard]:
    """Contiguous blocks of training nodes per host; label-flip poisoning applied at placement."""
    owner = (np.arange(len(train_ids)) * hosts) // len(train_ids)
    poison = getattr(attack, "kind", "model") == "data" and getattr(attack, "name", "") != "none"
    seed = int(getattr(attack, "seed", 0))
    shards = []
    for h in range(hosts):
        ids = train_ids[owner == h]
        xs, ys = [], []
        for c in ids.tolist():
            x, y = ds.x_train[parts[c]], ds.y_train[parts[c]]
            if poison and c < attack.f:
                gen = stream(seed, c, scheme="poison")
                x, y = attack.poison(x, y, ds.num_classes, gen)
            xs.append(x)
            ys.append(y)
        sizes = np.array([len(parts[c]) for c in ids.tolist()], dtype=np.int64)
        if (sizes < 1).any():
            raise ConfigError(
                f"nodes {ids[sizes < 1].tolist()} hold no samples; raise partition.alpha or "
                "lower num_clients"
            )
        shards.append(HostShard(ids, np.cumsum(sizes) - sizes, sizes, torch.cat(xs), torch.cat(ys)))
    return shards


def _start(c: dict[str, Any], ds, shards: list[HostShard], f: int, stack: ExitStack) -> _Backend:
    cl = c["cluster"]
    args = dict(
        model_cfg=c["model"],
        peer_cfg=c["strategy"],
        f=f,
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        seed=c["seed"],
        threads=cl["threads_per_host"],
    )
    if c["backend"] == "local":
        torch.set_num_threads(cl["threads_per_host"])
        hosts = [
            PeerHost(h, s, x_test=ds.x_test, y_test=ds.y_test, **args) for h, s in enumerate(shards)
        ]
        return _Backend(hosts, remote=False)
    if c["backend"] != "ray":
        raise NotImplementedError(
            f"backend={c['backend']} has no peer-to-peer mode; use local or ray"
        )
    import ray

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

    def close() -> None:
        for a in actors:
            ray.kill(a)

    stack.callback(close)
    return _Backend(actors, remote=True)


def _num_hosts(c: dict[str, Any], stack: ExitStack, n_train: int) -> int:
    cl = c["cluster"]
    if c["backend"] != "ray":
        return min(cl["hosts"] or 1, n_train)
    from system.ray_start import init_ray, shutdown_ray

    if init_ray(cl):  # as the federated runner: a new local Ray unless cluster.address is set
        stack.callback(shutdown_ray)
    import ray  # after init_ray: Ray reads its private-start settings when it is imported

    cpus = ray.cluster_resources().get("CPU", 1.0)
    per = cl["cpus_per_host"]
    hosts = cl["hosts"] or max(1, int(cpus // per) if per > 0 else int(cpus))
    return min(hosts, n_train)


def run_p2p(c: dict[str, Any], out: RunDir, t_start: float | None = None) -> dict[str, Any]:
    """Decentralized training as configured (``strategy.mode: p2p``); same run directory, progress
    bar, checkpoints and summary as the server mode. ``rounds`` counts steps (exchanges);
    ``num_clients`` counts nodes; ``clients_per_round``, ``client`` and ``aggregator`` are unused
    (the peer rule and its settings live in ``strategy``)."""
    from tqdm import tqdm

    from clients.partition import summarize
    from system.loggers import make_logger
    from system.memory import tree_memory_mb
    from system.preflight import load_inputs
    from system.runner import fingerprint, finish_summary

    t_start = time.perf_counter() if t_start is None else t_start
    n, steps = int(c["num_clients"]), int(c["rounds"])
    with ExitStack() as stack:
        torch.manual_seed(c["seed"])
        ds, parts = load_inputs(c)  # a bad input: one line naming it (system/preflight.py)
        labels = ds.y_train.numpy()
        attack = build_from(c["attack"])
        f = int(getattr(attack, "f", 0))
        if not 0 <= f < n:
            raise ConfigError(f"attack.f={f} must be in [0, num_clients={n})")
        active = f > 0 and getattr(attack, "name", "none") != "none"
        model_attack = active and getattr(attack, "kind", "model") == "model"
        train_ids = np.arange(f if model_attack else 0, n)
        hosts = _num_hosts(c, stack, len(train_ids))
        shards = _place(parts, ds, train_ids, hosts, attack)
        backend = _start(c, ds, shards, f, stack)
        net = PeerNetwork(c, backend, [s.client_ids for s in shards], n, attack)
        fp = fingerprint(c)
        start = 0
        state = out.load_checkpoint(fp) if c["resume"] else None
        if state is not None:
            net.load_state_dict(state)
            start = int(state["round"])
        out.begin(start)  # checks passed: .hydra/, metrics.jsonl cut back to the checkpoint
        out.write_json("partition.json", summarize(parts, labels, ds.num_classes))
        logger = make_logger(c["logger"], out.path, c)
        stack.callback(logger.close)
        startup_s = time.perf_counter() - t_start
        rows = out.read_metrics()
        every, ck = c["eval_every"], c["checkpoint_every"]
        bar = tqdm(
            range(start, steps),
            desc="steps",
            initial=start,
            total=steps,
            disable=not c["progress"],
            dynamic_ncols=True,
        )
        for t in bar:
            evaluate = (t + 1) % every == 0 or t + 1 == steps
            m = net.step(t, evaluate)
            if evaluate:
                m["rss_mb"], m["pss_mb"] = tree_memory_mb()
                bar.set_postfix(
                    acc=f"{m.get('accuracy', float('nan')):.3f}",
                    worst=f"{m.get('accuracy_worst', float('nan')):.3f}",
                    s_per_step=f"{m['round_time_s']:.3f}",
                )
            out.append_metrics(m)
            logger.log(m)
            rows.append(m)
            if (ck and (t + 1) % ck == 0) or t + 1 == steps:
                out.save_checkpoint({**net.state_dict(t + 1), "fingerprint": fp})
        bar.close()
        params = net.honest_params()
        final = next((r for r in reversed(rows) if "loss" in r), {})
        summary = {
            "mode": "p2p",
            "rule": net.cfg.rule,
            **finish_summary(c, rows, start, startup_s, out.path),
            "accuracy_worst": final.get("accuracy_worst"),
            "consensus_distance": final.get("consensus_distance"),
            "nodes": n,
            "byzantine": f if active else 0,
            "hosts": hosts,
        }
        out.write_json("summary.json", summary)
        out.plot_curves()
        times = [r["round_time_s"] for r in rows]
        return {**summary, "round_times": times, "params": params, "metrics": rows}
