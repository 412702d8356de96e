"""The generic package names resolve to this project, and the config tree ships with it."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.conftest import ROOT

NAMES = ["system", "strategies", "clients", "jobs", "launch", "conf"]


@pytest.mark.parametrize("name", NAMES)
def test_packages_are_ours_under_one_namespace(name: str) -> None:
    mod = importlib.import_module(f"flagstaff.{name}")
    assert Path(mod.__file__).resolve().parent == ROOT / name


def test_pyproject_lists_packages_and_scripts() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "flagstaff"
    st = meta["tool"]["setuptools"]
    for name in NAMES:
        assert f"flagstaff.{name}" in st["packages"]
        assert st["package-dir"][f"flagstaff.{name}"] == name  # the folder stays at the top
    scripts = meta["project"]["scripts"]
    assert scripts["flagstaff-train"] == "flagstaff.launch.train:main"
    deps = " ".join(meta["project"]["dependencies"])
    for dep in ("torch", "ray", "flwr", "opacus", "numpy", "hydra-core"):
        assert dep in deps


def test_a_users_own_strategies_and_system_do_not_shadow_flagstaff(tmp_path) -> None:
    """Issue 23 item 2: a user's strategies.py and system/ package beside their script broke
    ``from strategies.aggregators import build``; under the flagstaff namespace they cannot."""
    (tmp_path / "strategies.py").write_text("raise RuntimeError('the user strategies.py')\n")
    (tmp_path / "system").mkdir()
    (tmp_path / "system" / "__init__.py").write_text("raise RuntimeError('the user system')\n")
    script = (
        "import torch, flagstaff\n"
        "from flagstaff.strategies.aggregators import build\n"
        "import flagstaff.system.config\n"
        "agg = flagstaff.build_aggregator('median')\n"
        "print(agg(torch.tensor([[0.0], [1.0], [5.0]])).item())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1.0"


def test_public_entry_composes_and_builds() -> None:
    import flagstaff

    cfg = flagstaff.compose("experiment=smoke", "strategy=scaffold")
    assert cfg.strategy._target_.startswith("flagstaff.strategies.")
    assert type(flagstaff.build_strategy("scaffold")).__name__ == "SCAFFOLD"


def test_constraints_pin_known_good_versions() -> None:
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    assert pins["torch"] == "2.13.0"
    assert pins["flwr"] == "1.41.0"
    assert pins["ray"] == "2.55.1"
    assert pins["opacus"] == "1.6.0"
    assert pins["hydra-core"] == "1.3.8"
    assert pins["numpy"].startswith("2.")


def test_conf_found_through_package() -> None:
    from tests.conftest import compose

    cfg = compose()
    assert cfg.backend == "ray" and cfg.data.name == "digits"
