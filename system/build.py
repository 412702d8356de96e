"""Build once: the Hydra config becomes the run's objects here, once per run (issue 20 item 3).

``build_run(cfg)`` checks the plain values (``system.config.validate``) and constructs every
component exactly once: the client trainer, the strategy, the attack and its adversary, the
aggregator (with the f and n the adversary leaves it), the dataset and the clients' partition, the
server's model (the strategy bound to its layout), or, for the peer-to-peer mode, the peer settings
and the topology. Validation *is* this construction: a constructor that refuses its arguments
fails here, before anything is written, as a ``ConfigError`` naming the config group and the fix
(STYLE.md "Instantiate once, in the recipe", lightning-hydra-template's ``train.py``).

What travels on from here are objects or the small picklable specs a host needs to make its own
copy (:class:`HostSpec`: model spec, trainer, local rule, codec spec, seed, threads;
:class:`ModelSpec`), never the whole config dict. ``build_from`` (Hydra's ``instantiate`` on a
``_target_`` dict) is this module's, and only the recipe's helpers and the specs call it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from flagstaff.clients.dp import private_kinds
from flagstaff.clients.trainer import ParamSpec
from flagstaff.strategies.attacks import Adversary
from flagstaff.system.config import ConfigError, check_values, mode_of
from flagstaff.system.host import ClientHost
from flagstaff.system.p2p import PeerTopology, check_unused
from flagstaff.system.server import ParameterServer, ServerSettings
from flagstaff.system.specs import Federated, HostSpec, ModelSpec, Peer, Run, build_from

__all__ = [
    "Federated",
    "HostSpec",
    "ModelSpec",
    "Peer",
    "Run",
    "build_from",
    "build_run",
    "check_components",
    "check_gpus",
    "check_resources",
    "ResourceError",
    "validate",
    "client_host",
    "federated",
    "load_inputs",
    "mode_of",
    "parameter_server",
    "peer_settings",
]

# what a loader or builder raises for input it cannot use (Hydra wraps it: see _root)
_INPUT_ERRORS = (ValueError, TypeError, OSError, EOFError, ImportError)


def peer_settings(c: dict[str, Any]) -> dict[str, Any]:
    """The peer-to-peer settings group: ``p2p`` (``mode=p2p p2p=monna``) or, in the older
    spelling, ``strategy`` (``strategy=monna``)."""
    if (c.get("strategy") or {}).get("mode") == "p2p":
        return c["strategy"]
    if not c.get("p2p"):
        raise ConfigError(
            "mode=p2p needs the peer-to-peer settings group: add p2p=monna (MoNNA) or p2p=dsgd "
            "(D-SGD), e.g. flagstaff-train mode=p2p p2p=monna"
        )
    return c["p2p"]


# -- building, with errors that name the group -------------------------------------------------------
def _reason(err: BaseException) -> str:
    msg = str(err)
    cause = err.__cause__
    while cause is not None:  # hydra wraps constructor errors; show the root message
        msg = str(cause)
        cause = cause.__cause__
    return " ".join(msg.split())


def _root(err: BaseException) -> BaseException:
    while err.__cause__ is not None:  # hydra.utils.instantiate wraps what the target raised
        err = err.__cause__
    return err


def _group(group: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; any error becomes ConfigError("<group>: <root message>")."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the group named
        raise ConfigError(f"{group}: {_reason(err)}") from err


def _input(group: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; an error about the input (ValueError, OSError, ...) becomes
    ConfigError("<group>: <message>"); any other keeps its traceback (a bug)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001
        root = _root(err)
        if isinstance(root, _INPUT_ERRORS):
            msg = " ".join(str(root).split())
            raise ConfigError(msg if msg.startswith(group) else f"{group}: {msg}") from err
        raise


def load_inputs(c: dict[str, Any], trainer: Any = None) -> tuple[Any, list[np.ndarray]]:
    """The dataset and the clients' index arrays, as configured; ConfigError naming the group.
    Data with a per-batch transform needs hosts whose ``trainer`` applies it."""
    ds = _input("data", build_from, c["data"])
    _check_label_ids(ds)
    if ds.transform is not None:
        _check_transform(c, ds, trainer)
    parts = _input(
        "partition",
        build_from,
        c["partition"],
        labels=ds.y_train.numpy(),
        num_clients=c["num_clients"],
        columns=ds.partition_columns(),  # per-sample columns: natural and Flower partitions
    )
    return ds, parts


def _check_label_ids(ds: Any) -> None:
    """Labels are class indices 0..K-1 (the model gets max+1 outputs): ids such as 0, 1e6, 2e6
    would build a model with millions of outputs that trains for hours; one line instead."""
    distinct = int(torch.unique(ds.y_train).numel())
    if ds.num_classes > max(1000, 10 * distinct):
        raise ConfigError(
            f"data: {distinct} distinct labels occur, but the largest is {ds.num_classes - 1}, so "
            f"the model would get {ds.num_classes} outputs; save the labels as class indices "
            f"0..{distinct - 1} (numpy: np.unique(y, return_inverse=True)[1])"
        )


def _check_transform(c: dict[str, Any], ds: Any, trainer: Any) -> None:
    """Data with a per-batch transform (uint8 images, normalized and augmented per step) trains on
    the client hosts of backend=local|ray, with a trainer that applies it."""
    what = f"data: {ds.name} keeps its training samples as {ds.x_train.dtype} for a per-batch transform"
    if mode_of(c) == "p2p" or c["backend"] == "flower":
        mode = "peer-to-peer runs" if mode_of(c) == "p2p" else "backend=flower"
        raise ConfigError(f"{what}, which {mode} do not apply; use backend=local or backend=ray")
    if trainer is not None and not trainer.accepts_transform:
        raise ConfigError(
            f"{what}, which {type(trainer).__name__} does not apply; use client=sgd or "
            "client=momentum"
        )


@dataclass
class _Parts:
    trainer: Any
    strategy: Any
    aggregator: Any
    adversary: Adversary


def _components(c: dict[str, Any]) -> _Parts:
    """The server mode's components that need no data (cheap: built before the data loads)."""
    trainer = _group("client", build_from, c["client"])
    strategy = _group("strategy", build_from, c["strategy"])
    attack = _group("attack", build_from, c["attack"])
    adversary = _group("attack", Adversary, attack, c["num_clients"])
    # the threat model: the attack can run with this many inputs (e.g. ALIE's f < n/2)
    _group("attack", adversary.check, c["clients_per_round"])
    n_agg = adversary.inputs_per_round(c["clients_per_round"])  # crash leaves n - f inputs
    aggregator = _group("aggregator", build_from, c["aggregator"], f=adversary.f, n=n_agg)
    _check_client_level_dp(strategy, c["aggregator"])
    _check_prox_in_decay(strategy.client_rule, trainer)
    return _Parts(trainer, strategy, aggregator, adversary)


