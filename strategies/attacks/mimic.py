"""Mimic (Karimireddy, He, Jaggi; ICLR 2022): every Byzantine client copies one honest input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from flagstaff.clients.byzantine import Aggregator, as_count
from flagstaff.strategies.attacks.model import ModelAttack, check_updates, repeat_rows

__all__ = ["Mimic"]


class Mimic(ModelAttack):
    """Mimic (Karimireddy, He, Jaggi; ICLR 2022): every Byzantine copies one honest input.

    ``index`` given: copy ``honest[index]`` (rows are in the runtime's order, sorted by client id).
    ``index=None``: the paper's heuristic. For the first ``warmup`` calls (rounds) the attack keeps
    a running mean ``m`` of the honest inputs over rounds and a streaming power-iteration estimate
    ``z`` of the top eigenvector of their covariance (``v <- t/(t+1) v + 1/(t+1) C^T C z / h``,
    ``z = v/||v||``, C the centred honest inputs), and copies the input with the largest
    ``|<x_i - m, z>|``; after warmup that choice is frozen (state: ``state_dict``).
    Call ``__call__`` (or ``per_target``) once per round so the estimate advances once per round;
    ``targeted`` only reads it. Extras (``extra``): the Byzantines send the extras of the honest
    client whose update they copied in the preceding ``__call__`` (they pose as that client).
    """

    name: ClassVar[str] = "mimic"

    def __init__(
        self, f: int = 0, seed: int = 0, index: int | None = None, warmup: int = 20
    ) -> None:
        super().__init__(f, seed)
        self.index = None if index is None else as_count(index, "mimic: index")
        self.warmup = as_count(warmup, "mimic: warmup")
        if self.index is None and self.warmup < 1:
            raise ValueError(
                "mimic: the heuristic (index=null) needs warmup >= 1 rounds to estimate its "
                "direction; set warmup >= 1 or a fixed index"
            )
        self._rounds = 0
        self._mean: Tensor | None = None
        self._acc: Tensor | None = None
        self._dir: Tensor | None = None
        self._chosen: int | None = None
        self._last_row = 0  # the honest row copied by the last ``__call__`` (for ``extra``)

    def _pick(self, honest: Tensor, gen: torch.Generator, update: bool) -> int:
        h = honest.shape[0]
        if self.index is not None:
            if self.index >= h:
                raise ValueError(f"mimic: index {self.index} out of range for h = {h} honest rows")
            return self.index
        if update and self._rounds < self.warmup:
            t = self._rounds
            mean = honest.mean(dim=0)
            if self._mean is None:
                self._mean = mean
            else:  # running mean over rounds (state may come from another device)
                self._mean, self._acc, self._dir = (
                    v.to(honest) for v in (self._mean, self._acc, self._dir)
                )
                self._mean = self._mean + (mean - self._mean) / (t + 1)
            if self._dir is None:
                z = self._noise("normal", (honest.shape[1],), honest, gen)
                self._dir = z / torch.linalg.vector_norm(z).clamp_min(torch.finfo(z.dtype).tiny)
                self._acc = torch.zeros_like(self._dir)
            centred = honest - self._mean
            cov_z = centred.T @ (centred @ self._dir) / h
            self._acc = self._acc * (t / (t + 1)) + cov_z / (t + 1)
            norm = torch.linalg.vector_norm(self._acc)
            if norm > 0:
                self._dir = self._acc / norm
            self._rounds += 1
            self._chosen = None
        if self._dir is None:  # nothing observed yet (targeted before any round)
            return 0
        if not update or self._chosen is None or self._chosen >= h:
            proj = (honest - self._mean.to(honest)) @ self._dir.to(honest)
            chosen = int(torch.argmax(proj.abs()))
            if not update:  # targeted: the best row of what this node received
                return chosen
            self._chosen = chosen
        return self._chosen

    def craft(self, honest: Tensor, aggregator: Aggregator | None, gen: torch.Generator) -> Tensor:
        self._last_row = self._pick(honest, gen, update=True)
        return repeat_rows(honest[self._last_row], self.f)

    def extra(
        self,
        honest: Tensor,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The copied client's row of the extra (no state update, no randomness)."""
        check_updates(honest, self.name)
        return repeat_rows(honest[min(self._last_row, honest.shape[0] - 1)], self.f)

    def targeted(
        self,
        received_honest: Tensor,
        target: Tensor | None = None,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        check_updates(received_honest, self.name)
        self.check(received_honest.shape[0] + self.f)
        row = self._pick(received_honest, self._rng(generator), update=False)
        return repeat_rows(received_honest[row], self.f)

    def per_target(
        self,
        honest: Tensor,
        *,
        aggregators: Sequence[Aggregator] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        out = self(honest, generator=generator)  # one state update per round
        return None if out is None else out.unsqueeze(0).expand(honest.shape[0], -1, -1)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            rounds=self._rounds, mean=self._mean, acc=self._acc, dir=self._dir, chosen=self._chosen
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._rounds, self._chosen = int(state["rounds"]), state["chosen"]
        self._mean, self._acc, self._dir = state["mean"], state["acc"], state["dir"]
