#!/usr/bin/env bash
# Run entrl on GPU hosts: one JAX process per host, using all of that host's GPUs.
#
#   launch/gpu_host.sh COMMAND...
#
# One host (e.g. 8x H100):
#   launch/gpu_host.sh entrl train configs/paper/r1-distill-qwen-1.5b/sent.yaml mesh.data=2 mesh.fsdp=4
# Several hosts: the same line on every host, ENTRL_PROCESS_ID = 0 .. N-1 (host 0 runs the coordinator):
#   ENTRL_COORDINATOR=host0:12355 ENTRL_NUM_PROCESSES=2 ENTRL_PROCESS_ID=0 launch/gpu_host.sh entrl train ...
# SLURM: one task per node; JAX reads the coordinator, process count and id from SLURM_* itself:
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_host.sh entrl train ...
#
# The command runs exactly as given (exec "$@"); its output also goes, appended after a header line,
# to $ENTRL_LOG_DIR/process_<id>.log (default launch_logs/; <id> is the process id, 0 on one host),
# and the exit code is the command's (`entrl train` stopped by SIGTERM exits 143 after a checkpoint).
# A multi-host setting that is half there (ENTRL_NUM_PROCESSES without ENTRL_COORDINATOR, a process id
# out of range, ENTRL_DISTRIBUTED=1 alone where JAX cannot find the cluster itself, several SLURM tasks
# per node) is refused with one line and exit 2, before anything starts.
#
# Environment set here unless already set:
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.92   JAX preallocates 92% of each GPU (its default is 75%); lower
#                                         it if NCCL or cuDNN run out of memory
#   XLA_FLAGS += --xla_gpu_enable_latency_hiding_scheduler=true
#                                         overlap collectives with compute (what NVIDIA's JAX images set);
#                                         not added when XLA_FLAGS already names the flag
#   JAX_LOCAL_DEVICE_IDS=0,...,n-1        every visible GPU, in a multi-process run: under SLURM (or Open
#                                         MPI) JAX would otherwise give each process only the GPU of its
#                                         local rank (SLURM_LOCALID), i.e. one GPU per host
#   ENTRL_DISTRIBUTED=1                   when the run spans processes (entrl then calls
#                                         jax.distributed.initialize, with ENTRL_* or JAX's detection)
set -euo pipefail

fail() { printf 'gpu_host.sh: %s\n' "$1" >&2; exit 2; }

case ${1-} in -h | --help) sed -n '2,/^set -euo pipefail$/{/^set /d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;; esac
[ $# -gt 0 ] || fail "missing COMMAND; usage: launch/gpu_host.sh COMMAND... (e.g. launch/gpu_host.sh entrl train CONFIG)"
if [ "$1" = -- ]; then shift; [ $# -gt 0 ] || fail "missing COMMAND after --"; fi

set_vars=() unset_vars=()
for v in ENTRL_COORDINATOR ENTRL_NUM_PROCESSES ENTRL_PROCESS_ID; do
  if [ -n "${!v-}" ]; then set_vars+=("$v"); else unset_vars+=("$v"); fi
done
multi=0 id=0
if [ ${#set_vars[@]} = 3 ]; then
  [[ $ENTRL_NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || fail "ENTRL_NUM_PROCESSES=$ENTRL_NUM_PROCESSES is not a positive integer"
  [[ $ENTRL_PROCESS_ID =~ ^[0-9]+$ ]] && [ "$ENTRL_PROCESS_ID" -lt "$ENTRL_NUM_PROCESSES" ] ||
    fail "ENTRL_PROCESS_ID=$ENTRL_PROCESS_ID must be one of 0..$((ENTRL_NUM_PROCESSES - 1)) (ENTRL_NUM_PROCESSES=$ENTRL_NUM_PROCESSES)"
  [[ $ENTRL_COORDINATOR =~ ^[^:]+:[0-9]+$ || $ENTRL_COORDINATOR =~ ^\[.+\]:[0-9]+$ ]] ||
    fail "ENTRL_COORDINATOR=$ENTRL_COORDINATOR is not HOST:PORT (host of process 0, a free port)"
  multi=1 id=$ENTRL_PROCESS_ID
elif [ ${#set_vars[@]} -gt 0 ]; then
  fail "${set_vars[*]} set but not ${unset_vars[*]}: a multi-host run needs ENTRL_COORDINATOR, ENTRL_NUM_PROCESSES and ENTRL_PROCESS_ID on every host (or none: one host, or SLURM)"
elif [ -n "${SLURM_STEP_NUM_TASKS-}" ] && [ "${SLURM_STEP_NUM_TASKS}" -gt 1 ]; then
  # srun started several tasks: JAX's SLURM detection (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
  # SLURM_PROCID, SLURM_LOCALID) finds the coordinator (first node; port from the job id, or
  # JAX_COORDINATOR_PORT), the process count and this process's id.
  [ "$SLURM_STEP_NUM_TASKS" = "${SLURM_STEP_NUM_NODES-}" ] ||
    fail "srun started $SLURM_STEP_NUM_TASKS tasks on ${SLURM_STEP_NUM_NODES-?} nodes: gpu_host.sh runs one process per node with all its GPUs (srun --ntasks-per-node=1)"
  multi=1 id=${SLURM_PROCID:-0}
elif [ "${ENTRL_DISTRIBUTED-}" = 1 ]; then
  # Set by hand without ENTRL_*: only where JAX can read the cluster itself (mpirun of Open MPI 4,
  # Kubernetes with jax[k8s]); elsewhere jax.distributed.initialize() would stop with a traceback.
  [ -n "${OMPI_MCA_orte_hnp_uri-}${KUBERNETES_SERVICE_HOST-}" ] ||
    fail "ENTRL_DISTRIBUTED=1 without ENTRL_COORDINATOR, ENTRL_NUM_PROCESSES and ENTRL_PROCESS_ID: set all three (or run under srun)"
  multi=1 id=${OMPI_COMM_WORLD_RANK:-0}
fi

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
case " ${XLA_FLAGS-} " in
  *xla_gpu_enable_latency_hiding_scheduler*) ;;
  *) export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true" ;;
esac
if [ "$multi" = 1 ]; then
  export ENTRL_DISTRIBUTED=1
  if [ -z "${JAX_LOCAL_DEVICE_IDS-}" ]; then
    gpus=""
    if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
      IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
      gpus=${#visible[@]}
    elif command -v nvidia-smi > /dev/null; then
      gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)
    fi
    if [ -n "$gpus" ] && [ "$gpus" -gt 0 ]; then
      JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
      export JAX_LOCAL_DEVICE_IDS
    else
      echo "gpu_host.sh: warning: cannot count this host's GPUs; set JAX_LOCAL_DEVICE_IDS=0,1,... if a process sees one GPU" >&2
    fi
  fi
fi

log_dir=${ENTRL_LOG_DIR:-launch_logs}
mkdir -p "$log_dir"
log=$log_dir/process_$id.log
printf '=== %s %s process %s:%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(hostname)" "$id" "$(printf ' %q' "$@")" >> "$log"
# tee ignores the signals meant for the command (SLURM and Ctrl-C signal the whole process group) and
# keeps writing the file if the terminal goes away (-p), so the log holds everything up to the exit.
exec > >(trap '' INT TERM HUP; exec tee -a -p "$log") 2>&1
exec "$@"
