"""LoRA adapters (clients/lora.py): the formula, what travels, DP updates of trainable vs frozen
factors (opacus issue 820), MiniLM offline, the text task and the CSV/JSONL loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from flagstaff.clients.dp import DPSGDTrainer
from flagstaff.clients.lora import LoRALinear, apply_lora, build_lora_model, client_frozen_names
from flagstaff.clients.plan import make_plan
from flagstaff.clients.text import load_text_dataset, make_reviews, read_text_file
from flagstaff.clients.trainer import ParamSpec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_lora_linear_formula_and_init() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=4.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at init
    assert layer.A.shape == (2, 6) and layer.B.shape == (5, 2)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    expect = x @ base.weight.T + base.bias + (4.0 / 2) * x @ (layer.B @ layer.A).T
    torch.testing.assert_close(layer(x), expect)
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_only_adapters_and_head_travel() -> None:
    model = build_lora_model("mlp", (64,), 10, rank=4, hidden=(32, 32))
    spec = ParamSpec.of(model)
    # adapters on the two hidden layers, the output layer in full
    d_lora = 4 * (64 + 32) + 4 * (32 + 32)
    assert spec.numel == d_lora + 32 * 10 + 10
    assert all("lora_" in n or n.startswith("net.4") for n in spec.names)
    cnn = build_lora_model("cnn", (1, 8, 8), 10, rank=2, channels=4)
    assert all("lora_" in n for n in ParamSpec.of(cnn).names)


def test_train_option_and_errors() -> None:
    model = build_lora_model("mlp", (64,), 10, rank=4, train=["B"])
    assert client_frozen_names(model) == {"net.0.lora_A.weight", "net.2.lora_A.weight"}
    with pytest.raises(ValueError, match="subset"):
        build_lora_model("mlp", (64,), 10, train=["C"])
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        apply_lora(nn.Sequential(nn.Linear(3, 3)), ["nothing*"], 1, 1.0)
    with pytest.raises(ValueError, match="exceeds"):
        build_lora_model("mlp", (64,), 10, rank=65, hidden=(64,))


def _dp_round(model, noise: float = 1.0):
    spec = ParamSpec.of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    flat = spec.flatten(dict(model.named_parameters())).clone()
    base_before = {n: p.clone() for n, p in model.named_parameters() if n not in spec.names}
    x, y = torch.randn(40, 64), torch.randint(0, 10, (40,))
    tr = DPSGDTrainer(batch_size=8, lr=0.5, noise_multiplier=noise, max_grad_norm=1.0)
    sizes = np.array([40])
    plan = make_plan(np.array([0]), sizes, np.array([0]), 8, 0, 0)
    res = tr.train(
        model,
        spec,
        flat,
        x,
        y,
        plan,
        10,
        torch.as_tensor(sizes),
        client_ids=np.array([0]),
        offsets=np.array([0]),
    )
    delta = spec.unflatten(res.updates[0])
    for n, p in model.named_parameters():  # the frozen base is shared and never touched
        if n in base_before:
            torch.testing.assert_close(p, base_before[n], rtol=0, atol=0)
    return delta


@pytest.mark.parametrize("train", [["B"], ["A"], ["A", "B"]])
def test_dp_step_moves_trainable_factors_only(train) -> None:
    """opacus issue 820: the trainable factor must change under DP-SGD, the frozen one must not."""
    model = build_lora_model("mlp", (64,), 10, rank=4, hidden=(32,), train=train, seed=1)
    with torch.no_grad():  # B = 0 would give A a zero gradient; start from a generic adapter
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.1)
    delta = _dp_round(model)
    for f in ("A", "B"):
        moved = delta[f"net.0.lora_{f}.weight"].abs().max()
        if f in train:
            assert moved > 0
        else:
            assert moved == 0
    assert delta["net.2.weight"].abs().max() > 0  # the head trains in full


def test_generated_reviews_are_seeded_and_balanced() -> None:
    a, ya = make_reviews(400, seed=3)
    b, yb = make_reviews(400, seed=3)
    assert a == b and (ya == yb).all()
    assert set(np.unique(ya)) == {0, 1, 2, 3}
    assert np.bincount(ya).min() > 60
    assert any(" not " in t for t in a) and any(" but " in t for t in a)


def test_user_csv_and_jsonl(tmp_path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text('text,label\n"good, very good",pos\nawful,neg\nfine,pos\nbad,neg\n')
    texts, labels = read_text_file(csv)
    assert texts[0] == "good, very good" and labels == ["pos", "neg", "pos", "neg"]
    jl = tmp_path / "d.jsonl"
    jl.write_text(
        "\n".join(json.dumps({"sentence": t, "y": i % 3}) for i, t in enumerate("abcdefghi"))
    )
    ds = load_text_dataset(
        "user",
        path=str(jl),
        text_column="sentence",
        label_column="y",
        test_fraction=0.34,
        max_length=8,
    )
    assert (
        ds.num_classes == 3 and ds.x_train.shape[1:] == (2, 8) and ds.x_train.dtype == torch.int64
    )
    assert len(ds.y_train) + len(ds.y_test) == 9
    # errors name the problem
    with pytest.raises(ValueError, match="no column 'text'.*columns are"):
        read_text_file(jl)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text_file(tmp_path / "missing.csv")
    bad = tmp_path / "d.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        read_text_file(bad)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: not valid JSON"):
        read_text_file(broken)
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\nhello,1\n,0\n")
    with pytest.raises(ValueError, match="record 2 has an empty"):
        read_text_file(empty)


def test_minilm_loads_offline_with_a_head(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = load_text_dataset("reviews", n_samples=8, max_length=12)
    model = build_lora_model("minilm", ds.input_shape, ds.num_classes, rank=8)
    spec = ParamSpec.of(model)
    assert spec.numel == 6 * 2 * 8 * (384 + 384) + 384 * 4 + 4  # LoRA on q, v + head
    # the vmap-friendly forward equals BertModel's own (with its attention-mask helper)
    x = ds.x_train
    with torch.no_grad():
        h = model.encoder(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state
        m = x[:, 1, :, None].float()
        ref = model.head((h * m).sum(1) / m.sum(1))
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


# -- frozen factors stay frozen on every trainer (issue 18 item 2) ----------------------------------
_FROZEN_RUN = [
    "backend=local",
    "progress=false",
    "data=digits",
    "num_clients=4",
    "clients_per_round=2",
    "model=lora_mlp",
    "model.rank=2",
    "rounds=3",
    "partition=iid",
    "client.batch_size=16",
    "client.weight_decay=0.01",  # weight decay must not move a frozen factor either
]
_TRAINERS = {
    "dpsgd": ["client=dpsgd"],
    "dpsgd_batched": ["client=dpsgd_batched"],
    "sgd": ["client=sgd"],
    "sgd_sequential": ["client=sgd", "client.batched=false"],
    "momentum": ["client=momentum"],
}


def _changed(tmp_path, strategy: str, factors: str, trainer: str) -> set[int]:
    """Coordinates of the global vector that differ from the initial model after a runner run."""
    from flagstaff.system.build import validate
    from flagstaff.system.runner import train
    from flagstaff.system.specs import build_from
    from tests.conftest import compose

    cfg = compose(
        *_FROZEN_RUN, f"strategy={strategy}", f"model.train={factors}", *_TRAINERS[trainer]
    )
    res = train(cfg, run_dir=str(tmp_path / f"{strategy}-{trainer}"))
    c = validate(cfg)
    model = build_from(c["model"], input_shape=(64,), num_classes=10, seed=c["seed"])
    spec = ParamSpec.of(model)
    start = spec.flatten(dict(model.named_parameters())).detach()
    return set(torch.nonzero(res["params"] != start).flatten().tolist())


@pytest.mark.parametrize(
    ("strategy", "factors"),
    [
        ("ffa_lora", "[B]"),  # the fast variant: A frozen and never touched by the server
        pytest.param("fedsvd", "[B]", marks=pytest.mark.slow),
        pytest.param("dp_lora", "[A,B]", marks=pytest.mark.slow),
    ],
)
def test_every_trainer_changes_the_coordinates_opacus_changes(tmp_path, strategy, factors) -> None:
    """The coordinates that move under client=dpsgd (Opacus leaves frozen factors out of its
    optimizer) are exactly those that move under the batched DP trainer and the non-DP trainers."""
    want = _changed(tmp_path, strategy, factors, "dpsgd")
    for trainer in _TRAINERS:
        if trainer != "dpsgd":
            got = _changed(tmp_path, strategy, factors, trainer)
            assert got == want, (trainer, len(got - want), len(want - got))
    if strategy == "ffa_lora":  # the frozen A (2 layers x 2 x 64) never moves
        model = build_lora_model("mlp", (64,), 10, rank=2, train=["B"])
        spec = ParamSpec.of(model)
        frozen = client_frozen_names(model)
        i, idx = 0, set()
        for name, shape in zip(spec.names, spec.shapes, strict=True):
            n = int(np.prod(shape))
            if name in frozen:
                idx |= set(range(i, i + n))
            i += n
        assert len(idx) == 2 * 2 * 64 and not idx & want
