"""Hardware selection and multi-process start-up, done once before JAX touches a backend.

`setup` is the process side of an entry point's start-up (MaxText/startup.py calls it between pyconfig.resolve and
pyconfig.build); building a config alone never calls it. `detect_hardware` and `num_slices` are read by pyconfig.
"""

import ctypes
import glob
import importlib.metadata
import importlib.util
import logging
import os
import sys
import threading
from typing import Any

import jax

from MaxText.config_schema import ConfigError

logger = logging.getLogger("MaxText")

# JAX's own join deadline trails the configured timeout by this much, so the watchdog's message comes first.
JAX_DEADLINE_GRACE_SECONDS = 30

_PLATFORM = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}

# Environment variables by which JAX's own cluster detection (SLURM, Open MPI, TPU pods, ...) knows that
# several processes were launched. Used only to decide whether to call jax.distributed.initialize().
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _cluster_env_says_multiprocess() -> bool:
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for var in _CLUSTER_SIZE_VARS:
    try:
      if int(os.environ.get(var, "1")) > 1:
        return True
    except ValueError:
      pass
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def _backends_initialized() -> bool:
  # pylint: disable-next=protected-access
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  return xla_bridge.backends_are_initialized()


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_host_memory = {"reused": False}


def _accelerator_plugin_installed() -> bool:
  """Whether JAX could find a GPU/TPU backend here (a PJRT plugin or libtpu is installed); starts nothing."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return importlib.util.find_spec("jax_plugins") is not None


# Device nodes an accelerator driver creates: TPU v4 (accel), v5e/v5p/v6e (vfio), NVIDIA, AMD ROCm.
_ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def accelerator_present() -> bool:
  """Whether this host has a GPU/TPU that an installed plugin could drive; starts nothing.

  An installed plugin alone does not make a host an accelerator host: a CPU machine with libtpu (for ahead-of-time
  TPU compiles) runs on the CPU, and takes the CPU set-up (host memory reuse) like a machine without the plugin.
  """
  return _accelerator_plugin_installed() and any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def reuse_host_memory() -> bool:
  """Makes glibc malloc keep freed memory for reuse; True if applied (glibc only, once per process).

  XLA:CPU allocates a step's temporaries (GiBs for a small LM) afresh every step. glibc hands allocations that
  large to mmap, or to per-thread arenas that cannot hold them, and returns them to the kernel on free, so every
  step faults in and zero-fills the same GiBs again (llama-small: 1.75 M page faults and ~18% of the step). One
  arena, no mmap and no trimming make a step reuse the previous step's memory. The arena limit only binds threads
  that have not allocated yet, so this runs before JAX starts its thread pools. The process keeps its peak heap.
  """
  if _host_memory["reused"]:
    return True
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False  # not glibc (macOS, musl): nothing to tune
  # An int -1 becomes SIZE_MAX for the trim threshold: never give the top of the heap back.
  _host_memory["reused"] = all(
      mallopt(p, v) == 1 for p, v in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))
  )
  return _host_memory["reused"]


def reuse_host_memory_applied() -> bool:
  return _host_memory["reused"]


def setup(raw: dict[str, Any]) -> None:
  """Applies `hardware`, reuse_host_memory (CPU only) and starts jax.distributed when the config or the cluster
  asks for several processes; `raw` is pyconfig.resolve's coerced values.

  Must run before the first JAX computation; calling it again in the same process is a no-op for the parts
  that already happened (tests build many configs in one process).
  """
  hardware = raw["hardware"]
  if not _backends_initialized():
    if raw["compile_topology"]:
      # An ahead-of-time compile targets the TPU compiler's devices; the process itself runs on the host CPU.
      jax.config.update("jax_platforms", "cpu")
    elif hardware != "auto":
      jax.config.update("jax_platforms", _PLATFORM[hardware])
    elif not jax.config.jax_platforms and _accelerator_plugin_installed() and not accelerator_present():
      # A plugin without its hardware (libtpu on a CPU host): go straight to the CPU, without the plugin's failed
      # start-up and its warnings.
      jax.config.update("jax_platforms", "cpu")
  if raw["reuse_host_memory"] and not _backends_initialized():
    platforms = jax.config.jax_platforms or ""
    if hardware == "cpu" or platforms == "cpu" or (hardware == "auto" and not platforms and not accelerator_present()):
      reuse_host_memory()

  if raw["skip_jax_distributed_system"] or raw["num_processes"] == 1:
    return
  if jax.distributed.is_initialized():
    return
  explicit = bool(raw["coordinator_address"]) or raw["num_processes"] > 1
  if not explicit and not _cluster_env_says_multiprocess():
    return
  if _backends_initialized():
    raise ConfigError(
        "coordinator_address/num_processes: jax.distributed must start before any JAX computation, "
        "but a backend is already initialized in this process"
    )
  kwargs = {"initialization_timeout": raw["jax_distributed_initialization_timeout"]}
  if explicit:
    if not raw["coordinator_address"]:
      raise ConfigError("coordinator_address: required when num_processes > 1")
    if raw["process_id"] < 0 and raw["num_processes"] > 1:
      raise ConfigError("process_id: required (>= 0) when num_processes > 1")
    kwargs.update(
        coordinator_address=raw["coordinator_address"],
        num_processes=raw["num_processes"] or None,
        process_id=raw["process_id"] if raw["process_id"] >= 0 else None,
    )
  logger.info("Starting jax.distributed: %s", kwargs)
  _initialize_with_deadline(kwargs)


def _initialize_with_deadline(kwargs: dict[str, Any]):
  """jax.distributed.initialize, but a process that never joins gives a clear message instead of a C++ abort.

  JAX aborts the whole process (SIGABRT, a stack trace) when its deadline passes; a watchdog thread with the
  configured timeout speaks first and exits, and JAX's own deadline is set a little later.
  """
  timeout = kwargs["initialization_timeout"]
  where = kwargs.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS", "the cluster's coordinator")

  def give_up():
    print(
        f"ERROR: jax.distributed: not all {kwargs.get('num_processes') or ''} processes joined {where} within"
        f" {timeout} s (this is process {kwargs.get('process_id', '?')}). Start every process with the same"
        " coordinator_address and num_processes and a distinct process_id in 0..num_processes-1, or raise"
        " jax_distributed_initialization_timeout.",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)  # pylint: disable=protected-access

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**{**kwargs, "initialization_timeout": timeout + JAX_DEADLINE_GRACE_SECONDS})
  finally:
    watchdog.cancel()


def detect_hardware(requested: str) -> str:
  """Returns cpu|gpu|tpu for the default backend, checking it against a forced `hardware`."""
  try:
    backend = jax.default_backend()
  except (RuntimeError, AssertionError) as e:  # jax asserts when a forced platform has no plugin installed
    reason = str(e) or f"{type(e).__name__} while starting the backend"
    raise ConfigError(f"hardware: JAX cannot start the {requested!r} backend on this machine ({reason})") from None
  found = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu"}.get(backend, backend)
  if requested not in ("auto", found):
    raise ConfigError(f"hardware: asked for {requested!r} but JAX's backend is {found!r}")
  return found


def num_slices(requested: int) -> int:
  """Slices (TPU) or processes (elsewhere) that form the dcn_* mesh dimension."""
  devices = jax.devices()
  if hasattr(devices[0], "slice_index"):
    found, unit = max(d.slice_index for d in devices) + 1, "slices"
  else:
    found, unit = jax.process_count(), "processes"
  # The hybrid mesh builder groups devices by slice (or process), so another count cannot be laid out.
  if requested > 0 and requested != found:
    raise ConfigError(f"num_slices: {requested} requested, but the devices form {found} {unit} (use -1 to detect)")
  return found
