"""A floor for W1's round on one thread: 100 clients x 2 local steps of the MLP 64-64-10 as batched
matrix products with a hand-written backward (the cross-entropy gradient of
``clients.models.stacked``), and the float64 weighted sum, nothing else (no plan,
no host, no server). What Flagstaff's round costs beyond it is framework (issue 22 item 2).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/w1_floor.py

Prints the median thread CPU and wall time per round over ``--rounds`` rounds and the load.
Random data of W1's shapes (digits: 64 features, 10 classes; 14-15 samples per client, batch 8,
the second batch partial), so the numbers are not W1's, only its arithmetic.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flagstaff.clients.models.stacked import cross_entropy_grad  # noqa: E402


def floor_round(x, y, idx, mask, x0, lr: float = 0.05) -> torch.Tensor:
    """One round: every client's two SGD steps from x0 as bmm, then sum_i w_i (x_i - x0)."""
    T, K, B = idx.shape
    D, H, C = x.shape[1], 64, 10
    d = x0.numel()
    X = x0.expand(K, d).clone()
    a, b, c = H * D, H * D + H, H * D + H + C * H
    for t in range(T):
        xb, yb, mb = x[idx[t]], y[idx[t]], mask[t]
        w1, b1, w2, b2 = X[:, :a].view(K, H, D), X[:, a:b], X[:, b:c].view(K, C, H), X[:, c:]
        h = torch.baddbmm(b1.unsqueeze(1), xb, w1.transpose(1, 2)).clamp_min_(0)
        out = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))
        _, g = cross_entropy_grad(out, yb, mb / mb.sum(1, keepdim=True).clamp(min=1))
        gh = torch.ops.aten.threshold_backward(torch.bmm(g, w2), h, 0)
        grad = torch.cat(
            [
                torch.bmm(gh.transpose(1, 2), xb).view(K, -1),
                gh.sum(1),
                torch.bmm(g.transpose(1, 2), h).view(K, -1),
                g.sum(1),
            ],
            1,
        )
        X.sub_(grad.mul_(lr))
    weights = mask.sum((0, 2)).double()
    return torch.mv((X - x0).t().double(), weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    from _provenance import markdown, pin_threads, provenance

    pin_threads(1)
    g = torch.Generator().manual_seed(0)
    K, B, T, D = 100, 8, 2, 64
    x, y = torch.randn(1437, D, generator=g), torch.randint(0, 10, (1437,), generator=g)
    idx = torch.randint(0, 1437, (T, K, B), generator=g)
    mask = torch.ones(T, K, B)
    mask[1, :, 6:] = 0  # 14 samples: the second batch holds 6
    x0 = 0.1 * torch.randn(64 * D + 64 + 10 * 64 + 10, generator=g)
    for _ in range(20):
        floor_round(x, y, idx, mask, x0)
    cpu, wall = [], []
    for _ in range(args.rounds):
        w, c = time.perf_counter(), time.thread_time()
        floor_round(x, y, idx, mask, x0)
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    prov = provenance(None if argv is None else ["benchmarks/w1_floor.py", *argv])
    load = os.getloadavg()
    print(markdown(prov))
    print(
        f"W1 floor (100 clients x 2 steps, bmm + hand backward + float64 sum): median "
        f"{1e3 * np.median(cpu):.2f} ms CPU, {1e3 * np.median(wall):.2f} ms wall per round over "
        f"{args.rounds} rounds; load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
