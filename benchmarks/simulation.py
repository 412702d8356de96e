"""Simulation benchmark: one FedAvg task, several implementations, side by side in one run.

Usage (from the repository root)::

    .venv/bin/python benchmarks/simulation.py --workload w1 --impl flower,plain
    .venv/bin/python benchmarks/simulation.py --workload w1,w2 --json results.json
    .venv/bin/python benchmarks/simulation.py --workload w3 --impl plain,flagstaff-ray

Implementations (``--impl``, comma separated; default: all of them):

``flower``
    Flower 1.41's simulation engine with the Ray backend, using the Message API: a ``ServerApp``
    whose main runs a ``flwr.serverapp.strategy.FedAvg`` subclass via ``strategy.start(grid=...,
    initial_arrays=ArrayRecord(...), num_rounds=...)``, and a ``ClientApp`` with ``@app.train`` /
    ``@app.evaluate``.  Launched with ``flwr.simulation.run_simulation`` (deprecated in favour of
    ``flwr run``, but it runs offline from Python without an app project), with
    ``client_resources = {num_cpus: 1}``, i.e. one Ray actor per core (2 on a 2-core machine).
    Federated evaluation is off (``fraction_evaluate=0``); the final model is evaluated centrally
    on the test set through ``evaluate_fn`` after the last round only.
    The subclass only (a) picks the round's clients with the shared seeded sampler instead of
    Flower's unseeded ``random.sample`` and tells each message which virtual client it carries
    (``config["cid"]``; every SuperNode is interchangeable, so the data a message trains on is
    decided by ``cid``, not by the node), and (b) timestamps the round (below).  Aggregation is
    Flower's own ``FedAvg.aggregate_train``.
``plain``
    A single-process PyTorch loop, no framework: for each round, for each sampled client, load
    the global weights, run the local rule, add ``n_i / n`` times the result to the average.
    Torch uses ``--torch-threads`` intra-op threads (default 1, which is faster than 2 for these
    tiny matmuls, and what each Flower actor gets from Ray with ``num_cpus=1``).
``flagstaff-local``, ``flagstaff-ray``, ``flagstaff-ray-seq``
    ``launch.train.run(cfg)`` (what ``flagstaff-train`` runs: on ``backend=ray`` it starts Ray
    while torch and the training code import, then calls ``system.runner.train``) on a Hydra config composed from ``conf/train.yaml`` with
    ``experiment=<workload.experiment> backend=<local|ray> rounds=... num_clients=...
    clients_per_round=... seed=... model.hidden=[...]`` (plus ``--flagstaff-override``;
    ``flagstaff-ray-seq`` adds ``client.batched=false``: each host trains its clients one by one).  Reported as
    "unavailable: <reason>" while ``system.runner`` or the config cannot be imported/composed.

Every implementation uses the same data, shards, sampled clients, initial model, local rule and
shuffling (all from ``benchmarks/_workloads.py``), so ``flower`` and ``plain`` compute the same
model up to float summation order, and final accuracies are comparable.

What is measured (each implementation in its own subprocess, with a per-implementation timeout):

per-round time
    Wall time of one round = from the moment the server starts choosing the round's clients to
    the moment the new global model exists (training of all sampled clients + aggregation; no
    evaluation: the final accuracy is computed once, after the last round, outside round time).
    Flower: from entry into ``configure_train(r)`` (after the SuperNodes are registered) to the
    return of ``aggregate_train(r)``, timestamped inside the ServerApp by the strategy subclass;
    this covers message creation, the Simulation Engine's queues and 0.1 s polling, the Ray
    round trips, client training, serialization and aggregation.  Plain: the same span of the
    loop.  Flagstaff: ``round_times`` as returned by ``train``.  The table shows the median over
    rounds 2..N (round 1 absorbs lazy start-up work and is excluded).
start-up (s)
    *Effective* start-up: (end of round 1 - process start) - median round time.  Process start
    is the parent's clock just before it spawns the subprocess, so this covers interpreter
    start, imports, data loading and partitioning, engine start (Ray, actors) and any one-time
    work that lands inside round 1 (Flower creates its Ray actors and loads each actor's data
    while round 1 is already running, so "until round 1 begins" alone would hide its start-up).
round 1 begins (s)
    Literal start-up: process start -> the instant round 1 begins (same clock).
final accuracy
    Test accuracy (the workload's test split) of the global model after the last round.
peak RSS (MB)
    Largest sum of RSS over the subprocess and all its descendants (driver, Ray's raylet/GCS and
    workers, ...), sampled by a background thread in the parent with psutil every
    ``--sample-interval`` seconds.  Shared pages (e.g. torch's libraries mapped by every Ray
    worker) count once per process, so this is an upper bound on physical memory.
peak PSS (MB)
    Largest sum of PSS (proportional set size: each shared page split between the processes that
    map it) over the same tree: the tree's real memory footprint.

Results are printed as one markdown table per workload; ``--json PATH`` dumps the raw results.
Every process a run leaves behind (e.g. Ray daemons) is terminated by pid after it exits.
On a shared machine, ``--repeat N`` reports the run with the lowest per-round median of N (all
medians are kept in the JSON), and each run's 1-minute load average is recorded.

Model: "MLP 64-64-10" names input-hidden-output widths: one hidden layer of 64
(``Workload.hidden = (64,)``, as in ``conf/experiment/sim_w1.yaml``), which reproduces the reference
accuracy 0.78 on W1.  ``--hidden`` changes every implementation
(Flagstaff through ``model.hidden=[...]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# opacus 1.6 installs a top-level package named `benchmarks` into site-packages, which shadows
# this directory as a package: the benchmark modules are therefore imported as the top-level
# modules `_workloads` and `simulation` from this directory (also inside Ray workers), and the
# repository root is on the path for `clients`, `system` and `conf`.
for _path in (str(ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _workloads import (  # noqa: E402
    WORKLOADS,
    TaskData,
    Workload,
    build_model,
    evaluate,
    fedavg_accumulate,
    get_workload,
    load_task,
    local_train,
    sample_clients,
)

__all__ = [
    "Result",
    "RunOptions",
    "RUNNERS",
    "run_plain",
    "run_flower",
    "run_flagstaff",
    "run_isolated",
    "format_table",
    "main",
]

RESULT_PREFIX = "@@SIMULATION_BENCH_RESULT@@ "
FLOWER_API = (
    "flwr.simulation.run_simulation (Python API, deprecated in favour of `flwr run`), "
    "Ray backend, client_resources num_cpus=1"
)
#: Implementations skipped by default on a workload (run them anyway with ``--force``).
DEFAULT_SKIPS: dict[str, dict[str, str]] = {
    "w3": {
        "flower": "skipped: Flower 1.41 with 10,000 SuperNodes and 1,000 messages per round is "
        "too slow for this benchmark's budget (its engine polls every node's queue every 0.1 s); "
        "pass --force to run it",
    },
    "w4": {
        "flower": "skipped: Flower 1.41 with 100,000 SuperNodes is too slow for this benchmark's "
        "budget (see w3); pass --force to run it",
        "flagstaff-ray-seq": "skipped: the per-client path is measured on w3; pass --force to run it",
    },
}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """Options of one run of a runner.

    Attributes:
        t0: wall-clock (``time.time()``) instant taken as process start; ``None`` = when the
            runner is called (in-process use, e.g. tests).
        torch_threads: torch intra-op threads of the plain loop and of Flower's driver.
        flagstaff_overrides: extra Hydra overrides for the Flagstaff runners.
    """

    t0: float | None = None
    torch_threads: int = 1
    flagstaff_overrides: tuple[str, ...] = ()


@dataclass
class Result:
    """Outcome of one implementation on one workload.

    ``status`` is ``ok``, ``failed``, ``timeout``, ``skipped`` or ``unavailable`` (``note`` says
    why).  Times are in seconds; ``first_round_start_s`` is measured from process start.
    """

    impl: str
    workload: str
    status: str = "ok"
    note: str = ""
    round_times: list[float] = field(default_factory=list)
    first_round_start_s: float | None = None
    accuracy: float | None = None
    peak_rss_mb: float | None = None
    peak_pss_mb: float | None = None
    wall_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the run finished and produced timings."""
        return self.status == "ok" and bool(self.round_times)

    @property
    def median_round_s(self) -> float | None:
        """Median round time over rounds 2..N (round 1 when there is only one round)."""
        if not self.round_times:
            return None
        steady = self.round_times[1:] or self.round_times
        return float(statistics.median(steady))

    @property
    def first_round_end_s(self) -> float | None:
        """Process start -> end of round 1."""
        if self.first_round_start_s is None or not self.round_times:
            return None
        return self.first_round_start_s + self.round_times[0]

    @property
    def startup_s(self) -> float | None:
        """Effective start-up: end of round 1 minus one steady-state round (see module doc)."""
        end, median = self.first_round_end_s, self.median_round_s
        if end is None or median is None:
            return None
        return end - median

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the derived fields included."""
        out = dataclasses.asdict(self)
        out.update(
            median_round_s=self.median_round_s,
            startup_s=self.startup_s,
            first_round_end_s=self.first_round_end_s,
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """Inverse of :meth:`to_dict` (derived fields are recomputed)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _oneline(err: BaseException) -> str:
    """``Type: message`` of an exception on one line."""
    return " ".join(f"{type(err).__name__}: {err}".split())


