#!/usr/bin/env bash
# A Cloud TPU VM slice (v4/v5e/v5p/v6e pods): installs the project on every
# host and starts the same command on all of them; jax.distributed connects
# them and the mesh spans every chip of the slice. The workdir must be on a
# filesystem all hosts see (gs://...).
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG gs://bucket/run [overrides]
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides]}
zone=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides]}
config=${3:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides]}
workdir=${4:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides]}
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$zone" \
  "$repo" "$tpu":~/mmal_jax
gcloud compute tpus tpu-vm ssh "$tpu" --worker=all --zone="$zone" --command "
  set -e; cd ~/mmal_jax
  python3 -m venv ~/venv && . ~/venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]==0.10.2' \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python -m mmal_jax.main --multihost --config $config --workdir $workdir $*"
