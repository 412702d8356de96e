"""What a rerun of a benchmark needs, recorded next to its results.

``provenance()`` returns a JSON-ready dict: the git commit and whether the tracked tree was dirty
(and which files), the exact command, torch's thread counts, CPU capability and deterministic
flag, the environment variables that change floating-point results (thread counts, MKL's
conditional numerical reproducibility, ATen's and oneDNN's ISA caps), the versions of the
packages that produce the numbers, and the CPU model and the SIMD flags the kernels dispatch on.
``markdown(prov)`` is the same as one HTML comment line for a results ``.md`` file, and
``pin_threads(n)`` sets the thread count the way the benchmarks pin it.

Why: floating-point sums depend on the thread count and on the kernel chosen for the CPU's
instruction set (ATen's vectorized loops, MKL's GEMM), and chaotic training amplifies those last-bit
differences into different accuracies (docs/robustness.md, "Reproducibility"); a number without
them cannot be checked.

    from _provenance import markdown, provenance  # a sibling module: scripts run from benchmarks/
    blob = {"provenance": provenance(), **results}
    text = markdown(blob["provenance"]) + "\\n" + table
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["ENV_VARS", "PACKAGES", "cpu_info", "git_state", "markdown", "pin_threads", "provenance"]

ROOT = Path(__file__).resolve().parent.parent

#: environment variables that change numerical results or their threading
ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DEBUG_CPU_TYPE",
    "ATEN_CPU_CAPABILITY",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "KMP_DETERMINISTIC_REDUCTION",
    "CUBLAS_WORKSPACE_CONFIG",
    "PYTHONHASHSEED",
    "CUDA_VISIBLE_DEVICES",
)
#: distributions whose version can change a benchmark's numbers
PACKAGES = (
    "torch",
    "numpy",
    "scikit-learn",
    "ray",
    "flwr",
    "opacus",
    "hydra-core",
    "omegaconf",
    "scipy",
    "sentence-transformers",
    "transformers",
)
#: CPU flags that select different kernels (vector width, FMA, bf16/AMX paths)
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "fma",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
)


def _git(*args: str) -> str | None:
    """git's output with trailing whitespace removed (leading spaces are data: ``status``)."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip()


def git_state() -> dict[str, Any]:
    """Commit of HEAD, and whether tracked files differ from it (with their names, at most 50).

    Files under benchmarks/results/ do not count: they are what benchmarks write, not inputs."""
    commit = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no")
    files = [line[3:] for line in (changed or "").splitlines() if line.strip()]
    files = [f for f in files if not f.startswith("benchmarks/results/")]
    return {"commit": commit, "dirty": bool(files), "dirty_files": files[:50]}


def cpu_info() -> dict[str, Any]:
    """CPU model, logical CPU count, and which of ``ISA_FLAGS`` the CPU reports (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    ids: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key in ("cpu family", "model", "stepping"):
                ids.setdefault(key.replace("cpu ", ""), value.strip())
            elif key == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {
        "model": model,
        "family_model_stepping": "/".join(ids.get(k, "?") for k in ("family", "model", "stepping")),
        "logical_cpus": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _torch_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    try:
        state["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        pass
    try:
        state["mkl"] = torch.backends.mkl.is_available()
        state["mkldnn"] = torch.backends.mkldnn.is_available()
    except AttributeError:
        pass
    return state


def command(argv: list[str] | None = None) -> str:
    """The command line as typed from the repository root: ``python <script> <args>``."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        try:
            argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
        except ValueError:
            pass
    return shlex.join(["python", *argv])


def provenance(argv: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """Everything a rerun needs, as a JSON-ready dict (``extra`` keys are added as given)."""
    return {
        "command": command(argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_state(),
        "torch": _torch_state(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "versions": _versions(),
        "cpu": cpu_info(),
        **extra,
    }


def markdown(prov: dict[str, Any]) -> str:
    """One HTML comment line with the provenance, to head a results ``.md`` file."""
    git, th, cpu = prov["git"], prov["torch"], prov["cpu"]
    commit = (git["commit"] or "unknown")[:12] + (" (dirty)" if git["dirty"] else "")
    env = " ".join(f"{k}={v}" for k, v in prov["env"].items()) or "none"
    vers = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    return (
        f"<!-- command: {prov['command']} | commit {commit} | {prov['date_utc']} | "
        f"torch threads {th['num_threads']}, CPU capability {th.get('cpu_capability', '?')} | "
        f"env {env} | {vers} | CPU {cpu['model']} {cpu.get('family_model_stepping', '')} "
        f"({cpu['logical_cpus']} CPUs; "
        f"{' '.join(cpu['isa'])}) -->"
    )


def pin_threads(n: int = 1) -> None:
    """Pin torch's intra-op threads (and the OpenMP/MKL pools behind them) to ``n``.

    Results that sum in parallel depend on the thread count; the benchmarks that train pin it to
    1 so that a rerun on a machine with more cores sums in the same order.
    """
    import torch

    torch.set_num_threads(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)  # child processes start with the same count
