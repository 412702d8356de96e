"""The run loop, once for every mode and backend (issue 20 item 2): resume, metrics rows, checkpoints,
progress bar, loggers, the summary, the skipped-round stop and the privacy-budget stop.

It drives any *stepper* (STYLE.md point 4: the loop is one readable function on the driver):

* ``round(r, evaluate) -> metrics``: run round (or step) r; a row with ``stopped`` means the round
  did not run (e.g. it would exceed the privacy budget: ``"privacy budget"`` and a ``message``);
* ``state_dict()`` / ``load_state_dict(state)``: the checkpoint, and resuming from it;
* ``final_params()``, ``summary(rows)`` (the mode's own summary.json fields: hosts, faults,
  privacy, ...) and ``close()`` (idempotent);
* ``unit``: what a round is called on the progress bar ("rounds", or "steps" for peer-to-peer).

Steppers: the parameter server with its hosts (``system.runner``, backends local and ray), the
Flower simulation (``system.flower_backend.FlowerServer``) and the peer network
(``system.p2p.PeerNetwork``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from typing import Any, Protocol

import numpy as np
import torch

from flagstaff.system.loggers import make_logger
from flagstaff.system.memory import tree_memory_mb
from flagstaff.system.rundir import CheckpointError, RunDir, versions

__all__ = [
    "NO_UPDATE",
    "RunStopped",
    "Stepper",
    "check_resume",
    "fingerprint",
    "finish_summary",
    "no_update_message",
    "run_loop",
]

log = logging.getLogger("flagstaff")

NO_UPDATE = "no usable update"

# keys that may change between a run and its resumption without changing its result
_RESUME_FREE = (
    "resume",
    "rounds",
    "progress",
    "verbose",  # what the console shows (launch/train.py), like progress
    "cluster",
    "logger",
    "backend",
    "eval_every",
    "checkpoint_every",
    "experiment",
)


class Stepper(Protocol):
    """What the run loop drives (see the module docstring)."""

    unit: str

    def round(self, r: int, evaluate: bool) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def final_params(self) -> torch.Tensor: ...

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]: ...

    def close(self) -> None: ...


class RunStopped(RuntimeError):
    """The run stopped before its last round because it could not make progress (e.g.
    ``cluster.max_skipped_rounds`` rounds in a row without a usable update); the checkpoint holds
    everything up to the stop."""


# keys added after checkpoints existed: at these values they stay out of the fingerprint, so a
# checkpoint written before they existed still resumes
_ADDED = {"mode": "federated", "p2p": None}


def fingerprint(cfg: dict[str, Any]) -> dict[str, str]:
    """Hash of each config group that determines the result (checked on resume)."""
    return {
        k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
        for k, v in cfg.items()
        if k not in _RESUME_FREE and not (k in _ADDED and v == _ADDED[k])
    }


def check_resume(
    c: dict[str, Any], out: RunDir, fp: dict[str, str], numel: int
) -> dict[str, Any] | None:
    """With ``resume=true``: the checkpoint to resume from (None when there is none yet), after
    checking that it is readable, was written by this config, holds finite parameters and as many
    as the configured model (the only check left for a checkpoint without fingerprint)."""
    if not c["resume"]:
        return None
    state = out.load_checkpoint(fp)
    if state is None:
        log.info("resume=true: no checkpoint in %s yet, starting at round 0", out.path)
        return None
    if int(state["round"]) > c["rounds"]:
        raise CheckpointError(
            f"{out.checkpoint_path} holds round {state['round']} but rounds={c['rounds']}; "
            f"resume with rounds={state['round']} or more (the checkpoint is the run's state "
            "after that round)"
        )
    got = state["params"].numel()
    if got != numel:
        raise CheckpointError(
            f"{out.checkpoint_path} holds {got} parameters, the configured model has "
            f"{numel}; resume with the config it was written with (the run's "
            ".hydra/config.yaml), or start over in a new hydra.run.dir"
        )
    return state


def no_update_message(skipped: list[dict[str, Any]], c: dict[str, Any], path: Any) -> str:
    """Why K rounds in a row had no usable update (which clients were late, failed or sent
    non-finite updates) and what to change; one line."""
    who: dict[str, set[int]] = {}
    for m in skipped:
        for k, v in (m.get("skipped_clients") or {}).items():
            who.setdefault(k, set()).update(v)
    fixes = {
        "nonfinite": "sent non-finite updates (lower client.lr, check the data for NaN/inf, or "
        "clip the updates)",
        "late": "were late (raise cluster.round_deadline_s, or speed up or remove the slow "
        "hosts: cluster.slow_hosts; on a joined cluster (cluster.address), `ray status`)",
        "failed": "were on failed or lost hosts (check the host log lines above; on a joined "
        "cluster (cluster.address), `ray status`)",
    }
    why = [f"clients {_ids(who[k])} {fixes[k]}" for k in fixes if who.get(k)]
    if not why:  # e.g. the flower backend, or rounds that sampled no client
        why = sorted({str(m.get("skipped")) for m in skipped})
    first, last = skipped[0]["round"], skipped[-1]["round"]
    return (
        f"{len(skipped)} rounds in a row (rounds {first}-{last}) had no usable update: "
        + "; ".join(why)
        + f". The model is unchanged since round {first - 1}; {path}/checkpoint.pt holds round "
        f"{last}: fix the cause and rerun with resume=true (cluster.max_skipped_rounds="
        f"{c['cluster'].get('max_skipped_rounds', 3)} sets how many such rounds stop a run; 0: "
        "never)"
    )


def _ids(ids: set[int]) -> str:
    ids_ = sorted(ids)
    return str(ids_) if len(ids_) <= 20 else f"{ids_[:20]}... ({len(ids_)} clients)"


def finish_summary(
    c: dict[str, Any], rows: list[dict[str, Any]], start: int, startup_s: float, path: Any
) -> dict[str, Any]:
    """The fields of summary.json every training mode shares (final metrics, timing, memory,
    seed, versions); modes add their own (``Stepper.summary``)."""
    final = next((r for r in reversed(rows) if "loss" in r), {})
    times = [r["round_time_s"] for r in rows]
    # evaluated rounds with a number (max() would keep a leading NaN: nothing compares greater)
    scored = [r for r in rows if r.get("accuracy") is not None and np.isfinite(r["accuracy"])]
    best = max(scored, key=lambda r: r["accuracy"], default={})  # the first of equal bests
    return {
        "accuracy": final.get("accuracy"),
        "loss": final.get("loss"),
        "best_accuracy": best.get("accuracy"),  # papers' "best test accuracy over rounds"
        "best_round": best.get("round"),
        "rounds": c["rounds"],
        "resumed_from": start,
        "startup_s": startup_s,
        "round_time_median_s": float(np.median(times[1:] or times)) if times else None,
        "peak_rss_mb": max((r.get("rss_mb", 0.0) for r in rows), default=0.0),
        "peak_pss_mb": max((r.get("pss_mb", 0.0) for r in rows), default=0.0),
        "seed": c["seed"],
        "backend": c["backend"],
        "versions": versions(),
        "run_dir": str(path),
    }


def run_loop(
    c: dict[str, Any],
    stepper: Stepper,
    out: RunDir,
    fp: dict[str, str],
    state: dict[str, Any] | None,
    t_start: float,
) -> dict[str, Any]:
    """Run the rounds ``state`` (a checkpoint to resume from, or None) leaves, with metrics rows,
    checkpoints, progress bar and loggers; write summary.json; return the final metrics, timings,
    parameters and rows. Raises :class:`RunStopped` (after the checkpoint and summary) when
    ``cluster.max_skipped_rounds`` rounds in a row had no usable update."""
    start_round = int(state["round"]) if state is not None else 0
    if state is not None:
        stepper.load_state_dict(state)
        log.info("resumed from %s at round %d", out.checkpoint_path, start_round)
    logger = make_logger(c["logger"], out.path, c)
    try:
        startup_s = time.perf_counter() - t_start
        rows, stop = _rounds(c, stepper, out, fp, start_round, logger)
    finally:
        logger.close()
    extra = stepper.summary(rows)  # before close: e.g. a server actor ends with its hosts
    params = stepper.final_params()
    stepper.close()
    summary = finish_summary(c, rows, start_round, startup_s, out.path)
    summary.update(
        rounds_completed=max((r["round"] for r in rows), default=start_round),
        stopped=stop.get("stopped"),  # e.g. "privacy budget"; None: all rounds ran
        stop_message=stop.get("message"),
        **extra,
    )
    out.write_json("summary.json", summary)
    out.plot_curves()
    if stop.get("stopped") == NO_UPDATE:  # checkpoint and summary are written: now fail
        raise RunStopped(stop["message"])
    times = [r["round_time_s"] for r in rows]
    return {**summary, "round_times": times, "params": params, "metrics": rows}


def _rounds(
    c: dict[str, Any], stepper: Stepper, out: RunDir, fp: dict[str, str], start_round: int, logger
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rounds: run, log, checkpoint. Progress bar on stderr. Returns the metric rows and the
    stop row ({} when every round ran)."""
    from tqdm import tqdm

    rounds, every, ck = c["rounds"], c["eval_every"], c["checkpoint_every"]
    rows = out.read_metrics()
    bar = tqdm(
        range(start_round, rounds),
        desc=stepper.unit,
        initial=start_round,
        total=rounds,
        disable=not c["progress"],
        dynamic_ncols=True,
    )
    stop: dict[str, Any] = {}
    skipped: list[dict[str, Any]] = []  # the rounds in a row without a usable update
    max_skipped = c["cluster"].get("max_skipped_rounds", 3)
    per = f"s_per_{stepper.unit.rstrip('s')}"
    for r in bar:
        evaluate = (r + 1) % every == 0 or r + 1 == rounds
        m = stepper.round(r, evaluate)
        if m.get("stopped"):  # the round did not run: final checkpoint, clear message, stop
            stop = m
            log.warning("%s", m.get("message", m["stopped"]))
            bar.write(f"flagstaff: stopped: {m.get('message', m['stopped'])}", file=sys.stderr)
            out.save_checkpoint({**stepper.state_dict(), "fingerprint": fp})
            break
        if evaluate:
            m["rss_mb"], m["pss_mb"] = tree_memory_mb()
        out.append_metrics(m)
        logger.log(m)
        rows.append(m)
        if "accuracy" in m:
            post = {"acc": f"{m['accuracy']:.3f}"}
            if "accuracy_worst" in m:  # peer-to-peer: the worst honest node
                post["worst"] = f"{m['accuracy_worst']:.3f}"
            bar.set_postfix(**post, **{per: f"{m['round_time_s']:.3f}"})
        skipped = [*skipped, m] if m.get("skipped") else []
        if skipped:  # a visible event; max_skipped in a row stop the run (issue 19 item 5)
            why = m["skipped"] if isinstance(m["skipped"], str) else NO_UPDATE
            bar.write(f"flagstaff: round {m['round']} skipped: {why}", file=sys.stderr)
        if max_skipped and len(skipped) >= max_skipped:
            stop = {"stopped": NO_UPDATE, "message": no_update_message(skipped, c, out.path)}
        if (ck and (r + 1) % ck == 0) or r + 1 == rounds or stop:
            out.save_checkpoint({**stepper.state_dict(), "fingerprint": fp})
        if stop:
            break
    bar.close()
    return rows, stop
