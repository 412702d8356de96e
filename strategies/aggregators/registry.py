"""The aggregator registry: rules and pre-aggregations found by name (issue 20, item 6).

A rule's module registers its class where it is defined::

    @register("krum")
    class Krum(Aggregator): ...

    @register("nnm", rule=False, pre=True)   # a pre-aggregation only
    class NNM(PreAggregator): ...

``strategies.aggregators.build(rule=...)`` looks the name up after :func:`discover` imported every
module of the package, so adding an aggregator is one module in ``strategies/aggregators/`` plus its
``conf/aggregator/<name>.yaml`` (which takes ``_target_``, ``f``, ``n``, ``pre`` and ``pre_kwargs``
from ``conf/aggregator/_common.yaml`` through its defaults list). This module imports nothing from
the package, so any rule module can import it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

__all__ = ["PRE", "RULES", "discover", "register"]

#: name -> class, for ``build(rule=name)``
RULES: dict[str, type] = {}
#: name -> class, for ``build(pre=[name])`` (wrappers that take the rule as ``inner``)
PRE: dict[str, type] = {}


def register(name: str, *, rule: bool = True, pre: bool = False) -> Callable[[type], type]:
    """Class decorator: make the class buildable as rule ``name`` (``rule``) and/or as the
    pre-aggregation ``name`` (``pre``). The class's ``name`` attribute, if any, must agree."""

    def deco(cls: type) -> type:
        own = getattr(cls, "name", name)
        if own != name:
            raise ValueError(f"@register({name!r}) on {cls.__name__}, whose name is {own!r}")
        for table, on in ((RULES, rule), (PRE, pre)):
            if not on:
                continue
            old = table.get(name)
            if old is not None and old.__qualname__ != cls.__qualname__:
                raise ValueError(
                    f"aggregator name {name!r} is taken by {old.__module__}.{old.__qualname__}; "
                    f"choose another name for {cls.__module__}.{cls.__qualname__}"
                )
            table[name] = cls
        return cls

    return deco


def discover(package: str = "flagstaff.strategies.aggregators") -> None:
    """Import every module of ``package`` (once; Python caches them), so that the ``@register``
    decorators of a newly added module have run before a name is looked up."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")
