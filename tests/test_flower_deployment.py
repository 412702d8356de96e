"""Flower's deployment engine on this machine, attacked by a stranger: a real SuperLink with TLS and
SuperNode authentication, SuperNodes admitted by the operator, and an intruder who has only the CA
certificate (what every SuperNode is given) and the address SuperNodes connect to.

The intruder (a) runs ``flwr supernode register intruder.pub`` against every address of the
deployment it can reach, and (b) starts a SuperNode with its own key. Neither may work: the node
must never be listed as online by the operator's Control API and must receive no task (its
ClientApp process would leave a marker file). A SuperNode whose key nobody registered is refused as
well (``ApiError 2004``).

flwr 1.41: with ``--enable-supernode-auth`` the SuperLink disables self-registration; SuperNode
public keys (OpenSSH, NIST EC curve) are registered through the Control API with
``flwr supernode register <public-key> <connection>``, and each SuperNode signs its requests with
``--auth-supernode-private-key`` (OpenSSH private key). Certificates (a CA and a server certificate
for 127.0.0.1/localhost and this machine's address) are generated here with ``cryptography``.
Every wait is bounded, and all processes are killed at the end.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flagstaff.launch import flower_superlink
from tests.test_flower_example import BIN, ROOT, flwr_env, free_port, kill_trees, wait_for_file

#: the ClientApp process of a SuperNode is ``flwr-clientapp``: on the intruder's machine it leaves
#: a marker (a sitecustomize on the intruder's PYTHONPATH), so a task that reached it is visible
_MARKER_SITECUSTOMIZE = """\
import os, sys
if sys.argv and os.path.basename(sys.argv[0]) == "flwr-clientapp":
    with open(os.environ["INTRUDER_MARKER"], "a") as f:
        f.write(" ".join(sys.argv) + "\\n")
"""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_tls(d: Path, ips: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1, localhost and ``ips``."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("flagstaff-test-ca"))
        .issuer_name(_name("flagstaff-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.DNSName("localhost")] + [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", *ips)
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = d / "ca.crt", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def make_node_key(d: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format (what flwr 1.41 SuperNodes use)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / name, d / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return priv, pub


def public_ipv4() -> str | None:
    """A non-loopback IPv4 address of this machine (what a remote stranger would connect to)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    return None


def _wait_port(host: str, port: int, timeout: float) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def _connection(home: Path, name: str, address: str, ca: Path) -> dict[str, str]:
    """A Flower CLI home whose only SuperLink connection is ``name`` -> ``address`` (TLS, CA)."""
    env = flwr_env(home)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "{address}"\nroot-certificates = "{ca}"\n'
    )
    return env


class Deployment:
    """A SuperLink as docs/flower.md deploys it, the operator's CLI, and a stranger's CLI."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.public = public_ipv4() or "127.0.0.1"  # where SuperNodes (and strangers) connect
        self.ca, self.cert, self.key = make_tls(d, (self.public,) if self.public else ())
        self.fleet_port, self.control_port = free_port(), free_port()
        self.logs = d / "logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.operator_env = _connection(
            d / "operator", "deploy", f"127.0.0.1:{self.control_port}", self.ca
        )
        # the stranger has the CA certificate and the SuperNodes' address, nothing else
        self.stranger_env = _connection(
            d / "stranger", "stranger", f"{self.public}:{self.fleet_port}", self.ca
        )

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None):
        out = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=env or self.operator_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.d,
        )
        self.procs.append(p)
        return p

    def start_superlink(self) -> None:
        """launch/flower_superlink.py: Control and Runtime APIs on loopback, Fleet API public."""
        self.start(
            "superlink",
            [
                "python",
                "-m",
                "flagstaff.launch.flower_superlink",
                "--ssl-ca-certfile",
                str(self.ca),
                "--ssl-certfile",
                str(self.cert),
                "--ssl-keyfile",
                str(self.key),
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.control_port),
                "--fleet-host",
                self.public,
                "--fleet-port",
                str(self.fleet_port),
            ],
        )
        _wait_port(self.public, self.fleet_port, 60)
        _wait_port("127.0.0.1", self.control_port, 60)

    def supernode(
        self, name: str, priv: Path, partition: int, env: dict[str, str] | None = None, **kw: str
    ) -> subprocess.Popen:
        args = [
            "flower-supernode",
            "--superlink",
            f"{self.public}:{self.fleet_port}",
            "--root-certificates",
            str(self.ca),
            "--auth-supernode-private-key",
            str(priv),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--node-config",
            f"partition-id={partition} num-partitions=2",
        ]
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", v]
        return self.start(name, args, env)

    def flwr(self, args: list[str], env: dict[str, str], timeout: float = 120):
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    def operator(self, args: list[str], timeout: float = 120) -> str:
        """``flwr <args> deploy`` as the operator; must succeed."""
        proc = self.flwr(args, self.operator_env, timeout)
        assert proc.returncode == 0, f"flwr {args[:2]} failed:\n{proc.stdout[-2000:]}{proc.stderr}"
        return proc.stdout

    def admit(self, pub: Path) -> str:
        """Register a SuperNode's public key as the operator; its node id."""
        out = self.operator(["supernode", "register", str(pub), "deploy", "--format", "json"])
        return str(json.loads(out)["node-id"])

    def nodes(self) -> dict[str, str]:
        """node id -> status, from the operator's Control API."""
        out = self.operator(["supernode", "ls", "deploy", "--format", "json"])
        return {n["node-id"]: n["status"] for n in json.loads(out)["nodes"]}

    def close(self) -> None:
        kill_trees([p.pid for p in self.procs])


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path)
    try:
        d.start_superlink()
        yield d
    finally:
        d.close()