def _origin(opts: RunOptions) -> float:
    return time.time() if opts.t0 is None else opts.t0


def _set_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# plain: single-process PyTorch loop
# --------------------------------------------------------------------------------------------


def run_plain(workload: Workload, opts: RunOptions | None = None) -> Result:
    """FedAvg as a plain single-process loop over clients (no framework)."""
    import torch

    opts = opts or RunOptions()
    t0 = _origin(opts)
    _set_threads(opts.torch_threads)
    task = load_task(workload)
    model = build_model(workload, task.input_shape, task.num_classes)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    round_times: list[float] = []
    first_start = 0.0
    for rnd in range(1, workload.rounds + 1):
        if rnd == 1:
            first_start = time.time() - t0
        start = time.perf_counter()
        cids = sample_clients(workload, rnd)
        sizes = [len(task.shards[c]) for c in cids]
        total = float(sum(sizes))
        acc = None
        for cid, size in zip(cids, sizes, strict=True):
            model.load_state_dict(global_state)
            x, y = task.client(int(cid))
            local_train(model, x, y, workload, rnd, int(cid))
            acc = fedavg_accumulate(acc, model.state_dict(), size / total)
        assert acc is not None
        global_state = {k: torch.from_numpy(v) for k, v in acc.items()}
        round_times.append(time.perf_counter() - start)

    model.load_state_dict(global_state)
    loss, accuracy = evaluate(model, task.x_test, task.y_test)
    return Result(
        impl="plain",
        workload=workload.name,
        round_times=round_times,
        first_round_start_s=first_start,
        accuracy=accuracy,
        wall_s=time.time() - t0,
        details={"test_loss": loss, "torch_threads": torch.get_num_threads()},
    )


