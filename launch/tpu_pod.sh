#!/usr/bin/env bash
# Run one entrl command on every worker of a Cloud TPU VM slice (multi-controller JAX).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project P] -- entrl train configs/paper/qwen3-14b/sent.yaml
#
# Every worker runs the same command; on TPU VMs jax.distributed.initialize() discovers the
# coordinator, process count and process id by itself (entrl calls it when ENTRL_DISTRIBUTED=1).
# The first time, it installs entrl from this repository on every worker (ENTRL_REPO / ENTRL_REF).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE [--project P] -- COMMAND..." >&2; exit 2
fi
TPU=$1; ZONE=$2; shift 2
PROJECT_ARGS=()
if [ "${1:-}" = "--project" ]; then PROJECT_ARGS=(--project "$2"); shift 2; fi
[ "${1:-}" = "--" ] && shift
CMD="$*"
REPO=${ENTRL_REPO:-https://github.com/entrl/entrl.git}
REF=${ENTRL_REF:-main}
SETUP="set -e; if [ ! -d ~/entrl ]; then git clone $REPO ~/entrl; fi; cd ~/entrl && git fetch -q && git checkout -q $REF && \
python3 -m venv ~/entrl-venv && . ~/entrl-venv/bin/activate && pip install -q -e . 'jax[tpu]'"
RUN="cd ~/entrl && . ~/entrl-venv/bin/activate && ENTRL_DISTRIBUTED=1 $CMD"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all --command "$SETUP && $RUN"
