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
#
# Ctrl-C (or SIGTERM) to this script: a signal does not cross `gcloud ... ssh` (without a terminal, closing the
# connection only breaks the trainers' output pipe), so the script forwards it itself: SIGINT/SIGTERM to the
# trainer of every worker (its pid is in /tmp/mirage_train.pid there); they agree on a stop step, save it and
# exit 0. A second Ctrl-C forwards a second SIGINT (the trainers exit at once, 130, naming the last committed
# checkpoint). Trainers still running STOP_GRACE_S (default 150) seconds after the first forwarded signal get
# SIGKILL. `tee -p` keeps the log file written if the ssh connection goes away.
STOP_GRACE_S=${STOP_GRACE_S:-150}
remote() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}
# signal the worker's trainer if it still runs (the pid file may outlive it: check the pid is still a trainer)
signal_trainers() {
  remote "p=\$(cat /tmp/mirage_train.pid 2>/dev/null) && grep -q mirage_jax.train /proc/\$p/cmdline 2>/dev/null \
&& kill -$1 \$p || true" || true
}
TIMER_PID=
forward() {
  echo "[tpu_vm.sh] got SIG$1; forwarding it to the trainer on every worker" >&2
  signal_trainers "$1"
  if [[ -z $TIMER_PID ]]; then
    ( sleep "$STOP_GRACE_S"; echo "[tpu_vm.sh] trainers still running $STOP_GRACE_S s after SIG$1: SIGKILL" >&2
      signal_trainers KILL ) &
    TIMER_PID=$!
  fi
}
trap 'forward INT' INT
trap 'forward TERM' TERM

# started in the background, so it ignores the terminal's SIGINT (bash: async commands of a non-interactive
# shell do) and keeps streaming the trainers' output while they stop
remote "set -eo pipefail; $SETUP_CMD; cd $REPO && (echo \$BASHPID > /tmp/mirage_train.pid; exec $PYTHON -m mirage_jax.train \
$TRAIN_FLAGS) 2>&1 | tee -a -p /tmp/mirage_train.log" &
SSH_PID=$!
status=0
while true; do
  wait "$SSH_PID" && status=0 || status=$?
  kill -0 "$SSH_PID" 2>/dev/null || break  # `wait` returned because a trap ran: keep waiting
done
[[ -n $TIMER_PID ]] && kill "$TIMER_PID" 2>/dev/null
exit "$status"