def _intruder_env(d: Deployment) -> dict[str, str]:
    """The stranger's environment, with a marker that records any ClientApp started there."""
    site = d.d / "intruder_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_MARKER_SITECUSTOMIZE)
    return {
        **d.stranger_env,
        "PYTHONPATH": str(site),
        "INTRUDER_MARKER": str(d.d / "intruder_clientapp_called"),
    }


def _stranger_attacks(d: Deployment, pub: Path) -> dict[str, str]:
    """(a) ``flwr supernode register`` with only the CA certificate, on every address the stranger
    can reach from outside (the SuperNodes' address; the Control API's port on this machine's
    external address), plus raw requests for the Runtime API and the API docs on the SuperNodes'
    address. What each attempt got back (must be a refusal, never a registration)."""
    out = {}
    proc = d.flwr(["supernode", "register", str(pub), "stranger"], d.stranger_env)
    out["register@fleet"] = f"rc={proc.returncode} {proc.stdout}{proc.stderr}"
    if d.public != "127.0.0.1":
        env = _connection(d.d / "stranger2", "s2", f"{d.public}:{d.control_port}", d.ca)
        proc = d.flwr(["supernode", "register", str(pub), "s2"], env)
        out["register@control-port"] = f"rc={proc.returncode} {proc.stdout}{proc.stderr}"
    with httpx.Client(verify=ssl.create_default_context(cafile=d.ca), timeout=30) as http:
        base = f"https://{d.public}:{d.fleet_port}"
        out["runtime@fleet"] = str(http.post(f"{base}/v1/runtime/acquire-task").status_code)
        out["docs@fleet"] = str(http.get(f"{base}/docs").status_code)
    return out


def _replay_admitted_key(d: Deployment, pub: Path, node_id: str, own_key: Path) -> list[int]:
    """The stranger knows an admitted node's public key and id (public keys are not secret) but
    not its private key: it claims that key on the Fleet API, signing with a key of its own, to
    activate the node and to pull the node's messages. The HTTP status of each attempt."""
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    claimed = public_key_to_bytes(serialization.load_ssh_public_key(pub.read_bytes()))
    signer = serialization.load_ssh_private_key(own_key.read_bytes(), password=None)
    requests = {
        "activate-node": ActivateNodeRequest(public_key=claimed, heartbeat_interval=30),
        "pull-messages": PullMessagesRequest(node=Node(node_id=int(node_id))),
    }
    codes = []
    with httpx.Client(verify=ssl.create_default_context(cafile=d.ca), timeout=30) as http:
        for route, request in requests.items():
            stamp = dt.datetime.now(dt.timezone.utc).isoformat()
            headers = {
                "content-type": "application/protobuf",
                "flwr-public-key": base64.b64encode(claimed).decode(),
                "flwr-timestamp": stamp,
                "flwr-signature": base64.b64encode(sign_message(signer, stamp.encode())).decode(),
            }
            url = f"https://{d.public}:{d.fleet_port}/v1/fleet/{route}"
            codes.append(http.post(url, content=request.SerializeToString(), headers=headers))
    return [c.status_code for c in codes]


def _assert_refused(attempts: dict[str, str]) -> None:
    assert "rc=1" in attempts["register@fleet"] and "404" in attempts["register@fleet"], attempts
    if "register@control-port" in attempts:
        assert "rc=1" in attempts["register@control-port"], attempts
        assert "unavailable" in attempts["register@control-port"], attempts
    assert attempts["runtime@fleet"] == attempts["docs@fleet"] == "404", attempts


def _watch_intruder(
    d: Deployment, intruder: subprocess.Popen, admitted: set[str], timeout: float
) -> set[str]:
    """Poll the operator's node list until the admitted nodes are online and the intruder's
    SuperNode has given up (or ``timeout``); every node id ever seen online that the operator did
    not admit."""
    strangers: set[str] = set()
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        nodes = d.nodes()
        strangers |= {n for n, s in nodes.items() if s == "online" and n not in admitted}
        online = {n for n, s in nodes.items() if s == "online"}
        if admitted <= online and (intruder.poll() is not None or strangers):
            break
        time.sleep(1.0)
    return strangers


