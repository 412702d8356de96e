"""The training recipe (STYLE.md point 8): build once, open the run directory, start the stepper of
the run's mode and backend, run the loop, clean up.

``train(cfg)`` is what ``flagstaff-train`` calls; it is also the programmatic entry point:

    config --system.build--> objects --start--> stepper --system.loop--> rounds, checkpoints, summary

The steppers: the parameter server and its client hosts (backends local and ray; started here),
the Flower simulation (``system.flower_backend``) and the peer network (``system.p2p``).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from flagstaff.clients.dp import private_partition
from flagstaff.clients.partition import summarize
from flagstaff.strategies.attacks import Adversary
from flagstaff.system.build import Run, build_run, check_gpus, check_resources
from flagstaff.system.eval import attach_eval, split_for_eval
from flagstaff.system.host import ClientHost, HostShard, ShardRef, local_host_device
from flagstaff.system.loop import (
    NO_UPDATE,
    RunStopped,
    check_resume,
    fingerprint,
    finish_summary,
    run_loop,
)
from flagstaff.system.pool import LocalPool, RayPool
from flagstaff.system.ray_start import check_auth_token, init_ray, shutdown_ray
from flagstaff.system.rundir import RunDir, hydra_files
from flagstaff.system.server import ParameterServer, ServerSettings

__all__ = [
    "NO_UPDATE",
    "RunStopped",
    "check_auth_token",
    "finish_summary",
    "fingerprint",
    "train",
]

log = logging.getLogger("flagstaff")


def _shards(parts, ds, hosts: int, adversary: Adversary) -> tuple[np.ndarray, list[HostShard]]:
    """Contiguous client-id blocks per host; Byzantine data poisoning applied at placement.

    Clients that share samples (more samples over all clients than the train set holds, e.g.
    ``partition=with_replacement``) get the train set once per host plus their row indices
    (``HostShard.index``: 4 bytes per sample of a client instead of a copy of the sample)."""
    n = len(parts)
    owner = (np.arange(n) * hosts) // n
    sizes_all = np.fromiter((len(p) for p in parts), dtype=np.int64, count=n)
    poisoned = adversary.active and adversary.kind == "data"  # per-client copies then
    if not poisoned and int(sizes_all.sum()) > len(ds.y_train):
        return owner, _index_shards(parts, sizes_all, ds, owner, hosts)
    shards = []
    for h in range(hosts):
        ids = np.flatnonzero(owner == h)
        xs, ys = [], []
        for c in ids:
            x, y = ds.x_train[parts[c]], ds.y_train[parts[c]]
            xs.append(x)
            ys.append(y)
            if adversary.kind == "data":
                xs[-1], ys[-1] = adversary.poison_data(x, y, ds.num_classes, int(c))
        sizes = np.array([len(parts[c]) for c in ids], dtype=np.int64)
        offsets = np.cumsum(sizes) - sizes
        shards.append(HostShard(ids, offsets, sizes, torch.cat(xs), torch.cat(ys), ds.transform))
    return owner, shards


def _index_shards(
    parts, sizes_all: np.ndarray, ds, owner: np.ndarray, hosts: int
) -> list[HostShard]:
    """Per host: the whole train set and its clients' row indices (int32 where they fit)."""
    dtype = np.int32 if len(ds.y_train) < 2**31 else np.int64
    shards = []
    for h in range(hosts):
        ids = np.flatnonzero(owner == h)
        sizes = sizes_all[ids]
        index = np.concatenate([parts[c] for c in ids] or [np.empty(0, dtype)]).astype(dtype)
        offsets = np.cumsum(sizes) - sizes
        shards.append(
            HostShard(ids, offsets, sizes, ds.x_train, ds.y_train, ds.transform, index=index)
        )
    return shards


def train(
    cfg: DictConfig | dict, run_dir: str | None = None, *, started_at: float | None = None
) -> dict[str, Any]:
    """Run federated (or peer-to-peer) training as configured; return final metrics and timings.
    ``started_at`` (a ``time.perf_counter()`` value): when the caller began setting up (e.g.
    started Ray), so ``startup_s`` covers it."""
    t_start = time.perf_counter() if started_at is None else started_at
    run = build_run(cfg)  # every input checked, every component built once, nothing written yet
    c = run.config
    path = run_dir or _hydra_dir() or "outputs/run"
    out = RunDir(path, pending=hydra_files(cfg, path))  # .hydra/ is written at out.begin()
    with ExitStack() as stack:
        stack.enter_context(out.lock())  # one live run per directory
        fp = fingerprint(c)
        state = check_resume(c, out, fp, run.checkpoint_numel)
        if c["backend"] == "flower" and run.mode == "federated":
            from flagstaff.system.flower_backend import check_flower

            check_flower(run, resuming=state is not None)
        out.begin(int(state["round"]) if state is not None else 0)  # metrics cut back to it
        labels = run.data.y_train.numpy()
        # under DP without label histograms (and client sizes under client-level DP)
        part = private_partition(summarize(run.parts, labels, run.data.num_classes), run.kinds)
        out.write_json("partition.json", part)
        if run.federated is not None:  # large per-client state maps into the run directory
            run.federated.host = replace(run.federated.host, state_dir=str(out.path.resolve()))
        stepper = start(run, stack)
        return run_loop(c, stepper, out, fp, state, t_start)


