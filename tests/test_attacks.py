"""Byzantine attacks (strategies/attacks/, clients/byzantine.py): definitions, adaptivity, peer targets, configs."""

from __future__ import annotations

import pickle
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf

from flagstaff.clients import byzantine as bz
from flagstaff.strategies.attacks import (
    ALIE,
    ATTACKS,
    FOE,
    ALIEAdaptive,
    Crash,
    FOEAdaptive,
    Gaussian,
    InfAttack,
    LabelFlip,
    Mimic,
    NaNAttack,
    NoAttack,
    NoisyData,
    Reversed,
    SignFlip,
    Uniform,
    alie_z,
    build_attack,
    line_search,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "attack"


# tiny local rules (the aggregators package is separate)
def mean_rule(u: torch.Tensor) -> torch.Tensor:
    return u.mean(dim=0)


def median_rule(u: torch.Tensor) -> torch.Tensor:
    return u.median(dim=0).values


def nna_rule(own: torch.Tensor, f: int):
    """Mean of the n - f received vectors nearest to ``own`` (MoNNA's NNA)."""

    def rule(u: torch.Tensor) -> torch.Tensor:
        dist = torch.linalg.vector_norm(u - own, dim=1)
        keep = torch.argsort(dist, stable=True)[: u.shape[0] - f]
        return u[keep].mean(dim=0)

    return rule


class Counting:
    def __init__(self, rule):
        self.rule, self.calls = rule, 0

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.rule(u)


def honest_updates(h: int = 12, d: int = 40, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(h, d, generator=g) + 1.0).to(dtype)


# ---------------------------------------------------------------------------------------------
# ALIE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "f", "variant", "expected"),
    [
        (25, 5, "paper", 0.4677),
        (25, 5, "implementation", 0.2533),
        (15, 3, "paper", 0.4307),
        (15, 3, "implementation", 0.2104),
    ],
)
def test_alie_z_check_values(n, f, variant, expected):
    assert alie_z(n, f, variant) == pytest.approx(expected, abs=1e-4)
    assert ALIE(f=f, variant=variant).z_value(n) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("variant", ["paper", "implementation"])
def test_alie_vectors_are_mu_minus_z_sigma(variant):
    honest = honest_updates(h=12)
    attack = ALIE(f=3, variant=variant)
    out = attack(honest)
    z = alie_z(15, 3, variant)
    expected = honest.mean(dim=0) - z * honest.std(dim=0, correction=1)
    assert out.shape == (3, honest.shape[1])
    assert torch.equal(out, expected.expand(3, -1))


def test_alie_z_override_and_ddof():
    honest = honest_updates(h=4)
    out = ALIE(f=2, z=1.5, ddof=0)(honest)
    expected = honest.mean(0) - 1.5 * honest.std(0, correction=0)
    assert torch.equal(out[1], expected)
    # a single honest vector has no spread: ALIE sends it back
    one = honest[:1]
    assert torch.equal(ALIE(f=0, z=2.0)(one), one[:0])
    assert torch.equal(ALIE(f=1, z=2.0)(one)[0], one[0])


# ---------------------------------------------------------------------------------------------
# FOE / sign flip / reversed / random
# ---------------------------------------------------------------------------------------------


def test_foe_is_minus_eps_mu():
    honest = honest_updates()
    out = FOE(f=2, eps=0.1)(honest)
    assert torch.equal(out, (-0.1 * honest.mean(0)).expand(2, -1))
    assert ATTACKS["ipm"] is FOE
    assert torch.equal(build_attack("ipm", 2, eps=0.1)(honest), out)


def test_sign_flip_and_reversed():
    honest = honest_updates(h=5)
    mu = honest.mean(0)
    assert torch.equal(SignFlip(f=3)(honest), (-mu).expand(3, -1))
    assert torch.equal(Reversed(f=2)(honest), (-10.0 * mu).expand(2, -1))
    rows = SignFlip(f=7, source="rows")(honest)
    assert torch.equal(rows, -honest[torch.arange(7) % 5])


