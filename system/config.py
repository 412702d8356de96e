"""Config schemas (Hydra ConfigStore) and the value checks that run before any work starts.

The top-level schema types every key of ``conf/train.yaml`` (a typo or a wrong type fails when the
config is composed); ``check_values`` checks the plain values (ranges, choices, the comm group);
the components themselves are validated by constructing them, once, in ``system.build`` (an
unknown key inside a group or an impossible value fails there before Ray starts, naming the key
and what would work; ``system.build.validate`` does both for a caller that holds only a config).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

__all__ = [
    "TrainSchema",
    "ClusterSchema",
    "CommSchema",
    "ConfigError",
    "check_values",
    "mode_of",
    "register",
    "to_plain",
    "unknown_key_message",
]


class Backend(str, Enum):
    local = "local"
    ray = "ray"
    flower = "flower"


class Mode(str, Enum):
    federated = "federated"
    p2p = "p2p"


class Sampling(str, Enum):
    fixed = "fixed"
    bernoulli = "bernoulli"


class HostFailure(str, Enum):
    retry = "retry"
    drop = "drop"


@dataclass
class ClusterSchema:
    """Where hosts run and what each one asks Ray for."""

    name: str = "local"
    address: str | None = None  # None: start a local Ray; "auto" or host:port: join a cluster
    hosts: int | None = None  # None: one per CPU (ray), 1 (local)
    cpus_per_host: float = 1.0
    gpus_per_host: float = 0.0
    threads_per_host: int = 1
    resources: dict[str, float] = field(default_factory=dict)
    on_host_failure: HostFailure = HostFailure.retry
    round_deadline_s: float | None = None
    max_restarts: int = 3
    # a dead host not restarted by Ray within this many seconds is lost: its clients move to the
    # surviving hosts (system/pool.py)
    restart_timeout_s: float = 60.0
    # this many rounds in a row without a usable update stop the run with an error (0: never)
    max_skipped_rounds: int = 3
    include_dashboard: bool = False
    # a new local Ray without dashboard skips Ray's idle dashboard head and polls for its node
    # (system/ray_start.py lean_local_start); false: Ray's own start-up
    lean_start: bool = True
    # joining cluster.address needs Ray token authentication unless this is false (warned);
    # a local Ray always has its own token (system/ray_start.py)
    require_auth: bool | None = None
    namespace: str | None = None
    placement: str = "default"  # default | spread (one host per node where possible)
    server: str = "auto"  # auto | driver | actor: where the parameter server runs (backend=ray)
    host_reduce: bool = True  # hosts send one weighted sum when the aggregator is a weighted mean
    start_timeout_s: float = 120.0
    slow_hosts: list[float] = field(
        default_factory=list
    )  # chaos testing: extra s per round, by host


class CommKind(str, Enum):
    none = "none"
    powersgd = "powersgd"
    sketch = "sketch"


class SketchDecoder(str, Enum):
    auto = "auto"
    unbiased = "unbiased"
    contractive = "contractive"


@dataclass
class CommSchema:
    """Compressed client-to-server communication (system/codecs.py, docs/communication.md)."""

    kind: CommKind = CommKind.none  # none | powersgd (Vogels et al. 2019) | sketch (seeded rand-k)
    error_feedback: bool = True  # per-client residual memory on the hosts (checkpointed)
    min_compress_numel: int = 256  # vectors and tensors smaller than this are sent as they are
    rank: int = 2  # powersgd: rank of P Q^T per matrix (conv kernels as (out, rest))
    ratio: float = 0.1  # sketch: fraction of the compressible coordinates sent each round
    decoder: SketchDecoder = SketchDecoder.auto  # sketch: unbiased | contractive | auto
    seed: int | None = None  # codec randomness (Q init, sketch coordinates); null: the run seed


@dataclass
class LoggerSchema:
    kind: str = "none"  # none | tensorboard | mlflow
    experiment_name: str = "flagstaff"
    tracking_uri: str | None = None


@dataclass
class PrivacySchema:
    """Differential-privacy budget shared by client=dpsgd (sample-level) and strategy=dp_fedavg
    (client-level); see docs/privacy.md."""

    target_epsilon: float | None = None  # stop before any client (or the run) would exceed it
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | prv: Opacus accountant for calibration and reporting


@dataclass
class TrainSchema:
    """Top level of ``conf/train.yaml``; groups are typed by their own ``_target_`` classes."""

    mode: Mode = Mode.federated
    backend: Backend = Backend.ray
    rounds: int = 30
    num_clients: int = 20
    clients_per_round: int = 20
    sampling: Sampling = Sampling.fixed
    seed: int = 0
    resume: bool = False
    eval_every: int = 1
    checkpoint_every: int = 10
    progress: bool = True
    verbose: bool = False  # log lines and library warnings on the console too (launch/train.py)
    data: Any = MISSING
    partition: Any = MISSING
    model: Any = MISSING
    strategy: Any = MISSING
    aggregator: Any = MISSING
    client: Any = MISSING
    attack: Any = MISSING
    cluster: ClusterSchema = field(default_factory=ClusterSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    privacy: PrivacySchema = field(default_factory=PrivacySchema)
    comm: CommSchema = field(default_factory=CommSchema)
    p2p: Any = None  # the peer-to-peer settings group (mode=p2p p2p=monna | dsgd)
    experiment: Any = None


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the valid choices."""


