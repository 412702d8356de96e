"""A Flower SuperLink whose Control and Runtime APIs answer on loopback only; SuperNodes get a
separate address that serves nothing but the Fleet API.

    python -m launch.flower_superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem \\
        --ssl-keyfile server.key --enable-supernode-auth \\
        --host 127.0.0.1 --port 9093 --fleet-host 0.0.0.0 --fleet-port 9092

Why (issue 19 item 2): flwr 1.41 serves its Control API (register SuperNode keys, start runs),
its Runtime API (ServerApp tasks) and its Fleet API (SuperNodes) on one HTTPS port
(``flower-superlink --host/--port``; ``--control-api-address`` is deprecated and ignored), and the
open-source build authenticates no Control API caller (``NoOpControlAuthnPlugin``; OIDC accounts
exist only in Flower Enterprise). Anyone who can reach the port a SuperNode connects to, with just
the CA certificate, can therefore ``flwr supernode register`` a key of their own and join the
federation, which defeats ``--enable-supernode-auth``.

This runs Flower's own SuperLink (``flwr.superlink.main.create_app`` and ``SuperLinkLifespan``, all
``flower-superlink`` options) on two listeners in one process, both with the SuperLink's TLS
certificate: ``--host/--port`` (must be a loopback address) serves every API to the operator's
``flwr`` CLI and to the SuperExec on this machine; ``--fleet-host/--fleet-port`` serves only the
Fleet API's routes (every other path answers 404). SuperNode authentication and TLS are required.
Operator's steps: docs/flower.md, "Deployment".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from logging import INFO
from pathlib import Path
from typing import Any, NoReturn

import uvicorn

#: flower-superlink's defaults for the public (SuperNode) listener of this launcher
FLEET_HOST, FLEET_PORT = "0.0.0.0", 9092
_PROG = "python -m launch.flower_superlink"
_NOT_FLEET = b"Not Found: this address serves only the Flower Fleet API (SuperNodes)"

Asgi = Callable[[dict[str, Any], Any, Any], Any]


class FleetOnly:
    """ASGI app that passes the Fleet API's routes (exact POST paths) to the SuperLink app and
    answers 404 to everything else: Control API, Runtime API, OpenAPI docs."""

    def __init__(self, app: Asgi, paths: frozenset[str]) -> None:
        self.app, self.paths = app, paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            headers = [
                (b"content-type", b"text/plain"),
                (b"content-length", b"%d" % len(_NOT_FLEET)),
            ]
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": _NOT_FLEET})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to the caller (two servers share one event loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _fail(message: str) -> NoReturn:
    print(f"{_PROG}: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_args(ours: argparse.Namespace, flwr_args: argparse.Namespace) -> None:
    """Refuse, in one line each and before any work, a SuperLink a stranger could join."""
    if not _is_loopback(flwr_args.host):
        _fail(
            f"--host {flwr_args.host} would expose the Control API (anyone could register a "
            "SuperNode key) and the Runtime API; keep --host 127.0.0.1 and give SuperNodes "
            "--fleet-host/--fleet-port"
        )
    if flwr_args.insecure or not (
        flwr_args.ssl_certfile and flwr_args.ssl_keyfile and flwr_args.ssl_ca_certfile
    ):
        _fail(
            "TLS is required: pass --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile (a server "
            "certificate valid for 127.0.0.1 and the SuperNodes' address), not --insecure"
        )
    for opt in ("ssl_ca_certfile", "ssl_certfile", "ssl_keyfile"):
        if not Path(getattr(flwr_args, opt)).expanduser().is_file():
            path = getattr(flwr_args, opt)
            _fail(f"--{opt.replace('_', '-')} {path} is not a file; give the path of a PEM file")
    if not flwr_args.enable_supernode_auth:
        _fail(
            "--enable-supernode-auth is required: without it any SuperNode that reaches "
            "--fleet-host registers itself"
        )
    if flwr_args.simulation:
        _fail("--simulation has no SuperNodes to serve; run flower-superlink --simulation instead")
    if not 1 <= ours.fleet_port <= 65535 or ours.fleet_port == flwr_args.port:
        _fail(f"--fleet-port {ours.fleet_port} must be a free port other than --port")


def _listen(host: str, port: int) -> socket.socket:
    """A bound listening socket, or one clear line saying why there is none."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        _fail(f"cannot listen on {host}:{port} ({err.strerror}); choose another host or port")
    sock.listen(2048)
    return sock


async def _serve(servers: Sequence[tuple[uvicorn.Server, socket.socket]]) -> None:
    """Run the servers until a signal or until one of them stops; then stop all of them."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server, _ in servers:
            server.force_exit = server.should_exit
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(s.serve(sockets=[sock])) for s, sock in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server, _ in servers:
        server.should_exit = True
    await asyncio.gather(*tasks)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse and check the options, bind both listeners, then serve Flower's SuperLink app."""
    import flwr

    if not flwr.__version__.startswith("1.41."):
        _fail(f"written against flwr 1.41 (found {flwr.__version__}); install -c constraints.txt")
    from flwr.supercore import log
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_args_run_superlink,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app
    from flwr.superlink.routers.fleet.router import router as fleet_router

    parser = argparse.ArgumentParser(
        prog=_PROG, description=__doc__.split("\n\n")[0], add_help=False
    )
    parser.add_argument("--fleet-host", default=FLEET_HOST, help="address SuperNodes connect to")
    parser.add_argument("--fleet-port", type=int, default=FLEET_PORT, help="its port")
    ours, rest = parser.parse_known_args(argv)
    if any(a in ("-h", "--help") for a in rest):
        parser.print_help()
        print("\nAll other options are flower-superlink's:")
    flwr_args = _parse_args_run_superlink().parse_args(rest)
    check_args(ours, flwr_args)
    private = _listen(flwr_args.host, flwr_args.port)
    public = _listen(ours.fleet_host, ours.fleet_port)

    if shutil.which("flower-superexec") is None:  # the SuperLink starts it by name
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    sys.argv = ["flower-superlink", *rest]  # flwr reads its options (and explicit ones) there
    config = _parse_superlink_lifespan_config()
    app = create_app(config, SuperLinkLifespan)
    fleet_paths = frozenset(r.path for r in fleet_router.routes)
    common = {
        "ssl_keyfile": config.ssl_keyfile,
        "ssl_certfile": config.ssl_certfile,
        "log_config": get_uvicorn_log_config(console_handler.level),
        "access_log": True,
        "timeout_graceful_shutdown": 10,
    }
    log(INFO, "Control, Runtime, Fleet APIs (this machine only): %s:%s", config.host, config.port)
    log(INFO, "Fleet API only (SuperNodes): %s:%s", ours.fleet_host, ours.fleet_port)
    servers = [
        (_Server(uvicorn.Config(app, host=config.host, port=config.port, **common)), private),
        (
            _Server(
                uvicorn.Config(
                    FleetOnly(app, fleet_paths),
                    host=ours.fleet_host,
                    port=ours.fleet_port,
                    lifespan="off",
                    **common,
                )
            ),
            public,
        ),
    ]
    asyncio.run(_serve(servers))
    if not all(server.started for server, _ in servers):
        raise SystemExit(1)  # uvicorn or the SuperLink's lifespan logged why


if __name__ == "__main__":
    main()
