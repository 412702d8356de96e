"""Sample-level DP-SGD (clients/dp.py): clipping, reference epsilons, accounting across rounds,
checkpointed accountants and the budget stop, checked through real Opacus and the runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flagstaff.clients.dp import DPSGDTrainer, epsilon_of_history
from flagstaff.clients.models import build_model
from flagstaff.clients.plan import make_plan
from flagstaff.clients.trainer import ParamSpec
from tests.conftest import compose

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "expected"),
    [
        (1.0, 0.01, 1000, 2.1014),
        (1.0, 0.1, 100, 7.8993),
        (1.0, 0.1, 500, 18.0186),
        (1.1, 256 / 60000, 14062, 2.5966),
    ],
)
def test_rdp_epsilon_matches_reference_values(sigma, q, steps, expected) -> None:
    assert epsilon_of_history([(sigma, q, steps)], 1e-5, "rdp") == pytest.approx(expected, abs=1e-4)


def _model_and_spec(seed: int = 0):
    model = build_model("mlp", (64,), 10, hidden=(32,), seed=seed)
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec


def _train(tr, model, spec, x, y, sizes, ids, r, flat=None):
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = flat if flat is not None else spec.flatten(dict(model.named_parameters()))
    plan = make_plan(offs, np.asarray(sizes), np.asarray(ids), tr.batch_size, 0, r)
    return tr.train(
        model,
        spec,
        flat,
        x,
        y,
        plan,
        10,
        torch.as_tensor(sizes),
        client_ids=np.asarray(ids),
        offsets=offs,
        round_idx=r,
    )


def test_per_sample_clipped_gradient_norms_at_most_c() -> None:
    torch.manual_seed(0)
    model, spec = _model_and_spec()
    C = 0.1
    tr = DPSGDTrainer(batch_size=8, max_grad_norm=C, noise_multiplier=0.0)
    x, y = torch.randn(16, 64) * 5, torch.randint(0, 10, (16,))
    c = tr._client(model, spec, 0, x, y)
    params = [p for p in c.module.parameters() if p.requires_grad]
    loss = torch.nn.functional.cross_entropy
    for i in range(len(x)):  # one sample at a time: summed_grad is that sample's clipped gradient
        c.optimizer.zero_grad(set_to_none=True)
        loss(c.module(x[i : i + 1]), y[i : i + 1]).backward()
        raw = torch.cat([p.grad_sample.reshape(1, -1) for p in params], 1).norm()
        c.optimizer.clip_and_accumulate()
        clipped = torch.cat([p.summed_grad.reshape(-1) for p in params]).norm()
        assert raw > C  # clipping is active
        assert clipped <= C * (1 + 1e-5)
        assert clipped == pytest.approx(C, rel=1e-4)
    # a whole batch: every per-sample gradient is clipped before summation
    c.optimizer.zero_grad(set_to_none=True)
    loss(c.module(x), y).backward()
    per = torch.cat([p.grad_sample.reshape(len(x), -1) for p in params], 1)
    factor = (C / (per.norm(dim=1) + 1e-6)).clamp(max=1.0)
    c.optimizer.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.reshape(-1) for p in params])
    torch.testing.assert_close(summed, (per * factor[:, None]).sum(0), rtol=1e-4, atol=1e-6)
    assert ((per * factor[:, None]).norm(dim=1) <= C * (1 + 1e-5)).all()


def test_accountant_composes_across_rounds_and_survives_a_checkpoint() -> None:
    torch.manual_seed(0)
    model, spec = _model_and_spec()
    x, y = torch.randn(48, 64), torch.randint(0, 10, (48,))
    tr = DPSGDTrainer(batch_size=8, noise_multiplier=1.0, max_grad_norm=1.0)
    eps = [
        float(_train(tr, model, spec, x, y, [20, 28], [3, 7], r).metrics["epsilon"][0])
        for r in range(3)
    ]
    assert eps[0] < eps[1] < eps[2]
    q, steps = 1 / 3, 3  # client 3: 20 samples, batch 8
    assert tr.history(3) == [(1.0, q, 3 * steps)]
    assert eps[2] == pytest.approx(epsilon_of_history([(1.0, q, 9)], 1e-5, "rdp"), rel=1e-9)
    # prospective epsilon (budget check) = the epsilon after one more round
    after = tr.epsilon_after(3, 20)
    state = tr.state_dict()
    restored = DPSGDTrainer(batch_size=8, noise_multiplier=1.0, max_grad_norm=1.0)
    restored.load_state_dict(state)
    assert restored.epsilon(3) == pytest.approx(eps[2], rel=1e-12)
    r3 = _train(restored, model, spec, x, y, [20, 28], [3, 7], 3)
    assert float(r3.metrics["epsilon"][0]) == pytest.approx(after, rel=1e-9)
    assert restored.history(3) == [(1.0, q, 12)]


def test_same_seed_same_update_regardless_of_other_clients() -> None:
    torch.manual_seed(0)
    model, spec = _model_and_spec()
    x, y = torch.randn(48, 64), torch.randint(0, 10, (48,))
    a = _train(DPSGDTrainer(batch_size=8), model, spec, x, y, [20, 28], [3, 7], 0)
    b = _train(DPSGDTrainer(batch_size=8), model, spec, x[:20], y[:20], [20], [3], 0)
    torch.testing.assert_close(a.updates[0], b.updates[0])
    assert a.updates[0].abs().sum() > 0


def test_calibrated_noise_reaches_the_target_with_the_same_accountant() -> None:
    tr = DPSGDTrainer(
        batch_size=10,
        noise_multiplier=None,
        target_epsilon=3.0,
        accountant="rdp",
        rounds=10,
        num_clients=4,
        clients_per_round=2,
        calibrate="expected",
    )
    sigma = tr.sigma_for(100)
    planned = tr.steps_per_round(100) * tr.planned_rounds()  # 10 steps x 5 rounds
    assert planned == 50
    eps = epsilon_of_history([(sigma, 0.1, planned)], 1e-5, "rdp")
    assert 2.9 < eps <= 3.0


def _runs(tmp_path, *overrides):
    from flagstaff.system.runner import train

    cfg = compose(
        "experiment=privacy_dpsgd_digits",
        "backend=local",
        "progress=false",
        "num_clients=4",
        "clients_per_round=4",
        "client.batch_size=32",
        *overrides,
    )
    return train(cfg, run_dir=str(tmp_path))


def test_epsilon_grows_across_rounds_in_metrics(tmp_path) -> None:
    res = _runs(tmp_path, "rounds=2")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon_kind"] for r in rows] == ["sample-level"] * 2
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"]
    assert rows[0]["epsilon_mean"] <= rows[0]["epsilon"]
    # equals Opacus' accountant for the same sigma, q and steps (client sizes from partition.json)
    sizes = [c["samples"] for c in json.loads((tmp_path / "partition.json").read_text())["clients"]]
    expect = [
        epsilon_of_history([(1.0, 1 / -(-n // 32), 2 * -(-n // 32))], 1e-5, "rdp") for n in sizes
    ]
    assert rows[1]["epsilon"] == pytest.approx(max(expect), rel=1e-9)
    assert rows[1]["epsilon_mean"] == pytest.approx(float(np.mean(expect)), rel=1e-9)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    hist = ck["privacy"]["trainers"]["histories"]
    assert sorted(hist) == [0, 1, 2, 3]
    assert all(h[0][2] == 2 * -(-n // 32) for h, n in zip(hist.values(), sizes, strict=True))
    assert res["stopped"] is None


def test_budget_stop_fires_with_final_checkpoint(tmp_path, capsys) -> None:
    res = _runs(tmp_path, "rounds=10", "privacy.target_epsilon=4.0")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] == "privacy budget"
    assert "target_epsilon=4" in summary["stop_message"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) < 10
    assert max(r["epsilon"] for r in rows) <= 4.0
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["round"] == len(rows) == summary["rounds_completed"]
    assert "privacy budget" in capsys.readouterr().err
    assert res["stopped"] == "privacy budget"


def test_an_empty_poisson_batch_is_a_pure_noise_step() -> None:
    torch.manual_seed(0)
    model, spec = _model_and_spec()
    tr = DPSGDTrainer(batch_size=8, noise_multiplier=1.0, max_grad_norm=1.0)
    c = tr._client(model, spec, 0, torch.randn(16, 64), torch.randint(0, 10, (16,)))
    before = [p.detach().clone() for p in c.optimizer.params]
    for p in c.optimizer.params:
        p.grad_sample = torch.zeros(0, *p.shape)
    c.optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, c.optimizer.params, strict=True))
    assert tr.history(0) == [(1.0, 0.5, 1)]  # the step is accounted


def test_resumed_server_restores_every_clients_accountant() -> None:
    """Checkpoint after 2 rounds, restore into fresh hosts (2 of them): round 3 reports the same
    epsilons and the same parameters as the uninterrupted run."""
    from contextlib import ExitStack

    from flagstaff.system.build import build_run
    from flagstaff.system.runner import start

    cfg = compose(
        "experiment=privacy_dpsgd_digits",
        "backend=local",
        "num_clients=4",
        "clients_per_round=2",
        "client.batch_size=32",
        "cluster.hosts=2",
        "rounds=3",
    )
    with ExitStack() as stack:
        a = start(build_run(cfg), stack).server
        b = start(build_run(cfg), stack).server
        a.round(0, False)
        a.round(1, False)
        state = a.state_dict()
        assert len(state["privacy"]["trainers"]["histories"]) >= 2
        b.load_state_dict(state)
        ma, mb = a.round(2, True), b.round(2, True)
    assert ma["epsilon"] == mb["epsilon"] and ma["epsilon_mean"] == mb["epsilon_mean"]
    torch.testing.assert_close(a.params, b.params, rtol=0, atol=0)
    torch.testing.assert_close(a.client_epsilon, b.client_epsilon, rtol=0, atol=0)


# -- local rules under DP-SGD: accounting of a second private gradient (issue 20 item 7) ---------
def _both(**kw):
    from flagstaff.clients.dp_batched import BatchedDPSGDTrainer

    return [DPSGDTrainer(**kw), BatchedDPSGDTrainer(**kw)]


@pytest.mark.parametrize("which", [0, 1], ids=["opacus", "batched"])
def test_a_sam_step_is_one_gaussian_step_with_sigma_over_sqrt2(which) -> None:
    """FedSAM takes two private gradients per local step on the same Poisson batch: a Gaussian
    mechanism with sensitivity sqrt(2) C on one subsample, i.e. one sampled-Gaussian step with
    multiplier sigma / sqrt(2) per local step. The reported epsilon is Opacus' RDP accountant
    stepped that way; counting two independent (sigma, q) steps would report less; the budget
    stop's prospective epsilon (with the rule) is the next round's."""
    from opacus.accountants import RDPAccountant

    from flagstaff.strategies.fedsam import SAM
    from flagstaff.strategies.fedspeed import FedSpeedRule

    torch.manual_seed(0)
    model, spec = _model_and_spec()
    x, y = torch.randn(48, 64), torch.randint(0, 10, (48,))
    tr = _both(batch_size=8, noise_multiplier=1.0, max_grad_norm=1.0)[which]
    rule = SAM(0.05)

    def run(r):
        offs = np.array([0, 20])
        return tr.train(
            model, spec, spec.flatten(dict(model.named_parameters())), x, y, None, 10,
            torch.as_tensor([20, 28]), client_ids=np.array([3, 7]), offsets=offs,
            rule=rule, round_idx=r,
        )  # fmt: skip

    run(0)
    after = tr.epsilon_after(3, 20, rule)
    assert tr.epsilon_after(3, 20) < after  # without the rule: one release per step, too low
    eps = float(run(1).metrics["epsilon"][0])
    q, steps = 1 / 3, 3  # client 3: 20 samples, batch 8
    acc = RDPAccountant()
    for _ in range(2 * steps):
        acc.step(noise_multiplier=1.0 / np.sqrt(2), sample_rate=q)
    assert tr.history(3) == acc.history
    assert eps == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    assert eps == pytest.approx(after, rel=1e-12)
    assert eps > epsilon_of_history([(1.0, q, 4 * steps)], 1e-5, "rdp")  # 2 independent steps
    # FedSpeed with alpha = 0 takes one gradient per step: plain accounting
    other = _both(batch_size=8, noise_multiplier=1.0, max_grad_norm=1.0)[which]
    rule = FedSpeedRule(0.05, 0.0, 0.1)
    other.train(
        model, spec, spec.flatten(dict(model.named_parameters())), x[:20], y[:20], None, 10,
        torch.as_tensor([20]), client_ids=np.array([3]), offsets=np.array([0]), rule=rule,
        state={"ghat_i": torch.zeros(1, spec.numel)},
    )  # fmt: skip
    assert other.history(3) == [(1.0, q, steps)]


def test_calibrated_noise_of_a_two_gradient_rule_reaches_the_target() -> None:
    tr = DPSGDTrainer(
        batch_size=10, noise_multiplier=None, target_epsilon=3.0, rounds=10, num_clients=4,
        clients_per_round=2,
    )  # fmt: skip
    one, two = tr.sigma_for(100), tr.sigma_for(100, 2)
    assert two == pytest.approx(np.sqrt(2) * one, rel=1e-12)
    eps = epsilon_of_history([(two / np.sqrt(2), 0.1, 50)], 1e-5, "rdp")
    assert 2.9 < eps <= 3.0


def test_any_strategy_aggregator_attack_dp_and_compression_in_one_config(tmp_path) -> None:
    """SCAFFOLD x median x sign flip x batched DP-SGD x PowerSGD through the real runner: it runs,
    reports each round's epsilon (Opacus' accountant for every client's steps), and the clients'
    SCAFFOLD state lives on the hosts."""
    from flagstaff.system.runner import train

    res = train(
        compose(
            "experiment=smoke", "rounds=2", "clients_per_round=10", "strategy=scaffold",
            "aggregator=median", "attack=sign_flip", "attack.f=1", "client=dpsgd_batched",
            "comm=powersgd",
        ),
        run_dir=str(tmp_path),
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["epsilon_kind"] == "sample-level" for r in rows)
    sizes = [c["samples"] for c in json.loads((tmp_path / "partition.json").read_text())["clients"]]
    want = [epsilon_of_history([(1.0, 1 / -(-n // 8), 2 * -(-n // 8))], 1e-5, "rdp") for n in sizes]
    assert rows[1]["epsilon"] == pytest.approx(max(want), rel=1e-9)
    assert np.isfinite(res["metrics"][-1]["accuracy"])
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["clients"]["c_i"].abs().sum() > 0 and "comm.q" in ck["clients"]


def test_hosts_ask_the_budget_stop_with_the_rule(tmp_path) -> None:
    """The hosts' prospective epsilon (budget stop) counts FedSAM's two private gradients per
    step: before round 1 it equals every client's epsilon after round 1 (Opacus path)."""
    from contextlib import ExitStack

    from flagstaff.system.build import build_run
    from flagstaff.system.runner import start

    run = build_run(
        compose(
            "experiment=smoke", "strategy=fedsam", "client=dpsgd", "clients_per_round=10",
            "num_clients=10", "client.batch_size=32",
        )
    )  # fmt: skip
    parts = run.parts
    with ExitStack() as stack:
        server = start(run, stack).server
        asked = {}
        for part in server.pool.call("epsilon_after", {0: (list(range(10)),)}).values():
            asked.update(part)
        server.round(0, False)
        got = server.client_epsilon.tolist()
    assert sorted(asked) == list(range(10))
    assert got == pytest.approx([asked[i] for i in range(10)], rel=1e-12)
    sizes = [len(p) for p in parts]
    z = 1.0 / np.sqrt(2)
    want = [epsilon_of_history([(z, 1 / -(-n // 32), -(-n // 32))], 1e-5, "rdp") for n in sizes]
    assert got == pytest.approx(want, rel=1e-12)
