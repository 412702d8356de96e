"""FedSVD (strategies/fedsvd.py): the re-factorization preserves B A and returns orthonormal A rows;
the strategy re-factorizes every `period` rounds (0 = FFA-LoRA) and broadcasts the new A."""

from __future__ import annotations

import pytest
import torch

from flagstaff.clients.lora import build_lora_model
from flagstaff.clients.trainer import ParamSpec
from flagstaff.strategies import fedsvd_refactorize
from flagstaff.strategies.fedsvd import FedSVD


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_refactorize_preserves_product_and_orthonormal_rows(dtype, tol) -> None:
    g = torch.Generator().manual_seed(0)
    B, A = (
        torch.randn(30, 4, generator=g, dtype=dtype),
        torch.randn(4, 20, generator=g, dtype=dtype),
    )
    B2, A2 = fedsvd_refactorize(B, A)
    assert B2.shape == B.shape and A2.shape == A.shape and A2.dtype == dtype
    M = B @ A
    assert ((B2 @ A2 - M).norm() / M.norm()).item() < tol
    torch.testing.assert_close(A2 @ A2.T, torch.eye(4, dtype=dtype), atol=tol * 10, rtol=0)
    # B_new = U_r S_r: columns orthogonal with norms equal to the singular values
    S = torch.linalg.svdvals(M.double())[:4]
    torch.testing.assert_close(B2.double().norm(dim=0), S, rtol=1e-5, atol=1e-8)
    # idempotent up to signs: re-factorizing again keeps the product
    B3, A3 = fedsvd_refactorize(B2, A2)
    assert ((B3 @ A3 - M).norm() / M.norm()).item() < tol


def test_refactorize_rank_deficient_and_errors() -> None:
    B = torch.zeros(8, 3, dtype=torch.float64)
    A = torch.randn(3, 5, dtype=torch.float64)
    B2, A2 = fedsvd_refactorize(B, A)
    assert B2.abs().max() == 0
    torch.testing.assert_close(A2 @ A2.T, torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="need B"):
        fedsvd_refactorize(torch.zeros(3, 2), torch.zeros(3, 4))


def _bound(period: int):
    model = build_lora_model("mlp", (16,), 3, rank=2, hidden=(8,), train=["B"], seed=0)
    spec = ParamSpec.of(model)
    s = FedSVD(period=period)
    s.bind(model, spec)
    return model, spec, s


def test_strategy_refactorizes_every_period_and_keeps_the_function() -> None:
    from torch.func import functional_call

    model, spec, s = _bound(period=2)
    params = spec.flatten(dict(model.named_parameters())).detach().clone()
    state = s.init(params)
    g = torch.Generator().manual_seed(1)
    agg = torch.randn(params.shape, generator=g) * 0.1
    agg_p = spec.unflatten(agg)
    agg_p["net.0.lora_A.weight"].zero_()  # clients never move A
    x = torch.randn(5, 16)
    p1, state = s.update(params, agg, state, round_idx=0)  # round 1: no re-factorization
    torch.testing.assert_close(p1, params + agg)
    p2, state = s.update(p1, agg, state, round_idx=1)  # round 2: re-factorize
    plain = p1 + agg
    A2 = spec.unflatten(p2)["net.0.lora_A.weight"]
    torch.testing.assert_close(A2 @ A2.T, torch.eye(2), atol=1e-5, rtol=0)
    assert not torch.allclose(A2, spec.unflatten(plain)["net.0.lora_A.weight"])
    out_plain = functional_call(model, spec.unflatten(plain), (x,))
    out_new = functional_call(model, spec.unflatten(p2), (x,))
    torch.testing.assert_close(out_new, out_plain, atol=1e-5, rtol=1e-5)


def test_period_zero_is_ffa_lora_and_bind_checks_the_model() -> None:
    model, spec, s = _bound(period=0)
    params = spec.flatten(dict(model.named_parameters())).detach().clone()
    p, _ = s.update(params, torch.zeros_like(params), s.init(params), 0)
    torch.testing.assert_close(p, params)
    both = build_lora_model("mlp", (16,), 3, rank=2, hidden=(8,), train=["A", "B"])
    with pytest.raises(ValueError, match=r"model.train=\[B\]"):
        FedSVD().bind(both, ParamSpec.of(both))
    plain = build_lora_model("mlp", (16,), 3, rank=2, hidden=(8,), train=["B"])
    plain_spec = ParamSpec.of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        FedSVD().bind(plain, plain_spec)
