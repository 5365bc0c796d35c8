#!/usr/bin/env bash
# Run `python -m mirage_jax.train` on every worker of a Cloud TPU VM slice (single- or multi-host).
#
#   launch/tpu_vm.sh TPU_NAME ZONE [PROJECT] -- --config=configs/mirage_10b.py --workdir=gs://BUCKET/run1 [...]
#
# Every worker runs the same command; JAX finds the other hosts through the TPU metadata
# (jax.distributed.initialize() without arguments), so no coordinator flags are needed.
# Expects the repository at ~/mirage_jax on every worker with its venv in ~/mirage_jax/.venv
# (set REPO / PYTHON to change that); `SETUP=1` clones/updates and installs first.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- TRAIN_FLAGS..." >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_FLAG=()
if [[ $# -gt 0 && $1 != "--" ]]; then PROJECT_FLAG=(--project "$1"); shift; fi
[[ ${1:-} == "--" ]] && shift
REPO=${REPO:-'~/mirage_jax'}
PYTHON=${PYTHON:-.venv/bin/python}
REPO_URL=${REPO_URL:-}

# Quote the train flags for the remote shell.
TRAIN_FLAGS=$(printf '%q ' "$@")

SETUP_CMD=":"
if [[ ${SETUP:-0} == 1 ]]; then
  SETUP_CMD="( [ -d $REPO ] || git clone $REPO_URL $REPO ) && cd $REPO && git pull --ff-only && \
python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
fi

# The TPU runtime sends SIGTERM on maintenance events; the trainer saves at the agreed step and exits 0.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
  --command "set -e; $SETUP_CMD; cd $REPO && $PYTHON -m mirage_jax.train $TRAIN_FLAGS 2>&1 | tee -a /tmp/mirage_train.log"