def test_stranger_with_the_ca_cert_cannot_register_or_join(deployment, tmp_path) -> None:
    d = deployment
    node0 = make_node_key(tmp_path, "node0")
    intruder = make_node_key(tmp_path, "intruder")
    admitted = {d.admit(node0[1])}

    attempts = _stranger_attacks(d, intruder[1])
    replayed = _replay_admitted_key(d, node0[1], next(iter(admitted)), intruder[0])
    env = _intruder_env(d)
    intr = d.supernode("intruder", intruder[0], 0, env, max_retries="1", max_wait_time="20")
    d.supernode("node0", node0[0], 0)
    strangers = _watch_intruder(d, intr, admitted, timeout=120)
    nodes = d.nodes()
    code = intr.poll()
    log = (d.logs / "intruder.log").read_text()

    _assert_refused(attempts)
    assert replayed == [401, 401], replayed  # Flower: "Invalid SuperNode authentication"
    assert not strangers, f"nodes the operator never admitted were online: {strangers}"
    assert set(nodes) == admitted and nodes[next(iter(admitted))] == "online", nodes
    assert code is not None and code != 0, log[-2000:]
    assert "Receiving:" not in log and not Path(env["INTRUDER_MARKER"]).exists()


@pytest.mark.slow
def test_two_admitted_nodes_train_while_an_intruder_and_an_unknown_key_are_refused(
    deployment, tmp_path
) -> None:
    d = deployment
    keys = [make_node_key(tmp_path, f"node{i}") for i in range(2)]
    admitted = {d.admit(pub) for _, pub in keys}
    intruder = make_node_key(tmp_path, "intruder")
    unknown = make_node_key(tmp_path, "unknown")  # nobody ever registers this key

    attempts = _stranger_attacks(d, intruder[1])
    env = _intruder_env(d)
    intr = d.supernode("intruder", intruder[0], 0, env, max_retries="2", max_wait_time="30")
    for i, (priv, _) in enumerate(keys):
        d.supernode(f"node{i}", priv, i)
    strangers = _watch_intruder(d, intr, admitted, timeout=120)

    result = tmp_path / "result.json"
    d.operator(
        [
            "run",
            str(ROOT / "examples" / "flower_flag"),
            "deploy",
            "--stream",
            "--run-config",
            f"num-server-rounds=2 num-clients=2 attack='none' byzantine=0 result-file='{result}'",
        ],
        timeout=600,
    )
    wait_for_file(result, 120)
    out = json.loads(result.read_text())

    # a SuperNode whose key the SuperLink does not know is refused and gives up
    stray = d.supernode("unknown", unknown[0], 1, max_retries="2", max_wait_time="30")
    try:
        stray_code = stray.wait(timeout=120)
    except subprocess.TimeoutExpired:
        stray_code = None
    nodes = d.nodes()
    intruder_log = (d.logs / "intruder.log").read_text()

    _assert_refused(attempts)
    assert not strangers, f"nodes the operator never admitted were online: {strangers}"
    assert sorted(int(r) for r in out["train"]) == [1, 2]
    assert all(t["clients"] == 2 and t["dropped_failed"] == 0 for t in out["train"].values())
    assert out["accuracy"]["2"]["accuracy"] > out["accuracy"]["0"]["accuracy"]
    assert "Receiving:" not in intruder_log and not Path(env["INTRUDER_MARKER"]).exists()
    assert stray_code is not None and stray_code != 0, (d.logs / "unknown.log").read_text()[-2000:]
    assert set(nodes) == admitted, nodes  # the Control API knows only the two admitted nodes


@pytest.mark.parametrize(
    "change, words",
    [
        ({"--host": "0.0.0.0"}, "--host 0.0.0.0 would expose the Control API"),
        ({"--enable-supernode-auth": None}, "--enable-supernode-auth is required"),
        ({"--ssl-keyfile": None}, "TLS is required"),
        ({"--insecure": ""}, "TLS is required"),
        ({"--ssl-certfile": "missing.pem"}, "--ssl-certfile missing.pem is not a file"),
        ({"--fleet-port": "PORT"}, "must be a free port other than --port"),
    ],
)
def test_launcher_refuses_a_superlink_a_stranger_could_join(tmp_path, capsys, change, words):
    """One line naming the option and the fix, exit code 2, nothing bound."""
    ca, cert, key = make_tls(tmp_path)
    port = free_port()
    opts = {
        "--ssl-ca-certfile": str(ca),
        "--ssl-certfile": str(cert),
        "--ssl-keyfile": str(key),
        "--enable-supernode-auth": "",
        "--host": "127.0.0.1",
        "--port": str(port),
        "--fleet-host": "127.0.0.1",
        "--fleet-port": str(free_port()),
    }
    for k, v in change.items():
        opts[k] = str(port) if v == "PORT" else v
    argv = [a for k, v in opts.items() if v is not None for a in ([k, v] if v else [k])]
    with pytest.raises(SystemExit) as exc:
        flower_superlink.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and words in err, err
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the Control API's port was never taken


def test_launcher_says_which_port_is_taken(tmp_path, capsys):
    ca, cert, key = make_tls(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        argv = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile"]
        argv += [str(key), "--enable-supernode-auth", "--port", str(free_port())]
        argv += ["--fleet-host", "127.0.0.1", "--fleet-port", str(busy)]
        with pytest.raises(SystemExit) as exc:
            flower_superlink.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and f"cannot listen on 127.0.0.1:{busy}" in err, err