# --------------------------------------------------------------------------------------------
# flower: Flower 1.41 Simulation Engine (Ray backend), Message API
# --------------------------------------------------------------------------------------------

# Per-process cache of the ClientApp side (each Ray actor loads the data and builds the model
# once, on its first message, as a typical Flower app caches its dataset).
_FLOWER_CLIENT_CACHE: dict[str, tuple[Workload, TaskData, Any]] = {}


def _flower_client_state(workload_json: str) -> tuple[Workload, TaskData, Any]:
    hit = _FLOWER_CLIENT_CACHE.get(workload_json)
    if hit is None:
        workload = Workload.from_json(workload_json)
        task = load_task(workload)
        model = build_model(workload, task.input_shape, task.num_classes)
        hit = _FLOWER_CLIENT_CACHE[workload_json] = (workload, task, model)
    return hit


def _flower_train(msg: Any, context: Any) -> Any:
    """ClientApp ``@app.train``: local rule on client ``config["cid"]`` from the sent weights."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    config = msg.content["config"]
    workload, task, model = _flower_client_state(str(config["workload"]))
    cid, rnd = int(config["cid"]), int(config["server-round"])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = task.client(cid)
    n = local_train(model, x, y, workload, rnd, cid)
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(content=content, reply_to=msg)


def _flower_evaluate(msg: Any, context: Any) -> Any:
    """ClientApp ``@app.evaluate``: loss/accuracy of the sent weights on the client's shard.

    Registered for completeness; the benchmark evaluates centrally (``fraction_evaluate=0``).
    """
    from flwr.app import Message, MetricRecord, RecordDict

    config = msg.content["config"]
    _, task, model = _flower_client_state(str(config["workload"]))
    cid = int(config.get("cid", context.node_config.get("partition-id", 0)))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = task.client(cid)
    loss, accuracy = evaluate(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _flower_client_app() -> Any:
    """The ClientApp (built on demand so that importing this module does not import flwr)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(_flower_train)
    app.evaluate()(_flower_evaluate)
    return app


