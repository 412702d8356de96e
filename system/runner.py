"""The training recipe: set up (data, hosts, server), run the round loop, save, clean up.

``train(cfg)`` is what ``flagstaff-train`` calls; it is also the programmatic entry point.
The round loop is ``_loop``: one readable method on the driver (STYLE.md point 4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from clients.dp import privacy_kinds, private_partition
from clients.partition import summarize
from strategies.attacks import Adversary
from system.config import validate
from system.host import ClientHost, HostShard, build_from
from system.loggers import make_logger
from system.memory import tree_memory_mb
from system.pool import LocalPool, RayPool
from system.preflight import check_model, check_resume, load_inputs
from system.ray_start import check_auth_token, init_ray, shutdown_ray
from system.rundir import RunDir, hydra_files, versions
from system.server import ParameterServer

__all__ = ["train", "fingerprint", "check_auth_token", "RunStopped"]

log = logging.getLogger("flagstaff")

# keys that may change between a run and its resumption without changing its result
_RUN_INFO: dict[str, Any] = {}  # where the hosts ran, for summary.json (set by _start)

_RESUME_FREE = (
    "resume",
    "rounds",
    "progress",
    "cluster",
    "logger",
    "backend",
    "eval_every",
    "checkpoint_every",
    "experiment",
)


def fingerprint(cfg: dict[str, Any]) -> dict[str, str]:
    """Hash of each config group that determines the result (checked on resume)."""
    return {
        k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
        for k, v in cfg.items()
        if k not in _RESUME_FREE
    }


def _shards(parts, ds, hosts: int, adversary: Adversary) -> tuple[np.ndarray, list[HostShard]]:
    """Contiguous client-id blocks per host; Byzantine data poisoning applied at placement."""
    n = len(parts)
    owner = (np.arange(n) * hosts) // n
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


def train(
    cfg: DictConfig | dict, run_dir: str | None = None, *, started_at: float | None = None
) -> dict[str, Any]:
    """Run federated training as configured; return final metrics and timings. ``started_at``
    (a ``time.perf_counter()`` value): when the caller began setting up (e.g. started Ray), so
    ``startup_s`` covers it."""
    t_start = time.perf_counter() if started_at is None else started_at
    _RUN_INFO.clear()  # no stale host info from an earlier run in this process
    c = validate(cfg)
    path = run_dir or _hydra_dir() or "outputs/run"
    out = RunDir(path, pending=hydra_files(cfg, path))  # .hydra/ is written at out.begin()
    if c["strategy"].get("mode") == "p2p":  # decentralized training, no server (system/p2p.py)
        from system.p2p import run_p2p

        with out.lock():
            return run_p2p(c, out, t_start)
    with ExitStack() as stack:
        torch.manual_seed(c["seed"])
        # every input is checked before anything is written into the run directory (issue 19)
        ds, parts = load_inputs(c)
        num_params = check_model(c, ds)
        stack.enter_context(out.lock())  # one live run per directory
        fp = fingerprint(c)
        state = check_resume(c, out, fp, num_params)
        start_round = int(state["round"]) if state is not None else 0
        out.begin(start_round)  # .hydra/, metrics.jsonl cut back to the checkpoint's round
        labels = ds.y_train.numpy()
        # under DP without label histograms (and client sizes under client-level DP)
        kinds = privacy_kinds(c["client"], c["strategy"])
        part = private_partition(summarize(parts, labels, ds.num_classes), kinds)
        out.write_json("partition.json", part)
        adversary = Adversary(build_from(c["attack"]), c["num_clients"])
        server, pool_close = _start(c, ds, parts, adversary, stack)
        if state is not None:
            _call(server, "load_state_dict", state)
            log.info("resumed from %s at round %d", out.checkpoint_path, start_round)
        logger = make_logger(c["logger"], out.path, c)
        stack.callback(logger.close)
        startup_s = time.perf_counter() - t_start
        rows, stop = _loop(c, server, out, fp, start_round, logger)
        params = _call(server, "get_params")
        faults = _call(server, "faults") if hasattr(server, "faults") else {}
        # epsilon and the released mechanism (DP runs); asked before pool_close, which also ends
        # a server actor (cluster.server=actor)
        privacy = _call(server, "privacy_summary") if hasattr(server, "privacy_summary") else None
        pool_close()
        summary = finish_summary(c, rows, start_round, startup_s, out.path)
        summary.update(
            # communication over the run (per-round values in metrics.jsonl)
            bytes_up_total=sum(r.get("bytes_up", 0) for r in rows),
            bytes_down_total=sum(r.get("bytes_down", 0) for r in rows),
            rounds_completed=max((r["round"] for r in rows), default=start_round),
            stopped=stop.get("stopped"),  # e.g. "privacy budget"; None: all rounds ran
            stop_message=stop.get("message"),
            hosts=_RUN_INFO.get("hosts"),
            host_nodes=_RUN_INFO.get("host_nodes"),
            **faults,  # lost hosts and the clients whose per-client state they took (system/pool.py)
        )
        if privacy:
            summary["privacy"] = privacy
        out.write_json("summary.json", summary)
        out.plot_curves()
        if stop.get("stopped") == NO_UPDATE:  # checkpoint and summary are written: now fail
            raise RunStopped(stop["message"])
        times = [r["round_time_s"] for r in rows]
        return {**summary, "round_times": times, "params": params, "metrics": rows}


NO_UPDATE = "no usable update"


class RunStopped(RuntimeError):
    """The run stopped before its last round because it could not make progress (e.g.
    ``cluster.max_skipped_rounds`` rounds in a row without a usable update); the checkpoint holds
    everything up to the stop."""


def no_update_message(skipped: list[dict[str, Any]], c: dict[str, Any], path: Any) -> str:
    """Why K rounds in a row had no usable update (which clients were late, failed or sent
    non-finite updates) and what to change; one line."""
    who: dict[str, set[int]] = {}
    for m in skipped:
        for k, v in (m.get("skipped_clients") or {}).items():
            who.setdefault(k, set()).update(v)
    fixes = {
        "nonfinite": "sent non-finite updates (lower client.lr, check the data for NaN/inf, or "
        "clip the updates)",
        "late": "were late (raise cluster.round_deadline_s, or speed up or remove the slow "
        "hosts: cluster.slow_hosts, `ray status`)",
        "failed": "were on failed or lost hosts (check `ray status` and the host log lines above)",
    }
    why = [f"clients {_ids(who[k])} {fixes[k]}" for k in fixes if who.get(k)]
    if not why:  # e.g. the flower backend, or rounds that sampled no client
        why = sorted({str(m.get("skipped")) for m in skipped})
    first, last = skipped[0]["round"], skipped[-1]["round"]
    return (
        f"{len(skipped)} rounds in a row (rounds {first}-{last}) had no usable update: "
        + "; ".join(why)
        + f". The model is unchanged since round {first - 1}; {path}/checkpoint.pt holds round "
        f"{last}: fix the cause and rerun with resume=true (cluster.max_skipped_rounds="
        f"{c['cluster'].get('max_skipped_rounds', 3)} sets how many such rounds stop a run; 0: "
        "never)"
    )


def _ids(ids: set[int]) -> str:
    ids_ = sorted(ids)
    return str(ids_) if len(ids_) <= 20 else f"{ids_[:20]}... ({len(ids_)} clients)"


def finish_summary(
    c: dict[str, Any], rows: list[dict[str, Any]], start: int, startup_s: float, path: Any
) -> dict[str, Any]:
    """The fields of summary.json every training mode shares (final metrics, timing, memory,
    seed, versions); modes add their own."""
    final = next((r for r in reversed(rows) if "loss" in r), {})
    times = [r["round_time_s"] for r in rows]
    return {
        "accuracy": final.get("accuracy"),
        "loss": final.get("loss"),
        "rounds": c["rounds"],
        "resumed_from": start,
        "startup_s": startup_s,
        "round_time_median_s": float(np.median(times[1:] or times)) if times else None,
        "peak_rss_mb": max((r.get("rss_mb", 0.0) for r in rows), default=0.0),
        "peak_pss_mb": max((r.get("pss_mb", 0.0) for r in rows), default=0.0),
        "seed": c["seed"],
        "backend": c["backend"],
        "versions": versions(),
        "run_dir": str(path),
    }


def _loop(
    c, server, out: RunDir, fp, start_round: int, logger
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The round loop: run, log, checkpoint. Progress bar on stderr. Returns the metric rows and
    the server's stop row ({} when every round ran), e.g. before a privacy budget is exceeded."""
    from tqdm import tqdm

    rounds, every, ck = c["rounds"], c["eval_every"], c["checkpoint_every"]
    rows = out.read_metrics()
    bar = tqdm(
        range(start_round, rounds),
        desc="rounds",
        initial=start_round,
        total=rounds,
        disable=not c["progress"],
        dynamic_ncols=True,
    )
    stop: dict[str, Any] = {}
    skipped: list[dict[str, Any]] = []  # the rounds in a row without a usable update
    max_skipped = c["cluster"].get("max_skipped_rounds", 3)
    for r in bar:
        evaluate = (r + 1) % every == 0 or r + 1 == rounds
        m = _call(server, "round", r, evaluate)
        if m.get("stopped"):  # the round did not run: final checkpoint, clear message, stop
            stop = m
            log.warning("%s", m.get("message", m["stopped"]))
            bar.write(f"flagstaff: stopped: {m.get('message', m['stopped'])}", file=sys.stderr)
            state = _call(server, "state_dict")
            out.save_checkpoint({**state, "fingerprint": fp})
            break
        if evaluate:
            m["rss_mb"], m["pss_mb"] = tree_memory_mb()
        out.append_metrics(m)
        logger.log(m)
        rows.append(m)
        if "accuracy" in m:
            bar.set_postfix(acc=f"{m['accuracy']:.3f}", s_per_round=f"{m['round_time_s']:.3f}")
        skipped = [*skipped, m] if m.get("skipped") else []
        if skipped:  # a visible event; max_skipped in a row stop the run (issue 19 item 5)
            why = m["skipped"] if isinstance(m["skipped"], str) else NO_UPDATE
            bar.write(f"flagstaff: round {m['round']} skipped: {why}", file=sys.stderr)
        if max_skipped and len(skipped) >= max_skipped:
            stop = {"stopped": NO_UPDATE, "message": no_update_message(skipped, c, out.path)}
        if (ck and (r + 1) % ck == 0) or r + 1 == rounds or stop:
            state = _call(server, "state_dict")
            out.save_checkpoint({**state, "fingerprint": fp})
        if stop:
            break
    bar.close()
    return rows, stop


