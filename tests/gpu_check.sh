#!/usr/bin/env bash
# The prepared GPU check (common/perf/gpu_check.py): one command, offline, everything into one folder.
#   tests/gpu_check.sh runs/gpu_check              # on one CUDA GPU, ~8 minutes
#   tests/gpu_check.sh runs/gpu_check --dry-run    # print the commands only
#   tests/gpu_check.sh runs/gpu_check --ci-smoke   # every step at toy size on a CPU (CI runs this, ~1 minute)
#   tests/gpu_check.sh runs/gpu_check --cpu-smoke  # the real-width plumbing on a CPU (1-layer 3B + TRL, ~8 minutes)
# Missing bitsandbytes / trl / peft are installed from ./.whl/ (wheels you copied there), never the network.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" -m common.perf.gpu_check "$@"
