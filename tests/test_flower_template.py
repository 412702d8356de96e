"""The Flower drop-in with an ordinary Flower app (issue 23 item 1).

A Flower 1.41 app laid out as ``flwr new``'s PyTorch template (``quickstart-pytorch``) is written
here: ``task.py`` (a small CNN, a partition of scikit-learn's digits instead of CIFAR-10, which
would need the network), ``client_app.py`` with the template's ``@app.train`` / ``@app.evaluate``
handlers (the trained ``state_dict`` in an ArrayRecord plus ``train_loss`` and ``num-examples`` in
a MetricRecord; no ``query`` handler, no client id) and ``server_app.py`` that builds a strategy
and calls ``strategy.start(...)``. The only change to the template is the one docs/flower.md
documents: its imports and its ``strategy = ...`` line, read from docs/flower.md here, replace
``FedAvg``. The app then runs to completion with the Flag Aggregator, and with Flag under a
model-poisoning attack, on Flower's simulation engine (``flwr run``) and on a SuperLink with
SuperNodes on this machine (the deployment of docs/flower.md, ``launch.flower_superlink``).
"""

from __future__ import annotations

import importlib
import random
import re
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import tomli  # flwr depends on it (tomllib needs Python 3.11)
import torch
from flwr.app import Context, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from flagstaff.clients.flower_app import vector_to_arrays
from flagstaff.strategies.aggregators import build
from flagstaff.strategies.attacks import SignFlip
from flagstaff.strategies.fedavg import FedAvg
from flagstaff.strategies.flower import FlagstaffStrategy
from tests.test_flower_example import wait_for_file

ROOT = Path(__file__).resolve().parent.parent

#: the template's package name (``flwr new`` derives it from the app name)
PACKAGE = "quickstart"

TASK_PY = '''\
"""quickstart: A Flower / PyTorch app."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset


class Net(nn.Module):
    """Model (a small CNN for 8x8 digits)"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.fc1 = nn.Linear(8 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = x.view(-1, 8 * 6 * 6)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class Digits(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"img": self.x[i], "label": self.y[i]}


def _digits():
    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = np.random.default_rng(42).permutation(len(y))
    return x[order], y[order]


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """Load partition digits data (the first 1500 samples, IID; 80% train, 20% test)."""
    x, y = _digits()
    idx = np.array_split(np.arange(1500), num_partitions)[partition_id]
    cut = int(0.8 * len(idx))
    trainloader = DataLoader(Digits(x[idx[:cut]], y[idx[:cut]]), batch_size=batch_size, shuffle=True)
    testloader = DataLoader(Digits(x[idx[cut:]], y[idx[cut:]]), batch_size=batch_size)
    return trainloader, testloader


def load_centralized_dataset():
    """Load test set and return dataloader."""
    x, y = _digits()
    return DataLoader(Digits(x[1500:], y[1500:]), batch_size=128)


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
'''

CLIENT_APP_PY = '''\
"""quickstart: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart.task import Net, load_data
from quickstart.task import test as test_fn
from quickstart.task import train as train_fn

# Flower ClientApp
app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""

    # Load the model and initialize it with the received weights
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load the data
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    batch_size = context.run_config["batch-size"]
    trainloader, _ = load_data(partition_id, num_partitions, batch_size)

    # Call the training function
    train_loss = train_fn(
        model,
        trainloader,
        context.run_config["local-epochs"],
        msg.content["config"]["lr"],
        device,
    )

    # Construct and return reply Message
    model_record = ArrayRecord(model.state_dict())
    metrics = {
        "train_loss": train_loss,
        "num-examples": len(trainloader.dataset),
    }
    metric_record = MetricRecord(metrics)
    content = RecordDict({"arrays": model_record, "metrics": metric_record})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on local data."""

    # Load the model and initialize it with the received weights
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load the data
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    batch_size = context.run_config["batch-size"]
    _, valloader = load_data(partition_id, num_partitions, batch_size)

    # Call the evaluation function
    eval_loss, eval_acc = test_fn(
        model,
        valloader,
        device,
    )

    # Construct and return reply Message
    metrics = {
        "eval_loss": eval_loss,
        "eval_acc": eval_acc,
        "num-examples": len(valloader.dataset),
    }
    metric_record = MetricRecord(metrics)
    content = RecordDict({"metrics": metric_record})
    return Message(content=content, reply_to=msg)
'''

