"""Client-level DP (strategies/dp.py, DP-FedAvg): clipping, noise scale, sampled-Gaussian
accounting over rounds, adaptive clipping, the budget stop, and runs through the runner."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from flagstaff.clients.dp import epsilon_of_history
from flagstaff.strategies.dp import ClientLevelDP
from flagstaff.strategies.fedavg import FedAvg
from tests.conftest import ROOT, compose

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _dp(**kw) -> ClientLevelDP:
    args = dict(clip=1.0, noise_multiplier=1.0, num_clients=100, clients_per_round=10, seed=0)
    args.update(sampling="bernoulli")
    args.update(kw)
    return ClientLevelDP(FedAvg(), **args)


def test_clipping_and_equal_weights() -> None:
    s = _dp(clip=0.5)
    U = torch.tensor([[3.0, 4.0], [0.1, 0.0], [0.0, -2.0]])
    state = s.init(torch.zeros(2))
    V, w, state = s.pre_aggregate(U, torch.tensor([5.0, 1.0, 2.0]), state, 0)
    assert torch.all(V.norm(dim=1) <= 0.5 + 1e-7)
    torch.testing.assert_close(V[0], torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(V[1], U[1])  # small updates are untouched
    torch.testing.assert_close(w, torch.ones(3))
    assert state.round == {"n": 3, "unclipped": 1}


def test_noise_scale_is_z_s_over_m() -> None:
    z, S, m, d = 1.3, 0.7, 10, 200_000
    s = _dp(clip=S, noise_multiplier=z, clients_per_round=m)
    params = torch.zeros(d)
    state = s.init(params)
    _, _, state = s.pre_aggregate(torch.zeros(m, d), torch.ones(m), state, 0)
    new, state = s.update(params, torch.zeros(d), state, 0)  # FedAvg: params + noised mean
    assert new.std().item() == pytest.approx(z * S / m, rel=0.01)
    assert abs(new.mean().item()) < 5 * z * S / m / math.sqrt(d)
    # the fixed denominator m: 5 of 10 clients answered, the mean of theirs is halved
    state2 = s.init(params)
    _, _, state2 = s.pre_aggregate(torch.ones(5, 1) * 0.1, torch.ones(5), state2, 1)
    s0 = _dp(noise_multiplier=0.0, clients_per_round=m)
    out, _ = s0.update(torch.zeros(1), torch.tensor([0.1]), state2, 1)
    torch.testing.assert_close(out, torch.tensor([0.05]))


def test_accounting_is_the_sampled_gaussian_over_rounds() -> None:
    s = _dp(noise_multiplier=1.0, num_clients=100, clients_per_round=10)  # q = 0.1
    params = torch.zeros(3)
    state = s.init(params)
    eps = []
    for r in range(4):
        assert s.epsilon_after(state) == pytest.approx(
            epsilon_of_history([(1.0, 0.1, r + 1)], 1e-5, "rdp"), rel=1e-12
        )
        _, _, state = s.pre_aggregate(torch.ones(10, 3), torch.ones(10), state, r)
        params, state = s.update(params, torch.ones(3), state, r)
        eps.append(s.epsilon(state))
    assert state.history == [[1.0, 0.1, 4]]
    assert eps == sorted(eps) and eps[0] > 0
    # the reference value: sigma 1.0, q 0.1, 100 steps -> 7.8993 (RDP, delta 1e-5)
    assert epsilon_of_history([(1.0, 0.1, 100)], 1e-5, "rdp") == pytest.approx(7.8993, abs=1e-4)


def test_calibrated_noise_and_adaptive_clipping() -> None:
    s = _dp(noise_multiplier=None, target_epsilon=2.0, rounds=50)
    eps = epsilon_of_history([(s.noise_multiplier, 0.1, 50)], 1e-5, "rdp")
    assert 1.9 < eps <= 2.0
    a = _dp(
        adaptive=True,
        noise_multiplier=1.0,
        count_stddev=5.0,
        clip=1.0,
        target_quantile=0.5,
        clip_lr=0.2,
    )
    # Andrew et al.: update noise z_u with z^-2 = z_u^-2 + (2 sigma_b)^-2
    assert a.update_noise_multiplier**-2 + (2 * 5.0) ** -2 == pytest.approx(1.0)
    params = torch.zeros(2)
    state = a.init(params)
    clips = [state.clip]
    # all updates tiny: the clip shrinks geometrically towards their norm (b~ = 1 + N(0, 0.5^2)
    # clamped to [0, 1]: about exp(-0.06) per round)
    for r in range(60):
        _, _, state = a.pre_aggregate(torch.full((10, 2), 1e-3), torch.ones(10), state, r)
        params, state = a.update(params, torch.zeros(2), state, r)
        clips.append(state.clip)
    assert clips[-1] < 0.2 * clips[0]
    with pytest.raises(ValueError, match="count_stddev"):
        _dp(adaptive=True, noise_multiplier=1.0, count_stddev=0.1)


def test_dp_fedavg_runs_from_the_runner_and_stops_on_budget(tmp_path) -> None:
    from flagstaff.system.runner import train

    base = [
        "experiment=privacy_dp_fedavg_digits",
        "backend=local",
        "progress=false",
        "num_clients=20",
        "clients_per_round=10",
        "client.batch_size=32",
    ]
    train(compose(*base, "rounds=2"), run_dir=str(tmp_path / "a"))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon_kind"] for r in rows] == ["client-level"] * 2
    assert rows[0]["epsilon"] == pytest.approx(epsilon_of_history([(1.0, 0.5, 1)], 1e-5, "rdp"))
    assert rows[1]["epsilon"] == pytest.approx(epsilon_of_history([(1.0, 0.5, 2)], 1e-5, "rdp"))
    res = train(
        compose(*base, "rounds=10", "privacy.target_epsilon=5"), run_dir=str(tmp_path / "b")
    )
    assert res["stopped"] == "privacy budget"
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["strategy"]["dp"]["history"][0][2] == res["rounds_completed"] >= 1
    adaptive = compose(*base, "rounds=2", "strategy.adaptive=true", "strategy.count_stddev=2.0")
    train(adaptive, run_dir=str(tmp_path / "c"))
    ck = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert ck["strategy"]["dp"]["clip"] != 1.0


def test_dp_fedavg_needs_the_mean_aggregator() -> None:
    from flagstaff.system.build import validate
    from flagstaff.system.config import ConfigError

    with pytest.raises(ConfigError, match="aggregator=mean"):
        validate(compose("experiment=privacy_dp_fedavg_digits", "aggregator=median"))


# -- adaptive clipping: the mechanism actually released (issue 18 item 1) ---------------------------
# Andrew et al. 2021, Algorithm 1 / Theorem 1: the released count is centred, sum_i (b_i - 1/2) +
# N(0, sigma_b^2), so one client more or less moves it by at most 1/2, and the pair of releases has
# the noise multiplier z with z^-2 = z_u^-2 + (2 sigma_b)^-2. These tests measure what is released
# (the noised update and the next clip, from which b~ follows) instead of reading the formulas.


def _release(s: ClientLevelDP, U: torch.Tensor, r: int, clip: float) -> tuple[torch.Tensor, float]:
    """One server step on updates U (n, d) from zero parameters with clip S = ``clip``, as the
    server runs it (clip, mean aggregator, update); returns the noised update and the released
    fraction b~ recovered from the next clip, S' = S exp(-eta (b~ - gamma))."""
    d = U.shape[1]
    state = dataclasses.replace(s.init(torch.zeros(d)), clip=clip)
    V, w, state = s.pre_aggregate(U, torch.ones(len(U)), state, r)
    new, state = s.update(torch.zeros(d), V.mean(0), state, r)
    b = s.target_quantile - math.log(state.clip / clip) / s.clip_lr
    return new.double(), b