def register() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainSchema)


def to_plain(cfg: DictConfig | dict) -> dict[str, Any]:
    """A resolved plain-dict copy (what is sent to Ray actors and written to checkpoints)."""
    if isinstance(cfg, dict):
        return cfg
    out = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(out, dict)
    return out


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


SEED_MAX = 2**32 - 1  # numpy's legacy seeding and scikit-learn's random_state take [0, 2**32 - 1]


def _check_seeds(c: dict[str, Any], where: str = "") -> None:
    """Every ``seed`` key (the root one first, then those inside groups) is null or in
    [0, SEED_MAX]: numpy and scikit-learn reject others deep inside data loading."""
    for key in sorted(c, key=lambda k: k != "seed"):
        value, name = c[key], f"{where}{key}"
        if key == "seed" and value is not None:
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX
            _check(
                ok,
                f"{name}={value} is out of range: a seed is an integer in [0, {SEED_MAX}] "
                f"(what numpy and scikit-learn accept), e.g. {name}="
                f"{abs(value) % (SEED_MAX + 1) if isinstance(value, int) else 0}",
            )
        elif isinstance(value, dict):
            _check_seeds(value, f"{name}.")


_META = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}  # Hydra's instantiate keys


def unknown_key_message(key: str, valid: Iterable[str], where: str) -> str:
    """``unknown key <key> <where>; valid keys: ...; did you mean ...?`` on one line (difflib's
    closest valid key as the hint)."""
    valid = sorted(v for v in valid if v not in _META)
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(leaf)]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return f"unknown key {key} {where}; valid keys: {', '.join(valid) or 'none'}{hint}"


def _check_schema_keys(c: dict[str, Any]) -> None:
    """The top level and its typed groups (cluster, logger, privacy, comm) have no key their
    schema lacks (``+round=50`` would otherwise be ignored; system/strict.py checks the other
    groups against their YAML on the command line)."""
    top = {f.name for f in fields(TrainSchema)}
    for key in c:
        _check(key in top, unknown_key_message(key, top, "at the top level"))
    for name, schema in (("cluster", ClusterSchema), ("logger", LoggerSchema),
                         ("privacy", PrivacySchema), ("comm", CommSchema)):  # fmt: skip
        known = {f.name for f in fields(schema)}
        for key in c.get(name) or {}:
            _check(key in known, unknown_key_message(f"{name}.{key}", known, f"in group {name}"))


