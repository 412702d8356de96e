"""Compression jobs (jobs/compress): exact properties of SVD, FWSVD and WeLore, the Fisher sum on
Ray actors, parameter counting, loading and its errors, and the jobs from the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch
from torch import nn

from flagstaff.jobs.compress.core import (
    Budget,
    Context,
    LowRankLayer,
    accuracy,
    apply_compression,
    count_params,
    find_layers,
    fisher_row_sums,
    fisher_row_sums_sharded,
    layer_matrix,
    load_compressed,
    load_data,
    load_model,
    shard_bounds,
)
from flagstaff.jobs.compress.fwsvd import fwsvd, row_weights, weigh
from flagstaff.jobs.compress.run import run_compress
from flagstaff.jobs.compress.svd import svd_layer, truncated_svd
from flagstaff.jobs.compress.welore import (
    compress_welore,
    find_threshold,
    normalized_spectrum,
    welore_plan,
    welore_ranks,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job(**kw) -> NS:
    """The keys of a compress_* job config (as the Hydra schema gives them)."""
    base = dict(
        name="compress_svd",
        checkpoint=None,
        model=NS(kind="mlp", hidden=[32, 32], channels=8, path=None, epochs=8, lr=3e-3),
        data=NS(name="digits", seed=None, image=False, n_samples=200, max_length=16),
        rank=0,
        ratio=0.5,
        targets=["*"],
        calib_samples=128,
        sweep=[],
        save=False,
        fisher_batch=16,
        threshold=None,
        target_reduction=None,
        min_ratio=0.0,
        atoms=0,
        nonzeros=0,
        iters=3,
        grad_batch=8,
        damp=1e-4,
        block=0,
    )
    base.update(kw)
    return NS(**base)


@pytest.fixture(scope="module")
def demo():
    """A trained digits MLP 64-32-32-10 and its data (deterministic)."""
    torch.manual_seed(0)
    return load_model(_job(), seed=0)


def _spectrum_matrix(m: int, n: int, sigmas: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(sigmas), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(sigmas), generator=g, dtype=torch.float64))
    return U @ torch.diag(sigmas.double()) @ V.T


# -- SVD -----------------------------------------------------------------------------------------


def test_svd_error_is_eckart_young_tail():
    W = torch.randn(40, 25, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    S = torch.linalg.svdvals(W)
    for r in (1, 5, 24):
        U, V, _ = truncated_svd(W, r)
        err = torch.linalg.norm(W - U @ V)
        assert math.isclose(float(err), float(S[r:].square().sum().sqrt()), rel_tol=1e-10)
        rec = svd_layer("w", W, r, bias_params=40)
        assert rec.params == r * (40 + 25) + 40
        assert math.isclose(rec.rel_error, float(err / torch.linalg.norm(W)), rel_tol=1e-9)


# -- FWSVD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["input", "output"])
def test_fwsvd_equals_svd_under_constant_row_weights(axis):
    W = torch.randn(30, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k = 50 if axis == "input" else 30
    U, V, _ = truncated_svd(W, 7)
    for c in (1.0, 3.7e-4):
        Uf, Vf, _ = fwsvd(W, torch.full((k,), c, dtype=torch.float64), 7, axis)
        torch.testing.assert_close(Uf @ Vf, U @ V, rtol=1e-10, atol=1e-12)
    Uz, Vz, _ = fwsvd(W, torch.zeros(k), 7, axis)  # no Fisher information at all: plain SVD
    torch.testing.assert_close(Uz @ Vz, U @ V, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("axis", ["input", "output"])
def test_fwsvd_attains_weighted_eckart_young(axis):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(36, 20, generator=g, dtype=torch.float64)
    k = 20 if axis == "input" else 36
    importance = torch.rand(k, generator=g, dtype=torch.float64) ** 4 * 10 + 1e-3
    w = row_weights(importance)
    torch.testing.assert_close(w, importance.sqrt())
    weighted_spectrum = torch.linalg.svdvals(weigh(W, w, axis))

    def werr(W_hat: torch.Tensor) -> float:
        return float(torch.linalg.norm(weigh(W - W_hat, w, axis)))

    for r in (2, 6, 12):
        Uf, Vf, S = fwsvd(W, importance, r, axis)
        assert Uf.shape == (36, r) and Vf.shape == (r, 20)
        torch.testing.assert_close(S, weighted_spectrum)
        e_fw = werr(Uf @ Vf)
        assert math.isclose(e_fw, float(weighted_spectrum[r:].square().sum().sqrt()), rel_tol=1e-9)
        U, V, _ = truncated_svd(W, r)
        assert e_fw <= werr(U @ V) * (1 + 1e-12)
        gk = torch.Generator().manual_seed(10 + r)
        for _ in range(5):  # perturbed rank-r factors do worse in the weighted norm
            dU = torch.randn(Uf.shape, generator=gk, dtype=torch.float64)
            dV = torch.randn(Vf.shape, generator=gk, dtype=torch.float64)
            assert e_fw < werr((Uf + 0.01 * dU) @ (Vf + 0.01 * dV))


def test_fwsvd_input_axis_is_the_papers_row_weighting_of_the_transposed_weight():
    """Hsu et al.'s W is (in x out) for y = x W: weighting torch's input columns is their row
    weighting of W^T, so the two orientations are each other's transpose."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(24, 40, generator=g, dtype=torch.float64)
    importance = torch.rand(40, generator=g, dtype=torch.float64) + 0.1
    Ui, Vi, Si = fwsvd(W, importance, 5, "input")
    Uo, Vo, So = fwsvd(W.T.contiguous(), importance, 5, "output")
    torch.testing.assert_close(Si, So)
    torch.testing.assert_close(Ui @ Vi, (Uo @ Vo).T, rtol=1e-10, atol=1e-12)