def test_gaussian_and_uniform_are_seeded_and_in_range():
    honest = honest_updates(d=2000)
    a = Gaussian(f=2, sigma=3.0, seed=5)(honest)
    b = Gaussian(f=2, sigma=3.0, seed=5)(honest)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    assert a.std().item() == pytest.approx(3.0, rel=0.1)
    u = Uniform(f=3, seed=1)(honest)
    assert u.min() >= 0 and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.05)
    v = Uniform(f=3, low=-2.0, high=-1.0)(honest)
    assert v.min() >= -2 and v.max() < -1
    g = torch.Generator().manual_seed(9)
    g2 = torch.Generator().manual_seed(9)
    assert torch.equal(
        Uniform(f=1)(honest, generator=g), Uniform(f=1, seed=4)(honest, generator=g2)
    )


def test_inf_nan_crash():
    honest = honest_updates()
    assert torch.isposinf(InfAttack(f=2)(honest)).all()
    assert torch.isneginf(InfAttack(f=2, sign=-1)(honest)).all()
    assert torch.isnan(NaNAttack(f=2)(honest)).all()
    assert Crash(f=3)(honest) is None
    assert Crash(f=3).per_target(honest) is None


# ---------------------------------------------------------------------------------------------
# adaptive variants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adaptive", "fixed"),
    [
        (ALIEAdaptive(f=3, max_evals=16), ALIE(f=3)),
        (
            ALIEAdaptive(f=3, variant="implementation", max_evals=8),
            ALIE(f=3, variant="implementation"),
        ),
        (FOEAdaptive(f=3, max_evals=16), FOE(f=3)),
        (FOEAdaptive(f=3, eps=0.5, max_evals=3), FOE(f=3, eps=0.5)),
    ],
)
@pytest.mark.parametrize("rule", [mean_rule, median_rule])
def test_adaptive_beats_fixed_with_bounded_evaluations(adaptive, fixed, rule):
    honest = honest_updates()
    mu = honest.mean(0)
    counting = Counting(rule)
    byz = adaptive(honest, aggregator=counting)
    assert 1 <= counting.calls <= adaptive.max_evals
    moved = torch.linalg.vector_norm(rule(torch.cat([honest, byz])) - mu)
    moved_fixed = torch.linalg.vector_norm(rule(torch.cat([honest, fixed(honest)])) - mu)
    assert moved >= moved_fixed
    if rule is mean_rule and adaptive.max_evals >= 8:  # unbounded objective: search goes far
        assert moved > 2 * moved_fixed


def test_adaptive_alie_displaces_coordinatewise_median():
    honest = honest_updates(h=12, d=200, seed=3)
    mu = honest.mean(0)
    attack = ALIEAdaptive(f=3)
    byz = attack(honest, aggregator=median_rule)
    assert attack.last_factor is not None and attack.last_factor > 0
    attacked = torch.linalg.vector_norm(median_rule(torch.cat([honest, byz])) - mu)
    clean = torch.linalg.vector_norm(median_rule(torch.cat([honest, mu.expand(3, -1)])) - mu)
    assert attacked > 2 * clean
    sigma = honest.std(0)
    assert torch.allclose(byz[0], mu - attack.last_factor * sigma)


def test_adaptive_needs_an_aggregator():
    with pytest.raises(ValueError, match="aggregator="):
        ALIEAdaptive(f=2)(honest_updates())
    # works where the formula does not (f >= n/2): the search needs no z
    out = ALIEAdaptive(f=12, max_evals=4)(honest_updates(h=5), aggregator=median_rule)
    assert out.shape == (12, 40)


def test_line_search_finds_a_maximum_within_budget():
    calls: list[float] = []

    def objective(x: float) -> float:
        calls.append(x)
        return -((x - 5.3) ** 2)

    best, value, evals = line_search(objective, start=0.0, step=1.0, max_evals=20)
    assert evals == len(calls) == 20
    assert abs(best - 5.3) < 1.5 and value == max(-((x - 5.3) ** 2) for x in calls)
    best, _, _ = line_search(lambda x: -((x - 5.3) ** 2), max_evals=16, shrink=0.5)
    assert abs(best - 5.3) < 0.3
    best, value, evals = line_search(lambda x: float("nan") if x > 2 else x, max_evals=5)
    assert best == value == 1.0 and evals == 5  # 0, 1, then 3 is NaN: NaN never wins


