"""Runs N jaxlab processes on this machine joined by jax.distributed over 127.0.0.1.

    python launch/local_multiprocess.py -n 2 [--devices-per-process 2] -- jaxlab train --config ecg_cnn:tiny

Each process gets JAXLAB_COORDINATOR/NUM_PROCESSES/PROCESS_ID (read by jaxlab.train.distributed) and,
on CPU, its own fake devices. Output lines are prefixed with the process id; the exit code is the
first non-zero one.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num-processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=1, help="fake CPU devices per process")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- command to run in every process")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --")
    coordinator = f"127.0.0.1:{args.port or free_port()}"
    procs = []
    for pid in range(args.num_processes):
        env = dict(os.environ, JAXLAB_COORDINATOR=coordinator, JAXLAB_NUM_PROCESSES=str(args.num_processes),
                   JAXLAB_PROCESS_ID=str(pid), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))

    def relay(pid, proc):
        for line in proc.stdout:
            sys.stdout.write(f"[{pid}] {line}")

    threads = [threading.Thread(target=relay, args=(i, pr)) for i, pr in enumerate(procs)]
    for th in threads:
        th.start()
    codes = [pr.wait() for pr in procs]
    for th in threads:
        th.join()
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