def test_fisher_row_sums_match_a_direct_computation_and_shards_add_up(demo):
    model, ds = demo.model, demo.data
    names = ["net.0", "net.2"]
    x, y = ds.x_train[:100], ds.y_train[:100]
    sums = fisher_row_sums(model, names, x, y, batch_size=16)  # default: the paper's rows, inputs
    sums_out = fisher_row_sums(model, names, x, y, batch_size=16, axis="output")
    w = model.get_submodule("net.2").weight
    ref_in = torch.zeros(w.shape[1], dtype=torch.float64)
    ref_out = torch.zeros(w.shape[0], dtype=torch.float64)
    for i in range(0, 100, 16):
        w.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16])
        (g,) = torch.autograd.grad(loss, [w])
        w.requires_grad_(False)
        ref_in += g.double().square().sum(0)
        ref_out += g.double().square().sum(1)
    torch.testing.assert_close(sums["net.2"], ref_in, rtol=1e-10, atol=0)
    torch.testing.assert_close(sums_out["net.2"], ref_out, rtol=1e-10, atol=0)
    torch.testing.assert_close(sums["net.2"].sum(), sums_out["net.2"].sum(), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="choose one of"):
        fisher_row_sums(model, names, x, y, batch_size=16, axis="rows")
    assert shard_bounds(100, 16, 3) == [(0, 32), (32, 80), (80, 100)]  # 2, 3, 2 batches
    for axis, ref in (("input", sums), ("output", sums_out)):
        local3, info = fisher_row_sums_sharded(model, names, x, y, 16, "local", 3, axis)
        assert len(info["shards"]) == 3 and info["axis"] == axis
        for n in names:
            torch.testing.assert_close(local3[n], ref[n], rtol=1e-12, atol=0)


def test_fisher_row_sums_on_two_ray_actors_equal_single_process(demo, ray_session):
    model, ds = demo.model, demo.data
    names = ["net.0", "net.2", "net.4"]
    x, y = ds.x_train[:160], ds.y_train[:160]
    single = fisher_row_sums(model, names, x, y, batch_size=8)
    on_ray, info = fisher_row_sums_sharded(model, names, x, y, 8, "ray", 2)
    assert info["backend"] == "ray" and len(info["shards"]) == 2
    for n in names:  # float32 gradients; the actors run 1 BLAS thread: rounding-level changes
        torch.testing.assert_close(on_ray[n], single[n], rtol=1e-6, atol=0)


