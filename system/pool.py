"""Host pools: how the server reaches its client hosts, in-process or as Ray actors.

Both pools take the round's global parameters once and an assignment {host id: client ids}, and
return the hosts' replies plus the hosts that failed. The Ray pool sends the parameters once per
round as numpy arrays (inside the call when small, else through the object store), gathers with
``ray.wait`` under a deadline, and survives a host that dies: the actor is restarted by Ray
(``max_restarts``) and its clients are retried once or counted as dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from system.host import ClientError, ClientHost, HostReply
from system.wire import INLINE_BYTES, to_wire

__all__ = ["LocalPool", "RayPool", "RoundReplies"]

log = logging.getLogger(__name__)


@dataclass
class RoundReplies:
    """Replies of one round, plus the clients whose host failed or missed the deadline."""

    replies: list[HostReply]
    dropped: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    retried_hosts: list[int] = field(default_factory=list)


class LocalPool:
    """Hosts called directly in this process (backend=local: tests, debugging)."""

    def __init__(self, hosts: list[ClientHost]) -> None:
        self.hosts = hosts

    def train(
        self,
        params: torch.Tensor,
        assignment: dict[int, list[int]],
        round_idx: int,
        broadcast: dict[str, torch.Tensor] | None = None,
        reduce: bool = False,
    ) -> RoundReplies:
        replies = [
            self.hosts[h].train(params, cids, round_idx, broadcast, reduce)
            for h, cids in assignment.items()
        ]
        return RoundReplies(replies)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The hosts' per-client state merged over all clients (see :func:`merge_host_states`)."""
        return merge_host_states([h.state_dict() for h in self.hosts])

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for h in self.hosts:
            h.load_state_dict(state)

    def call(self, method: str, args: dict[int, tuple] | None = None) -> dict[int, Any]:
        """Call ``method`` on the hosts in ``args`` (host id -> arguments; None: all, no arguments)."""
        args = args if args is not None else {h: () for h in range(len(self.hosts))}
        return {h: getattr(self.hosts[h], method)(*a) for h, a in args.items()}

    def close(self) -> None:
        self.hosts = []


class RayPool:
    """Hosts as Ray actors; one object-store put of the parameters per round.

    ``on_failure``: "retry" re-sends a dead host's clients once after Ray restarts the actor, "drop"
    counts them as dropped for the round. ``deadline_s``: replies later than this are dropped.
    """

    def __init__(
        self,
        actors: list,
        on_failure: str = "retry",
        deadline_s: float | None = None,
        restart_timeout_s: float = 60.0,
    ) -> None:
        if on_failure not in ("retry", "drop"):
            raise ValueError(f"cluster.on_host_failure must be retry or drop, got {on_failure!r}")
        self.actors = actors
        self.on_failure = on_failure
        self.deadline_s = deadline_s
        self.restart_timeout_s = restart_timeout_s

    def train(
        self,
        params: torch.Tensor,
        assignment: dict[int, list[int]],
        round_idx: int,
        broadcast: dict[str, torch.Tensor] | None = None,
        reduce: bool = False,
    ) -> RoundReplies:
        import ray

        ref, bref = _send(params), _send(broadcast) if broadcast else None
        pending = {
            self.actors[h].train.remote(ref, cids, round_idx, bref, reduce): h
            for h, cids in assignment.items()
        }
        out = RoundReplies([])
        failed: list[int] = []
        t_end = None if self.deadline_s is None else time.monotonic() + self.deadline_s
        while pending:
            timeout = None if t_end is None else max(0.0, t_end - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not done:  # deadline passed: the rest are stragglers
                for r, h in pending.items():
                    log.warning("host %d missed the round deadline; dropping its clients", h)
                    out.late.extend(assignment[h])
                    ray.cancel(r)
                break
            r = done[0]
            h = pending.pop(r)
            try:
                out.replies.append(ray.get(r))
            except ray.exceptions.RayTaskError as err:
                cause = err.as_instanceof_cause()
                if isinstance(cause, ClientError):
                    raise cause from None  # a client bug: report it, do not retry
                raise
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                log.warning("host %d died in round %d", h, round_idx)
                failed.append(h)
        for h in failed:
            if self.on_failure == "retry" and self._wait_alive(h):
                out.retried_hosts.append(h)
                try:
                    out.replies.append(
                        ray.get(
                            self.actors[h].train.remote(ref, assignment[h], round_idx, bref, reduce)
                        )
                    )
                    continue
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    log.warning("host %d died again; dropping its clients", h)
            out.dropped.extend(assignment[h])
        return out

    def _wait_alive(self, h: int) -> bool:
        import ray

        t_end = time.monotonic() + self.restart_timeout_s
        while time.monotonic() < t_end:
            try:
                ray.get(self.actors[h].ping.remote(), timeout=5)
                return True
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.ActorUnavailableError,
                ray.exceptions.GetTimeoutError,
            ):
                time.sleep(0.2)
        return False

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The actors' per-client state, fetched and merged over all clients."""

        return merge_host_states(list(self.call("state_dict").values()))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        import ray

        ref = ray.put(state)
        ray.get([a.load_state_dict.remote(ref) for a in self.actors])

    def call(self, method: str, args: dict[int, tuple] | None = None) -> dict[int, Any]:
        """Call ``method`` on the actors in ``args`` (host id -> arguments; None: all, no args)."""
        import ray

        args = args if args is not None else {h: () for h in range(len(self.actors))}
        refs = {h: getattr(self.actors[h], method).remote(*a) for h, a in args.items()}
        out = {}
        for h, r in refs.items():
            try:
                out[h] = ray.get(r)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                # the host is being restarted by Ray: wait for it, then ask once more
                if not self._wait_alive(h):
                    raise RuntimeError(
                        f"host {h} is dead and Ray could not restart it within "
                        f"{self.restart_timeout_s} s; check `ray status` for lost nodes"
                    ) from None
                out[h] = ray.get(getattr(self.actors[h], method).remote(*args[h]))
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _send(x: torch.Tensor | dict[str, torch.Tensor]) -> Any:
    """What a round's actor calls take for ``x``: numpy arrays (system/wire.py), inline in the call
    when small, else put in the object store once for all hosts."""
    import ray

    x = to_wire(x)
    arrays = x.values() if isinstance(x, dict) else [x]
    size = sum(getattr(a, "nbytes", 0) for a in arrays)
    return x if size <= INLINE_BYTES else ray.put(x)


def merge_host_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One dict over all clients: ``client_ids`` (sorted) and, per state name, an (N, d) tensor in
    that order, so a checkpoint does not depend on how clients were spread over hosts."""
    states = [s for s in states if len(s) > 1]  # hosts of stateless rules hold only client_ids
    if not states:
        return {}
    ids = torch.cat([s["client_ids"] for s in states])
    order = torch.as_tensor(np.argsort(ids.numpy(), kind="stable"))
    names = [n for n in states[0] if n != "client_ids"]
    return {
        "client_ids": ids[order],
        **{n: torch.cat([s[n] for s in states])[order] for n in names},
    }
