"""GPU check (issue 22 item 5): the W1, CNN and ResNet-8 simulation workloads with client hosts on
the GPU (``cluster.gpus_per_host``) against the same workloads with hosts on CPU, one Markdown table.

    bash benchmarks/gpu_check.sh                      # prints "no GPU" and exits 0 without one
    python benchmarks/gpu_check.py --workloads w1,cnn,resnet8 --gpu-hosts 1 --rounds 5 --out FILE

Each row is one ``flagstaff-train`` run on ``backend=ray`` through ``benchmarks/simulation.py``'s
``run_flagstaff`` (the same experiment, data, clients and seed as the simulation benchmark; rounds
cut to ``--rounds``): ``cpu`` with one host per CPU core (the default placement), ``gpu`` with
``--gpu-hosts`` hosts sharing the GPUs (``cluster.gpus_per_host = GPUs / gpu-hosts``), each host
training its clients batched on its device. Per-round time is the median of rounds 2..N (training
and aggregation, no evaluation); accuracy is the final test accuracy; CPU and GPU runs of a workload
agree to float rounding, not bit for bit (different kernels).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules

from _provenance import markdown, provenance  # noqa: E402
from _workloads import get_workload  # noqa: E402

__all__ = ["main", "rows_for"]


def _gpu() -> tuple[int, str]:
    """(CUDA devices torch sees, the first one's name)."""
    import torch

    if not torch.cuda.is_available():
        return 0, ""
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


def rows_for(name: str, rounds: int | None, gpu_hosts: int, gpus: int) -> list[dict]:
    """The CPU and GPU runs of workload ``name`` as table rows."""
    import dataclasses

    from simulation import RunOptions, run_flagstaff

    w = get_workload(name)
    if rounds:
        w = dataclasses.replace(w, rounds=max(2, min(rounds, w.rounds)))
    share = gpus / gpu_hosts
    setups = {
        "cpu": ["cluster.gpus_per_host=0"],
        "gpu": [f"cluster.hosts={gpu_hosts}", f"cluster.gpus_per_host={share:g}"],
    }
    rows = []
    for device, extra in setups.items():
        row = {"workload": w.name, "device": device, "hosts": "?", "overrides": " ".join(extra)}
        row.update(rounds=0, round_s=None, accuracy=None)
        try:
            res = run_flagstaff(
                w, "ray", RunOptions(t0=time.time(), flagstaff_overrides=tuple(extra))
            )
        except Exception as err:  # noqa: BLE001 - one failed setup is a row, not the end
            row["status"] = f"failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        else:
            row.update(
                hosts=res.details.get("hosts", "?"),
                rounds=len(res.round_times),
                round_s=res.median_round_s,
                accuracy=res.accuracy,
                status="ok" if res.ok else f"{res.status}: {res.note}",
            )
        rows.append(row)
        print(f"  {w.name} {device}: {row['round_s']} s/round, {row['status']}", file=sys.stderr)
    return rows


def table(rows: list[dict], gpu_name: str) -> str:
    """The Markdown table, GPU rows with their speed-up over the CPU row of the workload."""
    cpu = {r["workload"]: r["round_s"] for r in rows if r["device"] == "cpu"}
    head = (
        "| workload | device | hosts | overrides | rounds | per-round median (s) | speed-up "
        "| final accuracy | status |\n|:--|:--|--:|:--|--:|--:|--:|--:|:--|"
    )
    out = [head]
    for r in rows:
        base, t = cpu.get(r["workload"]), r["round_s"]
        up = f"{base / t:.2f}x" if r["device"] == "gpu" and base and t else ""
        dev = f"gpu ({gpu_name})" if r["device"] == "gpu" else "cpu"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        sec = "-" if t is None else f"{t:.4f}"
        out.append(
            f"| {r['workload']} | {dev} | {r['hosts']} | `{r['overrides']}` | {r['rounds']} "
            f"| {sec} | {up} | {acc} | {r['status']} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="w1,cnn,resnet8")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per run (0: the workload's)")
    ap.add_argument("--gpu-hosts", type=int, default=1, help="hosts sharing the GPUs")
    ap.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = ap.parse_args(argv)
    gpus, gpu_name = _gpu()
    if gpus == 0:
        print("no GPU")
        return 0
    if args.gpu_hosts < 1:
        ap.error(f"--gpu-hosts must be >= 1, got {args.gpu_hosts}")
    import torch

    rows = []
    for name in args.workloads.split(","):
        rows += rows_for(name.strip(), args.rounds, args.gpu_hosts, gpus)
    prov = provenance(gpu=gpu_name, gpus=gpus, cuda=torch.version.cuda)
    text = "\n".join(
        [
            markdown(prov),
            f"GPU: {gpu_name} x{gpus}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
            f"commit {prov.get('git', {}).get('commit', '?')}; {os.cpu_count()} CPUs; "
            f"torch threads per host: cluster.threads_per_host (1)",
            "",
            table(rows, gpu_name),
        ]
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
