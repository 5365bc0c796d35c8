#!/usr/bin/env bash
# Submit the training run to a GKE TPU cluster with xpk (https://github.com/AI-Hypercomputer/xpk).
#
#   launch/gke/xpk.sh CLUSTER TPU_TYPE NUM_SLICES -- --config=configs/mirage_10b.py --workdir=gs://BUCKET/run1
#   e.g. launch/gke/xpk.sh my-cluster v5p-256 1 -- --config=configs/mirage_10b.py --workdir=gs://b/run1
#
# xpk builds an image from this directory (--base-docker-image with JAX for TPU preinstalled), creates
# the JobSet (like launch/gke/jobset.yaml) and restarts it after preemption (--max-restarts); every
# restart resumes from the newest committed checkpoint in --workdir.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 CLUSTER TPU_TYPE NUM_SLICES -- TRAIN_FLAGS..." >&2
  exit 2
fi
CLUSTER=$1; TPU_TYPE=$2; SLICES=$3; shift 3
[[ ${1:-} == "--" ]] && shift
WORKLOAD=${WORKLOAD:-mirage-$(date +%m%d-%H%M)}
TRAIN_FLAGS=$(printf '%q ' "$@")

xpk workload create \
  --cluster "$CLUSTER" \
  --workload "$WORKLOAD" \
  --tpu-type "$TPU_TYPE" \
  --num-slices "$SLICES" \
  --base-docker-image "${BASE_IMAGE:-us-docker.pkg.dev/cloud-tpu-images/jax-stable-stack/tpu:latest}" \
  --script-dir "$(cd "$(dirname "$0")/../.." && pwd)" \
  --max-restarts "${MAX_RESTARTS:-10}" \
  --command "pip install -q -r requirements.txt && python -m mirage_jax.train $TRAIN_FLAGS"