def run_flower(workload: Workload, opts: RunOptions | None = None) -> Result:
    """FedAvg on Flower 1.41's Simulation Engine (Ray backend) with the Message API."""
    opts = opts or RunOptions()
    t0 = _origin(opts)
    import flwr
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    _set_threads(opts.torch_threads)
    workload_json = workload.to_json()
    task = load_task(workload)  # server side: test set and model shape
    model = build_model(workload, task.input_shape, task.num_classes)
    initial = ArrayRecord(model.state_dict())
    out: dict[str, Any] = {}

    class TimedFedAvg(FedAvg):
        """Flower's FedAvg, with seeded client sampling and round timestamps."""

        def __init__(self) -> None:
            super().__init__(
                fraction_train=workload.clients_per_round / workload.num_clients,
                fraction_evaluate=0.0,
                min_train_nodes=workload.clients_per_round,
                min_available_nodes=workload.num_clients,
            )
            self.node_ids: list[int] = []
            self.t_start: dict[int, float] = {}
            self.round_times: dict[int, float] = {}
            self.first_round_start: float | None = None

        def _nodes(self, grid: Grid) -> list[int]:
            while len(self.node_ids) < workload.num_clients:
                self.node_ids = sorted(grid.get_node_ids())
                if len(self.node_ids) < workload.num_clients:
                    time.sleep(0.05)
            return self.node_ids

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> list[Message]:
            nodes = self._nodes(grid)  # SuperNode registration is start-up, not round time
            if server_round == 1:
                self.first_round_start = time.time()
            self.t_start[server_round] = time.perf_counter()
            messages = []
            for cid in sample_clients(workload, server_round):
                cfg = ConfigRecord({**config, "server-round": server_round, "cid": int(cid)})
                messages.append(
                    Message(
                        content=RecordDict({self.arrayrecord_key: arrays, "config": cfg}),
                        message_type=MessageType.TRAIN,
                        dst_node_id=nodes[int(cid)],
                    )
                )
            return messages

        def aggregate_train(
            self, server_round: int, replies: Any
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            result = super().aggregate_train(server_round, replies)
            self.round_times[server_round] = time.perf_counter() - self.t_start[server_round]
            errors = [msg.error.reason for msg in replies if msg.has_error()]
            if errors:  # a round with failed clients is not a valid measurement: stop now
                raise RuntimeError(
                    f"round {server_round}: {len(errors)} of {len(replies)} ClientApp replies "
                    f"were errors, first: {errors[0]}"
                )
            return result

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round != workload.rounds:
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, task.x_test, task.y_test)
        out["accuracy"], out["loss"] = accuracy, loss
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Any) -> None:
        strategy = TimedFedAvg()
        out["strategy"] = strategy
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=workload.rounds,
            train_config=ConfigRecord({"workload": workload_json}),
            evaluate_fn=evaluate_fn,
        )

    try:
        run_simulation(
            server_app=server_app,
            client_app=_flower_client_app(),
            num_supernodes=workload.num_clients,
            backend_name="ray",
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    finally:
        _shutdown_ray()

    strategy = out["strategy"]
    rounds = [strategy.round_times[r] for r in range(1, workload.rounds + 1)]
    return Result(
        impl="flower",
        workload=workload.name,
        round_times=rounds,
        first_round_start_s=strategy.first_round_start - t0,
        accuracy=out["accuracy"],
        wall_s=time.time() - t0,
        details={"test_loss": out["loss"], "flwr": flwr.__version__, "api": FLOWER_API},
    )


def _shutdown_ray() -> None:
    """``ray.shutdown()`` if Ray was imported and is still initialised in this process."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


# --------------------------------------------------------------------------------------------
# flagstaff: system.runner.train(cfg) (provided separately)
# --------------------------------------------------------------------------------------------


def flagstaff_overrides(workload: Workload, backend: str, extra: Sequence[str] = ()) -> list[str]:
    """Hydra overrides that select the workload's experiment on ``backend``."""
    return [
        f"experiment={workload.experiment}",
        f"backend={backend}",
        f"rounds={workload.rounds}",
        f"num_clients={workload.num_clients}",
        f"clients_per_round={workload.clients_per_round}",
        f"seed={workload.seed}",
        *(
            [f"model.hidden=[{','.join(str(h) for h in workload.hidden)}]"]
            if workload.model == "mlp"
            else [f"model.channels={workload.channels}"]
            if workload.model == "cnn"
            else []
        ),
        *extra,
    ]


def run_flagstaff(workload: Workload, backend: str, opts: RunOptions | None = None) -> Result:
    """Flagstaff on ``backend`` (``local`` or ``ray``) via ``launch.train.run(cfg)``.

    Contract assumed of ``run(cfg) -> dict`` (that of ``system.runner.train``):

    * ``round_times``: list of seconds, one per round, round 1 first; each covers training and
      aggregation of that round (like the other implementations, evaluation excluded);
    * ``startup_s``: seconds from entry into ``train`` until round 1 begins (Ray start, actors,
      data placement ...); the time from process start to the ``train`` call (imports, config
      composition) is added here;
    * ``accuracy``: test accuracy of the final global model.

    Other scalar entries of the dict are kept in ``Result.details``.
    """
    opts = opts or RunOptions()
    t0 = _origin(opts)
    impl = f"flagstaff-{backend}"
    try:
        from hydra import compose, initialize_config_module

        from flagstaff.launch.train import (
            run as train,  # what flagstaff-train runs on a composed config
        )
    except Exception as err:  # ImportError, or a broken package while it is being written
        return Result(impl, workload.name, "unavailable", f"unavailable: {_oneline(err)}")
    overrides = flagstaff_overrides(workload, backend, opts.flagstaff_overrides)
    try:
        try:  # structured schemas (conf/train.yaml's `train_schema`), as flagstaff-train does
            from flagstaff.system.config import register
        except ImportError:
            pass
        else:
            register()
        with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except Exception as err:
        return Result(
            impl,
            workload.name,
            "unavailable",
            f"unavailable: config {' '.join(overrides)}: {_oneline(err)}",
        )
    t_call = time.time()
    try:
        out = train(cfg)
    finally:
        _shutdown_ray()
    round_times = [float(t) for t in out["round_times"]]
    details = {
        k: v for k, v in out.items() if isinstance(v, int | float | str | bool) and k != "accuracy"
    }
    details["overrides"] = overrides
    return Result(
        impl=impl,
        workload=workload.name,
        round_times=round_times,
        first_round_start_s=(t_call - t0) + float(out["startup_s"]),
        accuracy=float(out["accuracy"]),
        wall_s=time.time() - t0,
        details=details,
    )


def run_flagstaff_local(workload: Workload, opts: RunOptions | None = None) -> Result:
    """Flagstaff, ``backend=local`` (in-process, no Ray)."""
    return run_flagstaff(workload, "local", opts)


def run_flagstaff_ray(workload: Workload, opts: RunOptions | None = None) -> Result:
    """Flagstaff, ``backend=ray``."""
    return run_flagstaff(workload, "ray", opts)


def run_flagstaff_sequential(workload: Workload, opts: RunOptions | None = None) -> Result:
    """Flagstaff, ``backend=ray`` with ``client.batched=false``: each host trains its clients one
    after the other (the per-client path), to show what batching adds."""
    opts = opts or RunOptions()
    extra = [*opts.flagstaff_overrides, "client.batched=false"]
    result = run_flagstaff(workload, "ray", dataclasses.replace(opts, flagstaff_overrides=extra))
    result.impl = "flagstaff-ray-seq"
    return result


RUNNERS: dict[str, Callable[..., Result]] = {
    "flower": run_flower,
    "plain": run_plain,
    "flagstaff-local": run_flagstaff_local,
    "flagstaff-ray-seq": run_flagstaff_sequential,
    "flagstaff-ray": run_flagstaff_ray,
}


# --------------------------------------------------------------------------------------------
# Isolation: one subprocess per implementation, peak RSS of its process tree
# --------------------------------------------------------------------------------------------


class TreeMemoryMonitor:
    """Samples the summed RSS of a process and all its descendants in a background thread.

    Every process ever seen in the tree is remembered (a psutil handle, safe against pid
    reuse), so processes that outlive the root (e.g. re-parented Ray daemons) are still counted
    while alive and can be terminated afterwards with :meth:`terminate_leftovers`.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.seen: dict[int, Any] = {pid: self.root}
        self.peak_bytes = 0
        self.peak_pss_bytes = 0
        self._samples = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-monitor", daemon=True)

    def start(self) -> TreeMemoryMonitor:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample and stop."""
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        """One sample: summed RSS (bytes) of the live processes of the tree (PSS peak kept too)."""
        ps = self._psutil
        try:
            for child in self.root.children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
            pass
        total, pss, alive = 0, 0, 0
        # PSS (shared pages split between processes) reads /proc/<pid>/smaps_rollup, which costs
        # milliseconds per process: take it every 20th sample so the monitor does not load the CPU
        with_pss = self._samples % 20 == 0
        self._samples += 1
        for proc in list(self.seen.values()):
            try:
                if with_pss:
                    info = proc.memory_full_info()
                    total += info.rss
                    pss += getattr(info, "pss", info.rss)
                else:
                    total += proc.memory_info().rss
                alive += 1
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                continue
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, alive
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
        return total

    def terminate_leftovers(self, grace: float = 5.0) -> list[str]:
        """Terminate (then kill) every remembered process still running; return their names."""
        ps = self._psutil
        alive = []
        for proc in self.seen.values():
            try:
                if proc.is_running() and proc.status() != ps.STATUS_ZOMBIE:
                    alive.append(proc)
            except (ps.NoSuchProcess, ps.AccessDenied):
                continue
        names = []
        for proc in alive:
            try:
                names.append(f"{proc.name()}[{proc.pid}]")
                proc.terminate()
            except (ps.NoSuchProcess, ps.AccessDenied):
                pass
        _, still = ps.wait_procs(alive, timeout=grace)
        for proc in still:
            try:
                proc.kill()
            except (ps.NoSuchProcess, ps.AccessDenied):
                pass
        return names


_WORKER_CODE = (
    "import sys; from simulation import _worker_main; sys.exit(_worker_main(sys.argv[1:]))"
)


def run_isolated(
    impl: str,
    workload: Workload,
    *,
    timeout: float = 1800.0,
    sample_interval: float = 0.05,
    torch_threads: int = 1,
    flagstaff_overrides: Sequence[str] = (),
    log_dir: Path | None = None,
) -> Result:
    """Run one implementation in a fresh subprocess; measure the peak RSS of its process tree.

    The child prints its :class:`Result` as one JSON line (prefixed by ``RESULT_PREFIX``) into
    its log; everything else it prints stays in ``<log_dir>/<workload>-<impl>.log``.
    """
    if impl not in RUNNERS:
        raise ValueError(f"unknown impl {impl!r}; choose {', '.join(RUNNERS)}")
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="simulation-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{workload.name}-{impl}.log"
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BENCH_DIR), str(ROOT), env.get("PYTHONPATH")) if p
    )
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network calls from Flower's telemetry
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.time()
    cmd = [
        sys.executable,
        "-c",
        _WORKER_CODE,
        "--impl",
        impl,
        "--workload-json",
        workload.to_json(),
        "--t0",
        repr(t0),
        "--torch-threads",
        str(torch_threads),
    ]
    for override in flagstaff_overrides:
        cmd += ["--flagstaff-override", override]
    # a scratch working directory: whatever a run writes relative to its cwd (e.g. Flagstaff's
    # run directory when no Hydra run dir is set) lands next to the log, not in the repository
    workdir = log_dir / f"{workload.name}-{impl}"
    workdir.mkdir(exist_ok=True)
    status, note = "ok", ""
    load_before = _load1()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        monitor = TreeMemoryMonitor(proc.pid, sample_interval).start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status, note = "timeout", f"timeout after {timeout:.0f} s"
        finally:
            monitor.stop()
            leftovers = monitor.terminate_leftovers()
            proc.wait()
    result = _parse_child_result(log_path)
    if result is None:
        if status == "ok":
            status, note = "failed", f"exit code {proc.returncode}, no result"
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        result = Result(impl, workload.name, status, note, details={"log_tail": tail})
    elif status != "ok":
        result.status, result.note = status, note
    result.peak_rss_mb = monitor.peak_bytes / 2**20
    result.peak_pss_mb = monitor.peak_pss_bytes / 2**20
    result.details.update(
        log=str(log_path),
        processes_at_peak=monitor.peak_processes,
        processes_seen=len(monitor.seen),
        leftovers_terminated=leftovers,
        exit_code=proc.returncode,
        load1_before=load_before,
        load1_after=_load1(),
    )
    return result