# -- WeLore --------------------------------------------------------------------------------------


def test_welore_thresholds_on_a_known_spectrum():
    S = torch.tensor([10.0, 8.0, 5.0, 3.0, 1.0])
    torch.testing.assert_close(
        normalized_spectrum(S), torch.tensor([1.0, 7 / 9, 4 / 9, 2 / 9, 0.0], dtype=torch.float64)
    )
    for t, r in [(0.0, 5), (0.2, 4), (2 / 9, 4), (0.3, 3), (0.5, 2), (0.78, 1), (1.0, 1)]:
        assert welore_ranks({"a": S}, t)["a"] == r, t
    flat = torch.ones(4)
    assert welore_ranks({"f": flat}, 0.9)["f"] == 4  # a flat spectrum has nothing to prune
    # a 20 x 5 matrix at rank 1 costs 25 < 100: low rank; at rank 4 (80 + 20... = 100) dense
    plan = welore_plan({"a": (20, 5)}, {"a": S}, 0.5)
    assert plan.ranks == {"a": 2} and plan.lowrank == {"a": True}
    assert plan.params_after == 2 * 25 and plan.params_before == 100
    plan = welore_plan({"a": (20, 5)}, {"a": S}, 0.1)
    assert plan.ranks == {"a": 4} and plan.lowrank == {"a": False} and plan.params_after == 100
    plan = welore_plan({"a": (20, 5)}, {"a": S}, 0.5, min_ratio=0.7)  # 1 - 2/5 < 0.7: dense
    assert plan.lowrank == {"a": False}


def _different_spectra_model() -> nn.Sequential:
    """Three 64 x 64 layers with fast, medium and slow singular-value decay."""
    net = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)
    )
    i = torch.arange(64, dtype=torch.float64)
    for k, (layer, decay) in enumerate(
        zip([net[0], net[2], net[4]], [0.6, 0.9, 0.99], strict=True)
    ):
        with torch.no_grad():
            layer.weight.copy_(_spectrum_matrix(64, 64, decay**i, seed=k).float())
    return net


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_welore_reaches_target_reduction_with_non_uniform_ranks(target):
    net = _different_spectra_model()
    layers = find_layers(net, ["*"])
    ctx = Context(net, layers, torch.zeros(1, 64), torch.zeros(1, dtype=torch.long), NS(), 0)
    recs = compress_welore(ctx, Budget(ratio=1 - target))
    plan = ctx.cache["welore_plan"]
    assert abs(plan.reduction - target) <= 0.01 * target, (plan.reduction, target)
    ranks = [plan.ranks[n] for n in layers]
    assert len(set(ranks)) == 3 and ranks == sorted(ranks), ranks  # slower decay, higher rank
    weights = sum(layer_matrix(m).numel() for m in layers.values())
    biases = sum(m.bias.numel() for m in layers.values())
    assert sum(r.params for r in recs.values()) == plan.params_after + biases
    assert plan.params_before == weights
    for n, rec in recs.items():  # low-rank components are rank-r SVDs, the others untouched
        if plan.lowrank[n]:
            assert rec.factors["U"].shape[1] == rec.factors["V"].shape[0] == plan.ranks[n]
        else:
            assert torch.equal(rec.weight_hat, layer_matrix(layers[n])) and rec.factors == {}
    # the bisection's threshold is a normalized singular value and reproduces the plan
    spectra = {n: torch.linalg.svdvals(layer_matrix(m).double()) for n, m in layers.items()}
    shapes = {n: tuple(layer_matrix(m).shape) for n, m in layers.items()}
    again = find_threshold(shapes, spectra, target)
    assert again.ranks == plan.ranks and again.threshold == plan.threshold


# -- layers, parameter counts, checkpoints -------------------------------------------------------