# ---------------------------------------------------------------------------------------------
# data poisoning
# ---------------------------------------------------------------------------------------------


def test_label_flip_maps_and_is_an_involution():
    attack = LabelFlip(f=2)
    x = torch.randn(10, 3)
    y = torch.arange(10) % 7
    x2, y2 = attack.poison(x, y, num_classes=7)
    assert x2 is x
    assert torch.equal(y2, 6 - y)
    assert torch.equal(attack.poison(x2, y2, 7)[1], y)
    assert attack.kind == "data"
    upd = torch.randn(2, 5)
    assert attack(upd) is upd  # data attacks pass the clients' updates through
    with pytest.raises(ValueError, match="range"):
        attack.poison(x, y, num_classes=5)
    with pytest.raises(ValueError, match="integer"):
        attack.poison(x, y.float(), num_classes=7)


def test_noisy_data():
    x = torch.zeros(500, 8)
    y = torch.arange(500) % 3
    xg, yg = NoisyData(f=1, std=2.0, seed=1).poison(x, y, 3)
    assert yg is y and xg.shape == x.shape and xg.std().item() == pytest.approx(2.0, rel=0.1)
    assert torch.equal(xg, NoisyData(f=1, std=2.0, seed=1).poison(x, y, 3)[0])
    xu, _ = NoisyData(f=1, mode="uniform", low=-1.0, high=3.0).poison(x, y, 3)
    assert xu.min() >= -1 and xu.max() < 3 and xu.std() > 0.5


def test_none_is_honest():
    attack = build_attack("none", 3)
    x, y = torch.randn(4, 2), torch.arange(4)
    assert attack.kind == "data" and attack.poison(x, y, 4) == (x, y)
    u = honest_updates()
    assert attack(u) is u


# ---------------------------------------------------------------------------------------------
# mimic
# ---------------------------------------------------------------------------------------------


def test_mimic_fixed_index_copies_exactly():
    honest = honest_updates()
    out = Mimic(f=4, index=5)(honest)
    assert out.shape == (4, honest.shape[1])
    assert all(torch.equal(row, honest[5]) for row in out)
    out[0, 0] = 1e9  # a copy, not a view of the honest row
    assert honest[5, 0] != 1e9
    with pytest.raises(ValueError, match="out of range"):
        Mimic(f=1, index=40)(honest)


def test_mimic_heuristic_follows_the_top_variance_direction_and_checkpoints():
    g = torch.Generator().manual_seed(0)
    h, d = 10, 30
    scales = torch.linspace(-1, 1, h)
    rounds = []
    for _ in range(6):  # honest spread mostly along e_3; row 0 and 9 lie at the extremes
        u = 0.01 * torch.randn(h, d, generator=g, dtype=torch.float64)
        u[:, 3] += 5 * scales
        rounds.append(u)
    attack = Mimic(f=2, warmup=3, seed=1)
    for u in rounds[:2]:
        out = attack(u)
        assert any(torch.equal(out[0], row) for row in u)
    state = pickle.loads(pickle.dumps(attack.state_dict()))
    rest = [attack(u) for u in rounds[2:]]
    chosen = [
        int(torch.nonzero((u == o[0]).all(1))[0]) for u, o in zip(rounds[2:], rest, strict=True)
    ]
    assert chosen[0] in (0, h - 1)
    assert len(set(chosen)) == 1  # frozen after warmup
    again = Mimic(f=2, warmup=3, seed=123)
    again.load_state_dict(state)
    assert all(torch.equal(again(u), r) for u, r in zip(rounds[2:], rest, strict=True))


# ---------------------------------------------------------------------------------------------
# peer-to-peer: per-target crafting
# ---------------------------------------------------------------------------------------------


def test_per_target_adaptive_differs_across_targets():
    honest = honest_updates(h=8, d=50, seed=2)
    f = 3
    aggs = [nna_rule(honest[i], f) for i in range(8)]
    out = ALIEAdaptive(f=f).per_target(honest, aggregators=aggs)
    assert out.shape == (8, f, 50)
    distinct = {tuple(out[i, 0].tolist()) for i in range(8)}
    assert len(distinct) > 1
    # targeted() gives node i's row
    one = ALIEAdaptive(f=f).targeted(honest, honest[4], aggregator=aggs[4])
    assert torch.equal(one, out[4])