#: the template's ServerApp; the two marked lines are what docs/flower.md replaces
SERVER_APP_PY = '''\
"""quickstart: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from quickstart.task import Net, load_centralized_dataset, test

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_evaluate: float = context.run_config["fraction-evaluate"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["learning-rate"]

    # Load global model
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize FedAvg strategy
    strategy = FedAvg(fraction_evaluate=fraction_evaluate)

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=global_evaluate,
    )

    # Save final model to disk
    print("\\nSaving final model to disk...")
    state_dict = result.arrays.to_torch_state_dict()
    torch.save(state_dict, "final_model.pt")


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Evaluate model on central data."""

    # Load the model and initialize it with the received weights
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load entire test set
    test_dataloader = load_centralized_dataset()

    # Evaluate the global model on the test set
    test_loss, test_acc = test(model, test_dataloader, device)

    # Return the evaluation metrics
    return MetricRecord({"accuracy": test_acc, "loss": test_loss})
'''

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "quickstart"
version = "1.0.0"
description = "flwr new's PyTorch template on digits"
license = "Apache-2.0"
dependencies = ["flwr[simulation]>=1.41,<2"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "flagstaff-test"

[tool.flwr.app.components]
serverapp = "quickstart.server_app:app"
clientapp = "quickstart.client_app:app"

[tool.flwr.app.config]
num-server-rounds = {rounds}
fraction-evaluate = 0.5
local-epochs = 2
learning-rate = 0.1
batch-size = 16
"""

_FEDAVG_IMPORT = "from flwr.serverapp.strategy import FedAvg\n"
_FEDAVG_LINE = "    strategy = FedAvg(fraction_evaluate=fraction_evaluate)\n"


def documented_lines() -> tuple[list[str], list[str]]:
    """docs/flower.md's drop-in block: (its import lines, its ``strategy = ...`` lines)."""
    text = (ROOT / "docs" / "flower.md").read_text()
    head = "## Use the Flag Aggregator in an existing Flower app"
    block = re.search(r"```python\n(.*?)```", text[text.index(head) :], re.S)
    assert block, f"docs/flower.md: no python block under {head!r}"
    lines = [ln for ln in block.group(1).splitlines() if ln and not ln.startswith("#")]
    imports = [ln for ln in lines if ln.startswith(("from ", "import "))]
    strategies = [ln.split("  #")[0] for ln in lines if ln.startswith("strategy = ")]
    return imports, strategies


def server_app_source(which: int, sizes: tuple[int, int] | None = None) -> str:
    """The template's ServerApp with docs/flower.md's lines in place of FedAvg: ``which``-th
    documented ``strategy = ...`` line; ``sizes`` (f, n) replaces the documented f=3, n=15."""
    imports, strategies = documented_lines()
    line = strategies[which]
    if sizes is not None:
        f, n = sizes
        line = line.replace("f=3, n=15", f"f={f}, n={n}").replace("f=3)", f"f={f})")
    src = SERVER_APP_PY
    assert _FEDAVG_IMPORT in src and _FEDAVG_LINE in src
    src = src.replace(_FEDAVG_IMPORT, "".join(f"{ln}\n" for ln in imports))
    return src.replace(_FEDAVG_LINE, textwrap.indent(line, "    ") + "\n")


def write_app(root: Path, server_app: str, rounds: int = 3) -> Path:
    """The app's folder (pyproject.toml + the package) under ``root``."""
    app = root / "quickstart-app"
    pkg = app / PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""quickstart: A Flower / PyTorch app."""\n')
    (pkg / "task.py").write_text(TASK_PY)
    (pkg / "client_app.py").write_text(CLIENT_APP_PY)
    (pkg / "server_app.py").write_text(server_app)
    (app / "pyproject.toml").write_text(PYPROJECT.format(rounds=rounds))
    return app


# -- node ids -> client ids ------------------------------------------------------------------------
def _plain_reply(node: int, model: torch.Tensor, n: int) -> Message:
    """A template ClientApp's train reply from node ``node``: the trained model and num-examples,
    no client id."""
    meta = Metadata(1, f"m{node}", node, 0, "ins", "", 0.0, 60.0, MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": vector_to_arrays(model, NAMES, SHAPES),
            "metrics": MetricRecord({"train_loss": 0.5, "num-examples": n}),
        }
    )
    return Message(content=content, metadata=meta)


NAMES, SHAPES = ("w", "b"), ((2, 3), (3,))


def test_64_bit_node_ids_map_to_client_ids_in_node_order() -> None:
    """Flower's node ids are unsigned 64-bit; without a ``client-id`` from the ClientApp the
    strategy numbers the nodes 0, 1, ... in node-id order (Python ints, no int64 array), sorts the
    round by those ids and attacks client id 0 (the Byzantine one). Failed before with
    ``OverflowError: Python int too large to convert to C long``."""
    nodes = [2**64 - 1, 2**63, 5, 2**63 + 7]
    s = FlagstaffStrategy(build(rule="mean"), FedAvg(), attack=SignFlip(f=1))
    x0 = torch.zeros(9)
    s.initialize(vector_to_arrays(x0, NAMES, SHAPES))
    assert s.client_ids(nodes) == {5: 0, 2**63: 1, 2**63 + 7: 2, 2**64 - 1: 3}
    assert s.client_ids([2**63 + 1]) == {2**63 + 1: 4}  # a later node: the next id, others kept
    U = {5: torch.full((9,), 1.0), 2**63: torch.full((9,), 2.0)}
    U[2**63 + 7], U[2**64 - 1] = torch.full((9,), 3.0), torch.full((9,), 4.0)
    s._sent = 4
    replies = [_plain_reply(n, x0 + U[n], 10) for n in reversed(nodes)]
    s.aggregate_train(1, replies)
    honest = torch.stack([U[2**63], U[2**63 + 7], U[2**64 - 1]])
    crafted = SignFlip(f=1)(honest, generator=torch.Generator().manual_seed(0))[0]
    expected = (crafted + honest.sum(0)) / 4  # client 0 (node 5) replaced by the attack
    assert torch.allclose(s.params, expected, atol=1e-6)


# -- running the app ---------------------------------------------------------------------------------
def run_config(app: Path) -> dict:
    """The app's ``[tool.flwr.app.config]`` (what ``flwr run`` gives its Context)."""
    return tomli.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


class InProcessGrid(Grid):
    """Flower's ``Grid`` interface over SuperNodes in this process: every message goes to the real
    ClientApp with its node's Context (``partition-id``, ``num-partitions``, the run config, a
    state kept across rounds); a ClientApp that raises answers with an error reply, as Flower's
    engines do. Node ids are random unsigned 64-bit integers, as Flower's LinkState draws them.
    The fast stand-in for the simulation engine (no Ray); the slow tests run the real ones."""

    def __init__(self, client_app: ClientApp, num_nodes: int, config: dict, seed: int) -> None:
        rng = random.Random(seed)
        self.app = client_app
        self.contexts = {}
        while len(self.contexts) < num_nodes:
            node = rng.getrandbits(64) or 1
            part = {"partition-id": len(self.contexts), "num-partitions": num_nodes}
            self.contexts[node] = Context(1, node, part, RecordDict(), dict(config))
        self.sent: Counter[str] = Counter()
        self._replies: dict[str, Message] = {}

    @property
    def run(self):  # noqa: D102 - not needed by Strategy.start
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            self.sent[msg.metadata.message_type] += 1
            node = msg.metadata.dst_node_id
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - an error reply, as Flower's engines send
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(app: Path, num_nodes: int, seed: int = 0) -> InProcessGrid:
    """The app's ServerApp on an :class:`InProcessGrid` of ``num_nodes`` nodes (cwd: the app's
    parent, where the template saves final_model.pt)."""
    sys.path.insert(0, str(app))
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    # what Flower's ServerApp process sets before the app creates messages
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one CPU per node, as Flower's simulation gives each ClientApp
    try:
        server = importlib.import_module(f"{PACKAGE}.server_app")
        client = importlib.import_module(f"{PACKAGE}.client_app")
        config = run_config(app)
        grid = InProcessGrid(client.app, num_nodes, config, seed)
        server.app(grid=grid, context=Context(1, 0, {}, RecordDict(), dict(config)))
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved
        torch.set_num_threads(threads)
        sys.path.remove(str(app))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]
    return grid


