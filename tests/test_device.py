"""GPU-ready hosts on a machine without a GPU (issue 22 item 5): the device plumbing runs on
torch's ``meta`` device (tensors with shapes and no data: any CPU tensor that meets one raises), the
tensors a host round creates are made on the host's device (factory calls recorded with a
TorchFunctionMode), and ``cluster.gpus_per_host`` without GPUs is refused before any work."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from flagstaff.clients.models import build_model
from flagstaff.clients.plan import make_plan
from flagstaff.clients.trainer import LocalSGD, ParamSpec
from flagstaff.system.build import build_from, build_run, check_gpus, client_host
from flagstaff.system.config import ConfigError, to_plain
from flagstaff.system.host import HostShard, host_device, local_host_device, visible_index
from tests.conftest import compose

ROOT = Path(__file__).resolve().parents[1]
# these tests check the refusal where torch sees no GPU; on a machine with one the refusal cannot happen
NO_GPU = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the no-GPU refusal; torch sees a GPU on this machine"
)


def _shard(n_clients: int = 4, per: int = 10, shape=(64,), seed: int = 0) -> HostShard:
    g = torch.Generator().manual_seed(seed)
    sizes = np.array([per + k for k in range(n_clients)], dtype=np.int64)  # unequal step counts
    n = int(sizes.sum())
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    return HostShard(np.arange(n_clients), np.cumsum(sizes) - sizes, sizes, x, y)


def _plain(*overrides: str) -> dict:
    return to_plain(compose("experiment=smoke", *overrides))


# -- the trainer's round on the meta device -----------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_round_runs_on_the_hosts_device(kind) -> None:
    """Everything the trainer makes meets the data on the host's device: a CPU tensor among
    meta ones raises, so a round that completes on ``meta`` created nothing on the CPU that
    took part in its arithmetic (the MLP through vmap, the CNN through its stacked layers)."""
    shape = (64,) if kind == "mlp" else (1, 8, 8)
    shard = _shard(shape=shape)
    model = build_model(kind, shape, 10, hidden=(16,), seed=0).to("meta")
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)  # as on a host: parameters are passed functionally
    rule = build_from(_plain("strategy=scaffold")["strategy"]).client_rule
    meta = torch.device("meta")
    plan = make_plan(shard.offsets, shard.sizes, shard.client_ids, 4, 0, 0, device=meta)
    tr = LocalSGD(lr=0.05, momentum=0.9, weight_decay=1e-3, grad_clip=1.0)
    K, d = len(shard.sizes), spec.numel
    res = tr.train(
        model,
        spec,
        torch.zeros(d, device=meta),
        shard.x.to(meta),
        shard.y.to(meta),
        plan,
        10,
        torch.as_tensor(shard.sizes),
        rule=rule,
        state={n: torch.zeros(K, d, device=meta) for n in rule.client_state},
        broadcast={"c": torch.zeros(d, device=meta)},  # SCAFFOLD's server control variate
    )
    tensors = [res.updates, res.weights, res.losses, *res.state.values(), *res.extras.values()]
    assert res.state and all(t.device == meta for t in tensors)
    assert res.updates.shape == (K, d)


def test_a_plan_lives_on_the_device_its_counts_on_the_cpu() -> None:
    sizes = np.array([3, 9, 5])
    plan = make_plan(np.cumsum(sizes) - sizes, sizes, np.arange(3), 4, 0, 0, device="meta")
    assert {plan.idx.device.type, plan.mask.device.type, plan.active.device.type} == {"meta"}
    assert plan.steps.device.type == "cpu"  # read by the Python loop: no device sync
    cpu = make_plan(np.cumsum(sizes) - sizes, sizes, np.arange(3), 4, 0, 0)
    leading = int(cpu.active.all(1).long().cumprod(0).sum())
    assert cpu.full_steps == leading == 1


def test_a_hosts_data_model_and_state_live_on_its_device() -> None:
    """A host on ``meta``: samples, model copy, the rule's and the codec's per-client state."""
    c = _plain("strategy=scaffold", "client=momentum", "comm=powersgd", "model=mlp")
    shard = _shard()
    host = client_host(
        0, shard, c["model"], c["client"], (64,), 10, 0, device="meta",
        strategy_cfg=c["strategy"], comm_cfg=c["comm"],
    )  # fmt: skip
    assert host.device == torch.device("meta")
    held = [host.x, host.y, *host.model.parameters(), *host.client_state.values()]
    held += list(host.comm_state.values())
    assert host.client_state and host.comm_state
    assert all(t.device.type == "meta" for t in held)


# -- every tensor a host round creates is made on the host's device ------------------------------
_FACTORIES = {
    "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "randperm",
    "tensor", "as_tensor", "eye", "linspace",
}  # fmt: skip
_OURS = (str(ROOT / "clients"), str(ROOT / "system" / "host.py"))


class _Factories(TorchFunctionMode):
    """Records the factory calls made from Flagstaff's host and client code without ``device=``
    (draws from a seeded CPU generator, ``generator=``, are moved to the device by design)."""

    def __init__(self) -> None:
        super().__init__()
        self.undeviced: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _FACTORIES and "device" not in kwargs and "generator" not in kwargs:
            for frame in inspect.stack(context=0)[1:]:
                if frame.filename.startswith(_OURS):
                    where = os.path.relpath(frame.filename, ROOT)
                    self.undeviced.append(f"torch.{name} at {where}:{frame.lineno}")
                    break
        return func(*args, **kwargs)


@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=scaffold", "client=momentum", "comm=powersgd"),
        ("client=dpsgd_batched",),
    ],
)
def test_a_host_round_makes_its_tensors_on_the_hosts_device(overrides) -> None:
    c = _plain("model=mlp", *overrides)
    host = client_host(
        0, _shard(), c["model"], c["client"], (64,), 10, 0,
        strategy_cfg=c["strategy"], comm_cfg=c["comm"],
    )  # fmt: skip
    params = torch.zeros(host.spec.numel)
    bcast = {"c": torch.zeros(host.spec.numel)} if "strategy=scaffold" in overrides else None
    with _Factories() as mode:
        reply = host.train(params, [0, 2, 3], 0, bcast)
        host.train(params, [1, 2], 1, bcast)
    assert reply.updates.shape[0] == 3
    assert mode.undeviced == []


# -- the device a host gets -----------------------------------------------------------------------
def test_the_gpu_ray_assigns_is_the_hosts_cuda_index(monkeypatch) -> None:
    assert visible_index([3], "3") == 0  # Ray sets CUDA_VISIBLE_DEVICES to the assigned ids
    assert visible_index(["3"], "1,3") == 1
    assert visible_index([2], None) == 2  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    assert visible_index([], "0") == 0
    assert local_host_device(5, 0.0) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # backend=local packing only
    assert [local_host_device(h, 0.5) for h in range(5)] == [
        "cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:0",
    ]  # fmt: skip
    assert [local_host_device(h, 1.0) for h in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert host_device("cpu") == torch.device("cpu")


@NO_GPU
def test_a_host_refuses_a_gpu_torch_cannot_see() -> None:
    """What a host (``ClientHost.__init__``) makes of its device: no silent fall-back to CPU."""
    with pytest.raises(ValueError, match="sees no CUDA device.*cluster.gpus_per_host=0"):
        host_device("cuda")


# -- cluster.gpus_per_host without GPUs: refused before any work ------------------------------------
@NO_GPU
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_gpus_per_host_without_a_gpu_is_refused_at_build(backend) -> None:
    cfg = compose("experiment=smoke", f"backend={backend}", "cluster.gpus_per_host=0.25")
    with pytest.raises(ConfigError, match=r"cluster.gpus_per_host=0.25 asks for GPUs") as err:
        build_run(cfg)  # a local Ray: torch's device count, before Ray starts
    assert "set cluster.gpus_per_host=0" in str(err.value)
    build_run(compose("experiment=smoke", f"backend={backend}"))  # no GPU asked: builds


def test_a_ray_cluster_without_gpus_is_refused() -> None:
    check_gpus(0.5, {"CPU": 8.0, "GPU": 2.0}.get("GPU", 0.0), "the Ray cluster")
    check_gpus(0.0, 0.0, "the Ray cluster")
    with pytest.raises(ConfigError, match="the Ray cluster has none"):
        check_gpus(0.5, {"CPU": 8.0}.get("GPU", 0.0), "the Ray cluster")


@NO_GPU
@pytest.mark.slow  # a fresh interpreter: seconds; the fast variant is the build_run test above
def test_the_cli_refuses_gpus_per_host_in_one_line_exit_2(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "flagstaff.launch.train", "experiment=smoke", "cluster.gpus_per_host=1",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cluster.gpus_per_host=1 asks for GPUs")
    assert not run_dir.exists() or not any(run_dir.iterdir())  # nothing written
