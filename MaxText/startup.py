"""Start-up shared by the entry points: the config, with the process set-up its values ask for, in the right order.

    config = startup.start(argv, "train")

0. storage.configure: STORAGE_EMULATOR_HOST (a GCS emulator) implies every storage client's test settings; set
   before gcsfs is imported, since it reads some of them at import.
1. pyconfig.resolve: the yml chain, model yml, M_<KEY> env and key=value arguments, coerced (JAX untouched).
2. distributed.setup: `hardware` picks the JAX platform, glibc keeps freed host memory (reuse_host_memory, CPU only),
   and jax.distributed starts when several processes are asked for; all of it must happen before a JAX backend
   starts, which is why it cannot wait for the devices to be counted.
3. pyconfig.build: the device-dependent values (devices, processes, slices, mesh, batch, backend ops) and every
   cross-key check, then the frozen Config.
4. use_compile_cache: JAX's persistent compilation cache in jax_cache_dir, before anything compiles (JAX decides at
   a process's first compile whether it uses a cache at all); not for compile_topology, whose executables for a
   TPU slice this host lacks cannot be loaded back.

A ConfigError at any step is one `CONFIG ERROR:` line on stderr and exit code 2. pyconfig.initialize (tests, Python
callers) does steps 1 and 3 only.
"""

import logging
import os
from typing import Optional, Sequence

import jax

from MaxText import distributed, pyconfig, storage
from MaxText.config.declare import ConfigError


def start(argv: Sequence[str], program: Optional[str] = None, **overrides) -> pyconfig.Config:
  """The Config for an entry point's argv, after the process set-up; exits 2 on a ConfigError."""
  storage.configure()
  try:
    values = pyconfig.resolve(argv, **overrides)
    distributed.setup(values)
    config = pyconfig.build(values, program)
    use_compile_cache(config)
    return config
  except ConfigError as e:
    pyconfig.exit_with_config_error(e)


def use_compile_cache(config) -> None:
  """Points JAX's persistent compilation cache at the config's jax_cache_dir; "" leaves JAX's own setting (e.g.
  JAX_COMPILATION_CACHE_DIR) as it is. Raises ConfigError for a directory that cannot be created or written."""
  if not config.jax_cache_dir:
    return
  if config.compile_topology:
    # JAX cannot load an executable back without a client for its devices, here a TPU slice this host lacks.
    logging.getLogger("MaxText").warning("jax_cache_dir: not used when compiling for compile_topology")
    return
  directory = os.path.abspath(os.path.expanduser(config.jax_cache_dir))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"jax_cache_dir: cannot create {directory}: {e.strerror}") from None
  if not os.access(directory, os.W_OK | os.X_OK):
    raise ConfigError(f"jax_cache_dir: {directory} is not writable")
  jax.config.update("jax_compilation_cache_dir", directory)
