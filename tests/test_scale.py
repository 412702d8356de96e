"""Scale mechanisms (issue 22 item 4, docs/cluster.md "Scale"): clients that share samples keep one
copy of the train set per host, per-client state costs memory only for clients that have state, and
large state tables map to a file yet checkpoint and resume bit-identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose

import flagstaff.system.client_state as client_state
from flagstaff.system.build import build_run
from flagstaff.system.client_state import ClientStateStore
from flagstaff.system.host import ClientHost, HostShard
from flagstaff.system.runner import _shards, train

#: 300 clients of 12 samples drawn with replacement from digits' 1,437: 3,600 > 1,437 samples
SHARED = ("experiment=smoke", "partition=with_replacement", "partition.samples_per_client=12")


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def test_clients_that_share_samples_keep_one_copy_of_the_train_set() -> None:
    run = build_run(compose(*SHARED, "num_clients=300"))
    ds = run.data
    owner, shards = _shards(run.parts, ds, 2, run.federated.adversary)
    for h, shard in enumerate(shards):
        assert shard.x.data_ptr() == ds.x_train.data_ptr()  # the train set itself, not a copy
        ids = np.flatnonzero(owner == h)
        assert shard.index.nbytes == 4 * 12 * len(ids)  # 4 bytes per sample of a client
    # a host trains the same numbers from the index as from its clients' own copies
    shard = shards[1]
    ids = shard.client_ids
    own = HostShard(
        ids,
        shard.offsets,
        shard.sizes,
        ds.x_train[torch.as_tensor(shard.index.astype(np.int64))],
        ds.y_train[torch.as_tensor(shard.index.astype(np.int64))],
    )
    params = run.federated.spec.flatten(dict(run.federated.model.named_parameters())).detach()
    picked = [int(ids[3]), int(ids[40]), int(ids[-1])]
    a = ClientHost(1, shard, run.federated.host).train(params, picked, 0)
    b = ClientHost(1, own, run.federated.host).train(params, picked, 0)
    assert torch.equal(a.updates, b.updates) and torch.equal(a.losses, b.losses)


def test_state_of_clients_never_sampled_takes_no_memory(tmp_path: Path) -> None:
    store = ClientStateStore(["c_i"], 100_000, 1_000)  # dense: 400 MB
    rows = np.array([5, 70_000, 99_999])
    store.scatter(rows, {"c_i": torch.ones(3, 1_000)})
    assert store.resident_rows() == 3 and store._rows["c_i"].numel() * 4 < 2**20
    got = store.gather(np.array([5, 6, 99_999]))["c_i"]
    assert torch.equal(got, torch.tensor([1.0, 0.0, 1.0])[:, None].expand(3, 1_000))
    # through a run: SCAFFOLD over 2,000 clients (a large table: 2,000 x 8,970 x 4 bytes), 5 per
    # round for 2 rounds: at most 10 rows, in memory and in the checkpoint
    assert 2_000 * 8_970 * 4 > client_state.MAP_ABOVE_BYTES
    res = train(
        compose(*SHARED, "strategy=scaffold", "num_clients=2000", "rounds=2", "checkpoint_every=2"),
        run_dir=str(tmp_path),
    )
    assert torch.isfinite(res["params"]).all()
    clients = _ckpt(tmp_path)["clients"]
    assert 5 <= len(clients["client_ids"]) <= 10
    assert clients["c_i"].shape == (len(clients["client_ids"]), res["params"].numel())
    assert (clients["c_i"].abs().sum(1) > 0).all()  # every row kept is a client that trained
    assert clients["c_i"].shape[1] == 8_970


def test_mapped_state_round_trips_bit_identically(tmp_path: Path) -> None:
    client_state.MAP_ABOVE_BYTES, old = 0, client_state.MAP_ABOVE_BYTES
    try:
        store = ClientStateStore(["a", "b"], 1_000, 64, directory=tmp_path)
        assert store.mode == "mapped" and not list(tmp_path.iterdir())  # unlinked once mapped
        rows = np.array([999, 3, 500])
        vals = {n: torch.randn(3, 64) for n in ("a", "b")}
        store.scatter(rows, vals)
        saved = store.state_dict(np.arange(1_000) + 7)  # global ids = position + 7
        assert saved["client_ids"].tolist() == [10, 507, 1006]
        again = ClientStateStore(["a", "b"], 1_000, 64, directory=tmp_path)
        again.load(np.array([3, 500, 999]), {n: saved[n] for n in ("a", "b")})
        for n in ("a", "b"):
            assert torch.equal(again.gather(rows)[n], vals[n])
            assert again.gather(np.array([0]))[n].abs().sum() == 0
        store.extend(5)  # adopting clients keeps the rows held
        assert torch.equal(store.gather(rows)["a"], vals["a"]) and store.num_clients == 1_005
    finally:
        client_state.MAP_ABOVE_BYTES = old


@pytest.mark.parametrize("mapped", [True, False])
def test_resume_with_scaffold_state_is_exact(mapped: bool, tmp_path: Path, monkeypatch) -> None:
    if mapped:  # every table maps to the run directory
        monkeypatch.setattr(client_state, "MAP_ABOVE_BYTES", 0)
    over = (*SHARED, "strategy=scaffold", "num_clients=200", "clients_per_round=20")
    full = train(compose(*over, "rounds=4", "checkpoint_every=2"), run_dir=str(tmp_path / "a"))
    train(compose(*over, "rounds=2", "checkpoint_every=2"), run_dir=str(tmp_path / "b"))
    resumed = train(compose(*over, "rounds=4", "resume=true"), run_dir=str(tmp_path / "b"))
    assert resumed["resumed_from"] == 2
    assert torch.equal(full["params"], resumed["params"])
    a, b = _ckpt(tmp_path / "a")["clients"], _ckpt(tmp_path / "b")["clients"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "b").glob("client-state-*"))  # nothing left in the run directory
    if mapped:  # the numbers do not depend on where the rows live
        monkeypatch.setattr(client_state, "MAP_ABOVE_BYTES", 2**62)
        memory = train(compose(*over, "rounds=4"), run_dir=str(tmp_path / "c"))
        assert torch.equal(memory["params"], full["params"])


def test_index_shards_travel_and_move_with_their_clients() -> None:
    """Pickled (as Ray sends it) the shard keeps its index; a host that adopts a lost host's index
    shard trains those clients exactly as their own host did (state starts at zero on both)."""
    import pickle

    run = build_run(compose(*SHARED, "strategy=scaffold", "num_clients=300"))
    _, shards = _shards(run.parts, run.data, 2, run.federated.adversary)
    wired = pickle.loads(pickle.dumps(shards[1]))
    assert np.array_equal(wired.index, shards[1].index) and torch.equal(wired.x, shards[1].x)
    fed = run.federated
    h0, h1 = ClientHost(0, shards[0], fed.host), ClientHost(1, wired, fed.host)
    params = fed.spec.flatten(dict(fed.model.named_parameters())).detach()
    picked = [int(c) for c in shards[1].client_ids[[0, 7, -1]]]
    there = h1.train(params, picked, 0, {"c": torch.zeros_like(params)})
    assert h0.adopt(shards[1]) == shards[1].client_ids.tolist()
    here = h0.train(params, picked, 0, {"c": torch.zeros_like(params)})
    assert torch.equal(here.updates, there.updates)
    assert len(h0.shard.index) == len(shards[0].index) + len(shards[1].index)


def test_ray_equals_local_with_shared_samples_and_state(ray_session, tmp_path: Path) -> None:
    over = (*SHARED, "strategy=scaffold", "num_clients=300", "clients_per_round=20", "rounds=3")
    ray_res = train(compose(*over, "backend=ray", "cluster.hosts=2"), run_dir=str(tmp_path / "r"))
    local = train(compose(*over, "backend=local", "cluster.hosts=2"), run_dir=str(tmp_path / "l"))
    assert torch.equal(ray_res["params"], local["params"])
    a, b = _ckpt(tmp_path / "r")["clients"], _ckpt(tmp_path / "l")["clients"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mapped_state_falls_back_to_the_temporary_directory(tmp_path: Path, monkeypatch) -> None:
    """A host whose node lacks the run directory maps its state in its temporary directory (and
    creates nothing where the run directory would be)."""
    monkeypatch.setattr(client_state, "MAP_ABOVE_BYTES", 0)
    monkeypatch.setattr(client_state.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    store = ClientStateStore(["c_i"], 10, 4, directory=tmp_path / "elsewhere" / "run")
    store.scatter(np.array([2]), {"c_i": torch.ones(1, 4)})
    assert store.mode == "mapped" and not (tmp_path / "elsewhere").exists()
    assert torch.equal(store.gather(np.array([2, 3]))["c_i"].sum(1), torch.tensor([4.0, 0.0]))
