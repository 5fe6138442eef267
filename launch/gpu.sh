#!/usr/bin/env bash
# GPUs: one host, or several hosts under SLURM.
#
# One host (every visible GPU joins the mesh; CUDA_VISIBLE_DEVICES selects):
#   launch/gpu.sh [--dry-run] CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# Several hosts: submit with sbatch, one process per GPU:
#   launch/gpu.sh [--dry-run] --nodes=N [--gpus-per-node=8] [--partition=P]
#     [--time=HH:MM:SS] [--account=A] CONFIG WORKDIR [--config.KEY=VALUE ...]
# which is the same as this batch script:
#   #!/bin/bash
#   #SBATCH --nodes=2 --ntasks-per-node=8 --gpus-per-node=8
#   srun launch/gpu.sh configs/coco_stream.py /shared/runs/coco
# Inside an srun step of several tasks this script adds --multihost, and
# jax.distributed.initialize() takes everything from SLURM's environment: the
# coordinator is the step's first node (SLURM_STEP_NODELIST) on a port derived
# from SLURM_JOB_ID, the process count is SLURM_NTASKS, the process id
# SLURM_PROCID, and each process keeps GPU number SLURM_LOCALID of its node.
# WORKDIR must be seen by every node (a shared filesystem or gs://).
#
# Install the CUDA build of jax first: pip install -r requirements-gpu.txt
# (CUDA 12; requirements-gpu-cuda13.txt for CUDA 13 drivers).
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
usage: launch/gpu.sh [--dry-run] CONFIG WORKDIR [--config.KEY=VALUE ...]
       launch/gpu.sh [--dry-run] --nodes=N [--gpus-per-node=G] [--partition=P]
                     [--time=HH:MM:SS] [--account=A] CONFIG WORKDIR [...]
EOF
}

nodes='' gpus_per_node=8 sbatch_opts=()
take_dry_run "$@"
set -- "${args[@]}"
while (($#)) && [[ $1 == -* ]]; do
  case $1 in
    --nodes=*) nodes=${1#*=} ;;
    --gpus-per-node=*) gpus_per_node=${1#*=} ;;
    --partition=* | --time=* | --account=*) sbatch_opts+=("$1") ;;
    -h | --help) usage && exit 0 ;;
    *) usage_error "unknown option $1" ;;
  esac
  shift
done
(($# >= 2)) || usage_error "CONFIG and WORKDIR are required"
config=$1 workdir=$2
shift 2

if [[ -n $nodes ]]; then
  for n in "$nodes" "$gpus_per_node"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] ||
      usage_error "--nodes and --gpus-per-node take positive numbers, not '$n'"
  done
  step=$(quote srun "$repo/launch/gpu.sh" "$config" "$workdir" "$@")
  run_last sbatch --job-name=mmal_jax --nodes="$nodes" \
    --ntasks-per-node="$gpus_per_node" --gpus-per-node="$gpus_per_node" \
    "${sbatch_opts[@]}" --output=mmal_jax-%j.out --wrap="$step"
fi
((${#sbatch_opts[@]} == 0)) || usage_error "${sbatch_opts[0]} needs --nodes"

multihost=0
if ((${SLURM_NTASKS:-1} > 1)); then
  for var in SLURM_JOB_ID SLURM_STEP_NODELIST SLURM_PROCID SLURM_LOCALID; do
    [[ -n ${!var:-} ]] || usage_error "SLURM_NTASKS=$SLURM_NTASKS but $var\
 is unset: start this script with srun (one task per GPU)"
  done
  multihost=1
fi
main_command "$config" "$workdir" "$multihost" "$@"
run_last env "PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}" \
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}" \
  "${main[@]}"
