"""Load time and memory of data=hf on a CIFAR-10-sized dataset: first load (decode) vs cached load.

Generates (once) a ``save_to_disk`` folder in uoft-cs/cifar10's layout (img: PNG-encoded 32x32 RGB
PIL images, label: ClassLabel) with ``--train`` and ``--test`` random images, then loads it with
``clients.hf.load_hf`` (the loader ``data=cifar10 data.path=...`` runs) in fresh processes: once with
an empty decode cache (datasets opens the arrow files, PIL decodes every image, the .npy cache is
written) and ``--repeats`` times from the cache. Each load reports its wall time, the process's peak
RSS and its RSS before the load (after imports), and the Dataset's tensors' sizes.

    python benchmarks/hf_load.py --out benchmarks/results/hf_load   # writes .md and .json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _provenance import markdown, pin_threads, provenance  # noqa: E402

_CHILD = r"""
import json, resource, sys, time
import psutil
from flagstaff.clients.hf import load_hf  # imports torch, numpy, datasets, PIL
rss0 = psutil.Process().memory_info().rss
t = time.perf_counter()
ds = load_hf(path=sys.argv[1], crop_padding=4, flip=True)
dt = time.perf_counter() - t
size = lambda x: x.numel() * x.element_size()
print(json.dumps({
    "seconds": dt,
    "rss_before_mb": rss0 / 2**20,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "x_train_mb": size(ds.x_train) / 2**20, "x_train_dtype": str(ds.x_train.dtype),
    "x_test_mb": size(ds.x_test) / 2**20, "x_test_dtype": str(ds.x_test.dtype),
    "shape": list(ds.x_train.shape),
}))
"""


def generate(root: Path, n_train: int, n_test: int, seed: int = 0) -> float:
    """The uoft-cs/cifar10 layout with random images; returns the seconds it took."""
    import datasets
    import numpy as np
    from PIL import Image

    datasets.disable_progress_bars()
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    feats = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )

    def split(n: int) -> datasets.Dataset:
        def rows():
            for i in range(n):
                a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                yield {"img": Image.fromarray(a, "RGB"), "label": i % 10}

        return datasets.Dataset.from_generator(rows, features=feats)

    datasets.DatasetDict(train=split(n_train), test=split(n_test)).save_to_disk(str(root))
    return time.perf_counter() - t


def _du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def load_once(root: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/flagstaff_cifar10_like")
    ap.add_argument("--train", type=int, default=50_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args()
    pin_threads(1)
    root = Path(args.root)
    gen_s = None
    if not (root / "dataset_dict.json").exists():
        gen_s = generate(root, args.train, args.test)
    shutil.rmtree(root / ".flagstaff_cache", ignore_errors=True)
    rows = [("first load (decode + write cache)", load_once(root))]
    for i in range(args.repeats):
        rows.append((f"cached load {i + 1}", load_once(root)))
    disk = {
        "dataset_mb": _du(root) - _du(root / ".flagstaff_cache"),
        "cache_mb": _du(root / ".flagstaff_cache"),
    }
    lines = [
        "| load | seconds | RSS before (MB) | peak RSS (MB) | x_train | x_test |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['x_train_dtype']} {'x'.join(map(str, r['shape']))}, {r['x_train_mb']:.0f} MB | "
            f"{r['x_test_dtype']}, {r['x_test_mb']:.0f} MB |"
        )
    lines.append("")
    lines.append(
        f"On disk: the save_to_disk folder {disk['dataset_mb']:.0f} MB (PNG), the decode cache "
        f"{disk['cache_mb']:.0f} MB (.npy)"
        + (f"; generating it took {gen_s:.0f} s" if gen_s else "")
    )
    table = "\n".join(lines)
    from importlib import metadata

    names = ("datasets", "pyarrow", "pillow", "flwr-datasets")
    prov = provenance(data_packages={n: metadata.version(n) for n in names})
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        blob = {"provenance": prov, "rows": dict(rows), "disk": disk, "generate_s": gen_s}
        out.with_suffix(".json").write_text(json.dumps(blob, indent=1))
        out.with_suffix(".md").write_text(markdown(prov) + "\n" + table + "\n")


if __name__ == "__main__":
    main()