def _start(c, ds, parts, adversary, stack: ExitStack):
    """Start hosts and the server on the configured backend; register their shutdown."""
    cl = c["cluster"]
    host_args = dict(
        model_cfg=c["model"],
        client_cfg=c["client"],
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        seed=c["seed"],
        threads=cl["threads_per_host"],
        strategy_cfg=c["strategy"],
        comm_cfg=c.get("comm"),
    )
    if c["backend"] == "local":
        torch.set_num_threads(cl["threads_per_host"])
        owner, shards = _shards(parts, ds, cl["hosts"] or 1, adversary)
        hosts = [ClientHost(h, s, **host_args) for h, s in enumerate(shards)]
        pool = LocalPool(hosts)
        _RUN_INFO.update(hosts=len(hosts), host_nodes=["local"] * len(hosts))
        server = ParameterServer(
            c, pool, owner, ds.x_test, ds.y_test, ds.input_shape, ds.num_classes
        )
        return server, pool.close
    if c["backend"] == "ray":
        return _start_ray(c, ds, parts, adversary, host_args, stack)
    if c["backend"] == "flower":  # Flower's simulation engine (system/flower_backend.py)
        from system.flower_backend import start_flower

        return start_flower(c, ds, adversary)
    raise NotImplementedError(f"backend={c['backend']} is not available yet; use local or ray")


