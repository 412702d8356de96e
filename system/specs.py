"""What the build (``system.build``) hands on: the built run and the small picklable specs hosts
make their own copies from (issue 20 item 3). Plain dataclasses; this module imports nothing of
``system`` so that hosts, the server and the runtimes can use the types without import circles.

``build_from`` is Hydra's ``instantiate`` for a ``_target_`` dict; ``system.build`` is the one place
that turns a run's config into objects with it (``ModelSpec.build`` calls it on a host for the
host's model copy).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from flagstaff.clients.trainer import ParamSpec

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["Federated", "HostSpec", "ModelSpec", "Peer", "Run", "build_from"]


def build_from(cfg: dict[str, Any] | DictConfig, **kwargs: Any) -> Any:
    """Instantiate a ``_target_`` config given as a plain dict or DictConfig."""
    import hydra  # imported here: client hosts build their model without it (ModelSpec.build)
    from omegaconf import DictConfig, OmegaConf

    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    return hydra.utils.instantiate(node, _convert_="all", **kwargs)


def _direct_target(cfg: dict[str, Any]) -> Any:
    """The callable a flat ``_target_`` dict names (no nested ``_target_``, no other ``_`` key:
    what ``build_from`` would call with the same arguments), else None. Lets a client host build
    its model without importing Hydra and OmegaConf (about 0.2 s of CPU per host process, on the
    start-up's critical path: docs/cluster.md)."""
    target = cfg.get("_target_")
    if not isinstance(target, str) or any(
        (k.startswith("_") and k != "_target_") or (isinstance(v, dict) and "_target_" in v)
        for k, v in cfg.items()
    ):
        return None
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # build_from reports it


@dataclass(frozen=True)
class ModelSpec:
    """How to make a copy of the run's model (hosts build their own; picklable)."""

    cfg: dict[str, Any]
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int

    def build(self) -> nn.Module:
        kwargs = dict(input_shape=self.input_shape, num_classes=self.num_classes, seed=self.seed)
        fn = _direct_target(self.cfg) if isinstance(self.cfg, dict) else None
        if fn is None:
            return build_from(self.cfg, **kwargs)
        return fn(**{k: v for k, v in self.cfg.items() if k != "_target_"}, **kwargs)


@dataclass(frozen=True)
class HostSpec:
    """What a client host needs (``system.host.ClientHost``): the model spec, the built trainer and
    the strategy's local rule (each host works on its own copy), the codec spec (``comm`` group;
    the codec is built against the host's model layout), the root seed and torch threads."""

    model: ModelSpec
    trainer: Any
    rule: Any = None
    comm: dict[str, Any] | None = None
    seed: int = 0
    threads: int = 1
    #: where hosts map large per-client state tables (the run directory; system/client_state.py)
    state_dir: str | None = None


@dataclass
class Federated:
    """The server mode's components, built once: the server's model (strategy bound to it), the
    strategy, aggregator, attack and adversary, the trainer, what hosts get, the DP kinds."""

    model: nn.Module
    spec: ParamSpec
    strategy: Any
    aggregator: Any
    adversary: Any
    trainer: Any
    host: HostSpec
    kinds: list[str] = field(default_factory=list)


@dataclass
class Peer:
    """The peer-to-peer mode's components: the peer settings, the attack, the training nodes and
    the topology (``system.p2p.PeerTopology``, whose construction checks the rule's precondition)
    and the model spec every peer host builds from."""

    settings: Any
    attack: Any
    f: int
    model: ModelSpec
    topology: Any
    threads: int = 1


@dataclass
class Run:
    """Everything one run needs, built once: the validated plain config, the data and partition,
    and the components of its mode (``federated`` or ``peer``)."""

    config: dict[str, Any]
    mode: str
    data: Any
    parts: list[np.ndarray]
    federated: Federated | None = None
    peer: Peer | None = None

    @property
    def kinds(self) -> list[str]:
        """The kinds of DP of the run ("sample-level", "client-level"); empty without DP."""
        return self.federated.kinds if self.federated is not None else []

    @property
    def checkpoint_numel(self) -> int:
        """How many parameters a checkpoint of this run holds (checked on resume)."""
        if self.federated is not None:
            return self.federated.spec.numel
        assert self.peer is not None
        spec = ParamSpec.of(self.peer.model.build())
        return spec.numel * len(self.peer.topology.train_ids)
