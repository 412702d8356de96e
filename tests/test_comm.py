"""Compressed communication (system/codecs.py): exact properties of PowerSGD and the rand-k sketch,
error feedback, byte counts, and end-to-end runs on both backends (docs/communication.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from flagstaff.clients.trainer import ParamSpec
from flagstaff.system.build import validate
from flagstaff.system.codecs import Layout, PowerSGD, RandKSketch, build_codec, powersgd_step
from flagstaff.system.config import ConfigError
from flagstaff.system.runner import train
from tests.conftest import compose

# a small model layout: a matrix, its bias, a conv kernel (8, 3, 3, 3) -> (8, 27), a tiny matrix
SPEC = ParamSpec(("w", "b", "conv", "tiny"), ((16, 12), (16,), (8, 3, 3, 3), (3, 4)))
SMOKE = ("experiment=smoke", "model.hidden=[64]")


def _low_rank(K: int, spec: ParamSpec, rank: int, gen: torch.Generator) -> torch.Tensor:
    """(K, d) updates whose every matrix has rank <= ``rank`` (vectors arbitrary)."""
    parts = []
    for shape in spec.shapes:
        if len(shape) >= 2:
            m, n = shape[0], int(np.prod(shape[1:]))
            a, b = torch.randn(K, m, rank, generator=gen), torch.randn(K, rank, n, generator=gen)
            parts.append((a @ b).reshape(K, -1))
        else:
            parts.append(torch.randn(K, int(np.prod(shape)), generator=gen))
    return torch.cat(parts, dim=1)


def test_powersgd_step_full_rank_is_exact_and_p_is_orthonormal() -> None:
    g = torch.Generator().manual_seed(0)
    for m, n in ((6, 4), (4, 9), (5, 5)):
        r = min(m, n)
        M = torch.randn(3, m, n, generator=g, dtype=torch.float64)
        P, Q = powersgd_step(M, torch.randn(3, n, r, generator=g, dtype=torch.float64))
        assert P.shape == (3, m, r) and Q.shape == (3, n, r)
        torch.testing.assert_close(P @ Q.transpose(1, 2), M, atol=1e-10, rtol=0)
        torch.testing.assert_close(P.transpose(1, 2) @ P, torch.eye(r).expand(3, r, r).double())


def test_powersgd_codec_is_exact_on_rank_r_updates_and_sends_vectors_raw() -> None:
    codec = PowerSGD(SPEC, seed=0, rank=2, error_feedback=False, min_compress_numel=32)
    # w (16, 12) and conv (8, 27) are compressed; the bias and the 12-entry tiny matrix travel raw
    assert [(m, n) for _, _, m, n in codec.layout.packed] == [(16, 12), (8, 27)]
    assert codec.layout.raw_numel == 16 + 12
    assert codec.payload_numel == 28 + 2 * (16 + 12) + 2 * (8 + 27)
    U = _low_rank(5, SPEC, 2, torch.Generator().manual_seed(1))
    payload, _ = codec.encode(U, codec.init_state(5), 0)
    assert payload.shape == (5, codec.payload_numel)
    torch.testing.assert_close(codec.decode(payload, 0), U, atol=1e-4, rtol=1e-4)
    # P in the payload has orthonormal columns
    P = payload[:, 28 : 28 + 32].reshape(5, 16, 2)
    torch.testing.assert_close(
        P.transpose(1, 2) @ P, torch.eye(2).expand(5, 2, 2), atol=1e-5, rtol=0
    )


def test_powersgd_warm_start_uses_the_clients_previous_q() -> None:
    spec = ParamSpec(("w",), ((10, 8),))
    codec = PowerSGD(spec, seed=3, rank=2, error_feedback=False, min_compress_numel=0)
    g = torch.Generator().manual_seed(2)
    state = codec.init_state(4)
    assert torch.equal(state["q"][0], state["q"][3])  # one seeded initial Q for every client
    U1, U2 = torch.randn(4, 80, generator=g), torch.randn(4, 80, generator=g)
    p1, state1 = codec.encode(U1, state, 0)
    Q1 = p1[:, 20:].reshape(4, 8, 2)
    assert torch.equal(state1["q"], Q1.reshape(4, -1))  # the Q sent is the Q kept
    p2, _ = codec.encode(U2, state1, 1)
    P2, Q2 = powersgd_step(U2.reshape(4, 10, 8), Q1)
    assert torch.equal(p2, torch.cat([P2.reshape(4, -1), Q2.reshape(4, -1)], dim=1))
    # a cold start (the initial Q again) gives a different message
    assert not torch.allclose(codec.encode(U2, state, 1)[0], p2)


@pytest.mark.parametrize(
    "codec",
    [
        PowerSGD(SPEC, seed=0, rank=1, min_compress_numel=32),
        RandKSketch(SPEC, seed=0, ratio=0.2, min_compress_numel=32),
    ],
    ids=["powersgd", "sketch"],
)
def test_error_feedback_telescopes(codec) -> None:
    """sum_t decode(payload_t) = sum_t u_t - e_T: nothing is lost, only delayed."""
    g = torch.Generator().manual_seed(5)
    state = codec.init_state(3)
    sent = torch.zeros(3, codec.d, dtype=torch.float64)
    true = torch.zeros(3, codec.d, dtype=torch.float64)
    for t in range(12):
        U = torch.randn(3, codec.d, generator=g)
        payload, state = codec.encode(U, state, t)
        sent += codec.decode(payload, t).double()
        true += U.double()
    assert state["residual"].abs().max() > 0.1  # the codec did lose something per round
    torch.testing.assert_close(sent, true - state["residual"].double(), atol=1e-4, rtol=0)


def test_sketch_decoder_is_unbiased_over_seeds_and_shares_coordinates() -> None:
    spec = ParamSpec(("w", "b"), ((6, 5), (6,)))
    codec = RandKSketch(
        spec, seed=0, ratio=0.2, error_feedback=False, min_compress_numel=0, decoder="unbiased"
    )
    assert codec.k == 6 and codec.payload_numel == 6 + 6
    x = torch.randn(1, codec.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    T = 3000
    total = torch.zeros_like(x)
    for t in range(T):  # the round's seed chooses the coordinates
        payload, _ = codec.encode(x.float(), {}, t)
        total += codec.decode(payload, t).double()
    # E[decode] = x; per coordinate std of the mean = sqrt((n/k - 1) / T) |x_i| ~ 0.04 |x_i|
    torch.testing.assert_close(total / T, x, atol=0.2 * float(x.abs().max()), rtol=0)
    assert float((total / T - x).norm() / x.norm()) < 0.1
    # the raw bias is exact; every client of a round (and the server) uses the same coordinates
    torch.testing.assert_close(
        codec.decode(codec.encode(x.float(), {}, 7)[0], 7)[0, 30:], x[0, 30:].float()
    )
    assert torch.equal(codec.indices(7), RandKSketch(spec, 0, 0.2, False, 0).indices(7))
    assert not torch.equal(codec.indices(7), codec.indices(8))
    assert not torch.equal(codec.indices(7), RandKSketch(spec, 1, 0.2, False, 0).indices(7))


def test_nonfinite_updates_send_nan_payloads_and_keep_state() -> None:
    codec = PowerSGD(SPEC, seed=0, rank=1, min_compress_numel=32)
    state = codec.init_state(3)
    state = {n: v + 1.0 for n, v in state.items()}
    U = torch.randn(3, codec.d)
    U[1, 5] = float("nan")
    payload, new = codec.encode(U, state, 0)
    assert torch.isfinite(payload[[0, 2]]).all() and torch.isnan(payload[1]).all()
    for n in state:
        assert torch.equal(new[n][1], state[n][1]) and not torch.equal(new[n][0], state[n][0])


def test_build_codec_from_config_and_layout_rules() -> None:
    assert build_codec({"kind": "none"}, SPEC, 0) is None
    c = build_codec(dict(to_comm("comm=powersgd", "comm.rank=4")), SPEC, 7)
    assert isinstance(c, PowerSGD) and c.rank == 4 and c.seed == 7 and c.error_feedback
    c = build_codec(dict(to_comm("comm=sketch", "comm.seed=3")), SPEC, 7)
    assert isinstance(c, RandKSketch) and c.seed == 3 and c.decoder == "contractive"
    # a rank-r factorization that would not save bytes is sent as it is (tiny: 1*(3+4) < 12 only)
    lay = Layout.of(SPEC, min_numel=0, rank=3)
    assert [(m, n) for _, _, m, n in lay.packed] == [(16, 12), (8, 27)]


def to_comm(*over: str) -> dict:
    return validate(compose(*SMOKE, *over))["comm"]


def test_bad_comm_config_fails_at_compose_or_validate() -> None:
    with pytest.raises(ConfigCompositionException, match="comm.rnak"):
        compose(*SMOKE, "comm=powersgd", "comm.rnak=2")  # unknown key: the structured schema
    with pytest.raises(
        ConfigError, match=r"unknown key comm.rnak in group comm; valid keys: .*rank"
    ):
        validate(compose(*SMOKE, "comm=powersgd", "+comm.rnak=2"))  # appended past the schema
    with pytest.raises(ConfigCompositionException):
        compose(*SMOKE, "comm.kind=zip")  # not a codec
    with pytest.raises(ConfigCompositionException):
        compose(*SMOKE, "comm=topk")  # no such config in the group
    for over, match in (
        (("comm=powersgd", "comm.rank=0"), "comm.rank=0 must be >= 1"),
        (("comm=sketch", "comm.ratio=1.5"), r"comm.ratio=1.5 must be in \(0, 1\]"),
        (("comm=sketch", "comm.min_compress_numel=-1"), "min_compress_numel"),
        (("comm=powersgd", "backend=flower"), "backend=local or backend=ray"),
        (("comm=sketch", "comm.decoder=unbiased"), "use comm.decoder=contractive"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate(compose(*SMOKE, *over))


def test_bytes_up_and_down_in_metrics_jsonl(tmp_path) -> None:
    """MLP 64-64-10 at rank 2: W1 (64, 64) -> 2 * (64 + 64), W2 (10, 64) -> 2 * (10 + 64), biases
    64 + 10 raw: 478 floats = 1912 bytes per client; 5 clients per round."""
    d = 64 * 64 + 64 + 10 * 64 + 10
    for over, up in ((("comm=powersgd", "comm.rank=2"), 1912), ((), 4 * d)):
        res = train(compose(*SMOKE, *over), run_dir=str(tmp_path / str(up)))
        rows = [
            json.loads(x) for x in (tmp_path / str(up) / "metrics.jsonl").read_text().splitlines()
        ]
        assert [(r["bytes_up"], r["bytes_down"]) for r in rows] == [(5 * up, 5 * 4 * d)] * 3
        summary = json.loads((tmp_path / str(up) / "summary.json").read_text())
        assert summary["bytes_up_total"] == 15 * up and summary["bytes_down_total"] == 15 * 4 * d
        assert res["accuracy"] > 0.3
    assert 4 * d / 1912 > 10  # the 10x


@pytest.mark.parametrize("agg", ["median", "krum"])
def test_robust_aggregators_work_on_decoded_updates(tmp_path, agg) -> None:
    over = (*SMOKE, "rounds=4", "comm=powersgd", f"aggregator={agg}")
    res = train(compose(*over, "attack=sign_flip", "attack.f=1"), run_dir=str(tmp_path / "a"))
    assert res["accuracy"] > 0.3 and np.isfinite(res["params"].numpy()).all()
    assert all(r["bytes_up"] == 5 * 1912 for r in res["metrics"])


def test_nonfinite_payloads_are_dropped_and_counted(tmp_path) -> None:
    from flagstaff.system.config import to_plain
    from flagstaff.system.pool import LocalPool

    res = train(
        compose(*SMOKE, "comm=sketch", "clients_per_round=10", "attack=nan_vector", "attack.f=2"),
        run_dir=str(tmp_path),
    )  # the attack acts on the decoded updates
    assert all(r["dropped_nonfinite"] == 2 for r in res["metrics"])
    # a payload that arrives non-finite: dropped before decoding, counted
    from flagstaff.clients.data import load_digits
    from flagstaff.system.build import client_host, parameter_server
    from flagstaff.system.host import HostShard

    cfg = to_plain(compose(*SMOKE, "comm=powersgd", "num_clients=2", "clients_per_round=2"))
    ds = load_digits()
    shard = HostShard(
        np.array([0, 1]), np.array([0, 20]), np.array([20, 20]), ds.x_train[:40], ds.y_train[:40]
    )
    host = client_host(
        0, shard, cfg["model"], cfg["client"], ds.input_shape, 10, 0, comm_cfg=cfg["comm"]
    )
    pool = LocalPool([host])
    server = parameter_server(
        cfg, pool, np.zeros(2, dtype=int), ds.x_test, ds.y_test, ds.input_shape, 10
    )
    assert server.codec is not None and not server.reduce_on_hosts  # per-client payloads
    train_fn = pool.train

    def corrupt(*a, **k):
        got = train_fn(*a, **k)
        got.replies[0].updates[1, 3] = float("inf")
        return got

    pool.train = corrupt
    m = server.round(0)
    assert m["dropped_nonfinite"] == 1 and torch.isfinite(server.params).all()


def test_resume_with_error_feedback_state_is_exact(tmp_path) -> None:
    over = (*SMOKE, "rounds=5", "checkpoint_every=1", "comm=powersgd", "comm.rank=1")
    full = train(compose(*over), run_dir=str(tmp_path / "full"))
    part = tmp_path / "part"
    train(compose(*over[:2], "rounds=2", *over[3:]), run_dir=str(part))
    ck = torch.load(part / "checkpoint.pt", weights_only=True)
    assert {"comm.residual", "comm.q"} <= set(ck["clients"])
    assert ck["clients"]["comm.residual"].abs().sum() > 0
    # the codec's state matters: a resume with the residuals and Qs reset ends elsewhere
    cold = tmp_path / "cold"
    cold.mkdir()
    reset = {
        n: torch.zeros_like(v) if n.startswith("comm.") else v for n, v in ck["clients"].items()
    }
    torch.save({**ck, "clients": reset}, cold / "checkpoint.pt")
    cold_res = train(compose(*over, "resume=true"), run_dir=str(cold))
    assert cold_res["resumed_from"] == 2 and not torch.equal(full["params"], cold_res["params"])
    resumed = train(compose(*over, "resume=true"), run_dir=str(part))
    assert resumed["resumed_from"] == 2
    assert torch.equal(full["params"], resumed["params"])


def test_ray_equals_local_with_compression(ray_session, tmp_path) -> None:
    over = (*SMOKE, "rounds=4", "clients_per_round=6", "cluster.hosts=2", "comm=powersgd")
    ray_res = train(compose(*over, "backend=ray"), run_dir=str(tmp_path / "ray"))
    local_res = train(compose(*over, "backend=local"), run_dir=str(tmp_path / "local"))
    assert torch.equal(ray_res["params"], local_res["params"])
    assert [r["bytes_up"] for r in ray_res["metrics"]] == [
        r["bytes_up"] for r in local_res["metrics"]
    ]


@pytest.mark.parametrize("comm", ["powersgd", "sketch"])
def test_host_layout_does_not_change_the_result(tmp_path, comm) -> None:
    """Encoding is batched per host, but no client's numbers depend on who shares its host."""
    over = (*SMOKE, "rounds=4", "clients_per_round=6", f"comm={comm}")
    one = train(compose(*over, "cluster.hosts=1"), run_dir=str(tmp_path / "one"))
    three = train(compose(*over, "cluster.hosts=3"), run_dir=str(tmp_path / "three"))
    assert torch.equal(one["params"], three["params"])
