# Sourced by the launchers: argument checks, shell quoting, dry runs.
# shellcheck shell=bash disable=SC2034  # (variables the launchers use)

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
dry_run=0

# Prints its arguments as one line that a shell reads back as the same words.
quote() {
  local word quoted out=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      out+=("$word")
    else
      quoted=${word//\'/\'\\\'\'}
      out+=("'$quoted'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# Sets `args` to its arguments less any --dry-run, which sets `dry_run`
# (mmal_jax.main has no such flag, so it is never meant as an override).
take_dry_run() {
  args=()
  local arg
  for arg in "$@"; do
    if [[ $arg == --dry-run ]]; then dry_run=1; else args+=("$arg"); fi
  done
}

# Runs a command; with --dry-run prints it instead.
run() {
  if ((dry_run)); then quote "$@"; else "$@"; fi
}

# `run` for a launcher's last command: the command replaces the shell, so
# signals (preemption, scancel) reach it directly.
run_last() {
  if ((dry_run)); then
    quote "$@"
    exit 0
  fi
  exec "$@"
}

# A usage error: the message, the usage, exit status 2.
usage_error() {
  echo "$(basename "$0"): error: $1" >&2
  usage >&2
  exit 2
}

# Sets `main` to the experiment command:
#   main_command CONFIG WORKDIR MULTIHOST(0|1) [--config.KEY=VALUE ...]
main_command() {
  local config=$1 workdir=$2 multihost=$3
  shift 3
  main=("$python" -m mmal_jax.main --config "$config" --workdir "$workdir")
  if ((multihost)); then main+=(--multihost); fi
  main+=("$@")
}
