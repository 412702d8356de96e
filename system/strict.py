"""Strict configs: every key a run is given is one its config group declares (issue 23 item 3).

Hydra refuses ``client.lrr=0.1`` (the key is not in the composed config) but accepts
``+round=50``, ``+client.lrr=0.1`` and keys an experiment file adds, and a run would ignore them
or fail late inside a constructor. Here the composed config is compared, key by key, with the
*declared* config: the same group options composed without ``+`` overrides and without the
experiment (each option's YAML declares every key its ``_target_`` takes; tests/test_config_strict.py
checks each YAML against its target's signature). An unknown key, a missing value (``???``), a
refused override or a missing option becomes one line that names the key, the group and the valid
keys (with difflib's closest match as a hint), before anything heavy is imported
(lightning-hydra-template's strict configs; Hydra's structured-config struct mode, extended to the
keys that ``+`` and ``@package _global_`` files bypass).

``preflight(argv, ...)`` runs this on the command line before Hydra starts the run (a one-line
error and exit code 2); ``check_config(cfg, choices, overrides, ...)`` runs it on a config Hydra
composed (each job of a sweep).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flagstaff.system.config import ConfigError, unknown_key_message

__all__ = ["check_config", "check_keys", "declared_config", "preflight", "unknown_key_message"]

# flags of Hydra's command line that take a value, and flags whose run needs no check
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "-i"}
_SKIP_FLAGS = {
    "--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc",
    "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
    "--experimental-rerun", "--info", "-i",
}  # fmt: skip
_declared_cache: dict[tuple[str, tuple[str, ...]], DictConfig] = {}


def _where(key: str, choices: Mapping[str, Any], node: Any) -> str:
    """``in group client (client=sgd, clients.trainer.LocalSGD)`` or ``at the top level``."""
    if "." not in key:
        return "at the top level"
    group = key.split(".", 1)[0]
    choice = choices.get(group)
    target = node.get("_target_") if isinstance(node, Mapping) else None
    what = ", ".join(str(s) for s in (f"{group}={choice}" if choice else None, target) if s)
    return f"in group {group}" + (f" ({what})" if what else "")


def check_keys(
    cfg: Mapping[str, Any], declared: Mapping[str, Any], choices: Mapping[str, Any]
) -> None:
    """Every key of ``cfg`` is in ``declared`` (recursively, inside non-empty declared mappings;
    an empty declared mapping, e.g. ``cluster.resources: {}``, takes any keys). Raises
    ConfigError with :func:`unknown_key_message`."""

    def walk(node: Mapping[str, Any], decl: Mapping[str, Any], path: str, group_node: Any) -> None:
        for key in node:
            name = f"{path}{key}"
            if key == "hydra" and not path:
                continue
            if key not in decl:
                top = node if not path else group_node
                raise ConfigError(unknown_key_message(name, decl, _where(name, choices, top)))
            value, dvalue = node[key], decl[key]
            if isinstance(value, Mapping) and isinstance(dvalue, Mapping) and len(dvalue):
                walk(value, dvalue, f"{name}.", value if not path else group_node)

    walk(cfg, declared, "", None)


def _missing(cfg: DictConfig) -> str | None:
    """The first key whose value is ``???`` (OmegaConf's MISSING)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    return missing[0] if missing else None


def _missing_message(key: str, choices: Mapping[str, Any]) -> str:
    group = key.split(".", 1)[0]
    choice = f" ({group}={choices[group]})" if "." in key and choices.get(group) else ""
    return f"missing value for {key}{choice}: set it on the command line, {key}=..."


def declared_config(config_name: str, choices: Mapping[str, Any]) -> DictConfig:
    """The config of the same group options with no overrides and no experiment: the keys each
    option declares (composed once per set of choices; needs an initialized Hydra)."""
    from hydra import compose

    overrides = tuple(
        sorted(
            f"~{g}" if c is None else f"{g}={c}"  # ~g: a group an experiment writes inline
            for g, c in choices.items()
            if not g.startswith("hydra") and g != "experiment"
        )
    )
    key = (config_name, overrides)
    if key not in _declared_cache:
        _declared_cache[key] = compose(config_name, overrides=list(overrides))
    return _declared_cache[key]


def check_config(
    cfg: DictConfig,
    choices: Mapping[str, Any],
    overrides: Iterable[str],
    config_name: str,
    check_values: Callable[[DictConfig], Any] | None = None,
) -> None:
    """Keys (when a ``+`` override or an experiment could have added some), missing values,
    then ``check_values``; raises ConfigError naming the key and the fix."""
    added = any(o.lstrip().startswith("+") for o in overrides)
    if added or choices.get("experiment"):
        declared = declared_config(config_name, choices)
        plain = OmegaConf.to_container(cfg, resolve=False)
        check_keys(plain, OmegaConf.to_container(declared, resolve=False), choices)
    key = _missing(cfg)
    if key is not None:
        raise ConfigError(_missing_message(key, choices))
    if check_values is not None:
        check_values(cfg)


# -- the command line ------------------------------------------------------------------------------
def _overrides(argv: list[str]) -> list[str] | None:
    """The overrides of a command line (a sweep's first value), or None where the run is not a
    plain composition this check can repeat (help, another config path or name)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    args: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        flag = a.split("=", 1)[0]
        if flag in _SKIP_FLAGS:
            return None
        if a.startswith("-"):
            skip = a in _VALUE_FLAGS
            continue
        args.append(a)
    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}
    out = []
    for o in OverridesParser.create().parse_overrides(args):
        if not o.is_sweep_override():
            out.append(o.input_line)
            continue
        first = next(iter(o.sweep_string_iterator()), None)
        if first is None:
            return None
        out.append(f"{prefix.get(o.type, '')}{o.get_key_element().lstrip('+~')}={first}")
    return out


def _composition_message(err: Exception, overrides: list[str]) -> str:
    """One line for what Hydra refused while composing."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(err, MissingConfigException) and err.options is not None:
        name = (err.missing_cfg_file or "").rsplit("/", 1)
        group, opt = (name[0], name[-1]) if len(name) == 2 else ("", name[-1])
        # schema nodes (ConfigStore *_schema) and shared parts (_common) are not choices
        options = [o for o in err.options if not (o.startswith("_") or o.endswith("_schema"))]
        close = difflib.get_close_matches(opt, options, n=1, cutoff=0.6)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return f"{group}={opt}: no such option; choose one of {', '.join(options)}{hint}"
    cause = err.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return str(err.__class__.__name__)  # replaced by the caller with the valid keys
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        first = str(cause).splitlines()[0]
        return f"{cause.full_key}: {first}"
    return " ".join(str(err).split())


def _refused_key(err: Exception) -> str | None:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return str(cause.full_key)
    return None


def preflight(
    argv: list[str],
    config_module: str,
    config_name: str,
    check_values: Callable[[DictConfig], Any] | None = None,
) -> None:
    """Compose the command line's config as Hydra will and check it (:func:`check_config`); a
    refusal is one line on stderr and exit code 2, before Hydra sets up the run. A command line
    this cannot repeat (``--help``, ``-cp``/``-cn``, a sweep it cannot expand) is left to Hydra."""
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException, OverrideParseException

    try:
        overrides = _overrides(argv)
    except OverrideParseException:
        return  # Hydra reports its own parse errors
    if overrides is None:
        return
    with initialize_config_module(config_module=config_module, version_base="1.3"):
        try:
            try:
                cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
            except ConfigCompositionException as err:
                key = _refused_key(err)
                if key is None:
                    raise ConfigError(_composition_message(err, overrides)) from None
                raise ConfigError(_refused_message(key, overrides, config_name)) from None
            choices = dict(cfg.hydra.runtime.choices)
            job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            check_config(job, choices, overrides, config_name, check_values)
        except ConfigError as err:
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            raise SystemExit(2) from None


def _refused_message(key: str, overrides: list[str], config_name: str) -> str:
    """A key Hydra refused (``client.lrr=0.1``): the valid keys where it was meant to go."""
    from hydra import compose

    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    cfg = compose(config_name, overrides=rest, return_hydra_config=True)
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.get(p) if isinstance(node, Mapping) else None
    group_node = (
        OmegaConf.to_container(cfg, resolve=False).get(parts[0]) if len(parts) > 1 else None
    )
    valid = node if isinstance(node, Mapping) else {}
    return unknown_key_message(key, valid, _where(key, dict(cfg.hydra.runtime.choices), group_node))
