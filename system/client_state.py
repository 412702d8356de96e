"""Per-client state vectors of a client host (SCAFFOLD's ``c_i``, FedDyn's and FedSpeed's
per-client vectors) that cost memory only for the clients that have state.

A rule that keeps per-client state keeps one d-vector per client and name, and a client that has
never trained holds zeros (Karimireddy et al. 2020, SCAFFOLD eq. 4: ``c_i`` starts at 0; FedDyn,
Acar et al. 2021, Alg. 1: ``grad L_i(theta_i^0) = 0``). Allocating the dense (C, d) table up front
costs ``C * d * 4`` bytes per name before any client trains (1.9 GB for 100,000 clients of a
4,810-parameter MLP). :class:`ClientStateStore` keeps instead:

* ``memory`` mode (small tables): the rows of the clients that have state, in a table on the host's
  device that grows as clients first train (doubling), found through a (C,) slot array; a client
  that never trained takes no row;
* ``mapped`` mode (tables whose dense size exceeds :data:`MAP_ABOVE_BYTES`, when a directory is
  given): a (C, d) float32 file per name, memory-mapped and created sparse, so rows never written
  take neither memory nor disk, and written rows are file-backed pages the kernel writes back and
  evicts under pressure instead of heap (the file is unlinked once mapped: nothing is left behind,
  not even after a crash). Rows travel to the host's device per round (K rows, not the table).

Reading a client without state gives zeros in both modes, so results do not depend on the mode.
:meth:`ClientStateStore.state_dict` holds a row for every client while the dense table is small
(at most :data:`MAP_ABOVE_BYTES`), and only the clients that have state when it is large (a
checkpoint of 100,000 clients of which 5,000 trained holds 5,000 rows); loading it gives the others
zeros again, which is what they held: resume is exact either way.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["ClientStateStore", "MAP_ABOVE_BYTES"]

#: dense size (bytes, all names) above which a table is large: its rows map to a file (when the
#: store has a directory) and checkpoints hold only the clients that have state
MAP_ABOVE_BYTES = 64 * 2**20


class ClientStateStore:
    """``names`` x (C, d) float32 per-client state, zeros for clients without state (see module)."""

    def __init__(
        self,
        names: Iterable[str],
        num_clients: int,
        numel: int,
        device: torch.device | str = "cpu",
        directory: str | Path | None = None,
    ) -> None:
        self.names = tuple(names)
        self.numel = int(numel)
        self.device = torch.device(device)
        self.directory = Path(directory) if directory is not None else None
        self.has = np.zeros(int(num_clients), dtype=bool)  # rows that hold state
        dense = int(num_clients) * self.numel * 4 * len(self.names)
        self.large = dense > MAP_ABOVE_BYTES
        self.mode = "mapped" if self.directory is not None and self.large else "memory"
        self._maps: dict[str, np.memmap] = {}
        self._slot = np.full(int(num_clients), -1, dtype=np.int64)  # memory mode: row in _rows
        self._rows: dict[str, torch.Tensor] = {
            n: torch.zeros(0, self.numel, device=self.device) for n in self.names
        }
        self._used = 0
        if self.mode == "mapped":
            for n in self.names:
                self._maps[n] = self._map(int(num_clients))

    def __bool__(self) -> bool:
        return bool(self.names)

    def __iter__(self):
        return iter(self.names)

    def values(self) -> list[torch.Tensor]:
        """The tables that hold the rows: on the host's device (memory mode), or the mapped files
        viewed as CPU tensors (mapped mode)."""
        if self.mode == "mapped":
            return [torch.from_numpy(m) for m in self._maps.values()]
        return list(self._rows.values())

    @property
    def num_clients(self) -> int:
        return len(self.has)

    def resident_rows(self) -> int:
        """Rows (per name) that hold state: what the store costs, ``x numel x 4`` bytes each."""
        return int(self.has.sum())

    # -- rows ----------------------------------------------------------------------------------
    def gather(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The (K, d) state of the clients at positions ``rows`` (zeros where they have none), on
        the host's device."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.mode == "mapped":  # fancy indexing of the map copies the K rows out of it
            return {
                n: torch.from_numpy(np.asarray(m[rows])).to(self.device)
                for n, m in self._maps.items()
            }
        out = {n: torch.zeros(len(rows), self.numel, device=self.device) for n in self.names}
        slots = self._slot[rows]
        held = np.flatnonzero(slots >= 0)
        if len(held):
            src = torch.as_tensor(slots[held], device=self.device)
            dst = torch.as_tensor(held, device=self.device)
            for n in self.names:
                out[n][dst] = self._rows[n][src]
        return out

    def scatter(self, rows: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        """Set the state of the clients at positions ``rows`` (distinct) to ``values`` (K, d)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        self.has[rows] = True
        if self.mode == "mapped":
            for n, v in values.items():
                self._maps[n][rows] = v.detach().to("cpu", torch.float32).numpy()
            return
        new = rows[self._slot[rows] < 0]
        if len(new):
            self._grow(self._used + len(new))
            self._slot[new] = np.arange(self._used, self._used + len(new))
            self._used += len(new)
        dst = torch.as_tensor(self._slot[rows], device=self.device)
        for n, v in values.items():
            self._rows[n][dst] = v.to(self.device, torch.float32)

    def extend(self, count: int) -> None:
        """Append ``count`` clients without state (a host adopting a lost host's clients)."""
        old = self.num_clients
        self.has = np.concatenate([self.has, np.zeros(count, dtype=bool)])
        self._slot = np.concatenate([self._slot, np.full(count, -1, dtype=np.int64)])
        if self.mode == "mapped":
            for n, m in self._maps.items():
                grown = self._map(old + count)
                held = np.flatnonzero(self.has[:old])
                grown[held] = m[held]
                self._maps[n] = grown

    def reset(self) -> None:
        """Every client back to no state (zeros)."""
        held = np.flatnonzero(self.has)
        for m in self._maps.values():
            m[held] = 0.0
        self.has[:] = False
        self._slot[:] = -1
        self._used = 0
        self._rows = {n: torch.zeros(0, self.numel, device=self.device) for n in self.names}

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self, client_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Every client (small tables) or the clients that have state (large ones): ``client_ids``
        (their global ids, from the host's position -> id array ``client_ids``) and one (N, d) CPU
        tensor per name, rows in that order."""
        held = np.flatnonzero(self.has) if self.large else np.arange(self.num_clients)
        ids = torch.as_tensor(np.asarray(client_ids, dtype=np.int64)[held], device="cpu")
        rows = self.gather(held) if len(held) else self._empty()
        return {"client_ids": ids, **{n: v.cpu().clone() for n, v in rows.items()}}

    def load(self, rows: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        """Replace all state: the clients at positions ``rows`` get ``values``, the others none."""
        self.reset()
        self.scatter(rows, values)

    def _empty(self) -> dict[str, torch.Tensor]:
        return {n: torch.zeros(0, self.numel) for n in self.names}

    def _grow(self, need: int) -> None:
        cap = next(iter(self._rows.values())).shape[0] if self._rows else 0
        if need <= cap:
            return
        cap = max(need, 2 * cap, 64)
        for n, v in self._rows.items():
            grown = torch.empty(cap, self.numel, device=self.device)
            grown[: v.shape[0]] = v
            self._rows[n] = grown

    def _map(self, num_clients: int) -> np.memmap:
        """A sparse (C, d) float32 file, mapped and unlinked (its pages stay until unmapped)."""
        directory = _writable(self.directory)
        path = directory / f"client-state-{os.getpid()}-{uuid.uuid4().hex}.f32"
        with open(path, "wb") as f:
            f.truncate(max(1, num_clients * self.numel * 4))  # a hole: no disk until written
        try:
            return np.memmap(path, dtype=np.float32, mode="r+", shape=(num_clients, self.numel))
        finally:
            path.unlink()

    def __reduce__(self) -> tuple[Any, ...]:  # pragma: no cover - hosts are not pickled
        raise TypeError("ClientStateStore lives on its host and is not pickled")


def _writable(directory: Path | None) -> Path:
    """``directory`` where it exists and this process can write there (the run directory is not on
    a worker node's disk without a shared file system), else the system's temporary directory."""
    if directory is not None and directory.is_dir() and os.access(directory, os.W_OK):
        return directory
    return Path(tempfile.gettempdir())
