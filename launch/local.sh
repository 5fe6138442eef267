#!/usr/bin/env bash
# Runs an experiment on this machine, on every local accelerator or the CPU.
#
#   launch/local.sh [--dry-run] [--devices=N] CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# --devices=N (or DEVICES=N) splits the CPU into N XLA devices, to try a
# sharded run without accelerators. --dry-run prints the command instead of
# running it. CONFIG and WORKDIR are read from the current directory.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  echo "usage: launch/local.sh [--dry-run] [--devices=N] CONFIG WORKDIR" \
    "[--config.KEY=VALUE ...]"
}

devices=${DEVICES:-}
take_dry_run "$@"
set -- "${args[@]}"
while (($#)) && [[ $1 == -* ]]; do
  case $1 in
    --devices=*) devices=${1#*=} ;;
    -h | --help) usage && exit 0 ;;
    *) usage_error "unknown option $1" ;;
  esac
  shift
done
(($# >= 2)) || usage_error "CONFIG and WORKDIR are required"
config=$1 workdir=$2
shift 2

env_vars=("PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}")
if [[ -n $devices ]]; then
  [[ $devices =~ ^[1-9][0-9]*$ ]] ||
    usage_error "--devices takes a positive number, not '$devices'"
  env_vars+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices")
fi
main_command "$config" "$workdir" 0 "$@"
run_last env "${env_vars[@]}" "${main[@]}"