def start(run: Run, stack: ExitStack) -> Any:
    """The stepper (``system.loop.Stepper``) of the run's mode and backend; its hosts' shutdown
    (``close``) and the Ray it started are registered on ``stack``."""
    stepper = _stepper(run, stack)
    stack.callback(stepper.close)
    return stepper


def _stepper(run: Run, stack: ExitStack) -> Any:
    c = run.config
    if run.mode == "p2p":  # decentralized training, no server (system/p2p.py)
        from flagstaff.system.p2p import start_p2p

        return start_p2p(run, stack)
    if c["backend"] == "local":
        return _start_local(run)
    if c["backend"] == "ray":
        return _start_ray(run, stack)
    if c["backend"] == "flower":  # Flower's simulation engine (system/flower_backend.py)
        from flagstaff.system.flower_backend import FlowerServer

        return FlowerServer(run, stack)
    raise NotImplementedError(f"backend={c['backend']} is not available yet; use local or ray")


@dataclass
class ServerRun:
    """The run loop's view of a parameter server and its client hosts (a ``system.loop`` stepper):
    ``server`` is the ParameterServer itself or, placed as a Ray actor, a :class:`Remote` of it."""

    server: Any
    close_hosts: Any
    hosts: int
    host_nodes: list[str]
    unit: str = "rounds"
    _closed: bool = field(default=False, repr=False)

    def round(self, r: int, evaluate: bool) -> dict[str, Any]:
        return self.server.round(r, evaluate)

    def state_dict(self) -> dict[str, Any]:
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state)

    def final_params(self) -> torch.Tensor:
        return self.server.get_params()

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Communication over the run, where the hosts ran, what host faults lost, and epsilon with
        the released mechanism (DP runs)."""
        out = {
            # per-round values in metrics.jsonl
            "bytes_up_total": sum(r.get("bytes_up", 0) for r in rows),
            "bytes_down_total": sum(r.get("bytes_down", 0) for r in rows),
            "hosts": self.hosts,
            "host_nodes": self.host_nodes,
            **self.server.faults(),  # lost hosts and the clients whose per-client state they took
        }
        privacy = self.server.privacy_summary()
        if privacy:
            out["privacy"] = privacy
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.close_hosts()


class Remote:
    """A Ray actor's methods as plain calls (``ray.get`` of each), for the run loop."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    def __getattr__(self, method: str) -> Any:
        import ray

        fn = getattr(self._actor, method)
        return lambda *args: ray.get(fn.remote(*args))


def _start_local(run: Run) -> ServerRun:
    """backend=local: hosts and the server are plain objects in this process."""
    c, fed = run.config, run.federated
    cl = c["cluster"]
    torch.set_num_threads(cl["threads_per_host"])
    parts, held = split_for_eval(c, run.parts)  # natural partitions: a held-out share per client
    owner, shards = _shards(parts, run.data, cl["hosts"] or 1, fed.adversary)
    attach_eval(shards, owner, run.data, held)  # the hosts evaluate (system/eval.py)
    gpus = cl["gpus_per_host"]  # > 0: hosts on this machine's GPUs (checked by build_run)
    hosts = [
        ClientHost(h, s, fed.host, device=local_host_device(h, gpus)) for h, s in enumerate(shards)
    ]
    pool = LocalPool(hosts)
    ds = run.data
    settings = replace(ServerSettings.of(c), host_eval=True)
    server = ParameterServer(fed, pool, owner, ds.x_test, ds.y_test, settings)
    return ServerRun(server, pool.close, len(hosts), ["local"] * len(hosts))


