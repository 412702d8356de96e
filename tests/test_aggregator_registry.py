"""The aggregator registry (strategies/aggregators/registry.py; issue 20, item 6): a rule is one
module that registers its class by name plus one YAML that includes conf/aggregator/_common.yaml."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import hydra.utils
import pytest
import torch

import flagstaff.strategies.aggregators as aggregators
from flagstaff.strategies.aggregators import AGGREGATORS, PRE_AGGREGATIONS, build
from flagstaff.strategies.aggregators.registry import PRE, RULES, discover, register

CONF = Path(__file__).resolve().parents[1] / "conf" / "aggregator"

NEW_RULE = '''
"""A test-only rule: scale times the mean of the two inputs of smallest norm."""
import torch

from flagstaff.strategies.aggregators.base import Aggregator
from flagstaff.strategies.aggregators.registry import register


@register("two_smallest")
class TwoSmallest(Aggregator):
    name = "two_smallest"

    def __init__(self, *, f: int = 0, n: int | None = None, scale: float = 1.0) -> None:
        super().__init__(f=f, n=n)
        self.scale = scale

    def aggregate(self, U, weights):
        return self.scale * U[U.norm(dim=1).argsort()[:2]].mean(dim=0)
'''


def test_every_rule_and_pre_aggregation_is_registered_by_its_module() -> None:
    assert AGGREGATORS is RULES and PRE_AGGREGATIONS is PRE
    assert set(RULES) == {
        *("mean", "median", "trimmed_mean", "krum", "multikrum", "geomed", "cclip"),
        *("bulyan", "mda", "meamed", "phocas", "clip", "arc", "flag"),
    }
    assert set(PRE) == {"nnm", "bucketing", "clip", "arc"}
    for name, cls in RULES.items():
        assert cls.name == name and cls.__module__ != "flagstaff.strategies.aggregators"
    yamls = {p.stem for p in CONF.glob("*.yaml") if not p.stem.startswith("_")}
    assert yamls == set(RULES)
    for p in CONF.glob("*.yaml"):  # the shared block is written once
        assert ("pre_kwargs:" in p.read_text()) == (p.stem == "_common"), p.name


def test_register_refuses_a_taken_name_or_a_mismatched_one() -> None:
    class Other:
        name = "krum"

    with pytest.raises(ValueError, match="taken by flagstaff.strategies.aggregators.krum.Krum"):
        register("krum")(Other)
    with pytest.raises(ValueError, match="whose name is 'krum'"):
        register("median2")(Other)
    assert "median2" not in RULES


def test_a_new_rule_is_one_module_plus_its_yaml(tmp_path: Path, monkeypatch) -> None:
    """A module dropped into the package's path is found by discover() and built by name; its
    YAML needs only the defaults line, the rule and its own settings (no __init__ edit)."""
    pkg_dir = tmp_path / "pkg"
    pkg_dir.mkdir()
    (pkg_dir / "two_smallest.py").write_text(NEW_RULE)
    monkeypatch.setattr(aggregators, "__path__", [*aggregators.__path__, str(pkg_dir)])
    conf = tmp_path / "conf"
    (conf / "aggregator").mkdir(parents=True)
    shutil.copy(CONF / "_common.yaml", conf / "aggregator" / "_common.yaml")
    (conf / "aggregator" / "two_smallest.yaml").write_text(
        textwrap.dedent(
            """\
            defaults:
              - _common
              - _self_
            rule: two_smallest
            scale: 2.0
            """
        )
    )
    try:
        discover()
        assert "two_smallest" in RULES
        U = torch.tensor([[3.0, 3.0], [0.0, 0.0], [100.0, -100.0], [1.0, 1.0]])
        assert torch.equal(build("two_smallest", f=1, n=4)(U), torch.tensor([0.5, 0.5]))
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(overrides=["+aggregator=two_smallest", "aggregator.pre=[bucketing]"])
        agg = hydra.utils.instantiate(cfg.aggregator, f=1, n=4)
        assert agg.inner.scale == 2.0 and agg(U).shape == (2,)
    finally:
        RULES.pop("two_smallest", None)
        import sys

        sys.modules.pop("flagstaff.strategies.aggregators.two_smallest", None)
