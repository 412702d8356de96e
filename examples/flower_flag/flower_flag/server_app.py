"""ServerApp: Flower's Strategy.start loop with Flagstaff's Flag Aggregator (+ Byzantine attack)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flagstaff.clients.flower_app import arrays_to_vector, model_to_arrays
from flagstaff.clients.trainer import ParamSpec
from flagstaff.strategies.aggregators import build
from flagstaff.strategies.fedavg import FedAvg
from flagstaff.strategies.flower import FlagstaffStrategy
from flower_flag.task import attack, dataset, model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    seed, n = int(cfg["seed"]), int(cfg["num-clients"])
    atk = attack(cfg)
    pre = [p for p in str(cfg.get("pre", "")).split(",") if p]
    aggregator = build(rule=str(cfg["aggregator"]), f=atk.f, n=n, pre=pre)
    strategy = FlagstaffStrategy(
        aggregator,
        FedAvg(),
        attack=atk,
        min_available_nodes=n,
        min_train_nodes=n,
        seed=seed,
        discover=True,  # the ClientApp's query handler tells each node's client id (partition id)
    )
    net = model(seed)
    spec = ParamSpec.of(net)
    ds = dataset(seed)

    @torch.no_grad()
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        params = spec.unflatten(arrays_to_vector(arrays, spec.names))
        out = torch.func.functional_call(net, params, (ds.x_test,))
        acc = float((out.argmax(1) == ds.y_test).float().mean())
        return MetricRecord({"accuracy": acc})

    result = strategy.start(
        grid=grid,
        initial_arrays=model_to_arrays(net),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=evaluate,
    )
    if cfg.get("result-file"):
        rows = {int(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
        train = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
        Path(str(cfg["result-file"])).write_text(
            json.dumps({"accuracy": rows, "train": train, "byzantine": sorted(strategy.byzantine)})
        )
