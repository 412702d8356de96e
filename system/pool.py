"""Host pools: how the server reaches its client hosts, in-process or as Ray actors.

Both pools take the round's global parameters once and an assignment {host id: client ids}, and
return the hosts' replies plus the clients whose host failed or was late. The Ray pool sends the
parameters once per round as numpy arrays (inside the call when small, else through the object
store), gathers with ``ray.wait`` under a deadline, and survives hosts that die:

* Ray restarts a dead host (``cluster.max_restarts``) from the shard reference the driver keeps; its
  clients are retried once (``cluster.on_host_failure=retry``) or counted as dropped (``drop``).
* A host that does not come back within ``cluster.restart_timeout_s`` (no restarts left, or its
  node is gone for good) is *lost*: its clients' shards (in the object store, held by the driver)
  move to the surviving host that holds the fewest clients, and with ``retry`` they train there in
  the same round. Clients with DP-SGD accountants cannot move (a fresh accountant would under-count
  their epsilon): they are out of the run, with a line per round that samples them.
* Per-client state on a host that died (restarted or lost) is gone; the pool names the clients
  whose state was lost (:meth:`RayPool.faults`, and per round in metrics.jsonl).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flagstaff.system.host import (
    PRIVACY_STATE,
    ClientError,
    ClientHost,
    HostReply,
    UnknownClientsError,
)
from flagstaff.system.wire import INLINE_BYTES, to_wire

__all__ = ["LocalPool", "RayPool", "RoundReplies"]

log = logging.getLogger(__name__)


@dataclass
class RoundReplies:
    """Replies of one round, plus the clients whose host failed or missed the deadline."""

    replies: list[HostReply]
    dropped: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    retried_hosts: list[int] = field(default_factory=list)


def _no_faults() -> dict[str, list]:
    return {"lost_hosts": [], "lost_state_clients": [], "lost_state": [], "out_of_run": []}


class LocalPool:
    """Hosts called directly in this process (backend=local: tests, debugging)."""

    def __init__(self, hosts: list[ClientHost]) -> None:
        self.hosts = hosts

    def __len__(self) -> int:
        """The number of hosts."""
        return len(self.hosts)

    def place(
        self, assignment: dict[int, list[int]], round_idx: int = 0
    ) -> tuple[dict[int, list[int]], list[int]]:
        """Where the round's clients train (in-process hosts never fail: as assigned)."""
        return assignment, []

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

    def evaluate(self, params: torch.Tensor) -> list[Any]:
        """Every host's evaluation sums for ``params`` (``ClientHost.evaluate``)."""
        return [h.evaluate(params) for h in self.hosts]

    def take_events(self) -> dict[str, list[int]]:
        return {}

    def faults(self) -> dict[str, list]:
        return _no_faults()

    def load_faults(self, state: dict[str, Any]) -> None:
        return None

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

    ``on_failure``: "retry" re-sends a dead host's clients once (after Ray restarts the actor, or
    to the host that took them over), "drop" counts them as dropped for the round.
    ``deadline_s``: replies later than this are dropped. ``restart_timeout_s``: how long to wait
    for Ray to restart a dead host before it counts as lost. ``shards`` (the driver's object
    references of each host's data) and ``owner`` (client id -> host id) let the clients of a lost
    host move to another; without them they are out of the run.
    """

    def __init__(
        self,
        actors: list,
        on_failure: str = "retry",
        deadline_s: float | None = None,
        restart_timeout_s: float = 60.0,
        shards: list | None = None,
        owner: np.ndarray | None = None,
    ) -> None:
        if on_failure not in ("retry", "drop"):
            raise ValueError(f"cluster.on_host_failure must be retry or drop, got {on_failure!r}")
        self.actors = actors
        self.on_failure = on_failure
        self.deadline_s = deadline_s
        self.restart_timeout_s = restart_timeout_s
        self.shards = shards
        n = len(actors)
        self.owner = np.asarray(owner) if owner is not None else None
        # the clients each host started with (a "block"), and who holds each block now
        self.blocks = (
            {h: np.flatnonzero(self.owner == h).tolist() for h in range(n)}
            if self.owner is not None
            else {h: [] for h in range(n)}
        )
        self.holder: dict[int, int | None] = {h: h for h in range(n)}  # None: nobody (out of run)
        self.lost: list[int] = []
        self.out_of_run: dict[int, str] = {}  # client id -> why it cannot train again
        self.lost_state_clients: set[int] = set()
        self.lost_state: list[str] = []  # names of the per-client state that was lost
        self._events: dict[str, set[int]] = {"lost_hosts": set(), "lost_state_clients": set()}
        self._incarnation: dict[int, int] = {}
        self._kinds: list[str] | None = None
        self._round = -1  # the round being trained (or last trained), for log lines
        self._why_lost = ""  # why the last host counted as lost (set by _wait_alive)

    def __len__(self) -> int:
        """The number of hosts (lost ones included: host ids stay as they were)."""
        return len(self.actors)

    # -- where clients train ---------------------------------------------------------------------
    def live(self) -> list[int]:
        """Hosts not lost, in id order."""
        return [h for h in range(len(self.actors)) if h not in self.lost]

    def held_by(self, h: int) -> list[int]:
        """The blocks (original host ids) host ``h`` holds now."""
        return [b for b, t in self.holder.items() if t == h]

    def place(
        self, assignment: dict[int, list[int]], round_idx: int = 0
    ) -> tuple[dict[int, list[int]], list[int]]:
        """The assignment rewritten to the hosts that hold the clients now (sorted ids per host),
        plus the clients that cannot train (out of the run); one line names those."""
        placed: dict[int, list[int]] = {}
        out: list[int] = []
        for h, cids in assignment.items():
            for c in cids:
                block = int(self.owner[c]) if self.owner is not None else h
                t = None if c in self.out_of_run else self.holder.get(block, block)
                if t is None:
                    out.append(c)
                else:
                    placed.setdefault(t, []).append(c)
        if out:
            why = sorted({self.out_of_run.get(c, "their host was lost") for c in out})
            log.warning(
                "round %d: clients %s dropped: %s", round_idx + 1, sorted(out), "; ".join(why)
            )
        return {h: sorted(v) for h, v in sorted(placed.items())}, sorted(out)

    # -- one round -------------------------------------------------------------------------------
    def train(
        self,
        params: torch.Tensor,
        assignment: dict[int, list[int]],
        round_idx: int,
        broadcast: dict[str, torch.Tensor] | None = None,
        reduce: bool = False,
    ) -> RoundReplies:
        import ray

        self._round = round_idx
        if not self._incarnation:  # which host processes hold the state now (see _accept)
            self._learn_incarnations()
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
                self._accept(out, ray.get(r), round_idx)
            except ray.exceptions.RayTaskError as err:
                cause = err.as_instanceof_cause()
                if isinstance(cause, ClientError):
                    raise cause from None  # a client bug: report it, do not retry
                if not isinstance(cause, UnknownClientsError):
                    raise
                failed.append(h)  # restarted without the clients it had taken over
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                log.warning("host %d died in round %d", h, round_idx + 1)
                failed.append(h)
        for h in failed:
            self._recover_round(out, h, assignment[h], ref, bref, round_idx, reduce)
        return out

    def _recover_round(self, out, h, cids, ref, bref, round_idx, reduce) -> None:
        """Host ``h`` failed this round: wait for Ray to restart it, else hand its clients over;
        then retry its clients once (``retry``) or count them as dropped (``drop``)."""
        import ray

        alive = self._recover(h, round_idx)
        if self.on_failure != "retry":
            out.dropped.extend(cids)
            return
        placed, gone = self.place({h: cids}, round_idx) if not alive else ({h: cids}, [])
        out.dropped.extend(gone)
        for t, part in placed.items():
            out.retried_hosts.append(h)
            try:
                rep = ray.get(self.actors[t].train.remote(ref, part, round_idx, bref, reduce))
                self._accept(out, rep, round_idx)
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.ActorUnavailableError,
                ray.exceptions.RayTaskError,
            ) as err:
                if isinstance(err, ray.exceptions.RayTaskError):
                    cause = err.as_instanceof_cause()
                    if isinstance(cause, ClientError):
                        raise cause from None
                log.warning("host %d failed again; dropping clients %s this round", t, part)
                out.dropped.extend(part)
        out.retried_hosts = sorted(set(out.retried_hosts))

    def _accept(self, out: RoundReplies, rep: HostReply, round_idx: int) -> None:
        """Keep a reply, unless it comes from a host process that Ray restarted since the pool
        last heard from it and that trained with fresh privacy accountants."""
        h, seen = rep.host_id, self._incarnation.get(rep.host_id)
        self._incarnation[h] = rep.incarnation
        if seen is None or seen == rep.incarnation:
            out.replies.append(rep)
            return
        if self._state_lost(h, "restarted by Ray", round_idx):
            out.dropped.extend(int(c) for c in rep.client_ids)  # trained from a fresh accountant
        else:
            out.replies.append(rep)

    # -- faults ----------------------------------------------------------------------------------
    def _recover(self, h: int, round_idx: int) -> bool:
        """True when host ``h`` is up again (Ray restarted it; the blocks it had taken over are
        given back to it); False when it is lost (its blocks moved or out of the run)."""
        import ray

        if self._wait_alive(h):
            try:
                self._give_back(h)
                return True
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self._why_lost = "it died again while taking back the clients it held"
        self._lose(h, round_idx)
        return False

    def _wait_alive(self, h: int) -> bool:
        """Wait up to ``restart_timeout_s`` for host ``h`` to answer; False at once when Ray says
        the actor is dead for good (no restarts left). ``_why_lost`` says which."""
        import ray

        t_end = time.monotonic() + self.restart_timeout_s
        while True:
            left = t_end - time.monotonic()
            try:
                ray.get(self.actors[h].ping.remote(), timeout=max(0.1, min(5.0, left)))
                return True
            except ray.exceptions.ActorDiedError:
                self._why_lost = "Ray will not restart it, cluster.max_restarts is used up"
                return False
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.ActorUnavailableError,
                ray.exceptions.GetTimeoutError,
            ):
                if time.monotonic() >= t_end:
                    self._why_lost = (
                        f"not restarted within cluster.restart_timeout_s={self.restart_timeout_s:g}"
                        " s, no node can hold it"
                    )
                    return False
                time.sleep(0.2)

    def _lose(self, h: int, round_idx: int) -> None:
        """Host ``h`` is gone for good: stop Ray from restarting it later, move the blocks it held
        to the live host holding the fewest clients (or put them out of the run)."""
        import ray

        try:
            ray.kill(self.actors[h], no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        self.lost.append(h)
        self._events["lost_hosts"].add(h)
        blocks = self.held_by(h)
        private = self._state_lost(h, "lost", round_idx)
        for b in blocks:
            self.holder[b] = None
            target = None if private or self.shards is None else self._adopt(b)
            if target is None:
                why = (
                    f"host {h} was lost with their privacy accountants (resume cannot restore "
                    "them either: they stay out)"
                    if private
                    else f"host {h} was lost and no live host could take its clients"
                )
                self.out_of_run.update({c: why for c in self.blocks[b]})
            else:
                self.holder[b] = target
        where = sorted({self.holder[b] for b in blocks} - {None})
        log.warning(
            "round %d: host %d is lost: %s; its clients %s %s",
            round_idx + 1,
            h,
            self._why_lost,
            _ids(c for b in blocks for c in self.blocks[b]),
            f"move to host(s) {where}" if where else "are out of the run",
        )

    def _adopt(self, block: int) -> int | None:
        """Give ``block``'s shard to the live host holding the fewest clients; its id or None."""
        import ray

        load = {t: sum(len(self.blocks[b]) for b in self.held_by(t)) for t in self.live()}
        for t in sorted(load, key=lambda t: (load[t], t)):
            try:
                ray.get(self.actors[t].adopt.remote(self.shards[block]))
                return t
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                continue  # that one is down too; it is dealt with when next used
            except ray.exceptions.RayTaskError as err:
                log.warning("host %d cannot take host %d's clients: %s", t, block, err)
                return None
        return None

    def _give_back(self, h: int) -> None:
        """A restarted host comes back with its own block only: hand it the others it held."""
        import ray

        for b in self.held_by(h):
            if b != h:
                ray.get(self.actors[h].adopt.remote(self.shards[b]))

    def _state_lost(self, h: int, how: str, round_idx: int) -> bool:
        """Record that the per-client state of every client host ``h`` held is gone; True when that
        state includes privacy accountants (those clients must not train again)."""
        kinds = self._state_kinds()
        clients = sorted(c for b in self.held_by(h) for c in self.blocks[b])
        if kinds and clients:
            self.lost_state_clients.update(clients)
            self._events["lost_state_clients"].update(clients)
            self.lost_state = sorted(set(self.lost_state) | set(kinds))
            log.warning(
                "round %d: host %d %s: the %s of clients %s is lost (they continue from zero)",
                round_idx + 1,
                h,
                how,
                ", ".join(kinds),
                _ids(clients),
            )
        private = PRIVACY_STATE in kinds
        if private and how != "lost":  # restarted: the same host, but its accountants are new
            why = f"host {h} was restarted by Ray and lost their privacy accountants"
            self.out_of_run.update({c: why for c in clients})
        return private

    def _state_kinds(self) -> list[str]:
        """What per-client state the hosts keep (all run the same config); asked once."""
        import ray

        if self._kinds is None:
            for t in self.live():
                try:
                    self._kinds = list(ray.get(self.actors[t].state_kinds.remote(), timeout=30))
                    break
                except Exception:  # noqa: BLE001 - ask the next host
                    continue
        return self._kinds or []

    def _learn_incarnations(self) -> None:
        import ray

        self._state_kinds()  # asked while every host is up
        for h in self.live():
            try:
                self._incarnation[h] = ray.get(self.actors[h].incarnation.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a host down now is dealt with when it is used
                pass

    def take_events(self) -> dict[str, list[int]]:
        """Hosts lost and clients whose state was lost since the last call (for the round's
        metrics); empty when nothing happened."""
        ev = {k: sorted(v) for k, v in self._events.items() if v}
        for v in self._events.values():
            v.clear()
        return ev

    def faults(self) -> dict[str, list]:
        """Everything lost so far: hosts, the clients whose per-client state was lost and which
        state that was, the clients out of the run."""
        return {
            "lost_hosts": sorted(self.lost),
            "lost_state_clients": sorted(self.lost_state_clients),
            "lost_state": list(self.lost_state),
            "out_of_run": sorted(self.out_of_run),
        }

    def load_faults(self, state: dict[str, Any]) -> None:
        """Restore the clients that are out of the run (from a checkpoint)."""
        why = "out of the run since before the resume (their privacy accountants were lost)"
        self.out_of_run.update({int(c): why for c in state.get("out_of_run", [])})

    # -- calls on every host -----------------------------------------------------------------------
    def evaluate(self, params: torch.Tensor) -> list[Any]:
        """Every live host's evaluation sums for ``params`` (``ClientHost.evaluate``), the
        parameters sent once; asked again when a host was lost meanwhile (the host that took its
        clients over now holds its test slice)."""
        ref = _send(params)
        for _ in range(2):
            lost = len(self.lost)
            parts = self.call("evaluate", {h: (ref,) for h in self.live()})
            if len(self.lost) == lost:
                break
        return list(parts.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The actors' per-client state, fetched and merged over all clients."""

        return merge_host_states(list(self.call("state_dict").values()))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        import ray

        ref = ray.put(state)
        ray.get([self.actors[h].load_state_dict.remote(ref) for h in self.live()])
        self._learn_incarnations()

    def call(self, method: str, args: dict[int, tuple] | None = None) -> dict[int, Any]:
        """Call ``method`` on the actors in ``args`` (host id -> arguments; None: every live host,
        no arguments). A host that died is waited for (Ray restarts it); one that is lost is
        skipped, and a call on every host is made again so that the host that took its clients
        over answers for them."""
        import ray

        every = args is None
        args = {h: () for h in self.live()} if every else args
        refs = {h: getattr(self.actors[h], method).remote(*a) for h, a in args.items()}
        out = {}
        for h, r in refs.items():
            try:
                out[h] = ray.get(r)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if not self._recover(h, self._round):
                    if every:
                        return self.call(method)  # the survivors now hold h's clients
                    continue
                out[h] = ray.get(getattr(self.actors[h], method).remote(*args[h]))
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - a lost host is already gone
                pass
        self.actors = []


def _ids(ids) -> str:
    """Client ids for a log line: all of them up to 20, else the first 20 and the count."""
    ids = sorted(int(c) for c in ids)
    return str(ids) if len(ids) <= 20 else f"{ids[:20]}... ({len(ids)} clients)"


def _send(x: torch.Tensor | dict[str, torch.Tensor]) -> Any:
    """What a round's actor calls take for ``x``: numpy arrays (system/wire.py), inline in the call
    when small, else put in the object store once for all hosts."""
    import ray

    x = to_wire(x)
    arrays = x.values() if isinstance(x, dict) else [x]
    size = sum(a.nbytes for a in arrays)  # to_wire gives numpy arrays
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
