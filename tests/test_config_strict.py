"""Strict configs (issue 23 item 3): an unknown or missing key is one line naming the key, its
group and the valid keys, exit code 2, before any work (system/strict.py, system/config.py)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flagstaff.system.config import ConfigError, check_values, register
from flagstaff.system.strict import preflight
from tests.conftest import ROOT, compose


def _cli(module: str, *args: str, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_refusal(p: subprocess.CompletedProcess, run_dir: Path, *needles: str) -> None:
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert p.stdout == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not run_dir.exists()  # refused before Hydra made the run directory


@pytest.mark.parametrize(
    "args, needles",
    [
        # accepted silently before: the run did the default 30 rounds
        (
            ["+round=50"],
            ["unknown key round at the top level", "valid keys:", "did you mean rounds?"],
        ),
        # Hydra's 5-line refusal (exit 1), then LocalSGD's TypeError with no valid keys
        (
            ["client.lrr=0.1"],
            [
                "unknown key client.lrr in group client (client=sgd",
                "lr_decay",
                "did you mean client.lr?",
            ],
        ),
        # a 28-line traceback from inside the data loader
        (["data=user"], ["missing value for data.root (data=user)", "data.root=..."]),
    ],
)
def test_cli_bad_key_is_one_line_exit_2(tmp_path, args, needles) -> None:
    run_dir = tmp_path / "run"
    p = _cli("flagstaff.launch.train", "experiment=smoke", *args, run_dir=run_dir)
    _one_line_refusal(p, run_dir, *needles)


def test_job_cli_bad_key_is_one_line_exit_2(tmp_path) -> None:
    run_dir = tmp_path / "run"
    p = _cli("flagstaff.launch.job", "backend=local", "+job.sketchh=srht", run_dir=run_dir)
    _one_line_refusal(p, run_dir, "unknown key job.sketchh in group job (job=lstsq", "nnz")
    assert "did you mean job.sketch?" in p.stderr


def _preflight(capsys, *args: str, config: str = "train") -> str:
    """``preflight`` as flagstaff-train/-job run it; the one line it printed ('' if it passed)."""
    register()
    try:
        preflight(list(args), "flagstaff.conf", config, check_values if config == "train" else None)
    except SystemExit as stop:
        assert stop.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]
    return ""


@pytest.mark.parametrize(
    "args, needles",
    [
        (
            ["+client.lrr=0.1"],
            ["unknown key client.lrr in group client", "did you mean client.lr?"],
        ),
        (["+cluster.gpu=1"], ["unknown key cluster.gpu in group cluster", "gpus_per_host"]),
        (["+privacy.delt=1e-6"], ["privacy.delt", "did you mean privacy.delta?"]),
        (["+model.depth=3"], ["model.depth in group model (model=mlp", "valid keys: hidden, kind"]),
        (
            ["+aggregator.pre_kwargs.bucketing.ss=3"],
            ["aggregator.pre_kwargs.bucketing.ss", "valid keys: s, seed"],
        ),
        (["experiment=robust_digits", "+attack.ff=2"], ["attack.ff", "did you mean attack.f?"]),
        (["clients_per_round=30", "num_clients=10"], ["clients_per_round=30 must be between"]),
        (["client=sgdd"], ["client=sgdd: no such option", "did you mean client=sgd?"]),
        (["backend=gpu"], ["backend:", "local, ray, flower"]),
        (["-m", "seed=0,1", "+round=3"], ["unknown key round"]),  # a sweep: its first job
        (["-m", "clients_per_round=99,5"], ["clients_per_round=99"]),
    ],
)
def test_preflight_refuses_with_the_key_and_the_valid_keys(capsys, args, needles) -> None:
    line = _preflight(capsys, *args)
    for needle in needles:
        assert needle in line, (needle, line)


def test_preflight_job_missing_option_hides_schema_nodes(capsys) -> None:
    line = _preflight(capsys, "job=lstsqq", config="job")
    assert "did you mean job=lstsq?" in line and "_schema" not in line


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize(
    "names",
    [
        # an inline data group, overridden groups, a p2p run (the default suite)
        ["smoke", "sim_resnet8", "robust_digits", "monna_digits"],
        pytest.param(EXPERIMENTS, marks=pytest.mark.slow),  # two compositions each: ~20 s
    ],
)
def test_every_experiment_passes(names: list[str]) -> None:
    """Experiments set only keys their groups declare (one typo would refuse the experiment)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from flagstaff.system.strict import check_config

    register()
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        for name in names:
            over = [f"experiment={name}"]
            cfg = hydra_compose("train", overrides=over, return_hydra_config=True)
            choices = dict(cfg.hydra.runtime.choices)
            job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            check_config(job, choices, over, "train", check_values)


