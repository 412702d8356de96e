"""The run directory: metrics.jsonl, summary.json, checkpoint.pt, curves.png, partition.json.

One run owns a directory at a time: ``lock()`` holds an flock on ``.flagstaff.lock`` for the run's
lifetime, which the kernel releases when the process ends, however it ends. Nothing of the run is
written before ``begin()``, which the recipe calls once the inputs and the checkpoint passed their
checks; ``begin()`` also writes Hydra's ``.hydra/`` files (``conf/train.yaml`` sets
``hydra.output_subdir: null`` so that Hydra does not write them before the run could check anything)
and cuts metrics.jsonl back to the checkpoint's round.

Durability (what a kill, a power cut or a full disk leaves): checkpoints are serialized in memory,
written to a temp file that is fsynced, renamed over checkpoint.pt, and the directory is fsynced;
metric rows are appended and flushed each round and fsynced off the round's critical path, and
always before the checkpoint that covers them. A write that fails for lack of space says which
checkpoint is intact. Every file is valid JSON: non-finite numbers are written as null and listed
under ``nonfinite`` (RFC 8259 has no NaN or infinity).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import math
import os
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunDir",
    "RunDirError",
    "RunDirBusy",
    "NoSpaceError",
    "CheckpointError",
    "LOCK_NAME",
    "finite_json",
    "hydra_files",
    "versions",
]

log = logging.getLogger("flagstaff")

LOCK_NAME = ".flagstaff.lock"
FSYNC_EVERY_S = 1.0  # metrics.jsonl: at most one background fsync per second (append_metrics)
# the temp files of save_checkpoint and _atomic (".<name>.<random>.tmp"): a run killed while it
# wrote one leaves it behind, as large as what it held; begin() removes them
_TEMP = re.compile(
    r"\.(checkpoint|metrics\.jsonl|summary\.json|partition\.json|config\.yaml|hydra\.yaml|"
    r"overrides\.yaml)\.\w+\.tmp"
)

# errors that mean "the disk (or this process's share of it) is full", with what to say
_NO_SPACE = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit (ulimit -f) reached",
}


class RunDirError(RuntimeError):
    """A run directory that this run cannot use or write; the message says why and what to do."""


class CheckpointError(RunDirError):
    """A checkpoint that cannot be used to resume this run."""


class RunDirBusy(RunDirError):
    """Another live run holds the run directory."""


class NoSpaceError(RunDirError):
    """A write into the run directory failed for lack of space; the message says what is intact."""


def versions() -> dict[str, str]:
    """Versions of the packages that determine a run's numbers, plus the git commit."""
    out = {"python": platform.python_version()}
    for name in ("torch", "ray", "opacus", "flwr", "numpy", "hydra"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - an absent optional package is just not listed
            pass
    try:
        root = Path(__file__).resolve().parent.parent
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return out


def hydra_files(task_cfg: Any, run_dir: str | Path) -> dict[str, str]:
    """The ``.hydra/`` files Hydra would have written for this job (config.yaml, hydra.yaml,
    overrides.yaml), when running under a Hydra app whose ``output_subdir`` is null and whose
    output directory is ``run_dir``; {} otherwise (a programmatic run, or Hydra wrote them)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import DictConfig, OmegaConf

        if not isinstance(task_cfg, DictConfig) or not HydraConfig.initialized():
            return {}
        hydra_cfg = HydraConfig.instance().cfg
        hc = hydra_cfg.hydra
        if hc.output_subdir is not None or Path(hc.runtime.output_dir) != Path(run_dir).absolute():
            return {}
        saved = OmegaConf.create(OmegaConf.to_container(hydra_cfg, resolve=False))
        saved.hydra.output_subdir = ".hydra"  # where they are, as Hydra itself records it
        return {
            ".hydra/config.yaml": OmegaConf.to_yaml(task_cfg),
            ".hydra/hydra.yaml": OmegaConf.to_yaml(saved),
            ".hydra/overrides.yaml": OmegaConf.to_yaml(hc.overrides.task),
        }
    except Exception as err:  # noqa: BLE001 - provenance only: never fail a run over it
        log.warning("could not record the Hydra config in .hydra/: %s", err)
        return {}


class RunDir:
    """Writes the files of one run under ``path`` (see the module docstring for the guarantees).
    ``pending``: files (relative name -> text) to write at ``begin()``, e.g. ``hydra_files``."""

    def __init__(self, path: str | Path, pending: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._pending = dict(pending or {})
        self._metrics_fd: int | None = None  # metrics.jsonl, open for appending
        self._fsync: Future | None = None  # its fsync in flight (at most one)
        self._unsynced = False  # rows written since the last fsync began
        self._fsync_at = -math.inf  # time.monotonic() when the last fsync began
        self._fsync_pool: ThreadPoolExecutor | None = None
        self.checkpoint_round: int | None = None  # round of checkpoint.pt when known

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    # -- ownership -------------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold the directory for this run (flock on ``.flagstaff.lock``, which holds the owner's
        pid); ``RunDirBusy`` if a live run holds it. Released on exit, even on error, and by the
        kernel when the process dies, so a killed run leaves no stale lock behind."""
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(
                f"run directory {self.path} is in use by another run (pid {holder}); wait for it "
                "to end or stop it, or choose another hydra.run.dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield self
            self.sync()  # a normal end reports a failed fsync; an error ending the run wins
        finally:
            self.close()
            os.close(fd)

    def begin(self, start_round: int) -> None:
        """Claim the directory once every check passed: remove the temp files a killed run left
        (``_TEMP``; this run holds the lock, so no live writer owns them), write the pending files
        (``.hydra/``) and cut metrics.jsonl back to ``start_round`` (0: a fresh log)."""
        for d in (self.path, self.path / ".hydra"):
            for f in d.iterdir() if d.is_dir() else ():
                if _TEMP.fullmatch(f.name) and f.is_file():
                    log.warning("removed %s, left by a run killed while it wrote it", f)
                    f.unlink()
        if start_round == 0 and self.checkpoint_path.exists():
            log.warning(
                "%s holds a previous run's checkpoint.pt: this run starts over and replaces it, "
                "its metrics.jsonl and summary.json (resume=true continues a run instead)",
                self.path,
            )
        for name, text in self._pending.items():
            self._atomic(name, text.encode())
        self._pending.clear()
        self.close()
        if start_round > 0:
            self.truncate_metrics(start_round)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh start (or no checkpoint yet) starts a fresh log
            _fsync_dir(self.path)

    # -- metrics ---------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        self._atomic(name, _dumps(obj, indent=2).encode())

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row (one line of JSON), in the file (and the OS cache: a killed run keeps
        it) at once. Its fsync runs in a background thread, one at a time and at most one per
        ``FSYNC_EVERY_S``: rows written meanwhile go with the next one, so a row is on disk
        within a second or one round, and the round loop does not wait for the disk (an fsync
        here takes about 5 ms; writing into a page under writeback blocks too). ``sync()``
        (before each checkpoint, at the end) waits for all of them. A failed write is cut off
        again, so it leaves no torn row."""
        line = (_dumps(row) + "\n").encode()
        try:
            if self._metrics_fd is None:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
                self._metrics_fd = os.open(self.metrics_path, flags, 0o644)
            fd = self._metrics_fd
            end = os.fstat(fd).st_size
            try:
                _write_all(fd, line)
            except OSError:
                os.ftruncate(fd, end)
                raise
        except OSError as err:
            self._raise_no_space(err, self.metrics_path)
            raise
        self._unsynced = True
        now = time.monotonic()
        if (self._fsync is None or self._fsync.done()) and now - self._fsync_at >= FSYNC_EVERY_S:
            self._wait_fsync()
            if self._fsync_pool is None:
                self._fsync_pool = ThreadPoolExecutor(1, thread_name_prefix="flagstaff-fsync")
            self._unsynced, self._fsync_at = False, now
            self._fsync = self._fsync_pool.submit(os.fsync, fd)

    def _wait_fsync(self) -> None:
        """Wait for the fsync in flight (if any) and report its error."""
        pending, self._fsync = self._fsync, None
        if pending is not None:
            try:
                pending.result()
            except OSError as err:
                self._raise_no_space(err, self.metrics_path)
                raise

    def sync(self) -> None:
        """Wait until every appended metric row is on disk."""
        self._wait_fsync()
        if self._unsynced and self._metrics_fd is not None:
            self._unsynced = False
            try:
                os.fsync(self._metrics_fd)
            except OSError as err:
                self._raise_no_space(err, self.metrics_path)
                raise

    def close(self) -> None:
        """Finish the fsyncs and close metrics.jsonl; errors are left to ``sync()``, which a run
        that ends normally calls first."""
        if self._fsync is not None:
            wait([self._fsync])
            self._fsync = None
        if self._fsync_pool is not None:
            self._fsync_pool.shutdown(wait=True)
            self._fsync_pool = None
        if self._metrics_fd is not None:
            try:
                if self._unsynced:  # best effort: a run ending in an error keeps its last rows
                    os.fsync(self._metrics_fd)
            except OSError:
                pass
            os.close(self._metrics_fd)
            self._metrics_fd = None
        self._unsynced = False

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; a line that is not JSON (torn by a kill or a full disk) is
        dropped with a warning naming the file and line."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for i, line in enumerate(self.metrics_path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                row = None
                why = err.msg
            else:
                why = "not a row object"
            if not isinstance(row, dict):
                log.warning(
                    "%s:%d: dropped a torn metrics row (%s): %.60s", self.metrics_path, i, why, line
                )
                continue
            rows.append(row)
        return rows

    def truncate_metrics(self, last_round: int) -> None:
        """Keep one row per round up to ``last_round`` (the checkpoint's; the rounds after it are
        run again), the last one written for a round that appears twice; drop torn rows."""
        by_round = {r.get("round", 0): r for r in self.read_metrics()}
        by_round = {k: r for k, r in by_round.items() if k <= last_round}
        rows = [by_round[k] for k in sorted(by_round)]
        self.close()
        self._atomic("metrics.jsonl", "".join(_dumps(r) + "\n" for r in rows).encode())

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Replace checkpoint.pt atomically and durably: serialize in memory, write and fsync a
        temp file, rename it, fsync the directory. The metric rows it covers are synced first."""
        self.sync()
        buf = io.BytesIO()
        torch.save(state, buf)
        fd, tmp = _temp_file(self.path, ".checkpoint.")
        try:
            try:
                _write_all(fd, buf.getbuffer())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.checkpoint_path)
            _fsync_dir(self.path)
        except OSError as err:
            self._raise_no_space(err, self.checkpoint_path)
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.checkpoint_round = int(state["round"])

    def load_checkpoint(self, fingerprint: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The checkpoint, or None if there is none; CheckpointError if unusable: unreadable,
        written by another config, or holding non-finite parameters."""
        path = self.checkpoint_path
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
            raise CheckpointError(
                f"{path} is not a readable Flagstaff checkpoint ({_load_error(err)}); delete it "
                "to start over, or point hydra.run.dir at the run you want to resume"
            ) from err
        if not isinstance(state, dict) or "round" not in state or "params" not in state:
            raise CheckpointError(f"{path} is not a Flagstaff checkpoint (no round/params)")
        if fingerprint is not None and state.get("fingerprint") not in (None, fingerprint):
            diff = sorted(
                k
                for k in set(fingerprint) | set(state["fingerprint"])
                if fingerprint.get(k) != state["fingerprint"].get(k)
            )
            raise CheckpointError(
                f"{path} was written by a run with a different config (differs in: {diff}); "
                "resume with the same config, or use a new hydra.run.dir"
            )
        params = state["params"]
        if isinstance(params, torch.Tensor) and params.is_floating_point():
            bad = int((~torch.isfinite(params)).sum())
            if bad:
                raise CheckpointError(
                    f"{path} holds {bad} non-finite parameter(s) of {params.numel()} (round "
                    f"{state['round']}): training from it gives only NaN; resume from a copy "
                    "saved before the run diverged, or start over in a new hydra.run.dir"
                )
        self.checkpoint_round = int(state["round"])
        return state

    # -- writing ---------------------------------------------------------------------------------
    def _atomic(self, name: str, data: bytes) -> None:
        """Replace ``name`` (relative to the run directory) with ``data``: temp file, fsync,
        rename, fsync of the directory."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_file(target.parent, f".{target.name}.")
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as err:
            self._raise_no_space(err, target)
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _raise_no_space(self, err: OSError, target: Path) -> None:
        """For a disk-full error writing ``target``: ``NoSpaceError`` saying which checkpoint is
        intact. Other errors: return (the caller re-raises them unchanged)."""
        cause = _NO_SPACE.get(err.errno or 0)
        if cause is None:
            return
        r = self.checkpoint_round
        if r is None and self.checkpoint_path.exists():
            try:
                r = int(torch.load(self.checkpoint_path, weights_only=True)["round"])
            except Exception:  # noqa: BLE001 - then say only that it is there
                r = None
        if r is not None:
            intact = f"the previous checkpoint (round {r}) is intact"
        elif self.checkpoint_path.exists():
            intact = "the previous checkpoint.pt is intact"
        else:
            intact = "no checkpoint had been written yet"
        raise NoSpaceError(
            f"{cause} on {self.path}: {intact} ({target.name} could not be written); free space, "
            "then continue with resume=true"
        ) from err

    # -- plots -----------------------------------------------------------------------------------
    def plot_curves(self, rows: list[dict[str, Any]] | None = None) -> Path | None:
        """curves.png: what the run is about (system/report.py plot_run)."""
        from flagstaff.system.report import plot_run

        try:
            return plot_run(self.path, rows)
        except OSError as err:  # a full disk: no torn image, and one line saying what is intact
            if err.errno in _NO_SPACE:
                (self.path / "curves.png").unlink(missing_ok=True)
                self._raise_no_space(err, self.path / "curves.png")
            raise


def finite_json(obj: Any) -> tuple[Any, list[str]]:
    """``obj`` as plain JSON values (tensors and numpy values converted), with every non-finite
    number replaced by None; returns it and the sorted keys (dotted paths) where that happened."""
    bad: set[str] = set()

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor) or (hasattr(x, "tolist") and not isinstance(x, str)):
            x = x.tolist()
        elif hasattr(x, "item") and not isinstance(x, (int, float, str)):
            x = x.item()
        if isinstance(x, float):
            if math.isfinite(x):
                return x
            bad.add(key)
            return None
        if isinstance(x, dict):
            return {str(k): walk(v, f"{key}.{k}" if key else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, key) for v in x]
        if x is None or isinstance(x, (bool, int, str)):
            return x
        return str(x)

    return walk(obj, ""), sorted(bad)


def _dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON; a dict with non-finite numbers gets them as null plus ``nonfinite``."""
    clean, bad = finite_json(obj)
    if bad and isinstance(clean, dict):
        clean["nonfinite"] = bad
    return json.dumps(clean, indent=indent, allow_nan=False)


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _temp_file(directory: Path, prefix: str) -> tuple[int, str]:
    """A temp file to rename over a run file, with the mode a plain ``open`` would give it
    (0666 minus the umask, as metrics.jsonl and Hydra's files get; mkstemp's is 0600, which made
    a run's summary, config and checkpoint unreadable to the group that shares its outputs)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _load_error(err: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` said about a file, short: a file it refuses gets
    only the refusal's reason (torch's text around it advises loading the file again with
    weights_only=False, or allowlisting its globals, which would run any code a corrupt or
    foreign file holds)."""
    text = _one_line(err)
    if text.startswith("Weights only load failed"):
        reason = re.sub(r"^.*?trusted source\.|Please file an issue.*?use case:", "", text)
        reason = reason.split("Check the documentation")[0].replace("WeightsUnpickler error:", "")
        first = reason.strip().split(". ")[0].rstrip(". ")
        return f"corrupt, or not saved by Flagstaff: {first or 'refused by torch.load'}"
    return f"{type(err).__name__}: {text[:160]}"
