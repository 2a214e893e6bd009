#!/usr/bin/env bash
# Runs one gr2_jax stage on every worker of a Cloud TPU VM slice (v5e-16, v5p-64, ...).
#
#   launch/tpu_vm.sh TPU_NAME ZONE [--project=P] -- --config=configs/rl.py:full \
#       --workdir=gs://bucket/runs/qwen3 --config.runtime.mesh="(-1,4,4)" ...
#
# 1. copies this checkout to every worker (~/gr2_jax), 2. installs it there with the TPU build
# of JAX (`pip install -e '.[tpu]'`), 3. starts the same command on all workers at once with
# `--distributed`: each worker calls jax.distributed.initialize(), which finds the slice's
# other workers by itself; process 0 writes logs, tables and artifacts. The workdir must be
# one all workers share (a GCS bucket through gcsfuse, or Filestore).
set -euo pipefail

usage() { echo "usage: $0 TPU_NAME ZONE [--project=PROJECT] [--skip_install] -- MAIN_ARGS..." >&2; exit 2; }
[[ $# -ge 2 ]] || usage
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_ARGS=(); INSTALL=1
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --project=*) PROJECT_ARGS=("--project=${1#--project=}") ;;
    --skip_install) INSTALL=0 ;;
    *) usage ;;
  esac
  shift
done
[[ ${1:-} == "--" ]] || usage
shift
[[ $# -gt 0 ]] || usage
REPO=$(cd "$(dirname "$0")/.." && pwd)
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_ARGS[@]}" --worker=all)

if [[ $INSTALL == 1 ]]; then
  tar -C "$REPO" --exclude=.git --exclude=runs -czf /tmp/gr2_jax_src.tgz .
  gcloud compute tpus tpu-vm scp /tmp/gr2_jax_src.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" \
      "${PROJECT_ARGS[@]}" --worker=all
  "${SSH[@]}" --command="mkdir -p ~/gr2_jax && tar -xzf /tmp/gr2_jax_src.tgz -C ~/gr2_jax && \
      cd ~/gr2_jax && python3 -m pip install -q -e '.[tpu]'"
fi

ARGS=$(printf '%q ' "$@")
"${SSH[@]}" --command="cd ~/gr2_jax && python3 -m gr2_jax.main --distributed $ARGS"