def _clients(unclipped: int, clipped: int, d: int, S: float) -> torch.Tensor:
    """``unclipped`` zero updates and ``clipped`` updates of norm 10 S along the first axis."""
    U = torch.zeros(unclipped + clipped, d)
    U[unclipped:, 0] = 10 * S
    return U


def test_adaptive_effective_noise_multiplier_measured_equals_accounted() -> None:
    m, S, z, sb = 10, 0.5, 1.0, 1.0
    s = _dp(adaptive=True, noise_multiplier=z, count_stddev=sb, clip=S, clients_per_round=m)
    d = 4
    # sensitivities: neighbouring rounds (one client more, unclipped or clipped), same noise draw
    base = _clients(5, 5, d, S)
    u0, b0 = _release(s, base, 0, S)
    u_in, b_in = _release(s, torch.cat([base, _clients(1, 0, d, S)]), 0, S)
    u_out, b_out = _release(s, torch.cat([base, _clients(0, 1, d, S)]), 0, S)
    sens_update = max(float((u_in - u0).norm()), float((u_out - u0).norm()))
    sens_count = m * max(abs(b_in - b0), abs(b_out - b0))  # the count is m (b~ - 1/2)
    assert sens_update == pytest.approx(S / m, rel=1e-5)
    # noise: the update noise over many coordinates, the count noise over many rounds
    big, _ = _release(s, _clients(5, 5, 100_000, S), 1, S)
    noise_u = big[1:]  # coordinate 0 holds the clipped updates' sum
    counts = torch.tensor([m * _release(s, base, r, S)[1] for r in range(2, 3002)])
    std_u, std_b = float(noise_u.std()), float(counts.std())
    assert std_b == pytest.approx(sb, rel=0.05)
    measured = ((sens_update / std_u) ** 2 + (sens_count / std_b) ** 2) ** -0.5
    state = s.init(torch.zeros(d))
    _, _, state = s.pre_aggregate(base, torch.ones(len(base)), state, 0)
    _, state = s.update(torch.zeros(d), base.mean(0), state, 0)
    accounted = state.history[-1][0]
    assert measured == pytest.approx(accounted, rel=0.03)
    assert sens_count == pytest.approx(0.5, rel=1e-6)


