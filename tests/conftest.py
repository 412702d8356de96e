"""Shared fixtures: compose Flagstaff configs the way flagstaff-train does; one Ray per module."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from flagstaff.system.ray_start import make_ray_private, shutdown_ray, start_local_ray

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# every Ray the tests start is private like flagstaff-train's: loopback only, token required. Ray
# reads these settings when it is imported, so here, before any test module imports it; tests that
# call ray.init themselves use this process's token (system/ray_start.py)
make_ray_private()
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def compose(*overrides: str, config_name: str = "train"):
    """The composed config of ``flagstaff-train <overrides>`` (Hydra compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from flagstaff.system.config import register

    register()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=False)


def plain_sgd_params(model, g0, x, y, plan, lr: float, momentum: float = 0.0):
    """The reference every batched-trainer test compares with: each client of ``plan`` alone, the
    module ``model`` from the flat parameters ``g0`` and torch.optim.SGD on its planned batches
    (cross-entropy); the (K, d) flat parameters after its local steps."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    out = []
    for k in range(plan.idx.shape[1]):
        nn.utils.vector_to_parameters(g0.clone(), model.parameters())
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        sub = plan.select(k)
        for t in range(sub.num_steps):
            rows = sub.idx[t, 0][sub.mask[t, 0] > 0]
            opt.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
        out.append(nn.utils.parameters_to_vector(model.parameters()).detach())
    return torch.stack(out)


@pytest.fixture(scope="module")
def ray_session():
    """A real local Ray instance shared by the tests of one module (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():  # private: loopback, its own token, a watchdog
        start_local_ray(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    shutdown_ray()
