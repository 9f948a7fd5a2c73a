#!/usr/bin/env bash
# The prepared GPU check (common/gpu_check.py): one command, offline, everything into one folder.
#   tests/gpu_check.sh runs/gpu_check              # on one CUDA GPU, ~8 minutes
#   tests/gpu_check.sh runs/gpu_check --dry-run    # print the commands only
#   tests/gpu_check.sh runs/gpu_check --cpu-smoke  # the same plumbing on a CPU (CI runs this)
# Missing bitsandbytes / trl / peft are installed from ./.whl/ (wheels you copied there), never the network.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" -m common.gpu_check "$@"
