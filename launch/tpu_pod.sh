#!/usr/bin/env bash
# Run entrl on every worker of a Cloud TPU VM slice: one JAX process per worker (multi-controller).
#
#   launch/tpu_pod.sh setup TPU ZONE [--project P]                  install entrl on every worker (once per ref)
#   launch/tpu_pod.sh run   TPU ZONE [--project P] [--name NAME] [--detach] -- COMMAND...
#                                                                    run COMMAND on every worker, one log per worker
#   launch/tpu_pod.sh logs  TPU ZONE [--project P] [NAME [WORKER]]  follow NAME's log on WORKER (default 0);
#                                                                    without NAME, list the runs on worker 0
#   launch/tpu_pod.sh stop  TPU ZONE [--project P] NAME             SIGTERM the run on every worker
#   launch/tpu_pod.sh       TPU ZONE [--project P] [...] -- COMMAND...   setup, then run (one step)
#
# Example:
#   launch/tpu_pod.sh setup my-v5p-32 us-east5-a
#   launch/tpu_pod.sh run my-v5p-32 us-east5-a --name sent -- entrl train configs/paper/qwen3-14b/sent.yaml \
#       data.train=gs://my-bucket/data/dapo17k_se_q3.jsonl train.out_dir=gs://my-bucket/runs/q3-sent
#
# setup (on every worker): clones ENTRL_REPO into ~/entrl (or fetches it again), checks out ENTRL_REF
# detached at the fetched commit, creates the venv ~/entrl-venv with a Python >= 3.11 (on a TPU VM image
# without one it installs python3.11 with apt), and pip-installs entrl (with its gcs extra) and jax[tpu].
# Each worker prints the commit it checked out: they must all agree. Rerun it after changing ENTRL_REF.
#
# run (on every worker): from ~/entrl with the venv first on PATH and ENTRL_DISTRIBUTED=1, so entrl
# calls jax.distributed.initialize() and JAX reads the coordinator, process count and process id from
# the TPU VM metadata. COMMAND reaches every worker exactly as you typed it: each argument is quoted for
# the remote shell, so overrides with spaces or quotes (data.prompt_suffix='Think step by step.') survive
# (and are never run by a shell: set a variable with `-- env LIBTPU_INIT_ARGS=... entrl train ...`).
# Every worker writes its output to ~/entrl-logs/NAME/worker-<i>.log (appended, with a header line and a
# closing `=== exit CODE` line); worker 0 also streams its output here. NAME defaults to run-<UTC time>.
# The exit code is gcloud's; a worker whose command fails prints `worker <i>: exit CODE` and the end of
# its log. With --detach the command keeps running after this script returns (follow it with logs).
# Whether Ctrl-C here stops the workers depends on your ssh session: use stop, which sends SIGTERM to
# the command on every worker (`entrl train` then writes a checkpoint and exits 143; rerun to resume).
# Every worker reads data.train and writes to train.out_dir: use gs:// paths (or a shared filesystem).
#
# Fetch a log:  gcloud compute tpus tpu-vm scp TPU:entrl-logs/NAME/worker-3.log . --worker=3 --zone=ZONE
#
# Environment:
#   ENTRL_REPO        git URL of entrl to install (default: this checkout's `origin` remote)
#   ENTRL_REF         branch, tag or commit to check out (default: main)
#   ENTRL_PYTHON      interpreter for the venv on the workers (default: the first Python >= 3.11 found)
#   ENTRL_PIP         extra pip requirements, space-separated (default: jax[tpu])
#   ENTRL_REMOTE_DIR, ENTRL_VENV, ENTRL_LOG_DIR   checkout, venv and log directory on each worker
#                     (default: entrl, entrl-venv, entrl-logs; relative to the worker's home)
#   ENTRL_SSH_FLAGS   extra flags for `gcloud compute tpus tpu-vm ssh`, e.g. --internal-ip
#   CLOUDSDK_CORE_PROJECT   the project when --project is not given (gcloud's own default otherwise)
#
# One slice only. On GKE (and for multislice), use xpk instead: README, "Launching on TPU pods and GPU hosts".
set -euo pipefail

