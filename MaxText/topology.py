"""TPU slices by the names MaxText's users book them under (v5e-256, v5p-1024, ...), for ahead-of-time compiles.

`compile_topology=NAME` makes every entry point build its mesh on the devices of that slice (times
`compile_topology_num_slices`) as the TPU compiler describes them, so the real TPU compiler sizes the step on a
machine without TPUs (libtpu from the package index is enough). The table below is data only; `devices` is the one
function that needs libtpu.

Names follow Cloud TPU's accelerator types: v4 and v5p count TensorCores (two per chip, one megacore device), v5e
(also `v5litepod-N`) and v6e count chips. Slice shapes are those the hardware is sold in: v5e/v6e 2D tori up to
16x16; v4/v5p the small 2x2x1..2x4x4 slices and every cuboid of 4x4x4 blocks that fits the pod, shaped as cubic as
the chip count allows.
"""

import dataclasses
import importlib.util
import itertools
import os
from typing import Optional

from MaxText.config.declare import ConfigError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # as in the slice names: v4, v5e, v5p, v6e
  device_kind: str  # jax.Device.device_kind the TPU compiler reports
  hbm_bytes: int  # per chip
  peak_bf16_tflops: float  # per chip, dense
  topology_prefix: str  # get_topology_desc's name prefix
  chip_config: str  # default | megacore
  cores_per_chip_in_name: int  # v4-8 is 4 chips: the name counts TensorCores


GENERATIONS = {
    "v4": Generation("v4", "TPU v4", 32 * GIB, 275.0, "v4", "megacore", 2),
    "v5e": Generation("v5e", "TPU v5 lite", 16 * GIB, 197.0, "v5e", "default", 1),
    "v5p": Generation("v5p", "TPU v5", 95 * GIB, 459.0, "v5", "megacore", 2),
    "v6e": Generation("v6e", "TPU v6 lite", 32 * GIB, 918.0, "v6e", "default", 1),
}
# Single-host slices keep all their chips on one host; larger ones are built from 2x2 hosts.
_SINGLE_HOST_BOUNDS = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}
_POD_BOUNDS = {"v4": (16, 16, 16), "v5p": (16, 20, 28)}  # sorted pod dimensions
_SMALL_3D = ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4))
_2D = ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))


@dataclasses.dataclass(frozen=True)
class Slice:
  """One bookable TPU slice."""

  name: str
  generation: Generation
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def chips(self) -> int:
    n = 1
    for d in self.shape:
      n *= d
    return n

  @property
  def topology_name(self) -> str:
    return f"{self.generation.topology_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    if self.generation.chip_config == "megacore" or self.chips > 8:
      return (2, 2, 1)
    return _SINGLE_HOST_BOUNDS[self.chips]


def _cuboids(bounds: tuple[int, int, int]) -> dict[int, tuple[int, int, int]]:
  """chip count -> the most cubic sorted shape of 4x4x4 blocks within the pod's sorted bounds."""
  best = {}
  for a, b, c in itertools.product(*(range(4, hi + 1, 4) for hi in bounds)):
    if not a <= b <= c:
      continue
    n = a * b * c
    if n not in best or c / a < best[n][2] / best[n][0]:
      best[n] = (a, b, c)
  return best


def _table() -> dict[str, Slice]:
  table = {}
  for gen_name in ("v5e", "v6e"):
    gen = GENERATIONS[gen_name]
    for shape in _2D:
      s = Slice(f"{gen_name}-{shape[0] * shape[1]}", gen, shape)
      table[s.name] = s
  for gen_name in ("v4", "v5p"):
    gen = GENERATIONS[gen_name]
    shapes = {a * b * c: (a, b, c) for a, b, c in _SMALL_3D}
    shapes.update(_cuboids(_POD_BOUNDS[gen_name]))
    for chips, shape in sorted(shapes.items()):
      s = Slice(f"{gen_name}-{chips * gen.cores_per_chip_in_name}", gen, shape)
      table[s.name] = s
  return table


SLICES = _table()
ALIASES = {f"v5litepod-{s.chips}": name for name, s in SLICES.items() if s.generation.name == "v5e"}


def names() -> list[str]:
  return list(SLICES) + list(ALIASES)


def lookup(name: str) -> Slice:
  """The slice called `name` (a compile_topology value); ConfigError listing the valid names otherwise."""
  found = SLICES.get(ALIASES.get(name, name))
  if found is None:
    by_gen = {}
    for s in SLICES.values():
      by_gen.setdefault(s.generation.name, []).append(s.name.split("-")[1])
    listing = "; ".join(f"{g}-{{{','.join(sizes)}}}" for g, sizes in by_gen.items())
    raise ConfigError(f"compile_topology: unknown TPU slice {name!r}; valid names: {listing} (v5litepod-N = v5e-N)")
  return found


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def require_libtpu():
  if not libtpu_installed():
    raise ConfigError(
        "compile_topology: compiling for a TPU slice needs the TPU compiler (libtpu), which is not installed: "
        "`DEVICE=tpu bash setup.sh` or `pip install \"jax[tpu]==$(python3 -c 'import jax; print(jax.__version__)')\"`"
    )


_DEVICES: dict[tuple[str, int], list] = {}


def devices(name: str, num_slices: int = 1) -> list:
  """The TPU compiler's devices for `num_slices` slices called `name` (multi-slice devices carry slice_index)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  s = lookup(name)
  key = (s.name, num_slices)
  if key not in _DEVICES:
    require_libtpu()
    # libtpu takes a host-wide lock file when it starts, so a second compiling process (parallel test workers, two
    # AOT runs) would abort; compile-only processes drive no chips, so sharing is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topo = topologies.get_topology_desc(
        topology_name=s.topology_name,
        platform="tpu",
        chip_config_name=s.generation.chip_config,
        chips_per_host_bounds=s.chips_per_host_bounds,
        num_slices=num_slices,
    )
    _DEVICES[key] = list(topo.devices)
  return _DEVICES[key]


def target(config) -> Optional[Slice]:
  """The slice a config compiles for, or None when it runs on the local devices."""
  return lookup(config.compile_topology) if config.compile_topology else None