def _check_prox_in_decay(rule: Any, trainer: Any) -> None:
    """A local rule with its own weight decay (FedSpeed's ``strategy.prox=decay``) needs the
    trainer that applies it after the clip (LocalSGD); the DP-SGD trainers would drop it."""
    from flagstaff.clients.trainer import LocalSGD

    if getattr(rule, "decay", 0.0) and not isinstance(trainer, LocalSGD):
        raise ConfigError(
            f"strategy.prox=decay adds the prox term as a weight decay after LocalSGD's clip; "
            f"the client trainer {type(trainer).__name__} does not apply it: use "
            "strategy.prox=direction (the default) with this client"
        )


def _with_model(
    c: dict[str, Any], p: _Parts, input_shape: tuple[int, ...], num_classes: int
) -> Federated:
    """The server's model (built leaving torch's global random state as it found it), the
    strategy bound to its layout, and what the hosts get."""
    spec = ModelSpec(c["model"], tuple(input_shape), int(num_classes), int(c["seed"]))
    with torch.random.fork_rng(devices=[]):
        model = _input("model", spec.build)
    _input("model", p.trainer.check_model, model)  # e.g. BatchNorm refused before any work
    pspec = ParamSpec.of(model)
    _input("strategy", p.strategy.bind, model, pspec)  # the parameter layout (FedSVD, FFA-LoRA)
    host = HostSpec(
        spec,
        p.trainer,
        p.strategy.client_rule,
        c.get("comm"),
        int(c["seed"]),
        int(c["cluster"]["threads_per_host"]),
    )
    kinds = private_kinds(p.trainer, p.strategy)
    return Federated(model, pspec, p.strategy, p.aggregator, p.adversary, p.trainer, host, kinds)