USAGE="usage: launch/tpu_pod.sh {setup|run|logs|stop} TPU ZONE [--project P] [--name NAME] [--detach] [-- COMMAND...] (--help for more)"

die() { printf 'tpu_pod.sh: %s; %s\n' "$1" "$USAGE" >&2; exit 2; }

# One word for any POSIX shell, whatever bytes it holds: single quotes, each ' written as '\''. (The
# replacement comes from a variable: bash before 4.3 keeps the quotes of a literal one inside "...".)
shquote() { local q="'\\''"; printf "'%s'" "${1//\'/$q}"; }

quote_words() {
  local out="" a
  for a in "$@"; do out+="$(shquote "$a") "; done
  printf '%s' "${out% }"
}

case ${1-} in
  -h | --help) sed -n '2,/^set -euo pipefail$/{/^set /d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
  setup | run | logs | stop) sub=$1; shift ;;
  "") die "missing subcommand" ;;
  -*) die "unknown option $1" ;;
  *) sub=oneshot ;;
esac
{ [ $# -ge 1 ] && [[ $1 != -* ]]; } || die "missing TPU name"
tpu=$1; shift
{ [ $# -ge 1 ] && [[ $1 != -* ]]; } || die "missing ZONE"
zone=$1; shift

project=${CLOUDSDK_CORE_PROJECT-}
name="run-$(date -u +%Y%m%d-%H%M%S)"
detach=0
positional=()
cmd=()
have_cmd=0
while [ $# -gt 0 ]; do
  case $1 in
    --project) [ $# -ge 2 ] || die "--project needs a value"; project=$2; shift 2 ;;
    --project=*) project=${1#*=}; shift ;;
    --name) [ $# -ge 2 ] || die "--name needs a value"; name=$2; shift 2 ;;
    --name=*) name=${1#*=}; shift ;;
    --detach) detach=1; shift ;;
    --) shift; cmd=("$@"); have_cmd=1; break ;;
    -*) die "unknown option $1" ;;
    *) positional+=("$1"); shift ;;
  esac
done

case $sub in
  setup)
    [ ${#positional[@]} -eq 0 ] && [ $have_cmd = 0 ] || die "setup takes no command" ;;
  run | oneshot)
    [ ${#positional[@]} -eq 0 ] || die "unexpected '${positional[0]}': put the command after --"
    [ ${#cmd[@]} -gt 0 ] || die "missing COMMAND after --" ;;
  logs)
    [ ${#positional[@]} -le 2 ] && [ $have_cmd = 0 ] || die "logs takes [NAME [WORKER]]"
    if [ ${#positional[@]} -ge 1 ]; then name=${positional[0]}; fi ;;
  stop)
    [ ${#positional[@]} -eq 1 ] && [ $have_cmd = 0 ] || die "stop takes the run's NAME"
    name=${positional[0]} ;;
esac
[[ $name =~ ^[A-Za-z0-9._-]+$ ]] || die "--name '$name' may only hold letters, digits, '.', '_' and '-'"
log_worker=0
if [ "$sub" = logs ] && [ ${#positional[@]} -eq 2 ]; then
  log_worker=${positional[1]}
  [[ $log_worker =~ ^[0-9]+$ ]] || die "WORKER must be a number, got '$log_worker'"
fi
command -v gcloud > /dev/null || { echo "tpu_pod.sh: gcloud not found: install the Google Cloud CLI" >&2; exit 2; }

remote_dir=${ENTRL_REMOTE_DIR:-entrl}
venv=${ENTRL_VENV:-entrl-venv}
log_dir=${ENTRL_LOG_DIR:-entrl-logs}
read -ra pip_extra <<< "${ENTRL_PIP-jax[tpu]}"
read -ra ssh_flags <<< "${ENTRL_SSH_FLAGS-}"
gcloud_flags=(--zone="$zone")
if [ -n "$project" ]; then gcloud_flags+=(--project="$project"); fi
gcloud_flags+=(${ssh_flags[@]+"${ssh_flags[@]}"})
shown_log_dir=$log_dir
# shellcheck disable=SC2088  # the worker's home, shown to the user, not expanded here
[[ $log_dir == /* ]] || shown_log_dir="~/$log_dir"

# The remote scripts run under bash on each worker: a prelude of quoted values, then a fixed body.
prelude() {
  printf 'dir=%s venv=%s log_dir=%s name=%s\n' "$(shquote "$remote_dir")" "$(shquote "$venv")" \
    "$(shquote "$log_dir")" "$(shquote "$name")"
  cat << 'EOF'
# The worker's index in the slice: GKE sets TPU_WORKER_ID, a TPU VM has it in its metadata.
w=${TPU_WORKER_ID:-$(curl -sf --noproxy '*' -m 5 -H 'Metadata-Flavor: Google' \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2> /dev/null || hostname)}
say() { printf 'worker %s: %s\n' "$w" "$*"; }
fail() { printf 'worker %s: %s\n' "$w" "$*" >&2; exit 2; }
for v in dir venv log_dir; do [[ ${!v} == /* ]] || printf -v "$v" '%s/%s' "$HOME" "${!v}"; done
EOF
}

setup_script() {
  prelude
  printf 'repo=%s ref=%s py=%s\npip_extra=(%s)\n' "$(shquote "$repo")" "$(shquote "$ref")" \
    "$(shquote "${ENTRL_PYTHON-}")" "$(quote_words ${pip_extra[@]+"${pip_extra[@]}"})"
  cat << 'EOF'
set -euo pipefail
command -v git > /dev/null || fail "git is not installed"
if [ -d "$dir/.git" ]; then git -C "$dir" remote set-url origin "$repo"; else git clone -q "$repo" "$dir"; fi
cd "$dir"
# Detached at the fetched commit, so a rerun after a push updates a branch too (a plain checkout would not).
if git fetch -q origin "$ref" 2> /dev/null; then git checkout -q --detach FETCH_HEAD
else git fetch -q --tags origin && git checkout -q --detach "$ref"; fi
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null; }
if [ -n "$py" ]; then
  py_ok "$py" || fail "ENTRL_PYTHON=$py is not a Python >= 3.11"
else
  for c in python3.13 python3.12 python3.11 python3; do
    if command -v "$c" > /dev/null && py_ok "$c"; then py=$c; break; fi
  done
fi
if [ -z "$py" ] && command -v apt-get > /dev/null && sudo -n true 2> /dev/null; then
  say "no Python >= 3.11 here (TPU VM images ship 3.10): installing python3.11 with apt"
  sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 update
  sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 install -y \
    python3.11 python3.11-venv > /dev/null
  py=python3.11
fi
[ -n "$py" ] || fail "entrl needs Python >= 3.11 and none was found: install one or set ENTRL_PYTHON"
if [ -x "$venv/bin/python" ] && ! py_ok "$venv/bin/python"; then
  say "replacing $venv: its Python is older than 3.11"; rm -rf "$venv"
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q -e "${dir}[gcs]" "${pip_extra[@]}"
say "entrl $(git rev-parse --short HEAD) ($ref) in $venv, $("$venv/bin/python" -c \
  'import importlib.metadata as m; print("jax", m.version("jax"))' 2> /dev/null || echo "jax missing")"
EOF
}

run_script() {
  prelude
  printf 'detach=%s\ncmd=(%s)\nshown=%s\n' "$detach" "$(quote_words "${cmd[@]}")" "$(shquote "$(quote_words "${cmd[@]}")")"
  cat << 'EOF'
set -uo pipefail
{ [ -x "$venv/bin/python" ] && [ -d "$dir" ]; } || fail "entrl is not set up in $venv: run launch/tpu_pod.sh setup first"
cd "$dir" || fail "cannot enter $dir"
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" ENTRL_DISTRIBUTED=1
mkdir -p "$log_dir/$name"
log=$log_dir/$name/worker-$w.log pid_file=$log_dir/$name/worker-$w.pid
if [ -e "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2> /dev/null; then
  fail "run $name is still running here (pid $(cat "$pid_file")): stop it or pick another --name"
fi
printf '=== %s %s worker %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$w" "$shown" >> "$log"
launch() {
  # The command runs in the background so its pid can be recorded for `stop`; worker 0 tees its output
  # here. tee ignores the signals meant for the command and survives a closed ssh session (-p), so the
  # log keeps everything the command prints until it exits.
  if [ "$detach" = 0 ] && [ "$w" = 0 ]; then
    { "${cmd[@]}" < /dev/null 2>&1 & echo $! > "$pid_file"; wait $!; } |
      (trap '' INT TERM HUP; exec tee -a -p "$log")
    rc=${PIPESTATUS[0]}
  else
    "${cmd[@]}" < /dev/null >> "$log" 2>&1 &
    echo $! > "$pid_file"; wait $!; rc=$?
  fi
  rm -f "$pid_file"
  printf '=== exit %s %s\n' "$rc" "$(date -u +%FT%TZ)" >> "$log"
  return "$rc"
}
if [ "$detach" = 1 ]; then
  (trap '' HUP; launch) < /dev/null > /dev/null 2>&1 &
  say "started in the background, log $log"
  exit 0
fi
launch; rc=$?
if [ "$rc" != 0 ] && [ "$w" = 0 ]; then say "exit $rc, log $log" >&2
elif [ "$rc" != 0 ]; then say "exit $rc; the end of $log:" >&2; tail -n 20 "$log" >&2; fi
exit "$rc"
EOF
}

logs_script() {
  prelude
  if [ ${#positional[@]} -eq 0 ]; then
    cat << 'EOF'
ls -t "$log_dir" 2> /dev/null || say "no runs in $log_dir"
EOF
  else
    cat << 'EOF'
set -- "$log_dir/$name"/worker-*.log
[ -e "$1" ] || fail "no log of run $name in $log_dir"
exec tail -n 100 -F "$@"
EOF
  fi
}

stop_script() {
  prelude
  cat << 'EOF'
for f in "$log_dir/$name"/worker-*.pid; do
  if [ -e "$f" ] && kill -TERM "$(cat "$f")" 2> /dev/null; then say "sent SIGTERM to $name (pid $(cat "$f"))"
  else say "$name is not running here"; fi
done
EOF
}

on_workers() {  # WORKER SCRIPT
  gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" --worker="$1" --command="bash -c $(shquote "$2")"
}

if [ "$sub" = setup ] || [ "$sub" = oneshot ]; then
  repo=${ENTRL_REPO:-$(git -C "$(dirname "$0")" remote get-url origin 2> /dev/null || true)}
  if [ -z "$repo" ]; then
    echo "tpu_pod.sh: set ENTRL_REPO to the git URL of entrl to install on the workers (this checkout has no origin)" >&2
    exit 2
  fi
  ref=${ENTRL_REF:-main}
  echo "tpu_pod.sh: installing entrl $ref from $repo on every worker of $tpu" >&2
  on_workers all "$(setup_script)"
fi
case $sub in
  run | oneshot)
    {
      echo "tpu_pod.sh: run $name on every worker of $tpu; each logs to $shown_log_dir/$name/worker-<i>.log"
      echo "  follow a worker: launch/tpu_pod.sh logs $tpu $zone $name [WORKER]"
      echo "  stop the run:    launch/tpu_pod.sh stop $tpu $zone $name"
    } >&2
    on_workers all "$(run_script)" ;;
  logs) on_workers "$log_worker" "$(logs_script)" ;;
  stop) on_workers all "$(stop_script)" ;;
esac