def test_adaptive_count_is_centred_with_the_expected_denominator() -> None:
    # 14 of the expected m = 20 clients answer, 7 of them unclipped: b~ = (7 - 14/2 + noise) / 20
    # + 1/2, so its mean is 1/2 (the uncentred count would give 7 / 20 = 0.35)
    m, S = 20, 1.0
    s = _dp(adaptive=True, noise_multiplier=1.0, count_stddev=1.0, clip=S, clients_per_round=m)
    U = _clients(7, 7, 3, S)
    b = torch.tensor([_release(s, U, r, S)[1] for r in range(2000)])
    assert float(b.mean()) == pytest.approx(0.5, abs=5 * (1.0 / m) / math.sqrt(2000))
    assert float(b.std()) == pytest.approx(1.0 / m, rel=0.1)


def test_summary_mechanism_reproduces_the_reported_epsilon(tmp_path) -> None:
    from opacus.accountants import RDPAccountant

    from flagstaff.system.runner import train

    cfg = compose(
        "experiment=privacy_dp_fedavg_digits",
        "backend=local",
        "progress=false",
        "num_clients=20",
        "clients_per_round=10",
        "client.batch_size=32",
        "rounds=3",
        "strategy.adaptive=true",
        "strategy.count_stddev=1.0",
    )
    train(cfg, run_dir=str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mech = summary["privacy"]["mechanism"]
    assert mech["count_sensitivity"] == 0.5 and mech["count_noise_std"] == 1.0
    assert mech["update_noise_std"] == pytest.approx(
        mech["update_noise_multiplier"] * mech["clip"] / mech["clients_per_round"], rel=1e-12
    )
    # the two Gaussian releases compose to one with z^-2 = z_u^-2 + (sigma_b / Delta_b)^-2
    z_eff = (
        mech["update_noise_multiplier"] ** -2
        + (mech["count_noise_std"] / mech["count_sensitivity"]) ** -2
    ) ** -0.5
    assert mech["effective_noise_multiplier"] == pytest.approx(z_eff, rel=1e-12)
    assert mech["sampling_rate"] == 0.5 and mech["steps"] == 3
    acc = RDPAccountant()
    for _ in range(mech["steps"]):
        acc.step(noise_multiplier=z_eff, sample_rate=mech["sampling_rate"])
    assert mech["accountant"] == "rdp" and mech["delta"] == 1e-5
    eps = acc.get_epsilon(delta=mech["delta"])
    assert rows[-1]["epsilon"] == pytest.approx(eps, rel=1e-9)
    assert summary["privacy"]["epsilon"] == pytest.approx(eps, rel=1e-9)


# -- the sampling, empty rounds, counts and the clip update (issue 18 review REV18P, 4/5/8/11) -----


def test_fixed_size_client_sampling_is_refused() -> None:
    """sampling=fixed draws exactly m of N clients without replacement (replace-one adjacency,
    sensitivity 2 S / m): not the Poisson add/remove sampled Gaussian the accountant reports
    (43.7 against 7.52 for N 100, m 20, z 1, 20 rounds). Only m = N (every client) is the same."""
    with pytest.raises(ValueError, match="sampling=bernoulli") as err:
        _dp(sampling="fixed")
    assert "\n" not in str(err.value)
    everyone = _dp(sampling="fixed", num_clients=10, clients_per_round=10)
    mech = everyone.mechanism(everyone.init(torch.zeros(1)))
    assert mech["sampling"] == "poisson" and mech["sampling_rate"] == 1.0
    assert mech["secure_rng"] is False


def test_cli_refuses_client_level_dp_with_fixed_sampling_in_one_line(tmp_path) -> None:
    out = tmp_path / "run"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "flagstaff.launch.train",
            "experiment=privacy_dp_fedavg_digits",
            "sampling=fixed",
            "backend=local",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "sampling=bernoulli" in errors[0], p.stderr
    assert "Traceback" not in p.stderr and not (out / "metrics.jsonl").exists()


def _step(s: ClientLevelDP):
    from flagstaff.strategies.aggregators import build
    from flagstaff.strategies.attacks import Adversary, NoAttack
    from flagstaff.strategies.server_step import ServerStep

    adversary = Adversary(NoAttack(), s.num_clients)
    return ServerStep(s, build("mean"), adversary, num_clients=s.num_clients, delta=s.delta)


def _rows(U: torch.Tensor, ids=None):
    from flagstaff.strategies.server_step import Replies

    n = len(U)
    ids = np.arange(n) if ids is None else np.asarray(ids)
    return Replies(ids, U, torch.ones(n), torch.zeros(n))


def test_an_empty_round_is_released_and_accounted() -> None:
    """Poisson sampling may sample nobody (or every update may be non-finite): skipping such a
    round is not post-processing of the sampled Gaussian mechanism, so the round releases the
    noise on a zero sum (denominator m) and the accountant steps."""
    from flagstaff.strategies.server_step import Replies

    m, d, S = 10, 50_000, 1.0
    s = _dp(adaptive=True, count_stddev=2.0, clip=S, clients_per_round=m)
    step = _step(s)
    p0 = torch.zeros(d)
    st = s.init(p0)
    empty = step(p0, st, Replies.empty(d), 0)
    assert not empty.skipped
    assert empty.state.history == [[s.effective_noise_multiplier, s.sample_rate, 1]]
    assert s.epsilon(empty.state) == pytest.approx(
        epsilon_of_history([(s.effective_noise_multiplier, 0.1, 1)], 1e-5, "rdp"), rel=1e-12
    )
    assert float(empty.params.std()) == pytest.approx(s.update_noise_multiplier * S / m, rel=0.02)
    assert "skipped" not in empty.metrics and "skipped_clients" not in empty.metrics
    # every update non-finite: each contributes nothing, the very release of an empty round
    nan = step(p0, st, _rows(torch.full((3, d), float("nan"))), 0)
    assert not nan.skipped and torch.equal(nan.params, empty.params)
    assert nan.state.clip == empty.state.clip and nan.state.history == empty.state.history
    # a non-finite update among finite ones contributes nothing either (not to the clipped sum,
    # not to the centred count): the release of the finite clients alone
    U = torch.randn(4, d) * 1e-3
    bad = torch.cat([U, torch.full((1, d), float("inf"))])
    a = step(p0, st, _rows(U), 3)
    b = step(p0, st, _rows(bad, [0, 1, 2, 3, 9]), 3)
    assert torch.equal(a.params, b.params) and a.state.clip == b.state.clip
    assert b.metrics["dropped_nonfinite"] == 1


def test_an_empty_round_without_client_level_dp_is_still_skipped() -> None:
    from flagstaff.strategies.aggregators import build
    from flagstaff.strategies.attacks import Adversary, NoAttack
    from flagstaff.strategies.server_step import Replies, ServerStep

    step = ServerStep(FedAvg(), build("mean"), Adversary(NoAttack(), 10), num_clients=10)
    res = step(torch.zeros(3), FedAvg().init(torch.zeros(3)), Replies.empty(3), 0)
    assert res.skipped and torch.equal(res.params, torch.zeros(3))


def test_an_empty_adaptive_round_releases_the_count_noise_alone() -> None:
    """With nobody answering the centred count is 0 + N(0, sigma_b^2): b~ is 1/2 plus noise of
    std sigma_b / m = 6e-4 here, so the clip barely moves; a count of -m/2 would move it by
    exp(eta / 2)."""
    from flagstaff.strategies.server_step import Replies

    s = _dp(
        adaptive=True, count_stddev=0.6, num_clients=10_000, clients_per_round=1000, clip_lr=0.2
    )
    step = _step(s)
    res = step(torch.zeros(2), s.init(torch.zeros(2)), Replies.empty(2), 0)
    assert not res.skipped
    assert abs(math.log(res.state.clip / s.clip)) < 1e-3


def test_metrics_log_the_expected_count_and_bytes_under_client_level_dp(tmp_path) -> None:
    """The realised number of sampled clients is what the fixed denominator hides: under
    client-level DP metrics.jsonl logs clients = m and the bytes m clients would move, in every
    round, also in an empty one; the epsilon covers every round (the empty one included)."""
    from opacus.accountants import RDPAccountant

    from flagstaff.system.runner import train
    from flagstaff.system.server import sample_clients

    sizes = [len(sample_clients(10, 2, 0, r, "bernoulli")) for r in range(3)]
    assert sizes == [2, 0, 1]  # seed 0: an empty round, and varying counts
    cfg = compose(
        "experiment=privacy_dp_fedavg_digits",
        "backend=local",
        "progress=false",
        "num_clients=10",
        "clients_per_round=2",
        "rounds=3",
        "seed=0",
        "client.batch_size=32",
        "strategy.adaptive=true",
        "strategy.count_stddev=1.0",
    )
    res = train(cfg, run_dir=str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(rows) == 3 and not any("skipped" in r or "skipped_clients" in r for r in rows)
    d = res["params"].numel()
    assert [r["clients"] for r in rows] == [2, 2, 2]
    assert [(r["bytes_up"], r["bytes_down"]) for r in rows] == [(2 * d * 4, 2 * d * 4)] * 3
    mech = summary["privacy"]["mechanism"]
    assert mech["steps"] == 3 and mech["sampling"] == "poisson" and mech["secure_rng"] is False
    acc = RDPAccountant()
    for _ in range(mech["steps"]):
        acc.step(noise_multiplier=mech["effective_noise_multiplier"], sample_rate=0.2)
    eps = acc.get_epsilon(delta=1e-5)
    assert [r["epsilon"] for r in rows][-1] == pytest.approx(eps, rel=1e-9)
    assert summary["privacy"]["epsilon"] == pytest.approx(eps, rel=1e-9)


def test_adaptive_clip_update_clamps_the_released_fraction() -> None:
    """b~ = c / m + 1/2 is a noisy estimate of a fraction: clamped to [0, 1] before the geometric
    update (TF-Privacy's QuantileEstimatorQuery; post-processing), so one round moves the clip by
    at most exp(eta gamma) up or exp(-eta (1 - gamma)) down."""
    eta, gamma = 0.2, 0.3
    s = _dp(
        adaptive=True, count_stddev=20.0, clients_per_round=10, clip_lr=eta, target_quantile=gamma
    )
    U = _clients(5, 5, 3, 1.0)
    b = torch.tensor([_release(s, U, r, 1.0)[1] for r in range(200)], dtype=torch.float64)
    assert float(b.min()) == pytest.approx(0.0, abs=1e-9)  # both ends are reached
    assert float(b.max()) == pytest.approx(1.0, abs=1e-9)
    assert ((b > 0.01) & (b < 0.99)).any()
