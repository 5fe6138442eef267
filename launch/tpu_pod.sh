#!/usr/bin/env bash
# A Cloud TPU VM slice (v4, v5e, v5p, v6e; one host or a pod slice).
#
#   launch/tpu_pod.sh [OPTIONS] create TPU_NAME
#   launch/tpu_pod.sh [OPTIONS] run TPU_NAME CONFIG gs://BUCKET/RUN [--config.KEY=VALUE ...]
#   launch/tpu_pod.sh [OPTIONS] logs TPU_NAME
#   launch/tpu_pod.sh [OPTIONS] delete TPU_NAME
#
# `run` copies this checkout to every host (--worker=all), installs the
# pinned requirements with jax[tpu] in a Python 3.11 venv there and starts the
# same command on all hosts in the background with --multihost (the hosts
# find each other through the TPU metadata: jax.distributed needs no
# arguments); each host logs to ~/mmal_jax.log, which `logs` follows. The
# workdir must be on gs:// (every host writes there; orbax checkpoints too).
# Rerunning `run` resumes the experiment.
#
# Options (or the environment variable named in brackets):
#   --zone=Z              [TPU_ZONE]            default us-central2-b
#   --accelerator-type=T  [TPU_ACCELERATOR_TYPE] default v4-32
#   --version=V           [TPU_VERSION]         default: the JAX runtime of T's
#                         generation (v4: tpu-ubuntu2204-base, v5e:
#                         v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e:
#                         v2-alpha-tpuv6e)
#   --spot                create a Spot TPU (preemptible; rerun `run` after)
#   --tfds-data-dir=D     [TFDS_DATA_DIR]       where tfds datasets live (gs://)
#   --worker=W            `logs` of host W (default 0) or of all
#   --dry-run             print the commands instead of running them
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh [OPTIONS] create TPU_NAME
       launch/tpu_pod.sh [OPTIONS] run TPU_NAME CONFIG gs://BUCKET/RUN [--config.KEY=VALUE ...]
       launch/tpu_pod.sh [OPTIONS] logs TPU_NAME
       launch/tpu_pod.sh [OPTIONS] delete TPU_NAME
options: --dry-run --zone=Z --accelerator-type=T --version=V --spot
         --tfds-data-dir=D --worker=W (see the comment at the top of the script)
EOF
}

zone=${TPU_ZONE:-us-central2-b}
accelerator_type=${TPU_ACCELERATOR_TYPE:-v4-32}
version=${TPU_VERSION:-}
tfds_data_dir=${TFDS_DATA_DIR:-}
worker=0 spot=() positional=() overrides=() needed=2
# Options may come anywhere; for `run`, the other words after WORKDIR are
# config overrides.
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator-type=*) accelerator_type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --spot) spot=(--spot) ;;
    --tfds-data-dir=*) tfds_data_dir=${1#*=} ;;
    --worker=*) worker=${1#*=} ;;
    -h | --help) usage && exit 0 ;;
    *)
      if ((${#positional[@]} == 4)) && [[ ${positional[0]} == run ]]; then
        overrides+=("$1")
      elif [[ $1 == -* ]]; then
        usage_error "unknown option $1"
      else
        positional+=("$1")
      fi
      ;;
  esac
  shift
done
((${#positional[@]} > 0)) || usage_error "a subcommand is required"
case ${positional[0]} in
  create | logs | delete) ;;
  run) needed=4 ;;
  *) usage_error "unknown subcommand '${positional[0]}' (create, run, logs, delete)" ;;
esac
((${#positional[@]} == needed)) ||
  usage_error "${positional[0]} takes $((needed - 1)) argument(s)"
command=${positional[0]} tpu=${positional[1]}
[[ $worker == all || $worker =~ ^[0-9]+$ ]] ||
  usage_error "--worker is a host number or all, not '$worker'"
tpu_vm=(gcloud compute tpus tpu-vm)

case $command in
  create)
    if [[ -z $version ]]; then
      case $accelerator_type in
        v4-*) version='tpu-ubuntu2204-base' ;;
        v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
        v5p-*) version=v2-alpha-tpuv5 ;;
        v6e-*) version=v2-alpha-tpuv6e ;;
        *) usage_error "no default --version for '$accelerator_type'" ;;
      esac
    fi
    run_last "${tpu_vm[@]}" create "$tpu" --zone="$zone" \
      --accelerator-type="$accelerator_type" --version="$version" "${spot[@]}"
    ;;
  delete)
    run_last "${tpu_vm[@]}" delete "$tpu" --zone="$zone" --quiet
    ;;
  logs)
    # shellcheck disable=SC2016  # $HOME expands on the TPU host.
    run_last "${tpu_vm[@]}" ssh "$tpu" --zone="$zone" --worker="$worker" \
      --command='tail -n 200 -F "$HOME/mmal_jax.log"'
    ;;
  run)
    config=${positional[2]} workdir=${positional[3]}
    [[ $workdir == gs://?* ]] || usage_error "WORKDIR must be gs://... (every\
 host of the slice writes there), not '$workdir'"
    # The hosts run the checkout's copy of CONFIG (an optional ":ARG" suffix
    # is ml_collections' config argument).
    config_file=${config%%:*}
    config_arg=${config:${#config_file}}
    [[ -f $config_file ]] || usage_error "no config file '$config_file'"
    config_file=$(cd "$(dirname "$config_file")" && pwd)/$(basename "$config_file")
    [[ $config_file == "$repo"/* ]] ||
      usage_error "CONFIG must be inside $repo (the checkout is what is copied)"
    main_command "${config_file#"$repo"/}$config_arg" "$workdir" 1 \
      "${overrides[@]}"
    tfds_env=()
    if [[ -n $tfds_data_dir ]]; then tfds_env=("TFDS_DATA_DIR=$tfds_data_dir"); fi
    jax_pin=$(sed -n 's/^jax==//p' "$repo/requirements.txt")
    # shellcheck disable=SC2016  # $HOME expands on the TPU hosts.
    steps=(
      'set -e'
      'rm -rf "$HOME/mmal_jax"'
      'mkdir -p "$HOME/mmal_jax"'
      'tar -xzf "$HOME/mmal_jax.tgz" -C "$HOME/mmal_jax"'
      'cd "$HOME/mmal_jax"'
      'python3 -m pip install -q --user uv'
      '"$HOME/.local/bin/uv" venv -q --allow-existing --python 3.11 "$HOME/mmal_venv"'
      '. "$HOME/mmal_venv/bin/activate"'
      "\"\$HOME/.local/bin/uv\" pip install -q -r requirements.txt $(quote "jax[tpu]==$jax_pin")"
      "nohup $(quote env "${tfds_env[@]}" "${main[@]}") >\"\$HOME/mmal_jax.log\" 2>&1 </dev/null &"
    )
    remote=${steps[0]}
    for step in "${steps[@]:1}"; do remote+="; $step"; done
    archive=${TMPDIR:-/tmp}/mmal_jax-$tpu.tgz
    run tar -czf "$archive" -C "$repo" --exclude=.git --exclude=.venv \
      --exclude=__pycache__ .
    run "${tpu_vm[@]}" scp "$archive" "$tpu:mmal_jax.tgz" --zone="$zone" \
      --worker=all
    run_last "${tpu_vm[@]}" ssh "$tpu" --zone="$zone" --worker=all \
      --command="$remote"
    ;;
esac