def _start_ray(run: Run, stack: ExitStack) -> ServerRun:
    """backend=ray: hosts are Ray actors (restarted by Ray, placed by resources); the server runs
    on the driver or, for a remote Ray Client driver, as an actor on the head's node."""
    c, fed, ds = run.config, run.federated, run.data
    cl = c["cluster"]
    if init_ray(cl):  # a private local Ray (loopback, token, watchdog) or the cluster
        stack.callback(shutdown_ray)
    import ray  # after init_ray: Ray reads its private-start settings when it is imported

    cpus = ray.cluster_resources().get("CPU", 1.0)
    per = cl["cpus_per_host"]
    hosts = cl["hosts"] or max(1, int(cpus // per) if per > 0 else int(cpus))
    gpu = cl["gpus_per_host"]
    if gpu > 0:  # a local Ray was checked before any work (build_run); a cluster only now
        check_gpus(gpu, ray.cluster_resources().get("GPU", 0.0), "the Ray cluster")
    check_resources(ray.cluster_resources(), hosts, per, gpu, cl["resources"])
    parts, held = split_for_eval(c, run.parts)  # natural partitions: a held-out share per client
    owner, shards = _shards(parts, ds, hosts, fed.adversary)
    attach_eval(shards, owner, ds, held)  # the hosts evaluate (system/eval.py)
    Host = ray.remote(ClientHost)
    opts = dict(
        num_cpus=per,
        num_gpus=gpu,
        resources=cl["resources"] or None,
        max_restarts=cl["max_restarts"],
        max_task_retries=0,
        scheduling_strategy="SPREAD" if cl["placement"] == "spread" else "DEFAULT",
    )
    device = "cuda" if gpu > 0 else "cpu"  # cuda: the GPU Ray assigns (system.host.host_device)
    tag = f"{os.getpid()}-{time.time_ns()}"
    # the driver keeps the shard references for the whole run: Ray re-runs a host's constructor
    # with them when it restarts the host (after a crash or on another node); each goes nested in
    # a ShardRef, so Ray does not log a console line per host about object-store arguments
    shard_refs = [ray.put(s) for s in shards]
    stack.callback(shard_refs.clear)
    actors = [
        Host.options(name=f"flagstaff-host-{h}-{tag}", **opts).remote(
            h,
            ShardRef(shard_refs[h]),
            device=device,
            delay_s=float(cl["slow_hosts"][h]) if h < len(cl["slow_hosts"]) else 0.0,
            spec=fed.host,
        )
        for h in range(hosts)
    ]
    pool = RayPool(
        actors,
        on_failure=cl["on_host_failure"],
        deadline_s=cl["round_deadline_s"],
        restart_timeout_s=cl["restart_timeout_s"],
        shards=shard_refs,  # a lost host's clients move with these (system/pool.py)
        owner=owner,
    )
    where = server_placement(cl)
    settings = replace(ServerSettings.of(c), host_eval=True)
    if where == "driver":  # the server is a plain object in this process, on the driver's node
        server: Any = ParameterServer(fed, pool, owner, ds.x_test, ds.y_test, settings)
        pings = [a.ping.remote() for a in actors]
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # the server lives on the head's node: losing a worker node must not take the run's state
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        Server = ray.remote(ParameterServer).options(num_cpus=0, scheduling_strategy=here)
        actor = Server.remote(fed, pool, owner, ray.put(ds.x_test), ray.put(ds.y_test), settings)
        pings = [a.ping.remote() for a in actors] + [actor.ping.remote()]
        server = Remote(actor)
    try:
        ray.get(pings, timeout=cl["start_timeout_s"])
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(
            f"the {hosts} client hosts did not start within cluster.start_timeout_s="
            f"{cl['start_timeout_s']} s; on a joined cluster (cluster.address) check `ray status` "
            "for pending resources; on the run's own Ray, that cluster.hosts x "
            "cluster.cpus_per_host fits this machine's CPUs"
        ) from None

    def close() -> None:
        pool.close()
        if where == "actor":
            ray.kill(actor)

    nodes = ray.get([a.node_id.remote() for a in actors])
    log.info("%d client hosts on %d node(s)", hosts, len(set(nodes)))
    return ServerRun(server, close, hosts, nodes)


def server_placement(cl: dict[str, Any]) -> str:
    """Where the parameter server runs on backend=ray: ``driver`` (in this process: no extra
    worker process to start, no hop per round) unless the driver is a remote Ray Client
    (``ray://`` address), which should not pull every update over its connection: then
    ``actor`` (on the cluster node this client is attached to). ``cluster.server`` overrides."""
    choice = cl.get("server", "auto")
    if choice != "auto":
        return choice
    return "actor" if str(cl.get("address") or "").startswith("ray://") else "driver"


def _hydra_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # noqa: BLE001 - not inside a Hydra app
        return None