def _load1() -> float | None:
    """1-minute load average (other work on the machine skews the timings)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _parse_child_result(log_path: Path) -> Result | None:
    found = None
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith(RESULT_PREFIX):
            found = line[len(RESULT_PREFIX) :]
    return None if found is None else Result.from_dict(json.loads(found))


def _worker_main(argv: Sequence[str]) -> int:
    """Entry point of the per-implementation subprocess: run it, print the result line."""
    parser = argparse.ArgumentParser(prog="simulation-worker")
    parser.add_argument("--impl", required=True, choices=sorted(RUNNERS))
    parser.add_argument("--workload-json", required=True)
    parser.add_argument("--t0", type=float, required=True)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--flagstaff-override", action="append", default=[])
    args = parser.parse_args(list(argv))
    workload = Workload.from_json(args.workload_json)
    opts = RunOptions(args.t0, args.torch_threads, tuple(args.flagstaff_override))
    try:
        result = RUNNERS[args.impl](workload, opts)
    except Exception as err:
        traceback.print_exc()
        result = Result(args.impl, workload.name, "failed", f"failed: {_oneline(err)}")
    finally:
        _shutdown_ray()
    try:
        import resource

        maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result.details["driver_maxrss_mb"] = maxrss_kb / 1024
    except (ImportError, OSError):  # pragma: no cover - not on Linux
        pass
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result.to_dict()), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _ratio(reference: Result | None, result: Result) -> str:
    if reference is None or not reference.ok or not result.ok:
        return "-"
    ref, own = reference.median_round_s, result.median_round_s
    if not ref or not own:
        return "-"
    value = ref / own
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value * scale, spec)


def _cell(text: str, limit: int = 140) -> str:
    """One-line, pipe-free table cell, shortened to ``limit`` characters."""
    flat = " ".join(str(text).replace("|", "/").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def format_table(results: Sequence[Result]) -> str:
    """Markdown table of one workload's results (speed-ups from per-round medians)."""
    by_impl = {r.impl: r for r in results}
    flower, plain = by_impl.get("flower"), by_impl.get("plain")
    lines = [
        "| impl | per-round median (ms) | start-up (s) | round 1 begins (s) | final accuracy "
        "| peak RSS (MB) | peak PSS (MB) | speed-up vs Flower | speed-up vs plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.ok:
            lines.append(f"| {r.impl} | {_cell(r.note or r.status)} | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r.impl} | {_fmt(r.median_round_s, '.1f', 1e3)} | {_fmt(r.startup_s, '.1f')} "
            f"| {_fmt(r.first_round_start_s, '.1f')} | {_fmt(r.accuracy, '.4f')} "
            f"| {_fmt(r.peak_rss_mb, '.0f')} | {_fmt(r.peak_pss_mb, '.0f')} "
            f"| {_ratio(flower, r)} | {_ratio(plain, r)} |"
        )
    return "\n".join(lines)


def _machine_info() -> str:
    from importlib import metadata

    versions = []
    for dist in ("torch", "flwr", "ray"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} -")
    load = "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "-"
    python = sys.version.split()[0]
    return f"{os.cpu_count()} CPUs, load average {load} at start; Python {python}, " + ", ".join(
        versions
    )


DEFINITIONS = (
    "per-round median: rounds 2..N, one round = sampling + all clients' local training + "
    "aggregation (no evaluation); start-up: (end of round 1 - process start) - median round; "
    "round 1 begins: process start -> start of round 1; final accuracy: the workload's test "
    "split (digits, mnist1d or the generated CIFAR-shaped images); "
    "peak RSS: max over time of the summed RSS of the subprocess tree (driver + Ray processes), "
    "sampled with psutil; peak PSS: the same with shared pages split between processes (the "
    "real footprint); speed-up: ratio of per-round medians."
)


def _parse_list(text: str, choices: Sequence[str], what: str) -> list[str]:
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in choices]
    if bad or not items:
        raise SystemExit(f"unknown {what} {bad or text!r}; choose from {', '.join(choices)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the selected implementations on the selected workloads, print tables."""
    parser = argparse.ArgumentParser(
        description="FedAvg simulation benchmark: Flower vs a plain loop vs Flagstaff.",
        epilog=DEFINITIONS,
    )
    parser.add_argument(
        "--workload",
        default="w1",
        help="comma-separated: w1,w2,w3,w4,cnn,resnet8 (or tiny); 'all' = w1,w2,w3",
    )
    parser.add_argument(
        "--impl", default=",".join(RUNNERS), help=f"comma-separated subset of {','.join(RUNNERS)}"
    )
    parser.add_argument("--rounds", type=int, help="override the workload's number of rounds")
    parser.add_argument(
        "--hidden",
        help="override the MLP hidden widths for every impl, e.g. '64,64' (default: 64)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per implementation (default 1800)"
    )
    parser.add_argument("--json", type=Path, help="write the raw results to this JSON file")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each implementation N times, report the run with the lowest per-round median",
    )
    parser.add_argument(
        "--force", action="store_true", help="also run implementations skipped by default"
    )
    parser.add_argument("--sample-interval", type=float, default=0.05, help="RSS sampling (s)")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads of plain/Flower driver"
    )
    parser.add_argument(
        "--flagstaff-override",
        action="append",
        default=[],
        help="extra Hydra override for the flagstaff runners (repeatable)",
    )
    parser.add_argument("--log-dir", type=Path, help="where the subprocess logs go (default tmp)")
    args = parser.parse_args(argv)

    workload_names = (
        ["w1", "w2", "w3"]
        if args.workload.strip().lower() == "all"
        else _parse_list(args.workload, list(WORKLOADS), "workload")
    )
    impls = _parse_list(args.impl, list(RUNNERS), "impl")
    from _provenance import markdown, provenance

    print(markdown(provenance(None if argv is None else ["benchmarks/simulation.py", *argv])))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="simulation-bench-"))

    print(f"# Simulation benchmark\n\n{_machine_info()}\nLogs: {log_dir}\n", flush=True)
    everything: list[Result] = []
    for name in workload_names:
        workload = get_workload(name)
        if args.rounds:
            workload = dataclasses.replace(workload, rounds=args.rounds)
        if args.hidden:
            hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
            workload = dataclasses.replace(workload, hidden=hidden)
        results = []
        for impl in impls:
            skip = DEFAULT_SKIPS.get(workload.name, {}).get(impl)
            if skip and not args.force:
                result = Result(impl, workload.name, "skipped", skip)
            else:
                runs = []
                for k in range(args.repeat):
                    print(
                        f"[{workload.name}] running {impl} ({k + 1}/{args.repeat}) ...", flush=True
                    )
                    runs.append(
                        run_isolated(
                            impl,
                            workload,
                            timeout=args.timeout,
                            sample_interval=args.sample_interval,
                            torch_threads=args.torch_threads,
                            flagstaff_overrides=args.flagstaff_override,
                            log_dir=log_dir / f"run{k + 1}" if args.repeat > 1 else log_dir,
                        )
                    )
                    if runs[-1].status == "unavailable":
                        break  # repeating will not help
                result = _best_of(runs)
            _print_progress(result)
            results.append(result)
        everything += results
        print(f"\n## {workload.describe()}\n\n{format_table(results)}\n", flush=True)
    print(f"Definitions: {DEFINITIONS}\n")
    notes = sorted({r.note for r in everything if r.note})
    for note in notes:
        print(f"Note: {' '.join(note.split())}")
    if any(r.impl == "flower" and r.status != "skipped" for r in everything):
        print(f"Note: flower ran via {FLOWER_API}.")
    if args.json:
        payload = {
            "provenance": provenance(None if argv is None else ["benchmarks/simulation.py", *argv]),
            "machine": _machine_info(),
            "definitions": DEFINITIONS,
            "workloads": {n: dataclasses.asdict(get_workload(n)) for n in workload_names},
            "rounds_override": args.rounds,
            "hidden_override": args.hidden,
            "results": [r.to_dict() for r in everything],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"Raw results: {args.json}")
    return 0 if all(r.status in ("ok", "skipped", "unavailable") for r in everything) else 1


def _best_of(runs: Sequence[Result]) -> Result:
    """The run with the lowest per-round median (best of N, the usual choice on a shared
    machine); the medians of all runs are kept in ``details["repeat_medians_s"]``."""
    ok = [r for r in runs if r.ok]
    if not ok:
        return runs[-1]
    best = min(ok, key=lambda r: r.median_round_s or math.inf)
    if len(runs) > 1:
        best.details["repeat_medians_s"] = [r.median_round_s for r in runs]
        best.details["repeat_startups_s"] = [r.startup_s for r in runs]
    return best


def _print_progress(result: Result) -> None:
    if result.ok:
        print(
            f"    {result.impl}: median {result.median_round_s * 1e3:.1f} ms/round, start-up "
            f"{result.startup_s:.1f} s, accuracy {result.accuracy:.4f}, peak RSS "
            f"{result.peak_rss_mb or 0:.0f} MB (load {result.details.get('load1_before')} -> "
            f"{result.details.get('load1_after')})",
            flush=True,
        )
    else:
        print(f"    {result.impl}: {result.note or result.status}", flush=True)
        for line in result.details.get("log_tail", [])[-5:]:
            print(f"      | {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
