"""Ends every process of a local Ray when the process that started it ends (Linux).

Ray fate-shares its GCS, raylet and workers with the driver, but when the driver is killed its
dashboard and runtime-env agents first try to report the raylet's death to the GCS, which is already
gone, and wait in that call for Ray's GCS reconnect timeout (60 s by default, minutes on a loaded
machine). So ``system.ray_start`` starts this script before ``ray.init``, with a pipe from the driver
on its stdin, and sends it the Ray session directory once Ray is up (a line ``session <dir>``).
When the pipe closes (the driver shut Ray down, exited or was killed) the script ends every process
of that Ray, and exits. A process of that Ray is one of this user's processes (never the driver)
that

- carries ``FLAGSTAFF_RAY_RUN=<tag>`` in its environment: the driver sets it only while
  ``ray.init`` starts the GCS, raylet and monitors, and the raylet passes it to the workers; or
- names the session directory on its command line (GCS, raylet, monitors, dashboard); or
- renamed itself ``ray...`` (Ray's agents and dashboard modules rewrite their command line and
  environment) and holds a file open in the session directory (its logs).

Run as a file (``python -I ray_watchdog.py TAG``): it imports only the standard library.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterable

#: environment variable that marks the processes of one local Ray
TAG_VAR = "FLAGSTAFF_RAY_RUN"


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # the process ended meanwhile, or it is not ours
        return b""


def _holds_file_in(pid: str, dirs: list[str]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if any(target.startswith(d) for d in dirs):
            return True
    return False


def members(tag: str, sessions: Iterable[str] = (), exclude: Iterable[int] = ()) -> list[int]:
    """PIDs of this user's live processes that belong to the Ray tagged ``tag`` whose session
    directories are ``sessions`` (see the module docstring); never this process or ``exclude``.
    A zombie has no environment or command line left, so it is not listed."""
    entry = f"{TAG_VAR}={tag}".encode()
    dirs = [os.path.join(os.path.realpath(s), "") for s in sessions]
    skip = {os.getpid(), *exclude}
    uid = os.getuid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
        except OSError:
            continue
        if entry in _read(f"/proc/{name}/environ").split(b"\0"):
            found.append(int(name))
            continue
        cmdline = _read(f"/proc/{name}/cmdline")
        if any(d.encode() in cmdline for d in dirs) or (
            cmdline.startswith(b"ray") and _holds_file_in(name, dirs)
        ):
            found.append(int(name))
    return found


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def end_members(
    tag: str,
    sessions: Iterable[str] = (),
    exclude: Iterable[int] = (),
    grace_s: float = 1.0,
    passes: int = 5,
) -> int:
    """SIGTERM every member of the Ray (``members``), SIGKILL those still there after
    ``grace_s``; repeat while new ones appear (a raylet may start a worker meanwhile). Returns how
    many processes were signalled."""
    sessions, exclude = list(sessions), list(exclude)
    signalled: set[int] = set()
    for _ in range(passes):
        pids = members(tag, sessions, exclude)
        if not pids:
            break
        signalled.update(pids)
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in members(tag, sessions, exclude) if p in pids]
        _signal(pids, signal.SIGKILL)
    return len(signalled)


def main(argv: list[str]) -> int:
    """Read ``session <dir>`` lines from stdin until it closes, then end the Ray's processes."""
    if len(argv) != 2 or not argv[1]:
        print("usage: ray_watchdog.py TAG (stdin: a pipe from the driver)", file=sys.stderr)
        return 2
    driver = os.getppid()
    # a Ctrl-C or hang-up meant for the driver must not stop the clean-up after it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sessions = []
    for line in sys.stdin.buffer:
        kind, _, value = line.decode(errors="replace").strip().partition(" ")
        if kind == "session" and value:
            sessions.append(value)
    end_members(argv[1], sessions, exclude=[driver])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
