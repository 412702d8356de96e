"""backend=flower: run a Flagstaff training task through Flower's simulation engine (flwr 1.41).

The same data, partition, model, local trainer, aggregator, attack and server strategy as the
``local`` and ``ray`` backends, but every client is a Flower SuperNode running Flagstaff's ClientApp
(``clients.flower_app``) and the server loop is Flower's ``Strategy.start`` driving
``strategies.flower.FlagstaffStrategy``. Client sampling uses ``system.server.sample_clients`` and
each client draws the same batches (seeded by root seed, round and client id), so the run computes
the same model as ``backend=local`` up to float rounding of batched vs. per-client kernels.

The runner's round loop stays in charge (metrics.jsonl, logger, checkpoints, progress): Flower's
loop runs in a background thread and is held in lockstep with the runner through two queues; after
each round the strategy's metrics plus the central evaluation become the round's metrics row.
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

import hashlib
import json
import logging
import queue
import threading
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch.func import functional_call

from clients.flower_app import ClientSetup, make_client_app, model_to_arrays
from clients.trainer import ParamSpec, loss_fn_for
from strategies.attacks import Adversary
from strategies.flower import FlagstaffStrategy
from system.host import build_from
from system.server import sample_clients

__all__ = ["FlowerServer", "ShardLoader", "start_flower"]

log = logging.getLogger("flagstaff")

_CACHE: dict[str, dict[str, Any]] = {}  # per worker process: data, model, trainer, rule


class ShardLoader:
    """Picklable ``setup(context) -> ClientSetup`` for Flagstaff's ClientApp in Flower workers.

    Each worker process builds the dataset, partition, model, trainer and local rule once from the
    plain config (cached by config hash) and hands out the client of ``partition-id``; Byzantine
    data poisoning is applied exactly as the ray/local runtimes apply it at placement.
    """

    _KEYS = ("data", "partition", "model", "client", "strategy", "attack", "seed", "num_clients")

    def __init__(self, c: dict[str, Any]) -> None:
        self.cfg = {k: c[k] for k in self._KEYS}
        self.threads = int(c["cluster"]["threads_per_host"])
        blob = json.dumps(self.cfg, sort_keys=True, default=str).encode()
        self.key = hashlib.sha256(blob).hexdigest()

    def _build(self) -> dict[str, Any]:
        c = self.cfg
        torch.set_num_threads(max(1, self.threads))
        ds = build_from(c["data"])
        parts = build_from(
            c["partition"],
            labels=ds.y_train.numpy(),
            num_clients=c["num_clients"],
            columns=ds.partition_columns(),
        )
        model = build_from(
            c["model"], input_shape=ds.input_shape, num_classes=ds.num_classes, seed=c["seed"]
        )
        strategy = build_from(c["strategy"])
        return {
            "ds": ds,
            "parts": parts,
            "model": model,
            "trainer": build_from(c["client"]),
            "rule": getattr(strategy, "client_rule", None),
            "adversary": Adversary(build_from(c["attack"]), c["num_clients"]),
            "clients": {},
        }

    def __call__(self, context: Context) -> ClientSetup:
        if self.key not in _CACHE:
            _CACHE[self.key] = self._build()
        b = _CACHE[self.key]
        cid = int(context.node_config["partition-id"])
        if cid not in b["clients"]:
            ds, idx = b["ds"], b["parts"][cid]
            x, y = b["adversary"].poison_data(ds.x_train[idx], ds.y_train[idx], ds.num_classes, cid)
            b["clients"][cid] = ClientSetup(
                cid, x, y, ds.num_classes, b["model"], b["trainer"], b["rule"], self.cfg["seed"]
            )
        return b["clients"][cid]


class FlowerServer:
    """The runner's view of a Flower simulation: ``round(r)``, ``get_params``, ``state_dict``."""

    def __init__(self, c: dict[str, Any], ds: Any, adversary: Adversary) -> None:
        self.c = c
        self.rounds = int(c["rounds"])
        self.every = int(c["eval_every"])
        model = build_from(
            c["model"], input_shape=ds.input_shape, num_classes=ds.num_classes, seed=c["seed"]
        )
        self.model, self.spec = model, ParamSpec.of(model)
        self.initial = model_to_arrays(model)
        self.x_test, self.y_test, self.num_classes = ds.x_test, ds.y_test, ds.num_classes
        n, per, seed = int(c["num_clients"]), int(c["clients_per_round"]), int(c["seed"])
        kind = str(c.get("sampling", "fixed"))

        def sampler(ids: np.ndarray, round_idx: int) -> np.ndarray:
            return ids[sample_clients(len(ids), per, seed, round_idx, kind)]

        n_agg = adversary.inputs_per_round(per)
        self.strategy = FlagstaffStrategy(
            build_from(c["aggregator"], f=adversary.f, n=n_agg),
            build_from(c["strategy"]),
            attack=adversary.attack if adversary.active else None,
            byzantine=range(adversary.f),
            sampler=sampler,
            min_available_nodes=n,
            min_train_nodes=1,
            num_clients=n,
            timeout=float(c["cluster"].get("round_deadline_s") or 3600.0),
            model=model,
        )
        self.strategy.initialize(self.initial)
        self.has_client_state = bool(
            getattr(getattr(self.strategy.strategy, "client_rule", None), "client_state", ())
        )
        self.start_round = 0
        self.loader = ShardLoader(c)
        self._requests: queue.Queue[int | None] = queue.Queue()
        self._results: queue.Queue[dict[str, Any] | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        # "local": always a fresh Ray for this run unless cluster.address names one (with no
        # address Ray would join any cluster already running on the machine)
        init_args: dict[str, Any] = {
            "include_dashboard": bool(cl["include_dashboard"]),
            "address": cl.get("address") or "local",
        }
        try:
            run_simulation(
                server_app=server_app,
                client_app=make_client_app(self.loader),
                num_supernodes=int(self.c["num_clients"]),
                backend_config={"client_resources": resources, "init_args": init_args},
            )
        except BaseException as err:  # noqa: BLE001 - handed to the runner's thread
            self._results.put(err)
        else:
            self._results.put(RuntimeError("the Flower simulation ended before all rounds"))

    # -- runner side ---------------------------------------------------------------------------------
    def round(self, r: int, evaluate: bool = True) -> dict[str, Any]:
        """Let Flower run round ``r`` and return its metrics row (blocks until it is done)."""
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

    @torch.no_grad()
    def evaluate(self, batch: int = 4096) -> dict[str, float]:
        """Test accuracy and loss of the global model (as ``ParameterServer.evaluate``)."""
        p = self.spec.unflatten(self.strategy.params)
        loss, correct, n = 0.0, 0.0, len(self.y_test)
        lossf = loss_fn_for(self.num_classes)
        for i in range(0, n, batch):
            xb, yb = self.x_test[i : i + batch], self.y_test[i : i + batch]
            out = functional_call(self.model, p, (xb,))
            loss += float(lossf(out, yb).sum())
            if self.num_classes > 1:
                correct += float((out.argmax(1) == yb).sum())
        res = {"loss": loss / n}
        if self.num_classes > 1:
            res["accuracy"] = correct / n
        return res

    def get_params(self) -> torch.Tensor:
        return self.strategy.params

    def state_dict(self) -> dict[str, Any]:
        last = self.strategy.last_metrics.get("round", self.start_round)
        return {"round": int(last), **self.strategy.state_dict(), "clients": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("backend=flower: load_state_dict before the first round only")
        if self.has_client_state:
            raise RuntimeError(
                "backend=flower keeps per-client state in Flower's node contexts, which are not "
                "checkpointed; resume this run with backend=ray or backend=local"
            )
        self.strategy.load_state_dict(state)
        self.start_round = int(state["round"])
        self.strategy.round_offset = self.start_round

    def close(self) -> None:
        self._stop.set()
        self._requests.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)
            if self._thread.is_alive():
                log.warning("the Flower simulation thread did not stop within 60 s")


def start_flower(c: dict[str, Any], ds: Any, adversary: Adversary) -> tuple[FlowerServer, Any]:
    """The runner's ``_start`` for ``backend=flower``: (server, close)."""
    server = FlowerServer(c, ds, adversary)
    return server, server.close