def final_accuracy(root: Path, app: Path) -> float:
    """Accuracy of the template's saved final model on its central test set."""
    sys.path.insert(0, str(app))
    try:
        task = importlib.import_module(f"{PACKAGE}.task")
        net = task.Net()
        net.load_state_dict(torch.load(root / "final_model.pt"))
        return task.test(net, task.load_centralized_dataset(), "cpu")[1]
    finally:
        sys.path.remove(str(app))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


@pytest.mark.parametrize("which", [0, 1], ids=["flag", "flag_under_alie"])
def test_template_app_runs_with_the_documented_lines_in_process(
    tmp_path, monkeypatch, which
) -> None:
    """15 nodes with random 64-bit ids, 3 rounds; failed before with the query round's error
    replies and ``OverflowError`` (node ids in an int64 array)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    app = write_app(tmp_path, server_app_source(which))
    grid = run_in_process(app, 15)
    assert grid.sent[MessageType.QUERY] == 0  # no message an ordinary ClientApp cannot answer
    assert grid.sent[MessageType.TRAIN] == 3 * 15
    if which == 0:  # fraction_evaluate=0.5 of the template: federated evaluation ran
        assert grid.sent[MessageType.EVALUATE] == 3 * 7
    assert final_accuracy(tmp_path, app) > 0.5


# -- the real engines (slow) -------------------------------------------------------------------------
def _learned(root: Path, app: Path, logs: str) -> None:
    """The run saved its final model and the model learned (the initial one is at chance)."""
    assert (root / "final_model.pt").exists(), logs[-4000:]
    assert final_accuracy(root, app) > 0.5, logs[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1], ids=["flag", "flag_under_alie"])
def test_template_app_on_flowers_simulation_engine(tmp_path, which) -> None:
    """``flwr run`` of the template app with the documented lines, 15 SuperNodes on Flower's
    simulation engine (Ray); failed before with ``OverflowError`` after the query's error replies."""
    from tests.test_flower_example import BIN, flwr_env, free_port, kill_trees, pids_with

    app = write_app(tmp_path, server_app_source(which))
    http, control = free_port(), free_port()
    env = flwr_env(
        tmp_path / "flwr",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http),
        FLWR_LOCAL_CONTROL_API_PORT=str(control),
    )
    cmd = [str(BIN / "flwr"), "run", str(app), "--stream", "--federation-config"]
    cmd += ["num-supernodes=15 client-resources-num-cpus=1"]
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
    finally:  # the managed SuperLink outlives `flwr run`
        kill_trees(pids_with(str(tmp_path / "flwr")) + pids_with(f"127.0.0.1:{http}"))
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "[ROUND 3/3]" in logs, logs[-4000:]
    assert "OverflowError" not in logs and "No query function" not in logs, logs[-4000:]
    if which == 1:
        assert "on client ids [0, 1, 2]" in logs, logs[-4000:]  # the attack was on
    _learned(tmp_path, app, logs)


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1], ids=["flag", "flag_under_alie"])
def test_template_app_on_a_superlink_with_supernodes(tmp_path, which) -> None:
    """The deployment of docs/flower.md on this machine (``launch.flower_superlink``: TLS,
    SuperNode authentication), 4 admitted SuperNodes, ``flwr run <app> deploy``: the template app
    with the documented lines, f=1 of n=4."""
    from tests.test_flower_deployment import Deployment, make_node_key

    n = 4
    app = write_app(tmp_path, server_app_source(which, sizes=(1, n)))
    (tmp_path / "deploy").mkdir()
    d = Deployment(tmp_path / "deploy")  # certificates, CLI homes, logs; the SuperLink's cwd
    try:
        d.start_superlink()
        keys = [make_node_key(d.d, f"node{i}") for i in range(n)]
        admitted = {d.admit(pub) for _, pub in keys}
        for i, (priv, _) in enumerate(keys):
            d.supernode(f"node{i}", priv, i, node_config=f"partition-id={i} num-partitions={n}")
        t_end = time.monotonic() + 180
        while {k for k, s in d.nodes().items() if s == "online"} != admitted:
            assert time.monotonic() < t_end, f"nodes not online: {d.nodes()}"
            time.sleep(1.0)
        logs = d.operator(["run", str(app), "deploy", "--stream"], timeout=600)
        wait_for_file(d.d / "final_model.pt", 120, logs)
    finally:
        d.close()
    assert "[ROUND 3/3]" in logs and "OverflowError" not in logs, logs[-4000:]
    if which == 1:
        assert "on client ids [0]" in logs, logs[-4000:]
    _learned(d.d, app, logs)
