"""backend=flower: run a Flagstaff training task through Flower's simulation engine (flwr 1.41).

The same data, partition, model, local trainer, aggregator, attack and server strategy as the
``local`` and ``ray`` backends, but every client is a Flower SuperNode running Flagstaff's ClientApp
(``clients.flower_app``) and the server loop is Flower's ``Strategy.start`` driving
``strategies.flower.FlagstaffStrategy``. Client sampling uses ``system.server.sample_clients`` and
each client draws the same batches (seeded by root seed, round and client id), so the run computes
the same model as ``backend=local`` up to float rounding of batched vs. per-client kernels.

The run loop (``system.loop``) stays in charge (metrics.jsonl, logger, checkpoints, progress):
:class:`FlowerServer` is its stepper. Flower's loop runs in a background thread and is held in
lockstep with the run loop through two queues; after each round the strategy's metrics plus the
central evaluation become the round's metrics row. The components are the run's, built once by
``system.build`` (the server's strategy, aggregator and attack; the workers get the data, the
trainer, the local rule and the attack as objects, and a model spec). Flower's simulation runs on
the run's private local Ray (``system.ray_start.init_ray``: loopback only, a token per run, ended
with the driver), started before Flower would start its own.
``round_time_s`` is Flower's training round: from ``configure_train`` to the end of
``aggregate_train`` (message passing, client work and aggregation; evaluation excluded, as for the
other backends).

Notes: ``flwr.simulation.run_simulation`` is deprecated in favour of ``flwr run`` but remains
Flower's in-process entry to the simulation engine; its Ray backend calls ``ray.shutdown()`` when
the simulation ends (``RayBackend.terminate``), so do not share a Ray session with other work.
Per-client state of stateful rules (SCAFFOLD, FedSpeed) lives in the SuperNodes' ``context.state``
and is not checkpointed: resuming such a run with this backend is refused.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flagstaff.clients.flower_app import ClientSetup, make_client_app, model_to_arrays
from flagstaff.strategies.attacks import Adversary
from flagstaff.strategies.flower import FlagstaffStrategy
from flagstaff.system.config import ConfigError
from flagstaff.system.server import evaluate_model, sample_clients

__all__ = ["FlowerServer", "ShardLoader", "check_flower"]

log = logging.getLogger("flagstaff")

_CACHE: dict[str, dict[str, Any]] = {}  # per worker process: the model and the clients

#: Flower's deprecation notice for ``run_simulation``, which Flagstaff calls on purpose (its
#: in-process entry to the simulation engine; see the module docstring)
_DEPRECATION = "`run_simulation` function is deprecated"


def _not_deprecation(record: logging.LogRecord) -> bool:
    return _DEPRECATION not in record.getMessage()


def quiet_flower(verbose: bool, worker: bool = False) -> None:
    """Flower logs to its own console handler (INFO: every round's records, twice with the root
    logger's copy). A quiet run keeps Flower's records out of the console: they reach the run's
    train.log through the root logger (its console handler shows WARNING and above), and the
    deprecation notice of ``run_simulation`` is dropped. Called in the driver and in each Flower
    worker process (where they are dropped: Ray would forward them to the driver's terminal);
    ``verbose=true`` leaves Flower's logging as it is."""
    flwr_log = logging.getLogger("flwr")
    if _not_deprecation not in flwr_log.filters:
        flwr_log.addFilter(_not_deprecation)
    if verbose:
        return
    for handler in list(flwr_log.handlers):  # Flower's ConsoleHandler (a StreamHandler), not files
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            flwr_log.removeHandler(handler)
    if worker:  # a worker's console goes to the driver's terminal (Ray forwards it): nothing there
        flwr_log.addHandler(logging.NullHandler())
        flwr_log.propagate = False


class ShardLoader:
    """Picklable ``setup(context) -> ClientSetup`` for Flagstaff's ClientApp in Flower workers.

    Holds the run's built objects (dataset and partition, trainer, local rule, adversary) and the
    model spec; each worker process builds its model copy once (cached) and hands out the client
    of ``partition-id``, with Byzantine data poisoning applied exactly as the ray/local runtimes
    apply it at placement.
    """

    def __init__(
        self, data: Any, parts: list, model: Any, trainer: Any, rule: Any, adversary: Adversary,
        seed: int, threads: int, verbose: bool = False,
    ) -> None:  # fmt: skip
        self.verbose = bool(verbose)
        self.data, self.parts, self.model = data, parts, model
        self.trainer, self.rule, self.adversary = trainer, rule, adversary
        self.seed, self.threads = int(seed), int(threads)
        self.key = uuid.uuid4().hex  # this run's entry in a worker's cache

    def __call__(self, context: Context) -> ClientSetup:
        if self.key not in _CACHE:
            quiet_flower(self.verbose, worker=True)  # this worker's Flower logging, once
            torch.set_num_threads(max(1, self.threads))
            _CACHE[self.key] = {"model": self.model.build(), "clients": {}}
        b = _CACHE[self.key]
        cid = int(context.node_config["partition-id"])
        if cid not in b["clients"]:
            # the partition arrives read-only from Ray's object store: index with a copy (torch
            # warns on non-writable arrays); the index array is small
            ds, idx = self.data, torch.from_numpy(self.parts[cid].copy())
            x, y = self.adversary.poison_data(ds.x_train[idx], ds.y_train[idx], ds.num_classes, cid)
            b["clients"][cid] = ClientSetup(
                cid, x, y, ds.num_classes, b["model"], self.trainer, self.rule, self.seed
            )
        return b["clients"][cid]


class FlowerServer:
    """The run loop's stepper for a Flower simulation: ``round(r)``, ``state_dict``, ..."""

    unit = "rounds"

    def __init__(self, run: Any, stack: ExitStack) -> None:
        c, fed, ds = run.config, run.federated, run.data
        self.c = c
        self.rounds = int(c["rounds"])
        self.every = int(c["eval_every"])
        model = fed.model
        self.model, self.spec = model, fed.spec
        self.initial = model_to_arrays(model)
        self.x_test, self.y_test, self.num_classes = ds.x_test, ds.y_test, ds.num_classes
        n, per, seed = int(c["num_clients"]), int(c["clients_per_round"]), int(c["seed"])
        kind = str(c.get("sampling", "fixed"))

        def sampler(ids: np.ndarray, round_idx: int) -> np.ndarray:
            return ids[sample_clients(len(ids), per, seed, round_idx, kind)]

        adversary = fed.adversary
        self.strategy = FlagstaffStrategy(
            fed.aggregator,
            fed.strategy,  # bound to the model's layout by system.build
            attack=adversary.attack if adversary.active else None,
            byzantine=range(adversary.f),
            sampler=sampler,
            discover=True,  # Flagstaff's ClientApp answers: client id = partition id
            min_available_nodes=n,
            min_train_nodes=1,
            num_clients=n,
            timeout=float(c["cluster"].get("round_deadline_s") or 3600.0),
            private=bool(fed.kinds),
            delta=(c.get("privacy") or {}).get("delta"),
        )
        self.strategy.initialize(self.initial)
        self.target_epsilon = (c.get("privacy") or {}).get("target_epsilon")
        self.start_round = 0
        host = fed.host
        self.loader = ShardLoader(
            ds,
            run.parts,
            host.model,
            host.trainer,
            host.rule,
            adversary,
            seed,
            host.threads,
            verbose=bool(c.get("verbose")),
        )
        self._requests: queue.Queue[int | None] = queue.Queue()
        self._results: queue.Queue[dict[str, Any] | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        # the simulation's Ray is the run's private one (Flower uses a Ray that is already up)
        from flagstaff.system.ray_start import init_ray, shutdown_ray

        if init_ray(c["cluster"]):
            stack.callback(shutdown_ray)

    # -- Flower side (background thread) ---------------------------------------------------------
    def _next_request(self) -> int:
        while not self._stop.is_set():
            try:
                r = self._requests.get(timeout=0.5)
            except queue.Empty:
                continue
            if r is None:
                break
            return r
        raise RuntimeError("flagstaff: the run was closed")

    def _evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Flower before round 1 (0) and after every round: hand the row to the runner,
        then wait until the runner asks for the next round (lockstep)."""
        if server_round > 0:
            r = self.start_round + server_round - 1
            row = dict(self.strategy.last_metrics)
            if (r + 1) % self.every == 0 or r + 1 == self.rounds:
                row.update(self.evaluate())
            self._results.put(row)
        if self.start_round + server_round < self.rounds:
            self._next_request()
        return None

    def _simulate(self) -> None:
        from flwr.simulation import run_simulation

        quiet_flower(bool(self.c.get("verbose")))
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            self.strategy.start(
                grid=grid,
                initial_arrays=self.strategy.arrays(),
                num_rounds=self.rounds - self.start_round,
                timeout=self.strategy.timeout,
                evaluate_fn=self._evaluate_fn,
            )

        cl = self.c["cluster"]
        resources = {"num_cpus": cl["cpus_per_host"], "num_gpus": cl["gpus_per_host"]}
        try:  # Ray is up (init_ray in __init__): Flower's backend does not start another
            run_simulation(
                server_app=server_app,
                client_app=make_client_app(self.loader),
                num_supernodes=int(self.c["num_clients"]),
                backend_config={"client_resources": resources},
            )
        except BaseException as err:  # noqa: BLE001 - handed to the runner's thread
            self._results.put(err)
        else:
            self._results.put(RuntimeError("the Flower simulation ended before all rounds"))

    # -- runner side ---------------------------------------------------------------------------------
    def round(self, r: int, evaluate: bool = True) -> dict[str, Any]:
        """Let Flower run round ``r`` and return its metrics row (blocks until it is done); a stop
        row instead when the round would exceed the client-level privacy budget."""
        st = self.strategy
        stop = st.step.budget_stop(st.state, r, self.target_epsilon)
        if stop:  # nothing trained: the run loop writes the final checkpoint and ends the run
            return {"round": r + 1, "stopped": "privacy budget", "message": stop}
        if self._thread is None:
            self._thread = threading.Thread(target=self._simulate, name="flower", daemon=True)
            self._thread.start()
        self._requests.put(r)
        timeout = self.strategy.timeout + 120.0
        try:
            out = self._results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"round {r + 1}: no result from Flower in {timeout:.0f} s") from None
        if isinstance(out, BaseException):
            raise RuntimeError(f"backend=flower failed in round {r + 1}: {out}") from out
        return out

    def evaluate(self) -> dict[str, float]:
        """Test accuracy and loss of the global model (as ``ParameterServer.evaluate``)."""
        return evaluate_model(
            self.model, self.spec, self.strategy.params, self.x_test, self.y_test, self.num_classes
        )

    def final_params(self) -> torch.Tensor:
        return self.strategy.params

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Communication totals (none measured here), no hosts of Flagstaff's own, and epsilon with
        the released mechanism for DP runs."""
        out: dict[str, Any] = {
            "bytes_up_total": sum(r.get("bytes_up", 0) for r in rows),
            "bytes_down_total": sum(r.get("bytes_down", 0) for r in rows),
            "hosts": None,
            "host_nodes": None,
        }
        privacy = self.strategy.step.privacy_summary(self.strategy.state)
        if privacy:
            out["privacy"] = privacy
        return out

    def state_dict(self) -> dict[str, Any]:
        last = self.strategy.last_metrics.get("round", self.start_round)
        return {"round": int(last), **self.strategy.state_dict(), "clients": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("backend=flower: load_state_dict before the first round only")
        self.strategy.load_state_dict(state)
        self.start_round = int(state["round"])
        self.strategy.round_offset = self.start_round

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._requests.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)
            if self._thread.is_alive():
                log.warning("the Flower simulation thread did not stop within 60 s")


def check_flower(run: Any, resuming: bool) -> None:
    """What backend=flower cannot do, refused with one line before any work: a sample-level
    privacy budget (the clients' accountants live in the SuperNodes, so the server cannot ask
    them what one more round would cost), and resuming a run whose clients keep state in their
    nodes' ``context.state`` (a stateful local rule, DP-SGD accountants), which is not
    checkpointed."""
    c, fed = run.config, run.federated
    dp_sgd = fed.trainer.epsilon_kind is not None
    if dp_sgd and (c.get("privacy") or {}).get("target_epsilon") is not None:
        raise ConfigError(
            "backend=flower cannot stop at privacy.target_epsilon under sample-level DP (client="
            f"{type(fed.trainer).__name__}: each client's accountant lives in its SuperNode); "
            "set client.noise_multiplier and rounds for the epsilon you want, or use "
            "backend=local or backend=ray"
        )
    if not resuming:
        return
    rule = fed.strategy.client_rule
    if rule is not None and rule.client_state:
        raise ConfigError(
            "backend=flower keeps per-client state in Flower's node contexts, which are not "
            "checkpointed; resume this run with backend=ray or backend=local"
        )
    if dp_sgd:
        raise ConfigError(
            "backend=flower does not checkpoint the clients' DP-SGD accountants (they live in the "
            "SuperNodes' context.state): a resumed run would count every client's epsilon from 0; "
            "start the run over, or train with backend=local or backend=ray, which checkpoint them"
        )