def test_low_rank_conv_equals_dense_conv_with_the_product_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    W = layer_matrix(conv)
    assert W.shape == (8, 27)
    rec = svd_layer("c", W, 4, bias_params=8)
    holder = nn.Sequential(conv)
    dense = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    with torch.no_grad():
        dense.weight.copy_(rec.weight_hat.reshape(dense.weight.shape))
        dense.bias.copy_(conv.bias)
    apply_compression(holder, {"0": rec})
    assert isinstance(holder[0], LowRankLayer) and count_params(holder) == rec.params
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(holder(x), dense(x), rtol=1e-5, atol=1e-5)


def test_params_after_and_checkpoint_round_trip(demo, tmp_path):
    job = _job(rank=5, targets=["net.0", "net.2"], save=True, sweep=[0.5])
    res, draw = run_compress("svd", job, 0, "local", 1, None, str(tmp_path))
    # 64-32-32-10: net.0 (32 x 64), net.2 (32 x 32) at rank 5; biases stay
    expected = res["params_before"] - (32 * 64 + 32 * 32) + 5 * (32 + 64) + 5 * (32 + 32)
    assert res["params_before"] == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert res["params_after"] == expected == res["params_in_modules"]
    assert res["accuracy_before"] == accuracy(demo.model, demo.data.x_test, demo.data.y_test)
    model, meta = load_compressed(tmp_path / "compressed.pt")
    assert count_params(model) == expected and meta["structure"]["net.0"]["rank"] == 5
    ds = load_data(meta["data_spec"])
    assert accuracy(model, ds.x_test, ds.y_test) == res["accuracy_after"]
    assert set(res["rel_error"]) == {"net.0", "net.2"} and len(res["sweep"]) == 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    draw(fig)
    plt.close(fig)


def test_flagstaff_run_dir_and_state_dict_load(demo, tmp_path):
    from omegaconf import OmegaConf

    from flagstaff.clients.trainer import ParamSpec

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    cfg = {
        "seed": 0,
        "data": {
            "_target_": "flagstaff.clients.data.load_dataset",
            "name": "digits",
            "seed": "${seed}",
        },
        "model": {
            "_target_": "flagstaff.clients.models.build_model",
            "kind": "mlp",
            "hidden": [32, 32],
        },
    }
    OmegaConf.save(OmegaConf.create(cfg), run / ".hydra" / "config.yaml")
    flat = ParamSpec.of(_trainable(demo.model)).flatten(dict(demo.model.named_parameters()))
    torch.save({"round": 3, "params": flat.detach().clone()}, run / "checkpoint.pt")
    for path in (run, run / "checkpoint.pt"):
        loaded = load_model(_job(checkpoint=str(path)), seed=0)
        assert loaded.source.startswith("flagstaff run")
        x = loaded.data.x_test
        torch.testing.assert_close(loaded.model(x), demo.model(x))
    sd = tmp_path / "sd.pt"
    torch.save(demo.model.state_dict(), sd)
    loaded = load_model(_job(checkpoint=str(sd)), seed=0)
    torch.testing.assert_close(loaded.model(x), demo.model(x))
    with pytest.raises(ValueError, match="outside its run directory"):
        (tmp_path / "lone").mkdir()
        torch.save({"round": 3, "params": flat}, tmp_path / "lone" / "ck.pt")
        load_model(_job(checkpoint=str(tmp_path / "lone" / "ck.pt")), seed=0)


