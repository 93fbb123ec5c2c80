#!/usr/bin/env bash
# Run entrl on one or more GPU hosts (one JAX process per host, all local GPUs per process).
#
# Single host (e.g. 8x H100):
#   launch/gpu_host.sh entrl train configs/paper/r1-distill-qwen-1.5b/sent.yaml
# Several hosts: run the same line on every host with
#   ENTRL_COORDINATOR=host0:12355 ENTRL_NUM_PROCESSES=2 ENTRL_PROCESS_ID=<0|1> launch/gpu_host.sh entrl train ...
set -euo pipefail
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
if [ -n "${ENTRL_COORDINATOR:-}" ]; then
  export ENTRL_DISTRIBUTED=1
fi
exec "$@"
