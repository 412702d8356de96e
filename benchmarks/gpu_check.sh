#!/usr/bin/env bash
# GPU check (issue 22 item 5): W1, CNN and ResNet-8 with client hosts on the GPU
# (cluster.gpus_per_host) against the same workloads on CPU, as one Markdown table
# (benchmarks/gpu_check.py; its options pass through, e.g. --rounds 5 --gpu-hosts 1 --out FILE).
# Without a GPU (no nvidia-smi, or torch sees no CUDA device) it prints "no GPU" and exits 0.
# A few rounds per run: within 10 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no GPU"
    exit 0
fi
exec "$PY" benchmarks/gpu_check.py "$@"
