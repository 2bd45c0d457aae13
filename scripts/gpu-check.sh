#!/usr/bin/env bash
# GPU checks for the node actors, on a host with an NVIDIA driver and nvcc (the `cuda`
# feature builds candle's kernels). Prints the ledger against the driver's memory
# figures, CPU-vs-GPU outputs of the MLP and all-MiniLM-L6-v2, throughput at batch 32, and
# CPU-vs-GPU outputs of a Q8_0 MLP and a Q8_0 llama in llama.cpp's layout.
# Exit status: 0 all checks passed, 1 a check failed, 2 no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "nvcc not found: the cuda feature cannot build here" >&2; exit 2; }
exec cargo run --release -p shoal-actors --features cuda --example gpu_check