def test_targeted_uses_the_nodes_view_and_default_is_shared():
    honest = honest_updates(h=8)
    attack = ALIE(f=2)
    near = attack.targeted(honest[:5], honest[0])  # e.g. node 0 in a sparse graph
    far = attack.targeted(honest[3:], honest[7])
    assert not torch.equal(near, far)
    shared = SignFlip(f=2).per_target(honest)
    assert shared.shape == (8, 2, honest.shape[1])
    assert all(torch.equal(shared[i], shared[0]) for i in range(8))
    with pytest.raises(ValueError, match="one aggregator per honest node"):
        ALIEAdaptive(f=2).per_target(honest, aggregators=[mean_rule])


# ---------------------------------------------------------------------------------------------
# shapes, dtypes, devices; configs; errors
# ---------------------------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(n for n, c in ATTACKS.items() if c.kind == "model"))
def test_model_attacks_keep_shape_device_dtype(name, dtype, device):
    honest = honest_updates(h=10, d=17, dtype=dtype).to(device)
    attack = build_attack(name, 3)
    out = attack(honest, aggregator=median_rule)
    if name == "crash":
        assert out is None
        return
    assert out.shape == (3, 17) and out.dtype == dtype and out.device == honest.device
    empty = build_attack(name, 0)(honest, aggregator=median_rule)
    assert empty.shape == (0, 17)
    per = attack.per_target(honest, aggregators=[median_rule] * 10)
    assert per.shape == (10, 3, 17) and per.dtype == dtype


def test_registry_and_yaml_files_match():
    assert {p.stem for p in CONF.glob("*.yaml")} == set(ATTACKS)
    aliases = {"ipm": "foe", "ipm_adaptive": "foe_adaptive"}
    for name, cls in ATTACKS.items():
        assert cls.kind in ("model", "data")
        assert cls.name == aliases.get(name, name)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_attack_config_instantiates(path):
    cfg = OmegaConf.load(path)
    assert cfg.f == 0
    attack = hydra.utils.instantiate(cfg, f=3)
    assert isinstance(attack, ATTACKS[path.stem]) and attack.f == 3
    cfg.f = 2  # an override as attack.f=2 on the command line
    assert hydra.utils.instantiate(cfg).f == 2
    assert pickle.loads(pickle.dumps(attack)).f == 3  # shippable to Ray actors


def test_bad_settings_raise_helpful_errors():
    with pytest.raises(ValueError, match="f .*>= 0"):
        ALIE(f=-1)
    with pytest.raises(ValueError, match="integer"):
        SignFlip(f=1.5)
    with pytest.raises(ValueError, match="unknown variant.*paper"):
        ALIE(f=1, variant="baruch")
    with pytest.raises(ValueError, match="honest majority"):
        alie_z(10, 5)
    with pytest.raises(ValueError, match="honest majority"):
        ALIE(f=5)(honest_updates(h=5))  # n = 10, f = 5
    ALIE(f=5).check(11)
    ALIE(f=5, z=1.0)(honest_updates(h=5))  # fixed z needs no formula
    with pytest.raises(ValueError, match="honest"):
        SignFlip(f=2).check(2)
    with pytest.raises(ValueError, match="unknown attack 'alie2'.*alie"):
        build_attack("alie2", 1)
    with pytest.raises(ValueError, match="low < high"):
        Uniform(f=1, low=1.0, high=1.0)
    with pytest.raises(ValueError, match="sigma"):
        Gaussian(f=1, sigma=-1.0)
    with pytest.raises(ValueError, match="mode"):
        NoisyData(f=1, mode="salt")
    with pytest.raises(ValueError, match="warmup"):
        Mimic(f=1, warmup=0)
    with pytest.raises(ValueError, match="shrink"):
        FOEAdaptive(f=1, shrink=1.5)
    with pytest.raises(ValueError, match="2-D"):
        SignFlip(f=1)(torch.zeros(5))
    with pytest.raises(ValueError, match="floating"):
        SignFlip(f=1)(torch.zeros(2, 5, dtype=torch.long))
    assert NoAttack(f=0).f == 0 and bz.Attack.kind == "model"
