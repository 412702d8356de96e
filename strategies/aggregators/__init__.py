"""Aggregation rules: pure torch callables mapping stacked updates ``U`` (n, d) to one vector (d,).

Every rule is a class ``Rule(f=0, n=None, **hparams)`` whose instances are called as
``agg(U, weights=None)``; see ``base.Aggregator`` for the shared validation (shape, finiteness,
preconditions such as ``n > 2f``, checked at construction when ``n`` is given and on every call).

Rules (``AGGREGATORS``, name -> class): mean, median, trimmed_mean, krum, multikrum, geomed,
cclip, bulyan, mda, meamed, phocas, clip, arc, flag. Each module registers its classes by name
(``@register("krum")``, ``strategies.aggregators.registry``), and every module of this package is
imported here, so a new rule is one module plus its ``conf/aggregator/<name>.yaml``.

Pre-aggregations (``PRE_AGGREGATIONS``) wrap any rule and delegate to it (STYLE.md point 3):
nnm, bucketing, clip, arc. ``clip`` and ``arc`` are both: as a rule they clip then take the
weighted mean; as a pre-aggregation they clip then run the wrapped rule.

Building from config: ``build(rule, pre=(), f=0, n=None, pre_kwargs=None, **hparams)``, the
``_target_`` of every ``conf/aggregator/<rule>.yaml``. The shared keys are written once, in
``conf/aggregator/_common.yaml``, which each rule's YAML includes first::

    # conf/aggregator/_common.yaml
    _target_: flagstaff.strategies.aggregators.build
    f: 0
    n: null
    pre: []              # e.g. [nnm], [bucketing], [nnm, bucketing], [clip], [arc]
    pre_kwargs:          # hyperparameters of each pre-aggregation, used when listed in `pre`
      nnm: {}
      bucketing: {s: 2, seed: 0}
      clip: {c: 1.0}
      arc: {}

    # conf/aggregator/krum.yaml
    defaults:
      - _common
      - _self_
    rule: krum
    # ... the rule's own hyperparameters

``pre`` is applied in order to the inputs: ``pre=[nnm, bucketing]`` mixes, then buckets the mixed
vectors, then runs the rule. The rule and every wrapper get the same f; each stage's
precondition is checked against the number of vectors it receives (bucketing turns n into
ceil(n/s)). From the command line: ``aggregator=krum aggregator.pre=[nnm]
aggregator.pre_kwargs.bucketing.s=3``. ``hydra.utils.instantiate(cfg.aggregator, f=3, n=15)``
returns the callable.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from flagstaff.strategies.aggregators.base import Aggregator, PreAggregator
from flagstaff.strategies.aggregators.basic import (
    CoordinateMedian,
    Mean,
    MeanAroundMedian,
    Phocas,
    TrimmedMean,
)
from flagstaff.strategies.aggregators.clipping import ARC, CenteredClipping, StaticClip
from flagstaff.strategies.aggregators.flag import FlagAggregator, FlagFit
from flagstaff.strategies.aggregators.geomed import GeometricMedian
from flagstaff.strategies.aggregators.krum import MDA, Bulyan, Krum, MultiKrum
from flagstaff.strategies.aggregators.preagg import NNM, Bucketing
from flagstaff.strategies.aggregators.registry import PRE, RULES, discover

__all__ = [
    "AGGREGATORS",
    "PRE_AGGREGATIONS",
    "ARC",
    "Aggregator",
    "Bucketing",
    "Bulyan",
    "CenteredClipping",
    "CoordinateMedian",
    "FlagAggregator",
    "FlagFit",
    "GeometricMedian",
    "Krum",
    "MDA",
    "Mean",
    "MeanAroundMedian",
    "MultiKrum",
    "NNM",
    "Phocas",
    "PreAggregator",
    "StaticClip",
    "TrimmedMean",
    "build",
]

discover()  # every module of the package, so that each one's @register has run
AGGREGATORS: dict[str, type[Aggregator]] = RULES
PRE_AGGREGATIONS: dict[str, type[PreAggregator]] = PRE


def _hparam_names(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "inner", "f", "n")]


def _check_kwargs(kind: str, name: str, cls: type, kwargs: Mapping[str, Any]) -> None:
    valid = _hparam_names(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"{kind} {name!r} got unknown hyperparameter(s) {unknown}; valid: {valid or 'none'}"
        )


def build(
    rule: str,
    pre: Sequence[str] = (),
    f: int = 0,
    n: int | None = None,
    pre_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    **hparams: Any,
) -> Aggregator:
    """Construct rule ``rule`` with ``hparams``, wrapped by the pre-aggregations in ``pre``.

    ``pre`` is applied in order to the inputs (the first name is the outermost wrapper).
    ``pre_kwargs[name]`` holds the hyperparameters of pre-aggregation ``name``. Unknown names or
    hyperparameters, and impossible (f, n) settings, raise ``ValueError`` saying what would work.
    """
    if rule not in AGGREGATORS:
        raise ValueError(f"unknown aggregator rule {rule!r}; valid: {sorted(AGGREGATORS)}")
    if isinstance(pre, str):
        pre = [pre]
    pre = list(pre or [])
    pre_kwargs = {str(k): dict(v or {}) for k, v in dict(pre_kwargs or {}).items()}
    for name in [*pre, *pre_kwargs]:
        if name not in PRE_AGGREGATIONS:
            raise ValueError(f"unknown pre-aggregation {name!r}; valid: {sorted(PRE_AGGREGATIONS)}")
    rule_cls = AGGREGATORS[rule]
    _check_kwargs("aggregator", rule, rule_cls, hparams)
    for name in pre:
        _check_kwargs("pre-aggregation", name, PRE_AGGREGATIONS[name], pre_kwargs.get(name, {}))

    # count the vectors each stage receives, from the inputs inward
    counts: list[int | None] = [n]
    for name in pre:
        probe = PRE_AGGREGATIONS[name](f=f, **pre_kwargs.get(name, {}))  # n unknown: no check
        counts.append(None if counts[-1] is None else probe.output_count(counts[-1]))
    try:
        agg: Aggregator = rule_cls(f=f, n=counts[-1], **hparams)
    except ValueError as err:
        if pre and n is not None:
            raise ValueError(
                f"{err} (after pre={pre}, the rule receives {counts[-1]} of the {n} inputs)"
            ) from err
        raise
    for name, n_in in zip(reversed(pre), reversed(counts[:-1]), strict=True):
        agg = PRE_AGGREGATIONS[name](agg, f=f, n=n_in, **pre_kwargs.get(name, {}))
    return agg
