"""FedAdam (Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan; ICLR 2021).

Server Adam on the pseudo-gradient Delta = aggregate of the client updates (Algorithm 2, no bias
correction): m <- b1 m + (1 - b1) Delta; v <- b2 v + (1 - b2) Delta^2; x <- x + lr m / (sqrt(v) + tau).
``tau`` controls the adaptivity (the paper uses 1e-3 and tunes it). The same as ``strategy=fedavg
strategy/server_opt=adam``: the server step is ``strategies.optim.adam``, which composes with any
other strategy's correction (``strategy=scaffold strategy/server_opt=adam``).
"""

from __future__ import annotations

from flagstaff.strategies.optim import Composed, adam

__all__ = ["FedAdam"]


class FedAdam(Composed):
    """Server Adam with learning rate ``server_lr``, ``beta1``, ``beta2``, ``tau``."""

    name = "fedadam"

    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if server_lr <= 0:
            raise ValueError(f"strategy.server_lr must be > 0, got {server_lr}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError(
                f"FedAdam needs beta1, beta2 in [0, 1) and tau > 0; got {beta1}, {beta2}, {tau}"
            )
        super().__init__(adam(server_lr, beta1, beta2, tau))
