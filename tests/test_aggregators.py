"""Aggregation rules (strategies/aggregators): hand-computed cases, permutation invariance,
breakdown under outliers, dtypes, preconditions, non-finite rows, Hydra configs, Flag Aggregator."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import hydra.utils
import pytest
import torch

from flagstaff.strategies.aggregators import (
    AGGREGATORS,
    ARC,
    MDA,
    NNM,
    PRE_AGGREGATIONS,
    Bucketing,
    Bulyan,
    CenteredClipping,
    CoordinateMedian,
    FlagAggregator,
    GeometricMedian,
    Krum,
    Mean,
    MeanAroundMedian,
    MultiKrum,
    Phocas,
    StaticClip,
    TrimmedMean,
    build,
)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "aggregator"

# hyperparameters that make every rule meaningful on the n = 15, f = 3 test inputs
RULE_KWARGS: dict[str, dict] = {
    "clip": {"c": 10.0},
    "cclip": {"tau": 1.0},
    "geomed": {"nu": 1e-8, "tol": 1e-12},
}


def aggregator_yaml(name: str):
    """conf/aggregator/<name>.yaml as Hydra composes it (with the shared _common.yaml)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        return compose(overrides=[f"+aggregator={name}"]).aggregator


def col(*values: float) -> torch.Tensor:
    """A (n, 1) float64 matrix: one 1-D input per row."""
    return torch.tensor(values, dtype=torch.float64)[:, None]


def make(name: str, f: int = 3, n: int | None = 15, **kw) -> object:
    return AGGREGATORS[name](f=f, n=n, **{**RULE_KWARGS.get(name, {}), **kw})


