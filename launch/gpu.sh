#!/usr/bin/env bash
# GPUs. One host: every visible GPU joins the mesh (CUDA_VISIBLE_DEVICES
# selects them):
#   launch/gpu.sh CONFIG WORKDIR [--config.key=value ...]
# Several hosts under SLURM (one task per host, jax.distributed reads the
# coordinator and process ids from SLURM's environment):
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \
#     launch/gpu.sh CONFIG gs://bucket/run [overrides]
# Install the CUDA build of jax first: pip install "jax[cuda12]==0.10.2".
set -euo pipefail
config=${1:?usage: launch/gpu.sh CONFIG WORKDIR [overrides]}
workdir=${2:?usage: launch/gpu.sh CONFIG WORKDIR [overrides]}
shift 2
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
multihost=()
if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  multihost=(--multihost)
fi
exec python -m mmal_jax.main --config "$config" --workdir "$workdir" \
  "${multihost[@]}" "$@"
