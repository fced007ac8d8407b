"""Starts N local processes of a MaxText entry point, joined by jax.distributed over loopback.

  python3 -m MaxText.launch_local num_processes=2 devices_per_process=4 -- train MaxText/configs/base.yml steps=10

Each process gets `devices_per_process` CPU devices and the coordinator, process count and id through the
M_COORDINATOR_ADDRESS / M_NUM_PROCESSES / M_PROCESS_ID config overrides, exactly as a cluster launcher (SLURM,
a TPU VM's per-host command) would set them; collectives between processes use gloo. Output lines are
prefixed with the process index. Exits with the first non-zero child status; if one process fails, the others
are stopped after `grace_seconds`.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

USAGE = (
    "usage: python3 -m MaxText.launch_local [num_processes=N] [devices_per_process=K] [port=P] [grace_seconds=S]"
    " -- MODULE CONFIG key=value ..."
)
_OPTIONS = {"num_processes": 2, "devices_per_process": 1, "port": 0, "grace_seconds": 30}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def parse(argv: Sequence[str]) -> tuple[dict, list[str]]:
  if "--" not in argv:
    raise ValueError(f"missing '--' before the entry point\n{USAGE}")
  split = list(argv).index("--")
  options = dict(_OPTIONS)
  for arg in argv[:split]:
    key, eq, value = arg.partition("=")
    if not eq or key not in options:
      raise ValueError(f"unknown launcher option {arg!r} (known: {', '.join(options)})\n{USAGE}")
    try:
      options[key] = int(value)
    except ValueError:
      raise ValueError(f"{key}: expected an integer, got {value!r}") from None
  if options["num_processes"] < 1 or options["devices_per_process"] < 1:
    raise ValueError("num_processes and devices_per_process must be >= 1")
  command = list(argv[split + 1 :])
  if not command:
    raise ValueError(f"nothing to launch after '--'\n{USAGE}")
  module = command[0] if command[0].startswith("MaxText.") else f"MaxText.{command[0]}"
  return options, [module, *command[1:]]


def _pump(stream, prefix: str, out):
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()


def launch(options: dict, command: list[str]) -> int:
  port = options["port"] or _free_port()
  procs, threads = [], []
  for i in range(options["num_processes"]):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(options["devices_per_process"]),
        M_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        M_NUM_PROCESSES=str(options["num_processes"]),
        M_PROCESS_ID=str(i),
    )
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-u", "-m", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(stream, f"[p{i}] ", out), daemon=True)
      t.start()
      threads.append(t)

  def forward(signum, _frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  status, failed_at = 0, None
  while any(p.poll() is None for p in procs):
    codes = [p.poll() for p in procs]
    if failed_at is None and any(c not in (None, 0) for c in codes):
      failed_at = time.monotonic()
    if failed_at is not None and time.monotonic() - failed_at > options["grace_seconds"]:
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.1)
  for t in threads:
    t.join(timeout=5)
  for i, p in enumerate(procs):
    if p.returncode != 0:
      print(f"launch_local: process {i} exited with {p.returncode}", file=sys.stderr)
      status = status or (128 - p.returncode if p.returncode < 0 else p.returncode)
  return status


def main(argv: Sequence[str]):
  try:
    options, command = parse(argv[1:])
  except ValueError as e:
    print(f"CONFIG ERROR: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(launch(options, command))


if __name__ == "__main__":
  main(sys.argv)
