"""Per-round time and peak memory of the paper experiments (conf/experiment/paper_*.yaml, leaf_*.yaml)
on generated stand-ins in the real on-disk layouts, for docs/benchmarks.md (issue 21 item 7).

Each experiment runs as ``flagstaff-train experiment=<name> backend=local`` in its own process (one
torch thread) for a few rounds on a generated dataset of the real shape and, where feasible, the real
size; the script reads the run's metrics.jsonl and summary.json: the median round time (rounds
2..N, or round 1 when only one ran), the start-up, and the peak RSS/PSS (``rss_mb``, ``pss_mb``).
Where a full round cannot run here in minutes, the run takes fewer local steps (``client.steps``)
and the full round's time is computed as measured time per local step times the full round's steps
(the row says so). Generated data: random pixels / random words in the exact layouts that
tests/test_hf_data.py builds (a CIFAR-10 ``save_to_disk`` folder of PNG images, a FEMNIST parquet
clone, Shakespeare records, GLUE SST-2); accuracies on it mean nothing, so none is reported.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/paper_rounds.py --out benchmarks/results/paper_rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _provenance import markdown, pin_threads, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: name -> (data builder, overrides for the measured run, full-round local steps per client or None
#: when the measured round is the full round, measured steps per client, sizes said in the table)
WORKLOADS: dict[str, dict[str, Any]] = {
    "paper_fedspeed_cifar10": {
        "data": "cifar10",
        "over": ["rounds=2", "client.steps=1", "data.max_test=500"],
        "full_steps": 50,  # 5 epochs x 500 samples (Dirichlet: 500 on average) / batch 50
        "steps": 1,
        "expected_clients": 10,
        "sizes": "CIFAR-10-sized (50,000 / 10,000 random 32x32 PNGs; test capped at 500), "
        "100 clients, about 10 per round, 1 local step (x2 passes) measured",
    },
    "paper_flag_cifar10": {
        "data": "cifar10",
        "over": ["rounds=2", "data.max_test=500"],
        "full_steps": None,
        "sizes": "CIFAR-10-sized, 15 workers x 1 step of batch 128 (the full round), test capped at 500",
    },
    "paper_monna_cifar10": {
        "data": "cifar10",
        "over": ["rounds=2", "data.max_test=500", "eval_every=2"],
        "full_steps": None,
        "sizes": "CIFAR-10-sized, 16 nodes x 1 gradient of batch 50 (the full step), test capped at 500",
    },
    "paper_monna_cifar10@4": {
        "experiment": "paper_monna_cifar10",
        "data": "cifar10",
        "over": [
            "rounds=2",
            "data.max_test=500",
            "eval_every=2",
            "num_clients=4",
            "clients_per_round=4",
            "attack.f=1",
        ],  # fmt: skip
        "full_steps": None,
        "sizes": "as above with 4 nodes (f = 1): what fits, to measure the memory per node",
    },
    "paper_fedsvd_sst2": {
        "data": "sst2",
        "over": ["rounds=2"],
        "full_steps": None,
        "sizes": "SST-2-sized (67,349 / 872 random sentences), 6 clients, 3 per round, 10 DP steps "
        "of expected batch 128 (the full round)",
    },
    "leaf_femnist": {
        "data": "femnist",
        "over": ["rounds=3"],
        "full_steps": None,
        "sizes": "180 writers x 226 images (FEMNIST's mean per writer; 40,680 28x28 PNGs), "
        "3 per round, 1 epoch (the full round)",
    },
    "leaf_shakespeare": {
        "data": "shakespeare",
        "over": ["rounds=2"],
        "full_steps": None,
        "sizes": "100 roles x 400 lines (40,000 records), 10 per round, 1 epoch (the full round; "
        "LEAF's roles are larger and skewed)",
    },
}


def build_data(kind: str, root: Path) -> Path:
    """The generated stand-in in its real layout (built once, reused)."""
    sys.path.insert(0, str(ROOT))
    import tests.test_hf_data as layouts

    done = root / f"{kind}.done"
    path = {
        "cifar10": root / "cifar10",
        "sst2": root / "glue_sst2",
        "femnist": root / "femnist",
        "shakespeare": root / "shakespeare.parquet",
    }[kind]
    if done.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    if kind == "cifar10":
        from hf_load import generate

        generate(path, 50_000, 10_000)
    elif kind == "sst2":
        layouts.make_glue(path, task="sst2", n=67_349)  # validation: n // 2; trimmed below
        _trim_validation(path, 872)
    elif kind == "femnist":
        layouts.make_femnist(path, writers=180, per_writer=226)
    else:
        layouts.make_shakespeare(path, roles=100, per_role=400)
    done.write_text("ok")
    return path


def _trim_validation(path: Path, n: int) -> None:
    import shutil

    import datasets

    dd = datasets.load_from_disk(str(path))
    dd["validation"] = dd["validation"].select(range(n))
    tmp = path.with_name(path.name + ".tmp")
    dd.save_to_disk(str(tmp))
    del dd
    shutil.rmtree(path)
    tmp.rename(path)


def run_one(name: str, data: Path, out: Path) -> dict[str, Any]:
    w = WORKLOADS[name]
    run_dir = out / name
    cmd = [
        str(ROOT / ".venv" / "bin" / "flagstaff-train"),
        f"experiment={w.get('experiment', name)}",
        "backend=local",
        "progress=false",
        "checkpoint_every=0",
        f"data.path={data}",
        f"hydra.run.dir={run_dir}",
        *w["over"],
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(out / f"{name}.stderr", "w+") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own maximum resident set
        wall = time.perf_counter() - t
        code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    max_rss = usage.ru_maxrss / 1024
    if code != 0:
        tail = stderr.strip().splitlines()[-1:]
        why = tail[0] if tail else "no message: killed, out of memory"
        return {"name": name, "sizes": w["sizes"], "cmd": cmd, "max_rss_mb": max_rss,
                "error": f"exit code {code} after {wall:.0f} s, {why}"}  # fmt: skip
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    times = [r["round_time_s"] for r in rows]
    med = statistics.median(times[1:] or times)
    res = {
        "name": name,
        "cmd": " ".join(cmd[1:]),
        "round_times_s": times,
        "round_s": med,
        "wall_s": wall,
        "max_rss_mb": max_rss,
        "summary": {k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
        "versions": summary.get("versions"),  # the run's commit and package versions
        "peak_rss_mb": max(r.get("rss_mb") or 0 for r in rows),
        "peak_pss_mb": max(r.get("pss_mb") or 0 for r in rows),
        "clients": [r.get("clients") for r in rows],
        "sizes": w["sizes"],
    }
    if w["full_steps"]:
        res["full_round_s"] = full_round(res, w)
    return res


def full_round(res: dict[str, Any], w: dict[str, Any]) -> float:
    """The full round's time computed from the measured rounds: the median time per client and
    local step (rounds 2..N; Bernoulli sampling varies the clients per round) times the expected
    clients per round and the full round's local steps."""
    per = [t / (c * w["steps"]) for t, c in zip(res["round_times_s"], res["clients"], strict=True)]
    per_step = statistics.median(per[1:] or per)
    return per_step * w["expected_clients"] * w["full_steps"]


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| experiment | stand-in and sizes | round (s) | full round (s) | start-up (s) | "
        "RSS / PSS at the last round (MB) | max RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['name']} | {WORKLOADS[r['name']]['sizes']}; failed: "
                f"{r['error'] or 'killed, no message (out of memory)'} | | | | | "
                f"{_mb(r.get('max_rss_mb'))} |"
            )
            continue
        full = r.get("full_round_s")
        full_s = f"{full:.0f} (computed)" if full else f"{r['round_s']:.1f} (measured)"
        startup = r["summary"].get("startup_s")
        lines.append(
            f"| {r['name']} | {r['sizes']} | {r['round_s']:.1f} | {full_s} | "
            f"{startup if startup is None else round(startup, 1)} | {_sampled(r)} | "
            f"{_mb(r.get('max_rss_mb'))} |"
        )
    return "\n".join(lines)


