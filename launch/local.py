"""Start N CPU processes on this machine that form one JAX cluster (tests the multi-host path).

    python launch/local.py --num-processes 2 -- entrl train configs/demo.yaml train.steps=2

Each child gets ENTRL_DISTRIBUTED=1, ENTRL_COORDINATOR, ENTRL_NUM_PROCESSES and ENTRL_PROCESS_ID;
entrl calls `jax.distributed.initialize` with them before touching a device. Output of process i
goes to <log-dir>/process_i.log; the exit code is the first non-zero child exit code.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], num_processes: int, *, devices_per_process: int = 1, log_dir: str = "launch_logs",
          env: dict | None = None) -> list[tuple[subprocess.Popen, object]]:
    """Start the processes of one cluster; returns (process, its open log file) pairs."""
    port = free_port()
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(num_processes):
        child_env = dict(os.environ if env is None else env)
        # Keep the caller's other XLA flags; the device count is this launcher's.
        flags = [f for f in child_env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        child_env.update({
            "ENTRL_DISTRIBUTED": "1",
            "ENTRL_COORDINATOR": f"127.0.0.1:{port}",
            "ENTRL_NUM_PROCESSES": str(num_processes),
            "ENTRL_PROCESS_ID": str(i),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
        })
        out = open(Path(log_dir) / f"process_{i}.log", "w")
        procs.append((subprocess.Popen(cmd, env=child_env, stdout=out, stderr=subprocess.STDOUT), out))
    return procs


def launch(cmd: list[str], num_processes: int, *, devices_per_process: int = 1, log_dir: str = "launch_logs",
           timeout: float | None = None, env: dict | None = None) -> int:
    """Run `cmd` as `num_processes` processes of one cluster; the first non-zero exit code, else 0."""
    procs = start(cmd, num_processes, devices_per_process=devices_per_process, log_dir=log_dir, env=env)
    code = 0
    try:
        for p, out in procs:
            rc = p.wait(timeout=timeout)
            out.close()
            code = code or rc
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    return code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=1)
    ap.add_argument("--log-dir", default="launch_logs")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("give the command to run after --")
    return launch(cmd, a.num_processes, devices_per_process=a.devices_per_process, log_dir=a.log_dir)


if __name__ == "__main__":
    sys.exit(main())