def honest_and_outliers(n=15, f=3, d=40, scale=1e6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mu = torch.ones(d, dtype=dtype)
    honest = mu + 0.1 * torch.randn(n - f, d, generator=g, dtype=dtype)
    byz = scale * torch.randn(f, d, generator=g, dtype=dtype)
    return torch.cat([honest, byz]), mu


# ---------------------------------------------------------------------------------------------
# hand-computed cases


def test_mean_weighted():
    U = torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(Mean()(U), torch.tensor([2.0, 1.0], dtype=torch.float64))
    w = torch.tensor([1.0, 3.0])
    assert torch.allclose(Mean()(U, w), torch.tensor([2.5, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive sum"):
        Mean()(U, torch.zeros(2))
    with pytest.raises(ValueError, match="2 updates"):
        Mean()(U, torch.ones(3))


def test_median_odd_and_even_convention():
    assert CoordinateMedian()(col(1, 5, 2)).item() == 2.0
    # even n: mean of the two middle values (numpy), not the lower one (torch.median)
    assert CoordinateMedian()(col(1, 2, 3, 10)).item() == 2.5
    U = torch.tensor([[1.0, 9.0], [4.0, -1.0], [2.0, 3.0], [8.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(CoordinateMedian(f=1)(U), torch.tensor([3.0, 1.5], dtype=torch.float64))


def test_trimmed_mean_known_columns():
    U = torch.cat([col(1, 2, 3, 100, -50), col(0, 0, 6, 0, 3)], dim=1)
    out = TrimmedMean(f=1)(U)
    assert torch.allclose(out, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(TrimmedMean(f=0)(U), U.mean(0))


def test_krum_and_multikrum_pick_known_points():
    U = col(0, 1, 2.5, 4, 100)  # scores with n-f-2 = 2 neighbours: 7.25, 3.25, 4.5, 11.25, big
    assert Krum(f=1)(U).item() == 1.0
    assert MultiKrum(f=1, m=2)(U).item() == pytest.approx(1.75)
    assert MultiKrum(f=1)(U).item() == pytest.approx((0 + 1 + 2.5 + 4) / 4)  # m = n - f


def test_geomed_collinear_is_the_median_and_uses_weights():
    out = GeometricMedian(nu=1e-9, max_iter=500, tol=0)(col(0, 1, 2, 3, 100))
    assert out.item() == pytest.approx(2.0, abs=1e-4)
    # weighted: a weight majority at 0 pins the geometric median there
    U = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    out = GeometricMedian(nu=1e-9, max_iter=500, tol=0)(U, torch.tensor([3.0, 1.0]))
    assert out.abs().max().item() < 1e-4
    # three points of an equilateral triangle: the centre
    tri = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3.0)]], dtype=torch.float64)
    out = GeometricMedian(nu=1e-9, max_iter=500, tol=0)(tri)
    assert torch.allclose(out, torch.tensor([1.0, 1 / math.sqrt(3.0)], dtype=torch.float64))


def test_geomed_starts_agree_and_central_start_resists_far_outliers():
    U, mu = honest_and_outliers(n=9, f=2, d=5, scale=1.0)
    outs = [GeometricMedian(init=i, nu=1e-10, tol=0, max_iter=300)(U) for i in ("central", "mean")]
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    U, mu = honest_and_outliers(scale=1e25)
    assert float((GeometricMedian(f=3)(U) - mu).norm()) < 0.5


def test_centered_clipping_values_and_state():
    U = col(0, 0, 10)
    cc = CenteredClipping(tau=1.0, n_iter=1)
    assert cc(U).item() == pytest.approx(1 / 3)  # v = 0 + (0 + 0 + 10 * 1/10) / 3
    state = cc.state_dict()
    assert cc(U).item() == pytest.approx(4 / 9)  # v = 1/3 + (-1/3 - 1/3 + 1) / 3
    other = CenteredClipping(tau=1.0)
    other.load_state_dict(state)
    assert other(U).item() == pytest.approx(4 / 9)
    # zero distance is guarded: all inputs equal to the centre
    cc.load_state_dict({"center": torch.tensor([5.0], dtype=torch.float64)})
    assert cc(col(5, 5, 5)).item() == 5.0
    assert CenteredClipping(init="mean", tau=100.0)(col(1, 2, 6)).item() == pytest.approx(3.0)


def test_static_clip_and_arc_values():
    U = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(StaticClip(c=1.0)(U), torch.tensor([0.3, 0.9], dtype=torch.float64))
    # ARC: n = 5, f = 1 -> k = floor(2 * 1/5 * 4) = 1: the largest (10) is clipped to 4
    assert ARC.num_clipped(5, 1) == 1 and ARC.num_clipped(10, 3) == 4 and ARC.num_clipped(9, 0) == 0
    assert ARC(f=1)(col(1, 2, 3, 4, 10)).item() == pytest.approx((1 + 2 + 3 + 4 + 4) / 5)
    clipped, _ = ARC(f=3).transform(col(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), None)
    assert clipped.flatten().tolist() == [1, 2, 3, 4, 5, 6, 6, 6, 6, 6]


def test_mda_meamed_phocas_nnm_known_cases():
    assert MDA(f=1)(col(0, 1, 2, 10)).item() == pytest.approx(1.0)
    assert MeanAroundMedian(f=1)(col(1, 2, 3, 4, 100)).item() == pytest.approx(2.5)
    # trimmed mean of (0, 2, 3, 4, 100) is 3; the 4 closest values to 3 are 0, 2, 3, 4
    assert Phocas(f=1)(col(0, 2, 3, 4, 100)).item() == pytest.approx(2.25)
    # NNM, n - f = 3 neighbours: 0, 1, 3 -> 4/3 each; 10 -> (10 + 3 + 1)/3
    mixed, _ = NNM(f=1).transform(col(0, 1, 3, 10), None)
    assert torch.allclose(mixed.flatten(), torch.tensor([4, 4, 4, 14], dtype=torch.float64) / 3)
    assert NNM(Mean(), f=1)(col(0, 1, 3, 10)).item() == pytest.approx(13 / 6)


def _naive_closest_mean(U, center, k):
    out = []
    for j in range(U.shape[1]):
        c = center[j].item()
        vals = sorted(U[:, j].tolist(), key=lambda v: abs(v - c))  # noqa: B023
        out.append(sum(vals[:k]) / k)
    return torch.tensor(out, dtype=U.dtype)


def test_bulyan_mda_against_naive_reference():
    g = torch.Generator().manual_seed(3)
    U = torch.randn(11, 6, generator=g, dtype=torch.float64)
    U[-2:] *= 50  # two outliers
    f = 2
    # Bulyan by hand: iterated Krum on the remaining set, then beta closest to the median; tied
    # scores (one neighbour in the last picks: mutual nearest neighbours) go to the smallest sum
    # of squared distances to the remaining set
    remaining, chosen = list(range(11)), []
    for _ in range(11 - 2 * f):
        scores = []
        for i in remaining:
            others = sorted(float(((U[i] - U[j]) ** 2).sum()) for j in remaining if j != i)
            scores.append((sum(others[: max(len(remaining) - f - 2, 1)]), sum(others)))
        winner = remaining[min(range(len(scores)), key=scores.__getitem__)]
        chosen.append(winner)
        remaining.remove(winner)
    assert sorted(Bulyan(f=f).select(U).tolist()) == sorted(chosen)
    S = U[chosen]
    expected = _naive_closest_mean(S, S.median(dim=0).values, len(chosen) - 2 * f)
    assert torch.allclose(Bulyan(f=f)(U), expected)
    # MDA by hand over all subsets
    best = min(
        itertools.combinations(range(11), 11 - f),
        key=lambda s: max(float((U[i] - U[j]).norm()) for i in s for j in s),
    )
    assert torch.allclose(MDA(f=f)(U), U[list(best)].mean(0))


def test_mda_many_chunks_of_subsets():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(40, 3, generator=g, dtype=torch.float64)
    U[[5, 17, 33]] += 100.0  # C(40, 3) = 9880 subsets, several chunks
    keep = [i for i in range(40) if i not in (5, 17, 33)]
    assert torch.allclose(MDA(f=3)(U), U[keep].mean(0))


def test_bucketing_buckets_and_state():
    bk = Bucketing(Mean(), s=3, seed=7)
    B = bk.bucket_matrix(10)
    assert B.shape == (4, 10) and B.sum(0).eq(1).all() and B.sum(1).tolist() == [3, 3, 3, 1]
    U = torch.randn(10, 5, dtype=torch.float64)
    w = torch.arange(1.0, 11.0)
    # bucketing then the (weighted) mean is the (weighted) mean, whatever the permutation
    assert torch.allclose(bk(U), U.mean(0)) and torch.allclose(bk(U, w), Mean()(U, w))
    # s = 1 buckets are the inputs themselves: any permutation-invariant rule is unchanged
    assert torch.allclose(Bucketing(CoordinateMedian(f=2), f=2, s=1)(U), CoordinateMedian()(U))
    # reproducible from the seed and from a checkpoint
    a, b = Bucketing(Krum(f=1), f=1, s=2, seed=5), Bucketing(Krum(f=1), f=1, s=2, seed=5)
    U = torch.randn(12, 4, dtype=torch.float64)
    assert torch.equal(a(U), b(U))
    state = a.state_dict()
    first = a(U)
    b.load_state_dict(state)
    assert torch.equal(b(U), first)


# ---------------------------------------------------------------------------------------------
# properties of every rule


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_permutation_invariance(name):
    U = torch.randn(15, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(2))
    a, b = make(name)(U), make(name)(U[perm])  # fresh instances (cclip is stateful)
    assert torch.allclose(a, b, atol=1e-9), name


def test_permutation_invariance_with_pre_aggregation():
    U = torch.randn(15, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    perm = torch.randperm(15)
    for pre in (["nnm"], ["arc"], ["clip"], ["nnm", "arc"]):
        agg = build("median", pre=pre, f=3, n=15)
        assert torch.allclose(agg(U), agg(U[perm]), atol=1e-9), pre


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_breakdown_under_huge_outliers(name):
    U, mu = honest_and_outliers()
    if name == "cclip":
        agg = make(name)
        for _ in range(30):  # the centre moves at most tau per round; let it settle
            out = agg(U)
    else:
        out = make(name)(U)
    err = float((out - mu).norm() / mu.norm())
    if name == "mean":
        assert err > 1e3  # the outliers drag the mean away
    elif name in ("clip", "arc", "flag"):
        # bounded influence: each outlier counts as one clipped / unit vector
        assert err < 0.5, (name, err)
        assert float(torch.nn.functional.cosine_similarity(out, mu, dim=0)) > 0.9
    else:
        assert err < 0.1, (name, err)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_device_shape_preserved(name, dtype):
    U = torch.randn(15, 9, dtype=dtype)
    out = make(name)(U, torch.ones(15, dtype=dtype))
    assert out.shape == (9,) and out.dtype == dtype and out.device == U.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_non_finite_rows_and_bad_shapes_raise(name):
    U = torch.randn(15, 6, dtype=torch.float64)
    U[2, 1], U[5, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"rows \[2, 5\]"):
        make(name)(U)
    with pytest.raises(ValueError, match="2-D"):
        make(name)(torch.randn(6))
    with pytest.raises(ValueError, match="n = 0"):
        make(name, n=None)(torch.randn(0, 6))


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "bulyan", "meamed", "flag"])
def test_robust_rules_ignore_weights(name):
    U = torch.randn(15, 7, dtype=torch.float64)
    w = torch.rand(15) + 0.1
    assert torch.allclose(make(name)(U), make(name)(U, w))


def test_huge_finite_float32_inputs_do_not_give_nan():
    U, _ = honest_and_outliers(scale=1e25, dtype=torch.float32)
    for name in ("krum", "multikrum", "geomed", "bulyan", "flag", "median", "nnm"):
        agg = build("median", pre=["nnm"], f=3, n=15) if name == "nnm" else make(name)
        out = agg(U)
        assert torch.isfinite(out).all() and out.abs().max() < 10, name
    # the mean is a convex combination computed as one product: no intermediate overflow
    assert torch.equal(Mean()(torch.full((4, 3), 3e38)), torch.full((3,), 3e38))


# ---------------------------------------------------------------------------------------------
# preconditions and the builder


@pytest.mark.parametrize(
    ("cls", "f", "n", "text"),
    [
        (CoordinateMedian, 3, 6, r"n > 2f = 6"),
        (TrimmedMean, 2, 4, r"n > 2f = 4"),
        (MeanAroundMedian, 2, 4, r"n > 2f"),
        (Phocas, 2, 4, r"n > 2f"),
        (GeometricMedian, 2, 4, r"n > 2f"),
        (CenteredClipping, 2, 4, r"n > 2f"),
        (Krum, 3, 8, r"n > 2f \+ 2 = 8.*at least 9"),
        (MultiKrum, 3, 8, r"n > 2f \+ 2"),
        (Bulyan, 3, 14, r"n >= 4f \+ 3 = 15.*f <= 2"),
        (MDA, 12, 60, r"C\(60, 12\).*max_subsets"),
        (NNM, 3, 6, r"n > 2f"),
    ],
)
def test_preconditions_raise_at_construction_and_call(cls, f, n, text):
    with pytest.raises(ValueError, match=text):
        cls(f=f, n=n)
    agg = cls(f=f)  # n unknown at construction: checked on the call
    with pytest.raises(ValueError, match=text):
        agg(torch.randn(n, 3))


def test_bad_hyperparameters_raise():
    for bad in (
        lambda: MultiKrum(f=1, n=5, m=6),
        lambda: GeometricMedian(nu=0),
        lambda: CenteredClipping(n_iter=0),
        lambda: StaticClip(c=-1),
        lambda: Bucketing(s=0),
        lambda: FlagAggregator(method="qr"),
        lambda: FlagAggregator(rescale="max"),
        lambda: FlagAggregator(m=0),
        lambda: Krum(f=-1),
    ):
        with pytest.raises(ValueError):
            bad()


def test_builder_names_wrapping_and_errors():
    agg = build("krum", pre=["nnm", "bucketing"], f=1, n=15, pre_kwargs={"bucketing": {"s": 2}})
    assert isinstance(agg, NNM) and isinstance(agg.inner, Bucketing)
    assert isinstance(agg.inner.inner, Krum) and agg.inner.inner.n == 8
    with pytest.raises(ValueError, match=r"unknown aggregator rule 'krumm'.*'krum'"):
        build("krumm")
    with pytest.raises(ValueError, match=r"unknown pre-aggregation 'mix'.*'nnm'"):
        build("krum", pre=["mix"])
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['tau'\]"):
        build("krum", tau=1.0)
    # krum after bucketing(s=2) sees ceil(15/2) = 8 inputs < 2f + 3 = 9
    with pytest.raises(ValueError, match=r"receives 8 of the 15 inputs"):
        build("krum", pre=["bucketing"], f=3, n=15)
    # state of wrapped stateful rules is nested
    cc = build("cclip", pre=["bucketing"], f=1, n=9, tau=1.0)
    cc(torch.randn(9, 3))
    assert set(cc.state_dict()) == {"inner", "generator"} and "center" in cc.state_dict()["inner"]
    assert Krum().state_dict() == {}


def test_every_yaml_instantiates_and_aggregates():
    names = {p.stem for p in CONF.glob("*.yaml") if not p.stem.startswith("_")}
    assert names == set(AGGREGATORS), names ^ set(AGGREGATORS)
    U = torch.randn(15, 20)
    for name in sorted(names):
        cfg = aggregator_yaml(name)
        assert list(cfg.pre) == [] and set(cfg.pre_kwargs) == set(PRE_AGGREGATIONS)
        agg = hydra.utils.instantiate(cfg, f=3, n=15)
        assert isinstance(agg, AGGREGATORS[name]) and agg.f == 3
        assert agg(U).shape == (20,)
        cfg.pre = ["nnm"]
        wrapped = hydra.utils.instantiate(cfg, f=3, n=15)
        assert isinstance(wrapped, NNM) and isinstance(wrapped.inner, AGGREGATORS[name])
        assert wrapped(U).shape == (20,)
    with pytest.raises(Exception, match="n >= 4f"):
        hydra.utils.instantiate(aggregator_yaml("bulyan"), f=4, n=15)


def test_hydra_compose_with_command_line_overrides():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose(
            overrides=[
                "+aggregator=multikrum",
                "aggregator.pre=[nnm,bucketing]",
                "aggregator.pre_kwargs.bucketing.s=3",
            ]
        )
    agg = hydra.utils.instantiate(cfg.aggregator, f=1, n=15)
    assert isinstance(agg, NNM) and isinstance(agg.inner, Bucketing) and agg.inner.s == 3
    assert isinstance(agg.inner.inner, MultiKrum) and agg.inner.inner.n == 5
    assert agg(torch.randn(15, 4)).shape == (4,)


# ---------------------------------------------------------------------------------------------
# Flag Aggregator


def _projector(fit):
    P = fit.projections
    return P @ P.T


@pytest.mark.parametrize("lam", [0.0, 2.0])
@pytest.mark.parametrize("init", ["flag_mean", "random", "ambient"])
@pytest.mark.parametrize("m", [1, 3, None])
def test_flag_gram_route_equals_svd_route(lam, init, m):
    U = torch.randn(9, 30, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    U[3] *= 20.0
    kw = dict(m=m, lam=lam, init=init, seed=11, max_iter=6, rescale="none")
    a = FlagAggregator(method="gram", **kw).fit(U, return_basis=True)
    b = FlagAggregator(method="svd", **kw).fit(U, return_basis=True)
    assert a.objectives == pytest.approx(b.objectives, rel=1e-9, abs=1e-9)
    assert a.best_iteration == b.best_iteration and a.rank == b.rank
    assert torch.allclose(_projector(a), _projector(b), atol=1e-8)
    assert torch.allclose(a.basis @ a.basis.T, b.basis @ b.basis.T, atol=1e-8)
    assert torch.allclose(a.output, b.output, atol=1e-8)
    assert torch.allclose(a.basis.T @ a.basis, torch.eye(a.rank, dtype=torch.float64), atol=1e-8)


def test_flag_output_in_span_and_reference_scaling():
    U = torch.randn(6, 50, dtype=torch.float64)
    fit = FlagAggregator(m=2, rescale="none").fit(U, return_basis=True)
    Y = fit.basis
    unit = U / U.norm(dim=1, keepdim=True)
    assert torch.allclose(fit.output, Y @ (Y.T @ unit.sum(0)) / 2, atol=1e-10)
    coef = torch.linalg.lstsq(U.T, fit.output[:, None]).solution
    assert torch.allclose(U.T @ coef, fit.output[:, None], atol=1e-9)  # in the span of inputs
    # median_norm: the median input norm; median_proj (default): the median input component
    # along the output; both routes agree
    for n in (6, 7):
        V = torch.randn(n, 50, dtype=torch.float64) * torch.arange(1.0, n + 1)[:, None]
        for method in ("gram", "svd"):
            out = FlagAggregator(rescale="median_norm", method=method)(V)
            norms = V.norm(dim=1).sort().values
            median = 0.5 * (norms[(n - 1) // 2] + norms[n // 2])
            assert out.norm().item() == pytest.approx(median.item(), rel=1e-10)
            out = FlagAggregator(method=method)(V)
            comp = (V @ out / out.norm()).sort().values
            median = 0.5 * (comp[(n - 1) // 2] + comp[n // 2])
            assert out.norm().item() == pytest.approx(abs(median.item()), rel=1e-10)


def test_flag_m1_recovers_dominant_direction_ignoring_outliers():
    g = torch.Generator().manual_seed(0)
    d = 200
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    direction /= direction.norm()
    honest = direction * torch.rand(12, 1, generator=g, dtype=torch.float64).add(1.0)
    honest = honest + 0.02 * torch.randn(12, d, generator=g, dtype=torch.float64)
    outliers = 1e4 * torch.randn(3, d, generator=g, dtype=torch.float64)  # random / orthogonal
    U = torch.cat([outliers, honest])
    for method in ("gram", "svd"):
        fit = FlagAggregator(m=1, method=method).fit(U, return_basis=True)
        assert abs(float(fit.basis[:, 0] @ direction)) > 0.99
        assert float(fit.output @ direction) / float(fit.output.norm()) > 0.99
    assert float(Mean()(U) @ direction) / float(Mean()(U).norm()) < 0.5


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_flag_objective_best_kept_and_irls_monotone(lam):
    U = torch.randn(10, 25, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fit = FlagAggregator(m=3, lam=lam, max_iter=15, tol=0.0, init="random").fit(U)
    objs = fit.objectives
    assert fit.best_iteration >= 1 and objs[fit.best_iteration] == min(objs[1:])
    # IRLS is a majorize-minimize scheme for the (eps-smoothed) sum of sines: non-increasing
    assert all(b <= a + 1e-9 for a, b in zip(objs, objs[1:], strict=False))
    if lam == 0:  # the kept projections are those of the best iterate
        P = fit.projections
        s = (1 - (P * P).sum(1)).abs()
        assert (s + 1e-7).sqrt().sum().item() == pytest.approx(min(objs[1:]))


def test_flag_seed_reproducibility():
    U = torch.randn(8, 20, dtype=torch.float64)
    for init in ("random", "ambient"):
        a = FlagAggregator(m=2, init=init, seed=3, max_iter=1)
        b = FlagAggregator(m=2, init=init, seed=3, max_iter=1)
        c = FlagAggregator(m=2, init=init, seed=4, max_iter=1)
        assert torch.equal(a(U), b(U))
        assert a.fit(U).objectives[0] != c.fit(U).objectives[0]


def test_flag_degenerate_inputs():
    # zero-norm inputs, m > rank (rank-2 inputs), n = 1; both routes agree and nothing is NaN
    g = torch.Generator().manual_seed(2)
    basis = torch.randn(2, 15, generator=g, dtype=torch.float64)
    U = torch.randn(6, 2, generator=g, dtype=torch.float64) @ basis
    U[4] = 0.0
    fits = [FlagAggregator(m=4, method=m, lam=1.0).fit(U) for m in ("gram", "svd")]
    assert fits[0].rank == fits[1].rank == 2
    assert torch.allclose(_projector(fits[0]), _projector(fits[1]), atol=1e-8)
    assert torch.allclose(fits[0].output, fits[1].output, atol=1e-8)
    x = torch.randn(1, 10, dtype=torch.float64)
    for method in ("gram", "svd"):
        assert torch.allclose(FlagAggregator(method=method)(x), x[0])
        out = FlagAggregator(method=method, m=2, rescale="none")(x)
        assert torch.allclose(out, x[0] / x[0].norm() / 2)
        assert torch.equal(FlagAggregator(method=method)(torch.zeros(3, 5)), torch.zeros(5))


def test_flag_large_d_gram_route_float32():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(10, 200_000, generator=g) + 0.5
    out = FlagAggregator(lam=1.0)(U)
    assert out.shape == (200_000,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = FlagAggregator(lam=1.0)(U.double())
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-3


# ---------------------------------------------------------------------------------------------
# Krum / Multi-Krum / Bulyan ties: exact duplicates score exactly equal, the lowest index wins


def _direct_krum_scores(U: torch.Tensor, f: int) -> list[float]:
    """Krum scores from float64 differences, one pair at a time (the same ops for equal rows)."""
    V = U.double()
    n = V.shape[0]
    D = [[float(((V[i] - V[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    k = min(max(n - f - 2, 1), n - 1)
    return [sum(sorted(D[i][j] for j in range(n) if j != i)[:k]) for i in range(n)]


def _tie_cases() -> list[tuple[torch.Tensor, int]]:
    """(U, f): a mimic attack (3 copies of one honest row among 12, n = 15, f = 3) in random
    permutations, and two distinct vectors each sent twice (all four scores tie) in every order."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(6):
        H = 1.0 + 0.1 * torch.randn(12, 3000, generator=g)
        U0 = torch.cat([H[5:6].repeat(3, 1), H])
        cases.append((U0[torch.randperm(15, generator=g)], 3))
    a, b = torch.randn(2, 3000, generator=g)
    for perm in itertools.permutations([a, a, b, b]):
        cases.append((torch.stack(perm), 0))
    return cases


def check_krum_ties() -> list[str]:
    """Failures (empty if none): duplicate rows must get exactly equal Krum scores, and Krum,
    Multi-Krum and Bulyan must pick the lowest index among tied scores."""
    from flagstaff.strategies.aggregators.base import pairwise_sq_dists
    from flagstaff.strategies.aggregators.krum import krum_scores

    bad = []
    for c, (U, f) in enumerate(_tie_cases()):
        n = U.shape[0]
        scores = krum_scores(pairwise_sq_dists(U), f)
        for i in range(n):
            for j in range(i + 1, n):
                if torch.equal(U[i], U[j]) and scores[i] != scores[j]:
                    bad.append(f"case {c}: rows {i}, {j} equal, scores {scores[i]}, {scores[j]}")
        ref = _direct_krum_scores(U, f)
        order = sorted(range(n), key=lambda i: (ref[i], i))  # noqa: B023
        if Krum(f=f).select(U) != order[0]:
            bad.append(f"case {c}: Krum picked {Krum(f=f).select(U)}, lowest tied is {order[0]}")
        if not torch.equal(Krum(f=f)(U), U[order[0]]):
            bad.append(f"case {c}: Krum output is not row {order[0]}")
        mk = MultiKrum(f=f).select(U).tolist()
        if mk != order[: n - f]:
            bad.append(f"case {c}: Multi-Krum picked {mk}, expected {order[: n - f]}")
        if n >= 4 * f + 3:
            remaining, chosen = list(range(n)), []
            for _ in range(n - 2 * f):
                sub = U[remaining]
                sc = _direct_krum_scores(sub, f)
                chosen.append(remaining.pop(min(range(len(sc)), key=lambda i: (sc[i], i))))  # noqa: B023
            if Bulyan(f=f).select(U).tolist() != chosen:
                bad.append(
                    f"case {c}: Bulyan chose {Bulyan(f=f).select(U).tolist()}, expected {chosen}"
                )
    return bad


def test_krum_bulyan_ties_go_to_the_lowest_index(monkeypatch):
    assert check_krum_ties() == []
    # another BLAS sums each Gram entry in its own order: emulate it with last-bit noise that
    # depends on the entry's position (not symmetric, not equal for equal rows)
    import flagstaff.strategies.aggregators.base as base

    exact = base.gram

    def reordered_gram(U):
        K = exact(U)
        n = K.shape[0]
        pos = torch.arange(n * n, dtype=K.dtype).reshape(n, n)
        return K * (1.0 + 1e-15 * torch.sin(pos))

    monkeypatch.setattr(base, "gram", reordered_gram)
    assert check_krum_ties() == []


def test_krum_bulyan_ties_with_mkl_avx2_kernels():
    # MKL's AVX2 GEMM (MKL_CBWR=AVX2, what an AVX2-only CPU runs) rounds the Gram entries of
    # equal rows differently; a fresh process, since MKL reads MKL_CBWR once at start
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_aggregators as t; "
        "bad = t.check_krum_ties(); print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "MKL_CBWR": "AVX2"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Flag Aggregator: the reference's IRLS as an oracle (lam = 0), majorize-minimize for lam > 0


def _reference_flag(U: torch.Tensor, r: int, n_its: int, seed: int) -> torch.Tensor:
    """The reference's FlagIRLS (hamidralmasi/FlagAggregator, aggregators/center_algorithms_torch.py
    ``irls_flag`` with sin_cos 'sine', random init, lambda 0, and aggregators/flag.py's output),
    written out from its description for float64 column vectors."""
    data = [(u / u.norm())[:, None] for u in U]

    def err(Y):
        return sum(torch.sqrt((1 - torch.trace(Y.T @ x @ x.T @ Y)).clamp_min(0)) for x in data)

    torch.manual_seed(seed)
    Y = torch.linalg.qr(torch.rand(U.shape[1], r, dtype=torch.float64) - 0.5).Q[:, :r]
    errs, diff, it = [err(Y)], 1.0, 1
    while it <= n_its and diff > 1e-10 and errs[-1] > 1e-10:
        Y0 = Y.clone()
        cols = [((1 - torch.trace(Y.T @ x @ x.T @ Y)).abs() + 1e-7) ** -0.25 * x for x in data]
        Y = torch.linalg.svd(torch.hstack(cols), full_matrices=False)[0][:, :r]
        errs.append(err(Y))
        diff = errs[-2] - errs[-1]
        it += 1
    Y = Y if diff > 0 else Y0
    return sum(Y @ (Y.T @ x) for x in data)[:, 0] / r


@pytest.mark.parametrize("n_its", [1, 4])
@pytest.mark.parametrize("method", ["svd", "gram"])
def test_flag_equals_reference_irls_at_lam0(n_its, method):
    g = torch.Generator().manual_seed(7)
    U = torch.randn(15, 40, generator=g, dtype=torch.float64) + 0.3
    U[:3] = torch.rand(3, 40, generator=g, dtype=torch.float64)  # the uniform attack
    ref = _reference_flag(U, 8, n_its, seed=1)
    agg = FlagAggregator(
        m=8, max_iter=n_its, tol=1e-10, init="ambient", seed=1, rescale="none", method=method
    )
    assert float((agg(U) - ref).abs().max()) < 1e-14  # entries about 0.2: found 6e-16


def _flag_objective(U: torch.Tensor, Y: torch.Tensor, lam: float, eps: float) -> float:
    """The documented objective, by brute force over explicit (normalized) pairwise differences."""
    u = U / U.norm(dim=1, keepdim=True)
    n = u.shape[0]
    obj = ((1 - ((u @ Y) ** 2).sum(1)).abs() + eps).sqrt().sum()
    if lam > 0:
        for i in range(n):
            for j in range(n):
                if i != j:
                    v = (u[i] - u[j]) / (u[i] - u[j]).norm()
                    s = (1 - ((v @ Y) ** 2).sum()).abs()
                    obj = obj + lam / (n * (n - 1)) * (s + eps).sqrt()
    return float(obj)


@pytest.mark.parametrize("lam", [0.0, 1.0, 10.0])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_flag_irls_is_majorize_minimize(lam, method):
    # every IRLS step never increases the documented objective, on random instances
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        n, d, m = 9 + seed, 30, 1 + seed
        U = torch.randn(n, d, generator=g, dtype=torch.float64)
        U[: seed + 1] = torch.rand(seed + 1, d, generator=g, dtype=torch.float64) * 5
        for init in ("random", "flag_mean"):
            agg = FlagAggregator(m=m, lam=lam, max_iter=12, tol=0.0, init=init, method=method)
            objs = agg.fit(U).objectives
            assert all(b <= a + 1e-10 * a for a, b in zip(objs, objs[1:], strict=False)), objs
        # the recorded objective is the documented one, evaluated on the returned basis
        fit = FlagAggregator(m=m, lam=lam, max_iter=5, tol=0.0, method=method).fit(
            U, return_basis=True
        )
        best = fit.objectives[fit.best_iteration]
        assert _flag_objective(U, fit.basis, lam, 1e-7) == pytest.approx(best, rel=1e-9)


def test_flag_defaults_keep_the_honest_mean_scale_and_direction():
    # 15 honest updates (noise twice the signal, as local SGD updates are): the default Flag
    # Aggregator, from the class and from conf/aggregator/flag.yaml, returns the mean's direction
    # at the mean's scale (the old defaults, median-norm rescale, returned about 2x its norm)
    g = torch.Generator().manual_seed(0)
    mu = 0.01 * torch.randn(2000, generator=g, dtype=torch.float64)
    U = mu + 0.02 * torch.randn(15, 2000, generator=g, dtype=torch.float64)
    mean = U.mean(0)
    yaml_agg = hydra.utils.instantiate(aggregator_yaml("flag"), f=3, n=15)
    for agg in (FlagAggregator(), yaml_agg):
        out = agg(U)
        assert float(out @ mean / (out.norm() * mean.norm())) > 0.99
        assert 0.8 < float(out.norm() / mean.norm()) < 1.25
