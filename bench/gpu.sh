#!/usr/bin/env bash
# Everything a GPU should measure, in one command, within 8 minutes on one GPU: see bench/gpu.py and bench/README.md.
#   bench/gpu.sh                                        # CUDA: writes bench/results/gpu-<time>.md and .json
#   bench/gpu.sh --device cpu --quick --time-scale 5    # check every part on the CPU at toy sizes
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu.py" "$@"