def _sampled(r: dict[str, Any]) -> str:
    """RSS / PSS of the metrics rows (sampled at the evaluated rounds)."""
    if not r["peak_rss_mb"]:
        return "not sampled (no evaluated round)"
    return f"{r['peak_rss_mb']:.0f} / {r['peak_pss_mb']:.0f}"


def _mb(v: float | None) -> str:
    return "not recorded" if v is None else f"{v:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/tmp/flagstaff_paper_data", help="generated stand-ins")
    ap.add_argument("--runs", default="/tmp/flagstaff_paper_runs", help="run folders")
    ap.add_argument("--only", nargs="*", default=None, help="experiments to run (default: all)")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    ap.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json only")
    args = ap.parse_args()
    if args.render:
        blob = json.loads(Path(args.out).with_suffix(".json").read_text())
        for r in blob["results"]:
            if WORKLOADS[r["name"]]["full_steps"] and "error" not in r:
                r["full_round_s"] = full_round(r, WORKLOADS[r["name"]])
        Path(args.out).with_suffix(".json").write_text(json.dumps(blob, indent=1, default=str))
        write_md(Path(args.out), blob["provenance"], table(blob["results"]), blob.get("earlier"))
        return
    pin_threads(1)
    names = args.only or list(WORKLOADS)
    load = os.getloadavg()
    results, earlier = [], []
    old = Path(args.out).with_suffix(".json") if args.out else None
    if args.only and old is not None and old.exists():  # keep the rows not rerun
        blob = json.loads(old.read_text())
        results = [r for r in blob["results"] if r["name"] not in names]
        kept = sorted(r["name"] for r in results)
        earlier = [*blob.get("earlier", []), {"rows": kept, "provenance": blob["provenance"]}]
    for name in names:
        data = build_data(WORKLOADS[name]["data"], Path(args.data))
        results.append(run_one(name, data, Path(args.runs)))
        print(json.dumps({k: results[-1].get(k) for k in ("name", "round_s", "error")}), flush=True)
    load_after = os.getloadavg()
    results.sort(key=lambda r: list(WORKLOADS).index(r["name"]))
    text = table(results)
    print(text)
    if args.out:
        prov = provenance(load_average={"before": load, "after": load_after}, rows=names)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(
            json.dumps(
                {"provenance": prov, "earlier": earlier, "results": results}, indent=1, default=str
            )
        )
        write_md(out, prov, text, earlier)


def write_md(
    out: Path, prov: dict[str, Any], text: str, earlier: list[dict[str, Any]] | None = None
) -> None:
    """The results .md: provenance line (and those of rows kept from earlier runs), the command,
    the table, the load average."""
    kept = "".join(
        f"\nRows {', '.join(e['rows'])} kept from an earlier run:\n"
        + (e.get("markdown") or markdown(e["provenance"]))
        for e in earlier or []
    )
    cmd = f"OMP_NUM_THREADS=1 nice -n 10 python benchmarks/paper_rounds.py --out {out}"
    load = [tuple(round(x, 1) for x in prov["load_average"][k]) for k in ("before", "after")]
    out.with_suffix(".md").write_text(
        markdown(prov) + kept + f"\n\n```bash\n{cmd}\n```\n\n" + text + "\n\n"
        f"Load average before/after (1, 5, 15 min): {load[0]} / {load[1]}\n"
    )


if __name__ == "__main__":
    main()
