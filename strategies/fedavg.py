"""FedAvg with a server learning rate and server momentum (FedAvgM), or any server optimizer.

References: McMahan et al. 2017 (FedAvg); Hsu, Qi, Brown 2019 (FedAvgM, server momentum);
Reddi et al. 2021 (server learning rate as a server optimizer step on the pseudo-gradient).
"""

from __future__ import annotations

from flagstaff.strategies.optim import Composed, Transform, server_optimizer

__all__ = ["FedAvg"]


class FedAvg(Composed):
    """x <- x + lr * v,  v <- momentum * v + Delta, with Delta the aggregated update:
    ``chain(momentum(server_momentum), sgd(server_lr))`` (``strategies.optim``), or the server
    optimizer ``server_opt`` (e.g. ``adam(...)``: FedAdam; config ``strategy/server_opt=adam``).

    With ``server_lr=1`` and ``server_momentum=0`` this is plain FedAvg: the next model is the
    (sample-weighted, by the aggregator) average of the client models.
    """

    name = "fedavg"

    def __init__(
        self,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_opt: Transform | None = None,
    ) -> None:
        super().__init__(server_optimizer(server_lr, server_momentum, server_opt))
