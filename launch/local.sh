#!/usr/bin/env bash
# Runs an experiment on this machine.
#   launch/local.sh CONFIG WORKDIR [--config.key=value ...]
# DEVICES=N splits the CPU into N XLA devices (tests sharding without
# accelerators); on a GPU or TPU host every local accelerator is used.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides]}
shift 2
cd "$(dirname "$0")/.."
if [ -n "${DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES}"
fi
exec python -m mmal_jax.main --config "$config" --workdir "$workdir" "$@"