def test_in_process_config_refuses_unknown_top_level_and_typed_group_keys() -> None:
    """A config composed in Python (no command line) gets the schema's check too."""
    for override, key in (("+round=50", "round"), ("+cluster.gpu=1", "cluster.gpu")):
        with pytest.raises(ConfigError, match=rf"unknown key {key} .*valid keys: "):
            check_values(compose("experiment=smoke", override))


# -- the declarations: each option's YAML keys are what its _target_ takes ------------------------
def _accepted(target: str, node: dict) -> set[str]:
    """The keyword arguments ``target`` takes, following ``**kwargs`` to where they go."""
    from hydra.utils import get_method

    fn = get_method(target)
    params = inspect.signature(fn).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return names
    if target == "flagstaff.clients.data.load_dataset":  # dispatches on name (clients/data.py)
        import flagstaff.clients.data as d

        loader = {"digits": d.load_digits, "synthetic": d.make_synthetic}
        loader |= {"mnist1d": d.load_mnist1d, "user": d.load_user}
        return names | set(inspect.signature(loader[node["name"]]).parameters)
    if target == "flagstaff.strategies.aggregators.build":  # the rule's hyperparameters
        from flagstaff.strategies.aggregators import AGGREGATORS, _hparam_names

        return names | set(_hparam_names(AGGREGATORS[node["rule"]]))
    raise AssertionError(f"{target} takes **kwargs: say here where they go")


GROUPS = ("data", "partition", "model", "strategy", "aggregator", "client", "attack", "p2p")
OPTIONS = [
    (g, p.stem) for g in GROUPS for p in sorted((ROOT / "conf" / g).glob("*.yaml"))
    if not p.stem.startswith("_")
]  # fmt: skip


def _declared(group: str, option: str) -> dict:
    """conf/<group>/<option>.yaml merged over the group files its defaults list names (what
    Hydra composes for the group, read directly: 90 compositions would take a minute)."""
    raw = OmegaConf.load(ROOT / "conf" / group / f"{option}.yaml")
    out = OmegaConf.create()
    for entry in raw.pop("defaults", ["_self_"]):
        if entry == "_self_":
            out = OmegaConf.merge(out, raw)
        elif isinstance(entry, str):
            out = OmegaConf.merge(out, _declared(group, entry))
    node = OmegaConf.to_container(out, resolve=False)
    assert isinstance(node, dict)
    return node


@pytest.mark.parametrize("group, option", OPTIONS)
def test_declared_keys_are_accepted_by_the_target(group: str, option: str) -> None:
    node = _declared(group, option)
    keys = {k for k in node if not k.startswith("_")}
    unknown = keys - _accepted(node["_target_"], node)
    assert not unknown, f"conf/{group}/{option}.yaml declares {sorted(unknown)}"
    if group == "aggregator":
        from flagstaff.strategies.aggregators import PRE_AGGREGATIONS, _hparam_names

        for name, kwargs in node["pre_kwargs"].items():
            assert set(kwargs) <= set(_hparam_names(PRE_AGGREGATIONS[name])), name


def test_hosts_that_do_not_fit_a_local_ray_are_refused_before_anything_is_written(tmp_path) -> None:
    """cluster.hosts x cluster.cpus_per_host above this machine's CPUs: one line naming the keys
    (issue 23 item 7: it used to fail with a traceback after Ray had started and the run directory
    was written)."""
    import os

    from flagstaff.system.build import ResourceError, build_run

    hosts = len(os.sched_getaffinity(0)) + 1
    cfg = compose("experiment=smoke", "backend=ray", f"cluster.hosts={hosts}")
    with pytest.raises(ResourceError, match=rf"cluster.hosts={hosts} client hosts do not fit"):
        build_run(cfg)
    # half a CPU per host fits the same machine
    build_run(
        compose(
            "experiment=smoke",
            "backend=ray",
            f"cluster.hosts={hosts}",
            f"cluster.cpus_per_host={1 / hosts:.3f}",
        )
    )
