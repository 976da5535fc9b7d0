#!/usr/bin/env bash
# One node, N processes (workstations and CPU machines).
#   launchers/local.sh N [CONFIG.yaml] [key=value ...]
# On a machine with GPUs this uses accelerate_config.yaml (DDP, bf16); without, the CPU config.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
nproc_arg="${1:?usage: launchers/local.sh NUM_PROCESSES [CONFIG.yaml] [key=value ...]}"
shift
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  config="${ACCELERATE_CONFIG:-$here/accelerate_config.yaml}"
else
  config="${ACCELERATE_CONFIG:-$here/configs/accelerate/cpu.yaml}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc_arg > 0 ? $(nproc) / nproc_arg : 1 ))}"
fi
exec accelerate launch --config_file "$config" --num_processes "$nproc_arg" \
  --main_process_port "${MAIN_PROCESS_PORT:-29500}" "$here/rehamot/train.py" "$@"