def _trainable(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.mark.parametrize(
    "kw, exc, message",
    [
        ({"checkpoint": "/nonexistent/model.pt"}, FileNotFoundError, "does not exist"),
        ({"rank": 40}, ValueError, r"job.rank=40 exceeds min\(out, in\)=32 of layer 'net.0'"),
        ({"targets": ["encoder.*"]}, ValueError, "matches no linear or conv layer"),
    ],
)
def test_bad_input_says_what_to_do(kw, exc, message):
    with pytest.raises(exc, match=message):
        run_compress("svd", _job(**kw), 0)


def test_bad_state_dicts_say_what_to_do(demo, tmp_path):
    small = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    torch.save({f"net.{k}": v for k, v in small.state_dict().items()}, tmp_path / "small.pt")
    with pytest.raises(ValueError, match="shape mismatches .*set job.model.kind/hidden"):
        run_compress("svd", _job(checkpoint=str(tmp_path / "small.pt")), 0)
    sd = {k: v.clone() for k, v in demo.model.state_dict().items()}
    sd["net.2.weight"][3, 4] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="'net.2' has 1 non-finite weights"):
        run_compress("svd", _job(checkpoint=str(tmp_path / "nan.pt")), 0)
    (tmp_path / "junk.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match="not a readable torch file"):
        run_compress("svd", _job(checkpoint=str(tmp_path / "junk.pt")), 0)


# -- the other methods through the same framework ------------------------------------------------


def test_fwsvd_and_welore_jobs_in_process():
    res, _ = run_compress("fwsvd", _job(name="compress_fwsvd", sweep=[0.3]), 0, "local", 2)
    assert len(res["fisher"]["shards"]) == 2
    assert all(0 <= e < 1 for e in res["rel_error"].values())
    res, _ = run_compress("welore", _job(name="compress_welore", target_reduction=0.4), 0)
    red = res["welore"]["achieved_reduction"]
    assert abs(red - 0.4) <= 0.004 and res["welore"]["target_reduction"] == pytest.approx(0.4)
    weights = res["target_params_before"] - (32 + 32 + 10)
    assert res["target_params_after"] == round((1 - red) * weights) + (32 + 32 + 10)


def test_cospadi_and_mfac_jobs(tmp_path):
    res, _ = run_compress(
        "cospadi",
        _job(name="compress_cospadi", targets=["net.2"], save=True),
        0,
        "local",
        1,
        None,
        str(tmp_path),
    )
    info = res["layers"]["net.2"]
    assert res["target_params_after"] <= 0.5 * res["target_params_before"] + 1
    model, _ = load_compressed(tmp_path / "compressed.pt")
    codes = model.get_submodule("net.2").second.weight  # C^T: out x k, s nonzeros per output row
    assert ((codes != 0).sum(1) == info["nonzeros"]).all()
    res, _ = run_compress("mfac", _job(name="compress_mfac", ratio=0.3, targets=["net.0"]), 0)
    # 2048 weights, budget floor(0.3 * 2048) = 614 parameters: a 2048-bit mask costs 64 of them
    # (cheaper than 550 uint16 indices, 275), so 550 weights stay
    layer = res["layers"]["net.0"]
    assert layer["nonzeros"] == 550 and layer["params"] == 614 + 32  # + the kept bias
    assert res["accuracy_after"] > 0.5


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_compress_svd(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "flagstaff.launch.job",
        "job=compress_svd",
        "backend=local",
        "hosts=1",
        "progress=false",
        "blas_threads=1",
        "job.ratio=0.4",
        "job.model.epochs=10",
        "job.sweep=[0.25]",
        f"hydra.run.dir={tmp_path}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("params_before", "params_after", "accuracy_before", "accuracy_after", "rel_error"):
        assert key in res, key
    assert res["params_after"] < 0.5 * res["params_before"]
    assert (tmp_path / "compress_svd.png").stat().st_size > 1000
    model, meta = load_compressed(Path(res["checkpoint"]))
    ds = load_data(meta["data_spec"])
    assert accuracy(model, ds.x_test, ds.y_test) == res["accuracy_after"]


def test_config_errors_name_the_key(tmp_path):
    from hydra import compose, initialize_config_module

    from flagstaff.jobs.config import register_configs
    from flagstaff.jobs.runner import run

    register_configs()
    common = ["backend=local", "progress=false"]
    with initialize_config_module(config_module="flagstaff.conf", version_base="1.3"):
        with pytest.raises(Exception) as info:
            compose(config_name="job", overrides=["job=compress_svd", "job.model.kind=resnet"])
        chain, e = "", info.value
        while e is not None:
            chain, e = chain + str(e), e.__cause__
        assert "minilm" in chain
        bad = [("job.ratio=1.5", "job.ratio"), ("job.checkpoint=/nonexistent.pt", "does not exist")]
        for override, message in bad:
            cfg = compose(config_name="job", overrides=["job=compress_welore", *common, override])
            with pytest.raises(ValueError, match=message):
                run(cfg, str(tmp_path))
        cfg = compose(
            config_name="job", overrides=["job=compress_fwsvd", *common, "job.fisher_axis=rows"]
        )
        with pytest.raises(ValueError, match="job.fisher_axis='rows': choose 'input'"):
            run(cfg, str(tmp_path))
    assert not (tmp_path / "results.json").exists()


def test_conv_layers_of_a_flagstaff_cnn_run_compress_end_to_end(tmp_path):
    """A real federated CNN run (mnist1d, Conv1d) compressed from its run directory: the conv
    layers become factor pairs, the parameter count is exact, and compressed.pt reloads to the
    reported accuracy."""
    from omegaconf import OmegaConf

    from flagstaff.system.runner import train
    from tests.conftest import compose

    run = tmp_path / "cnn_run"
    cfg = compose(
        "experiment=sim_cnn",
        "backend=local",
        "rounds=2",
        "num_clients=10",
        "clients_per_round=10",
        "progress=false",
    )
    train(cfg, run_dir=str(run))
    (run / ".hydra").mkdir(exist_ok=True)  # what flagstaff-train's Hydra run directory holds
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    loaded = load_model(_job(checkpoint=str(run)), seed=0)
    convs = [n for n, m in loaded.model.named_modules() if isinstance(m, nn.Conv1d)]
    assert convs, "the CNN should have Conv1d layers"
    job = _job(checkpoint=str(run), targets=convs, ratio=0.5, save=True)
    res, _ = run_compress("svd", job, 0, "local", 1, None, str(tmp_path / "out"))
    assert res["params_after"] < res["params_before"]
    assert set(res["rel_error"]) == set(convs)
    model, meta = load_compressed(tmp_path / "out" / "compressed.pt")
    assert any(isinstance(m, LowRankLayer) for m in model.modules())
    assert count_params(model) == res["params_after"]
    ds = load_data(meta["data_spec"])
    assert accuracy(model, ds.x_test, ds.y_test) == res["accuracy_after"]


def test_text_calibration_rows_are_the_real_tokens_only():
    """A text classifier's padding never reaches its output, so per-token calibration rows (the
    inputs CoSpaDi whitens with) hold the real tokens only: the first query layer sees exactly
    the embeddings of the unpadded tokens."""
    from transformers import BertConfig, BertModel

    from flagstaff.clients.lora import TextClassifier
    from flagstaff.jobs.compress.core import collect_inputs

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, attn_implementation="eager",
    )  # fmt: skip
    model = TextClassifier(BertModel(cfg), 3).eval()
    ids = torch.randint(1, 50, (5, 7))
    mask = torch.ones(5, 7, dtype=torch.int64)
    mask[0, 4:], mask[2, 2:], mask[4, 6:] = 0, 0, 0
    x = torch.stack([ids * mask, mask], 1)
    name = "encoder.encoder.layer.0.attention.self.query"
    rows = collect_inputs(model, [name], x, batch=2)[name]
    assert rows.shape == (int(mask.sum()), 16)
    with torch.no_grad():
        emb = model.encoder.embeddings(input_ids=x[:, 0])
    torch.testing.assert_close(rows, emb[mask.bool()])


def test_welore_rank_pruning_on_minilm_matches_the_reference_numbers(monkeypatch):
    """WeLore's global thresholds on the packaged all-MiniLM-L6-v2 (36 encoder linears): t = 0.05,
    0.10, 0.175 prune 13.7%, 27.5%, 47.6% of the total rank (the reference figures)."""
    from flagstaff.clients.lora import load_minilm
    from flagstaff.jobs.compress.welore import welore_ranks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_minilm(None)
    spectra = {
        n: torch.linalg.svdvals(m.weight.detach().double())
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("encoder.")
    }
    assert len(spectra) == 36
    full = sum(len(S) for S in spectra.values())
    for t, pruned in ((0.05, 0.137), (0.10, 0.275), (0.175, 0.476)):
        got = 1 - sum(welore_ranks(spectra, t).values()) / full
        assert abs(got - pruned) < 5e-4, (t, got)
