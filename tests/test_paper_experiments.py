"""The papers' settings as one-line experiments (conf/experiment/paper_*.yaml, leaf_*.yaml).

Every experiment composes and validates as written; each runs end to end (backend=local) on small
generated data in its real on-disk layout (tests/test_hf_data.py builds them: a CIFAR-10
``save_to_disk`` folder of PIL images, a FEMNIST parquet clone, Shakespeare records, GLUE SST-2),
with the experiment's own model where the paper fixes it and only the sizes overridden down (few
clients, few samples, one or two rounds). ResNet-18 runs are marked slow; their fast variants take
the same data path with model=resnet8. When the data is missing, each stops before any work with
one line naming where it looked and the command that fetches it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_cli import cli  # noqa: F401 - the fixture running flagstaff-train in-process
from tests.test_hf_data import make_cifar, make_femnist, make_glue, make_shakespeare

EXPERIMENTS = (
    "paper_fedspeed_cifar10",
    "paper_flag_cifar10",
    "paper_monna_cifar10",
    "paper_fedsvd_sst2",
    "leaf_femnist",
    "leaf_shakespeare",
)
#: where each experiment's data comes from and the command that fetches it
FETCH = {
    "paper_fedspeed_cifar10": ("uoft-cs/cifar10", "save_to_disk('data/cifar10')"),
    "paper_flag_cifar10": ("uoft-cs/cifar10", "save_to_disk('data/cifar10')"),
    "paper_monna_cifar10": ("uoft-cs/cifar10", "save_to_disk('data/cifar10')"),
    "paper_fedsvd_sst2": ("'nyu-mll/glue', 'sst2'", "save_to_disk('data/glue_sst2')"),
    "leaf_femnist": ("flwr/femnist", "save_to_disk('data/femnist')"),
    "leaf_shakespeare": ("flwr/shakespeare", "save_to_disk('data/shakespeare')"),
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates_as_written(name) -> None:
    from flagstaff.system.build import validate
    from tests.conftest import compose

    c = validate(compose(f"experiment={name}"))
    assert c["data"]["path"] is None  # the user passes data.path=<local copy>
    assert c["rounds"] >= 80 and c["num_clients"] >= 6


def test_paper_settings_are_the_papers() -> None:
    """The settings each header promises (FL-Simulator, the Flag paper, MoNNA, FedSVD, LEAF)."""
    from tests.conftest import compose

    fs = compose("experiment=paper_fedspeed_cifar10")
    assert (fs.num_clients, fs.clients_per_round, fs.sampling) == (100, 10, "bernoulli")
    assert fs.model.kind == "resnet18" and fs.partition.kind == "dirichlet_equal"
    assert fs.partition.alpha == 0.1 and fs.strategy._target_.endswith("FedSpeed")
    # FL-Simulator's code: torchvision's stem, its split (a class that runs out restarts), its
    # augmentation and Normalize constants, test accuracy every round
    assert fs.model.stem == "imagenet" and fs.partition.exhausted == "refill"
    assert (fs.data.crop_padding, fs.data.crop_p, fs.data.pad_value, fs.data.flip) == (
        4, 0.5, "mean", True)  # fmt: skip
    assert list(fs.data.mean) == [0.491, 0.482, 0.447]
    assert list(fs.data.std) == [0.247, 0.243, 0.262]
    assert fs.eval_every == 1
    assert fs.model.init == "torchvision"  # its models.py builds torchvision's resnet18 (kaiming)
    cl = fs.client
    assert (cl.epochs, cl.batch_size, cl.lr, cl.lr_decay) == (5, 50, 0.1, 0.998)
    assert (fs.strategy.rho, fs.strategy.lamb, fs.strategy.alpha) == (0.1, 0.1, 1.0)
    assert fs.strategy.prox == "decay"  # the clip where FL-Simulator has it (REV21b)
    fl = compose("experiment=paper_flag_cifar10")
    assert (fl.num_clients, fl.clients_per_round, fl.attack.f) == (15, 15, 3)
    assert fl.aggregator.rule == "flag" and fl.model.kind == "resnet18"
    assert fl.attack._target_.endswith("Uniform") and (fl.client.steps, fl.client.batch_size) == (
        1,
        128,
    )
    mo = compose("experiment=paper_monna_cifar10")
    assert mo.mode == "p2p" and (mo.num_clients, mo.attack.f, mo.p2p.batch_size) == (16, 3, 50)
    assert mo.data.normalize == "load" and mo.p2p.rule == "nna"
    sv = compose("experiment=paper_fedsvd_sst2")
    assert (sv.num_clients, sv.clients_per_round, sv.client.steps) == (6, 3, 10)
    assert sv.strategy._target_.endswith("FedSVD") and sv.privacy.target_epsilon == 6.0
    assert sv.data.config == "sst2" and sv.model.kind == "minilm"
    fe = compose("experiment=leaf_femnist")
    assert fe.model.kind == "cnn_femnist" and fe.partition.key == "writer_id"
    assert (fe.clients_per_round, fe.client.lr, fe.client.batch_size) == (3, 0.004, 10)
    sh = compose("experiment=leaf_shakespeare")
    assert sh.model.kind == "lstm" and sh.partition.key == "character_id"
    assert (sh.clients_per_round, sh.client.lr, sh.rounds) == (10, 0.8, 80)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_missing_data_stops_before_any_work_with_one_line(tmp_path, cli, name) -> None:  # noqa: F811
    """No data.path and nothing in datasets' cache: exit 2, one line naming where it looked and
    the fetch command, nothing written into the run directory."""
    run_dir = tmp_path / "run"
    rc, out, err = cli(f"experiment={name}", "backend=local", f"data.cache_dir={tmp_path}/cache",
                       f"hydra.run.dir={run_dir}")  # fmt: skip
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    where, fetch = FETCH[name]
    assert where in lines[0] and "datasets' cache" in lines[0] and fetch in lines[0], lines[0]
    assert not run_dir.exists() or not any(run_dir.iterdir())


# -- end to end on generated data in the real layouts ------------------------------------------------
def _run(tmp_path, name: str, *overrides: str) -> dict:
    from flagstaff.system.runner import train
    from tests.conftest import compose

    over = (f"experiment={name}", "backend=local", "progress=false", "eval_every=1",
            "checkpoint_every=0", *overrides)  # fmt: skip
    res = train(compose(*over), run_dir=str(tmp_path / name))
    rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    res["metrics"] = [json.loads(r) for r in rows]
    return res


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("paper") / "cifar10", n_train=60, n_test=10)


def _ok(res: dict, rounds: int) -> None:
    assert len(res["metrics"]) == rounds and np.isfinite(res["loss"]), res["metrics"]
    assert torch.isfinite(res["params"]).all()


def test_normalize_at_load_gives_float_images_without_a_transform(cifar_root) -> None:
    """data.normalize=load: the training images normalized once (as the per-batch transform
    normalizes them, no crop or flip), no per-batch transform left; crop or flip refused."""
    from flagstaff.clients.hf import load_hf

    batch = load_hf(path=str(cifar_root))
    load = load_hf(path=str(cifar_root), normalize="load")
    assert load.transform is None and load.x_train.dtype == torch.float32
    torch.testing.assert_close(load.x_train, batch.transform(batch.x_train), rtol=0, atol=0)
    assert torch.equal(load.x_test, batch.x_test)
    with pytest.raises(ValueError, match="data.normalize=load.*crop_padding=0 and data.flip=false"):
        load_hf(path=str(cifar_root), normalize="load", crop_padding=4)
    with pytest.raises(ValueError, match="data.normalize='x'"):
        load_hf(path=str(cifar_root), normalize="x")


# CIFAR-10 experiments: the fast variants take the same data path (save_to_disk folder, uint8
# images, crop + flip per batch or normalized at load) with model=resnet8 instead of ResNet-18
FEDSPEED = ("num_clients=4", "clients_per_round=2", "client.epochs=1", "rounds=2")
FLAG = ("num_clients=7", "clients_per_round=7", "rounds=2")
MONNA = ("num_clients=5", "clients_per_round=5", "attack.f=1", "p2p.batch_size=8", "rounds=2")


def test_fedspeed_cifar10_fast_variant_runs(tmp_path, cifar_root) -> None:
    """ResNet-8 with the experiment's ImageNet stem, FL-Simulator's split (equal sizes) and its
    augmentation (half the crops, mean padding); summary.json carries the best evaluated round."""
    res = _run(tmp_path, "paper_fedspeed_cifar10", f"data.path={cifar_root}", "model=resnet8",
               *FEDSPEED)  # fmt: skip
    _ok(res, 2)
    run = tmp_path / "paper_fedspeed_cifar10"
    parts = json.loads((run / "partition.json").read_text())
    assert [c["samples"] for c in parts["clients"]] == [15] * 4  # 60 samples over 4 clients
    assert res["params"].shape[-1] == 78_042 + 16 * 3 * (49 - 9)  # ResNet-8 with the 7x7 stem
    accs = [r["accuracy"] for r in res["metrics"]]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_accuracy"] == max(accs) == res["best_accuracy"]
    assert summary["best_round"] == res["metrics"][accs.index(max(accs))]["round"]


def test_best_accuracy_skips_unevaluated_and_nan_rounds() -> None:
    """summary.json's best_accuracy/best_round: over the evaluated rounds only (eval_every > 1
    leaves rows without accuracy), the first of equal bests, a NaN accuracy never the best (max()
    keeps a leading NaN: nothing compares greater), None when no round has a number."""
    from flagstaff.system.loop import finish_summary

    def best(accs):
        rows = [{"round": i + 1, "round_time_s": 1.0, **({} if a is None else {"accuracy": a})}
                for i, a in enumerate(accs)]  # fmt: skip
        s = finish_summary({"rounds": len(rows), "seed": 0, "backend": "local"}, rows, 0, 0.0, "")
        return s["best_accuracy"], s["best_round"]

    assert best([None, 0.3, None, 0.5, None, 0.5]) == (0.5, 4)
    assert best([float("nan"), 0.2, 0.4, float("nan")]) == (0.4, 3)
    assert best([None, float("nan")]) == (None, None)
    assert best([]) == (None, None)


def test_flag_cifar10_fast_variant_runs_under_attack(tmp_path, cifar_root) -> None:
    res = _run(tmp_path, "paper_flag_cifar10", f"data.path={cifar_root}", "model=resnet8", *FLAG)
    _ok(res, 2)
    assert all(r["clients"] == 7 for r in res["metrics"])


def test_monna_cifar10_fast_variant_runs_peer_to_peer(tmp_path, cifar_root) -> None:
    res = _run(tmp_path, "paper_monna_cifar10", f"data.path={cifar_root}", "model=resnet8",
               *MONNA)  # fmt: skip
    _ok(res, 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,sizes",
    [("paper_fedspeed_cifar10", FEDSPEED), ("paper_flag_cifar10", FLAG),
     ("paper_monna_cifar10", MONNA)],
)  # fmt: skip
def test_cifar10_experiments_run_with_resnet18(tmp_path, cifar_root, name, sizes) -> None:
    res = _run(tmp_path, name, f"data.path={cifar_root}", *sizes[:-1], "rounds=1")
    _ok(res, 1)
    assert res["params"].shape[-1] > 11_000_000  # the experiment's own ResNet-18


SVD = ("data.max_length=16", "num_clients=3", "clients_per_round=2", "client.batch_size=4",
       "client.steps=2", "rounds=1")  # fmt: skip


def test_fedsvd_sst2_runs_with_minilm_under_dp(tmp_path) -> None:
    """Fast variant: a fixed noise multiplier and the RDP accountant (the experiment calibrates
    the noise with PRV, tens of seconds per client size: the slow test below)."""
    root = make_glue(tmp_path / "sst2", task="sst2", n=24)
    res = _run(tmp_path, "paper_fedsvd_sst2", f"data.path={root}", *SVD,
               "client.noise_multiplier=1.0", "privacy.accountant=rdp")  # fmt: skip
    _ok(res, 1)
    assert 0 < res["metrics"][-1]["epsilon"] <= 6.0


@pytest.mark.slow
def test_fedsvd_sst2_runs_as_configured_with_prv_calibration(tmp_path) -> None:
    root = make_glue(tmp_path / "sst2", task="sst2", n=24)
    res = _run(tmp_path, "paper_fedsvd_sst2", f"data.path={root}", *SVD)
    _ok(res, 1)
    assert 0 < res["metrics"][-1]["epsilon"] <= 6.0


def test_leaf_femnist_runs_one_client_per_writer(tmp_path) -> None:
    root = make_femnist(tmp_path / "femnist", writers=6, per_writer=12)
    res = _run(tmp_path, "leaf_femnist", f"data.path={root}", "num_clients=6", "rounds=2")
    _ok(res, 2)
    part = json.loads((tmp_path / "leaf_femnist" / "partition.json").read_text())
    assert part["num_clients"] == 6 and all(r["clients"] == 3 for r in res["metrics"])


def test_leaf_shakespeare_runs_one_client_per_role(tmp_path) -> None:
    path = make_shakespeare(tmp_path / "shakespeare.parquet", roles=4, per_role=10)
    res = _run(tmp_path, "leaf_shakespeare", f"data.path={path}", "num_clients=4",
               "clients_per_round=2", "rounds=1")  # fmt: skip
    _ok(res, 1)


def test_leaf_femnist_builds_leafs_cnn() -> None:
    """LEAF's FEMNIST CNN (TalwalkarLab/leaf models/femnist/cnn.py: 5x5 conv 32 and 64 'same', 2x2
    max pools, dense 2048, 62 outputs) has 6,603,710 parameters; FedAvg's paper CNN (dense 512,
    1,690,046 for 62 classes) is a different model."""
    from hydra.utils import instantiate

    from tests.conftest import compose

    fe = compose("experiment=leaf_femnist")
    model = instantiate(fe.model, input_shape=(1, 28, 28), num_classes=62)
    assert sum(p.numel() for p in model.parameters()) == 6_603_710
