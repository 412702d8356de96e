"""Flagstaff: robust, private, federated and distributed training on Ray.

Everything installs under this one name (issue 23 item 2): ``flagstaff.system``,
``flagstaff.strategies``, ``flagstaff.clients``, ``flagstaff.jobs``, ``flagstaff.launch`` and the
config tree ``flagstaff.conf``, so a user's own ``strategies.py`` or ``system/`` cannot shadow them.
In the repository the folders stay at the top (setuptools' package-dir mapping installs them under
this name); this package's path includes the repository root so a source checkout imports the same
way.

The public entry, imported lazily (``import flagstaff`` stays cheap):

* ``flagstaff.compose(*overrides)``: the training config, as ``flagstaff-train k=v ...`` composes it;
* ``flagstaff.train(cfg, run_dir=None)``: run it (what ``flagstaff-train`` runs), return the final
  metrics, parameters and per-round rows;
* ``flagstaff.build_aggregator(rule, pre=(), f=0, n=None, **hparams)``: an aggregation rule on
  stacked (n, d) updates (``flagstaff.strategies.aggregators.build``);
* ``flagstaff.build_strategy(name, **overrides)``: a server strategy from ``conf/strategy/<name>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "system" / "__init__.py").is_file() and (_ROOT / "pyproject.toml").is_file():
    __path__.append(str(_ROOT))  # a source checkout: flagstaff.system is <repo>/system

__all__ = ["build_aggregator", "build_strategy", "compose", "train"]


def compose(*overrides: str) -> Any:
    """The composed training config (conf/train.yaml with ``overrides``), as the CLI builds it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from flagstaff.system.config import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def train(cfg: Any, run_dir: str | None = None) -> dict[str, Any]:
    """Run training as configured (``flagstaff.system.runner.train``)."""
    from flagstaff.system.runner import train as run

    return run(cfg, run_dir=run_dir)


def build_aggregator(rule: str, **kwargs: Any) -> Any:
    """An aggregator by name (``flagstaff.strategies.aggregators.build``)."""
    from flagstaff.strategies.aggregators import build

    return build(rule, **kwargs)


def build_strategy(name: str, *overrides: str) -> Any:
    """A server strategy from ``conf/strategy/<name>.yaml`` with ``k=v`` overrides of the run."""
    from flagstaff.system.config import to_plain
    from flagstaff.system.specs import build_from

    cfg = to_plain(compose(f"strategy={name}", *overrides))
    return build_from(cfg["strategy"])