def _start_ray(c, ds, parts, adversary, host_args, stack: ExitStack):
    cl = c["cluster"]
    if init_ray(cl):  # a private local Ray (loopback, token, watchdog) or the cluster
        stack.callback(shutdown_ray)
    import ray  # after init_ray: Ray reads its private-start settings when it is imported
    cpus = ray.cluster_resources().get("CPU", 1.0)
    per = cl["cpus_per_host"]
    hosts = cl["hosts"] or max(1, int(cpus // per) if per > 0 else int(cpus))
    gpu = cl["gpus_per_host"]
    if gpu > 0 and ray.cluster_resources().get("GPU", 0.0) == 0:
        log.warning("cluster.gpus_per_host=%s but the cluster has no GPU: hosts run on CPU", gpu)
        gpu = 0.0
    check_resources(ray.cluster_resources(), hosts, per, gpu, cl["resources"])
    owner, shards = _shards(parts, ds, hosts, adversary)
    Host = ray.remote(ClientHost)
    opts = dict(
        num_cpus=per,
        num_gpus=gpu,
        resources=cl["resources"] or None,
        max_restarts=cl["max_restarts"],
        max_task_retries=0,
        scheduling_strategy="SPREAD" if cl["placement"] == "spread" else "DEFAULT",
    )
    device = "cuda" if gpu > 0 else "cpu"
    tag = f"{os.getpid()}-{time.time_ns()}"
    # the driver keeps the shard references for the whole run: Ray re-runs a host's constructor
    # with them when it restarts the host (after a crash or on another node)
    shard_refs = [ray.put(s) for s in shards]
    stack.callback(shard_refs.clear)
    actors = [
        Host.options(name=f"flagstaff-host-{h}-{tag}", **opts).remote(
            h,
            shard_refs[h],
            device=device,
            delay_s=float(cl["slow_hosts"][h]) if h < len(cl["slow_hosts"]) else 0.0,
            **host_args,
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
    if where == "driver":  # the server is a plain object in this process, on the driver's node
        server = ParameterServer(
            c, pool, owner, ds.x_test, ds.y_test, ds.input_shape, ds.num_classes
        )
        pings = [a.ping.remote() for a in actors]
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # the server lives on the head's node: losing a worker node must not take the run's state
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        Server = ray.remote(ParameterServer).options(num_cpus=0, scheduling_strategy=here)
        server = Server.remote(
            c, pool, owner, ray.put(ds.x_test), ray.put(ds.y_test), ds.input_shape, ds.num_classes
        )
        pings = [a.ping.remote() for a in actors] + [server.ping.remote()]
    try:
        ray.get(pings, timeout=cl["start_timeout_s"])
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(
            f"the {hosts} client hosts did not start within cluster.start_timeout_s="
            f"{cl['start_timeout_s']} s; check `ray status` for pending resources"
        ) from None

    def close() -> None:
        pool.close()
        if where == "actor":
            ray.kill(server)

    nodes = ray.get([a.node_id.remote() for a in actors])
    log.info("%d client hosts on %d node(s)", hosts, len(set(nodes)))
    _RUN_INFO.update(hosts=hosts, host_nodes=nodes, server=where)
    return server, close


def server_placement(cl: dict[str, Any]) -> str:
    """Where the parameter server runs on backend=ray: ``driver`` (in this process: no extra
    worker process to start, no hop per round) unless the driver is a remote Ray Client
    (``ray://`` address), which should not pull every update over its connection: then
    ``actor`` (on the cluster node this client is attached to). ``cluster.server`` overrides."""
    choice = cl.get("server", "auto")
    if choice != "auto":
        return choice
    return "actor" if str(cl.get("address") or "").startswith("ray://") else "driver"


def check_resources(
    available: dict[str, float], hosts: int, cpus: float, gpus: float, custom: dict[str, float]
) -> None:
    """Fail before work if the cluster cannot hold every host at once (else actors pend forever)."""
    need = {"CPU": hosts * cpus, "GPU": hosts * gpus}
    need.update({k: hosts * v for k, v in (custom or {}).items()})
    short = {k: (v, available.get(k, 0.0)) for k, v in need.items() if v > available.get(k, 0.0)}
    if short:
        what = ", ".join(f"{k}: need {v:g}, cluster has {a:g}" for k, (v, a) in short.items())
        raise RuntimeError(
            f"{hosts} client hosts do not fit on this Ray cluster ({what}); lower cluster.hosts "
            "or the per-host request (cluster.cpus_per_host, cluster.gpus_per_host, "
            "cluster.resources), or add nodes"
        )


def _call(server, method: str, *args):
    """Call a server method on either backend."""
    fn = getattr(server, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args))
    return fn(*args)


def _hydra_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # noqa: BLE001 - not inside a Hydra app
        return None
