"""The local trainer: torch.optim.SGD semantics, gating, batched == sequential for every local rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flagstaff.clients.models import build_model
from flagstaff.clients.plan import make_plan
from flagstaff.clients.rules import LocalRule
from flagstaff.clients.trainer import LocalSGD, ParamSpec
from flagstaff.strategies.feddyn import FedDynRule
from flagstaff.strategies.fedprox import Prox
from flagstaff.strategies.fedsam import SAM
from flagstaff.strategies.fedspeed import FedSpeedRule
from flagstaff.strategies.scaffold import Scaffold

D_IN, NUM_CLASSES = 6, 3


def _setup(sizes=(7, 12, 3, 9), seed=0, batch_size=4, epochs=2):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, D_IN, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    sizes = np.asarray(sizes)
    offsets = np.cumsum(sizes) - sizes
    ids = np.arange(len(sizes)) + 10
    plan = make_plan(offsets, sizes, ids, batch_size, seed, round_idx=3, epochs=epochs)
    model = build_model("mlp", (D_IN,), NUM_CLASSES, hidden=(5,), seed=seed)
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    flat = nn.utils.parameters_to_vector(model.parameters()).detach()
    return model, spec, flat, x, y, plan, torch.as_tensor(sizes)


def test_plain_equals_torch_optim_sgd_loop() -> None:
    """Each client equals a plain torch loop (SGD momentum + weight decay + clip) on its batches."""
    model, spec, flat, x, y, plan, sizes = _setup()
    tr = LocalSGD(lr=0.1, momentum=0.9, weight_decay=0.01, grad_clip=0.5, batched="true")
    res = tr.train(model, spec, flat, x, y, plan, NUM_CLASSES, sizes)
    for k in range(len(sizes)):
        ref = build_model("mlp", (D_IN,), NUM_CLASSES, hidden=(5,), seed=0)
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        sub = plan.select(k)
        for t in range(sub.num_steps):
            keep = sub.mask[t, 0] > 0
            idx = sub.idx[t, 0][keep]
            opt.zero_grad()
            F.cross_entropy(ref(x[idx]), y[idx]).backward()
            nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            opt.step()
        want = nn.utils.parameters_to_vector(ref.parameters()).detach() - flat
        torch.testing.assert_close(res.updates[k], want, atol=1e-5, rtol=1e-4)


RULES = {
    "plain": (LocalRule(), {}),
    "prox": (Prox(0.3), {}),
    "scaffold": (Scaffold(), {"c": 0.1}),
    "feddyn": (FedDynRule(0.05), {}),
    "sam": (SAM(0.05), {}),
    "fedspeed": (FedSpeedRule(0.05, 0.7, 0.1), {}),
    "fedspeed_all": (FedSpeedRule(0.05, 1.0, 0.1, average="all"), {}),
}


@pytest.mark.parametrize("name", list(RULES))
def test_batched_equals_sequential_for_every_rule(name: str) -> None:
    """Lockstep over unequal clients == one client at a time: messages, state and extras."""
    rule, bscale = RULES[name]
    model, spec, flat, x, y, plan, sizes = _setup()
    g = torch.Generator().manual_seed(1)
    K, d = len(sizes), spec.numel
    state = {n: 0.1 * torch.randn(K, d, generator=g) for n in rule.client_state}
    bcast = {n: s * torch.randn(d, generator=g) for n, s in bscale.items()}
    kw = dict(momentum=0.5, weight_decay=0.01, grad_clip=2.0, lr=0.05, lr_decay=0.9)
    out = []
    for mode in ("true", "false"):
        tr = LocalSGD(batched=mode, **kw)
        out.append(
            tr.train(
                model, spec, flat, x, y, plan, NUM_CLASSES, sizes,
                rule=rule, state=state, broadcast=bcast, round_idx=2,
            )
        )  # fmt: skip
    a, b = out
    torch.testing.assert_close(a.updates, b.updates, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.losses, b.losses, atol=1e-6, rtol=1e-5)
    assert a.state.keys() == b.state.keys() == set(rule.client_state)
    assert a.extras.keys() == b.extras.keys()
    for n in a.state:
        torch.testing.assert_close(a.state[n], b.state[n], atol=1e-5, rtol=1e-5)
    for n in a.extras:
        torch.testing.assert_close(a.extras[n], b.extras[n], atol=1e-5, rtol=1e-5)


def test_client_with_fewer_steps_does_exactly_its_steps() -> None:
    """Gating: a short client trained with long ones equals the short client trained alone."""
    model, spec, flat, x, y, plan, sizes = _setup(sizes=(3, 20))
    rule = FedSpeedRule(0.05, 1.0, 0.1)
    state = {"ghat_i": torch.randn(2, spec.numel) * 0.1}
    tr = LocalSGD(lr=0.05, momentum=0.9, weight_decay=0.01, batched="true")
    both = tr.train(model, spec, flat, x, y, plan, NUM_CLASSES, sizes, rule=rule, state=state)
    alone = tr.train(
        model, spec, flat, x, y, plan.select(0), NUM_CLASSES, sizes[:1],
        rule=rule, state={"ghat_i": state["ghat_i"][:1]},
    )  # fmt: skip
    assert int(plan.steps[0]) < int(plan.steps[1])
    torch.testing.assert_close(both.updates[:1], alone.updates, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both.state["ghat_i"][:1], alone.state["ghat_i"])


def test_lr_schedule_is_exponential_per_round() -> None:
    tr = LocalSGD(lr=0.1, lr_decay=0.998)
    assert tr.lr_at(0) == 0.1
    assert tr.lr_at(10) == pytest.approx(0.1 * 0.998**10)
    model, spec, flat, x, y, plan, sizes = _setup()
    # with plain SGD (no momentum) the update scales with the learning rate at the first step
    one = LocalSGD(lr=0.1, steps=1, batched="true")
    p1 = make_plan(np.array([0]), np.array([7]), np.array([0]), 4, 0, 5, steps=1)
    u0 = one.train(model, spec, flat, x, y, p1, NUM_CLASSES, sizes[:1]).updates
    dec = LocalSGD(lr=0.1, lr_decay=0.5, steps=1, batched="true")
    u5 = dec.train(model, spec, flat, x, y, p1, NUM_CLASSES, sizes[:1], round_idx=5).updates
    torch.testing.assert_close(u5, u0 * 0.5**5)


def test_rule_without_its_state_is_an_error() -> None:
    model, spec, flat, x, y, plan, sizes = _setup()
    with pytest.raises(ValueError, match="per-client state"):
        LocalSGD().train(model, spec, flat, x, y, plan, NUM_CLASSES, sizes, rule=Scaffold())
    with pytest.raises(ValueError, match="lr_decay"):
        LocalSGD(lr_decay=1.5)


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("batched", ["true", "false"])
def test_frozen_coordinates_never_move(name: str, batched: str) -> None:
    """Issue 18 item 2: a factor clients keep fixed (LoRA A with model.train=[B]) gets no
    direction, no weight decay and no update under every rule, with momentum and clipping; its
    per-client state and extras stay zero (they start at zero, as on a host)."""
    from flagstaff.clients.lora import build_lora_model, client_frozen_names

    rule, bscale = RULES[name]
    model = build_lora_model("mlp", (D_IN,), NUM_CLASSES, rank=2, hidden=(5,), train=["B"])
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    flat = spec.flatten(dict(model.named_parameters())).detach().clone()
    frozen = client_frozen_names(model)
    mask = torch.cat(
        [
            torch.full((int(np.prod(s)),), n not in frozen)
            for n, s in zip(spec.names, spec.shapes, strict=True)
        ]
    )
    _, _, _, x, y, plan, sizes = _setup()
    g = torch.Generator().manual_seed(1)
    K, d = len(sizes), spec.numel
    state = {n: 0.1 * torch.randn(K, d, generator=g) * mask for n in rule.client_state}
    bcast = {n: s * torch.randn(d, generator=g) for n, s in bscale.items()}  # server c: everywhere
    tr = LocalSGD(batched=batched, momentum=0.5, weight_decay=0.01, grad_clip=2.0, lr=0.05)
    res = tr.train(
        model, spec, flat, x, y, plan, NUM_CLASSES, sizes, rule=rule, state=state, broadcast=bcast
    )
    assert int((~mask).sum()) == 2 * D_IN and torch.count_nonzero(res.updates[:, ~mask]) == 0
    assert bool((res.updates[:, mask] != 0).any())
    for v in list(res.state.values()) + list(res.extras.values()):
        if name != "scaffold":  # SCAFFOLD's c_i+ = c_i - c + ...: the server's c enters as sent
            assert torch.count_nonzero(v[:, ~mask]) == 0


def test_trainer_hooks_are_declared_with_defaults() -> None:
    """Issue 20 item 4: what a host asks of a trainer is declared on clients.trainer.Trainer, with
    defaults that keep a non-private trainer's behaviour (no epsilon, no state, no per-client
    arguments); the DP trainers override them."""
    from flagstaff.clients.dp import DPSGDTrainer
    from flagstaff.clients.dp_batched import BatchedDPSGDTrainer
    from flagstaff.clients.trainer import Trainer

    plain = LocalSGD(batch_size=4, epochs=2, steps=3)
    assert isinstance(plain, Trainer)
    assert (plain.batch_size, plain.epochs, plain.steps) == (4, 2, 3)
    assert plain.per_client is False and plain.epsilon_kind is None
    assert plain.epsilon_after(0, 10, Scaffold()) is None
    assert plain.state_dict() == {} and plain.load_state_dict({}) is None
    assert plain.lr_at(2) == pytest.approx(0.05)
    with pytest.raises(NotImplementedError):
        Trainer().train(None, None, None, None, None, None, 0, None)
    for cls in (DPSGDTrainer, BatchedDPSGDTrainer):
        tr = cls(batch_size=5, noise_multiplier=1.0)
        assert isinstance(tr, Trainer) and tr.per_client and tr.epsilon_kind == "sample-level"
        assert tr.epsilon_after(0, 10) > 0
        assert tr.state_dict() == {"accountant": "rdp", "histories": {}}


def test_host_asks_declared_hooks_and_keeps_non_private_behaviour() -> None:
    """A host with a non-private trainer reports no privacy state and no prospective epsilon; with a
    DP trainer it lists the accountants and asks epsilon_after with its local rule."""
    from flagstaff.system.build import client_host
    from flagstaff.system.host import PRIVACY_STATE, HostShard

    model_cfg = {"_target_": "flagstaff.clients.models.build_model", "kind": "mlp", "hidden": [5]}
    x, y = torch.randn(20, D_IN), torch.randint(0, NUM_CLASSES, (20,))
    shard = HostShard(np.array([0, 1]), np.array([0, 10]), np.array([10, 10]), x, y)

    def host(client_cfg, strategy_cfg=None):
        return client_host(0, shard, model_cfg, client_cfg, (D_IN,), NUM_CLASSES, 0,
                          strategy_cfg=strategy_cfg)  # fmt: skip

    plain = host({"_target_": "flagstaff.clients.trainer.LocalSGD"})
    assert PRIVACY_STATE not in plain.state_kinds()
    assert plain.epsilon_after([0, 1]) == {} and plain.privacy_state() == {}
    dp = {"_target_": "flagstaff.clients.dp_batched.BatchedDPSGDTrainer", "noise_multiplier": 1.0}
    sam = host(dp, {"_target_": "flagstaff.strategies.fedsam.FedSAM", "rho": 0.1})
    assert PRIVACY_STATE in sam.state_kinds()
    eps = sam.epsilon_after([0, 1])
    assert eps == {0: sam.trainer.epsilon_after(0, 10, sam.rule), 1: eps[0]}
    assert eps[0] > host(dp).epsilon_after([0])[0]  # two private gradients per SAM step