def check_values(cfg: DictConfig | dict) -> dict[str, Any]:
    """Check the plain values (no component is built); return the plain config. Raises
    ConfigError naming the key and the fix."""
    c = to_plain(cfg)
    _check_schema_keys(c)
    _check_seeds(c)
    _check(c["rounds"] >= 1, f"rounds={c['rounds']} must be >= 1")
    _check(c["num_clients"] >= 1, f"num_clients={c['num_clients']} must be >= 1")
    _check(
        1 <= c["clients_per_round"] <= c["num_clients"],
        f"clients_per_round={c['clients_per_round']} must be between 1 and "
        f"num_clients={c['num_clients']}; lower clients_per_round or raise num_clients",
    )
    _check(c["eval_every"] >= 1, f"eval_every={c['eval_every']} must be >= 1")
    _check(c["checkpoint_every"] >= 0, "checkpoint_every must be >= 0 (0: only at the end)")
    cl = c["cluster"]
    _check(cl["hosts"] is None or cl["hosts"] >= 1, "cluster.hosts must be >= 1 or null")
    _check(cl["cpus_per_host"] >= 0 and cl["gpus_per_host"] >= 0, "cluster resources must be >= 0")
    _check(cl["threads_per_host"] >= 1, "cluster.threads_per_host must be >= 1")
    _check(
        cl["restart_timeout_s"] >= 0,
        f"cluster.restart_timeout_s={cl['restart_timeout_s']} must be >= 0 (seconds to wait for "
        "Ray to restart a dead host before its clients move to the others)",
    )
    _check(
        cl["max_skipped_rounds"] >= 0,
        f"cluster.max_skipped_rounds={cl['max_skipped_rounds']} must be >= 0 (0: never stop)",
    )
    _check(
        cl["placement"] in ("default", "spread"),
        f"cluster.placement={cl['placement']!r}: choose default or spread",
    )
    _check(
        cl.get("server", "auto") in ("auto", "driver", "actor"),
        f"cluster.server={cl.get('server')!r}: choose auto, driver or actor",
    )
    _check(
        c["logger"]["kind"] in ("none", "tensorboard", "mlflow"),
        f"logger.kind={c['logger']['kind']!r}: choose none, tensorboard or mlflow",
    )
    pv = c.get("privacy") or {}
    _check(
        pv.get("accountant", "rdp") in ("rdp", "prv"),
        f"privacy.accountant={pv.get('accountant')!r}: choose rdp or prv",
    )
    _check(0 < pv.get("delta", 1e-5) < 1, f"privacy.delta={pv.get('delta')} must be in (0, 1)")
    _check(
        pv.get("target_epsilon") is None or pv["target_epsilon"] > 0,
        f"privacy.target_epsilon={pv.get('target_epsilon')} must be > 0 or null",
    )
    _check(
        c.get("mode", "federated") in ("federated", "p2p"),
        f"mode={c.get('mode')!r}: choose federated or p2p",
    )
    _check_comm(c)
    return c


def mode_of(c: dict[str, Any]) -> str:
    """``p2p`` for peer-to-peer runs (``mode=p2p``, or the older spelling ``strategy=monna`` /
    ``strategy=dsgd`` whose group carries ``mode: p2p``), else ``federated``."""
    if c.get("mode") == "p2p" or (c.get("strategy") or {}).get("mode") == "p2p":
        return "p2p"
    return "federated"


def _check_comm(c: dict[str, Any]) -> None:
    """The ``comm`` group: values in range, and a backend whose hosts run the codec."""
    cm = c.get("comm") or {"kind": "none"}
    known = set(CommSchema.__dataclass_fields__)
    unknown = sorted(set(cm) - known)  # `+comm.key=...` appends past the schema
    _check(not unknown, f"comm: unknown key(s) {unknown}; the keys are {sorted(known)}")
    if cm["kind"] == "none":
        return
    _check(
        cm["rank"] >= 1,
        f"comm.rank={cm['rank']} must be >= 1 (1, 2 or 4 are typical; rank >= min(out, in) of "
        "every matrix sends the update exactly)",
    )
    _check(
        0 < cm["ratio"] <= 1,
        f"comm.ratio={cm['ratio']} must be in (0, 1]: the fraction of coordinates the sketch "
        "sends, e.g. 0.1 for 10x fewer",
    )
    _check(
        cm["min_compress_numel"] >= 0,
        f"comm.min_compress_numel={cm['min_compress_numel']} must be >= 0 (0: compress every "
        "matrix)",
    )
    _check(
        not (cm["kind"] == "sketch" and cm["decoder"] == "unbiased" and cm["error_feedback"]),
        "comm.decoder=unbiased with comm.error_feedback=true diverges (the residual grows by a "
        "factor 1/ratio - 1 each round); use comm.decoder=contractive (or auto) with error "
        "feedback, or comm.error_feedback=false with the unbiased decoder",
    )
    _check(
        c["backend"] in ("local", "ray"),
        f"comm={cm['kind']} runs on the client hosts of backend=local or backend=ray; got "
        f"backend={c['backend']} (use comm=none there)",
    )
    _check(
        mode_of(c) != "p2p",
        f"comm={cm['kind']} compresses client-to-server updates; the peer-to-peer mode "
        "(mode=p2p) has no server: use comm=none",
    )