def federated(c: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> Federated:
    """The server mode's components for data of ``input_shape`` and ``num_classes``, built once."""
    return _with_model(c, _components(c), input_shape, num_classes)


def _check_client_level_dp(strategy: Any, aggregator: dict[str, Any]) -> None:
    """Client-level DP (``strategy.epsilon_kind == "client-level"``): its noise is calibrated to
    the mean's sensitivity, and it covers the updates only, so strategies whose clients send
    per-client extras are refused (``strategies.server_step.client_level_extras_message``)."""
    if strategy.epsilon_kind != "client-level":
        return
    if not (aggregator.get("rule") == "mean" and not aggregator.get("pre")):
        raise ConfigError(
            "strategy=dp_fedavg needs aggregator=mean without pre-aggregation (its noise is "
            f"calibrated to the mean's sensitivity); got aggregator.rule={aggregator.get('rule')!r}"
        )
    rule = strategy.client_rule
    if rule is not None and rule.client_state:
        from flagstaff.strategies.server_step import client_level_extras_message

        raise ConfigError(client_level_extras_message(strategy))


def build_run(cfg: DictConfig | dict[str, Any]) -> Run:
    """Check the config and build everything the run needs, once (see the module docstring)."""
    c = check_values(cfg)
    mode = mode_of(c)
    cl = c["cluster"]
    if cl["gpus_per_host"] > 0 and (c["backend"] == "local" or not cl.get("address")):
        # this machine's GPUs; a joined cluster's are checked once Ray is up (system.runner)
        check_gpus(cl["gpus_per_host"], torch.cuda.device_count(), "this machine")
    if c["backend"] == "ray" and mode == "federated" and cl["hosts"]:
        _check_fits(cl)
    torch.manual_seed(c["seed"])
    if mode == "p2p":
        return _peer_run(c)
    p = _components(c)
    ds, parts = load_inputs(c, p.trainer)
    fed = _with_model(c, p, ds.input_shape, ds.num_classes)
    return Run(c, mode, ds, parts, federated=fed)


class ResourceError(ConfigError, RuntimeError):
    """Client hosts that cannot all be placed at once (their actors would pend forever)."""


def _check_fits(cl: dict[str, Any]) -> None:
    """The hosts fit, checked before anything is written where the resources are known: the Ray
    this process already runs (``flagstaff-train`` starts it while it imports), or the CPUs of this
    machine for a local Ray still to start; a cluster not joined yet is checked once joined."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        available = ray.cluster_resources()
        custom = cl["resources"]
    elif not cl.get("address"):
        available, custom = {"CPU": float(len(os.sched_getaffinity(0)))}, None
    else:
        return
    check_resources(available, cl["hosts"], cl["cpus_per_host"], 0.0, custom)


def check_resources(
    available: dict[str, float],
    hosts: int,
    cpus: float,
    gpus: float = 0.0,
    custom: dict[str, float] | None = None,
) -> None:
    """Fail before work if the cluster cannot hold every host at once (else actors pend forever):
    one line naming what is short and the keys that fix it."""
    need = {"CPU": hosts * cpus, "GPU": hosts * gpus}
    need.update({k: hosts * v for k, v in (custom or {}).items()})
    short = {k: (v, available.get(k, 0.0)) for k, v in need.items() if v > available.get(k, 0.0)}
    if short:
        what = ", ".join(f"{k}: need {v:g}, cluster has {a:g}" for k, (v, a) in short.items())
        raise ResourceError(
            f"cluster.hosts={hosts} client hosts do not fit on this Ray cluster ({what}); lower "
            "cluster.hosts or the per-host request (cluster.cpus_per_host, e.g. 0.5, "
            "cluster.gpus_per_host, cluster.resources), or add nodes"
        )


def check_gpus(gpus_per_host: float, gpus_found: float, where: str) -> None:
    """ConfigError (one line naming ``cluster.gpus_per_host`` and the fix) when hosts ask for GPUs
    and ``where`` (this machine for backend=local and a local Ray: torch's CUDA device count; a
    joined cluster: Ray's ``GPU`` resource) has none."""
    if gpus_per_host > 0 and gpus_found <= 0:
        cuda = torch.version.cuda
        raise ConfigError(
            f"cluster.gpus_per_host={gpus_per_host:g} asks for GPUs but {where} has none "
            f"(torch {torch.__version__}, CUDA {cuda or 'not built in'}); set "
            "cluster.gpus_per_host=0 to run the client hosts on CPU, or run where GPUs are "
            "(a CUDA build of torch on a machine or Ray cluster with GPUs)"
        )


def validate(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Check the values and construct the components that need no data (client trainer, strategy,
    attack, adversary, aggregator; or the peer settings), as a run builds them; return the plain
    config. For callers that hold only a config (tests, tools); a run builds once (``build_run``).
    Raises ConfigError naming the group and the fix."""
    c = check_values(cfg)
    check_components(c)
    return c


def check_components(c: dict[str, Any]) -> None:
    """Construct the components that need no data (what ``system.config.validate`` checks)."""
    if mode_of(c) == "p2p":
        _check_peer_unused(c)
        _group(_peer_group(c), build_from, peer_settings(c))
        _group("attack", build_from, c["attack"])
    else:
        _components(c)


def _check_peer_unused(c: dict[str, Any]) -> None:
    trainer = _group("client", build_from, c["client"])  # asked: is it private?
    check_unused(c, private_client=trainer.epsilon_kind is not None)


def _peer_group(c: dict[str, Any]) -> str:
    return "strategy" if (c.get("strategy") or {}).get("mode") == "p2p" else "p2p"


def _peer_run(c: dict[str, Any]) -> Run:
    _check_peer_unused(c)  # mode=p2p refuses the groups it does not use instead of ignoring them
    group = _peer_group(c)
    settings = _group(group, build_from, peer_settings(c))
    attack = _group("attack", build_from, c["attack"])
    ds, parts = load_inputs(c)
    n, seed = c["num_clients"], c["seed"]
    topology = _group(group, PeerTopology, settings, n, attack, seed, parts, group)
    spec = ModelSpec(c["model"], tuple(ds.input_shape), int(ds.num_classes), int(c["seed"]))
    with torch.random.fork_rng(devices=[]):
        _input("model", spec.build)
    peer = Peer(settings, attack, topology.f, spec, topology, int(c["cluster"]["threads_per_host"]))
    return Run(c, "p2p", ds, parts, peer=peer)


# -- the same construction for callers that hold a plain config (tests, tools) ----------------------
def parameter_server(
    c: dict[str, Any],
    pool: Any,
    owner: np.ndarray,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    input_shape: tuple[int, ...],
    num_classes: int,
) -> Any:
    """A ``ParameterServer`` for the plain config ``c`` over ``pool`` (components built here)."""
    fed = federated(c, input_shape, num_classes)
    return ParameterServer(fed, pool, owner, x_test, y_test, ServerSettings.of(c))


def client_host(
    host_id: int,
    shard: Any,
    model_cfg: dict[str, Any],
    client_cfg: dict[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    threads: int = 1,
    device: str = "cpu",
    strategy_cfg: dict[str, Any] | None = None,
    delay_s: float = 0.0,
    comm_cfg: dict[str, Any] | None = None,
) -> Any:
    """A ``ClientHost`` from config groups (model, client, strategy, comm)."""
    rule = build_from(strategy_cfg).client_rule if strategy_cfg else None
    spec = HostSpec(
        ModelSpec(model_cfg, tuple(input_shape), int(num_classes), int(seed)),
        build_from(client_cfg),
        rule,
        comm_cfg,
        int(seed),
        int(threads),
    )
    return ClientHost(host_id, shard, spec, device=device, delay_s=delay_s)
