"""What a compiled step costs each device: memory against the chip's HBM, FLOPs, and the bytes its collectives move.

Read from the compiler's own output (memory_analysis, cost_analysis and the optimized HLO text), so a sharding
mistake shows up before a launch: weights left replicated (large arguments), a full all-gather per layer (large
all-gather bytes), a missing reduce-scatter (all-reduce where FSDP expects reduce-scatter).

Collective bytes are per device per step, for ring algorithms over each op's replica group of size g:
all-gather sends (g-1)/g of its result, reduce-scatter (g-1)/g of its input, all-reduce twice that of its
operand, all-to-all (g-1)/g of its operand, collective-permute its whole operand. Ops inside loops (the scanned
layers, gradient accumulation) count once per trip.
"""

import dataclasses
import re
from typing import Optional

GIB = 2**30
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_CALLEE = re.compile(r"\b(calls|body|condition|true_computation|false_computation)=%([^\s,)]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONSTANT = re.compile(r"%(\S+) = s32\[\]\S* constant\((\d+)\)")
_COMPARE_LT = re.compile(r"compare\(%(\S+), %(\S+)\), direction=LT")


def _array_bytes(type_text: str) -> list[float]:
  """Bytes of each array in an HLO type (one for an array, several for a tuple)."""
  sizes = []
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    sizes.append(n * _DTYPE_BYTES[dtype])
  return sizes


def _split_type(rest: str) -> tuple[str, str]:
  """`TYPE opcode(...)...` -> (TYPE, remainder starting at the opcode); TYPE may be a parenthesised tuple."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _group_size(attrs: str) -> int:
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs)  # mesh['a'=4,'b'=2] {'a'}: over axis a
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    n = 1
    for axis in re.findall(r"'([^']+)'", m.group(2)):
      n *= int(sizes.get(axis, 1))
    return n
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  return 0  # no groups given: every device (filled in by the caller)


@dataclasses.dataclass
class _Computation:
  lines: list
  callees: list  # (name, multiplier)


def _parse(hlo: str) -> tuple[dict[str, _Computation], Optional[str]]:
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = _Computation([], [])
      comps[m.group(2)] = current
      if m.group(1):
        entry = m.group(2)
      continue
    if current is None or line.startswith("}"):
      current = None if line.startswith("}") else current
      continue
    current.lines.append(line)
  return comps, entry


def _trip_count(cond: _Computation) -> int:
  """Trip count of a `while` from its condition `counter < constant` (scan's form); 1 if it cannot be read."""
  constants = {}
  for line in cond.lines:
    m = _CONSTANT.search(line)
    if m:
      constants[m.group(1)] = int(m.group(2))
  for line in cond.lines:
    m = _COMPARE_LT.search(line)
    if m and m.group(2) in constants:
      return constants[m.group(2)]
  return 1


def _multiplicities(comps: dict[str, _Computation], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of the entry computation."""
  edges = {}
  for name, comp in comps.items():
    out = []
    for line in comp.lines:
      callees = dict((k, v) for k, v in _CALLEE.findall(line))
      if "body" in callees and "condition" in callees:
        trips = _trip_count(comps[callees["condition"]]) if callees["condition"] in comps else 1
        out += [(callees["body"], trips), (callees["condition"], trips + 1)]
      else:
        out += [(callee, 1) for key, callee in callees.items() if key != "body"]
      m = _BRANCHES.search(line)
      if m:
        out += [(b.strip().lstrip("%"), 1) for b in m.group(1).split(",")]
    edges[name] = [(c, k) for c, k in out if c in comps]
  counts = {entry: 1}
  order, seen = [], set()

  def visit(name):  # topological order (callers before callees)
    if name in seen:
      return
    seen.add(name)
    for callee, _ in edges.get(name, ()):
      visit(callee)
    order.append(name)

  visit(entry)
  for name in reversed(order):
    for callee, k in edges.get(name, ()):
      counts[callee] = counts.get(callee, 0) + counts.get(name, 0) * k
  return counts


def _all_reduce_kind(result: str, rest: str, computation: str, comp: _Computation) -> str:
  """What an all-reduce implements: the TPU compiler lowers some all-gathers as an all-reduce of each device's
  shard placed into zeros (a dynamic-update-slice), and reduce-scatters as an all-reduce whose result each device
  slices (fused as `all-reduce-scatter`, or followed by a dynamic-slice)."""
  operand = rest.split("(", 1)[1].lstrip("%") if "(" in rest else ""
  if operand.startswith(("dynamic-update-slice", "dynamic-slice_dynamic-update-slice", "constant_dynamic-update")):
    return "all-gather"
  if computation.startswith("all-reduce-scatter"):
    return "reduce-scatter"
  sliced = re.compile(rf"= \S+ (dynamic-slice|fusion)\(%{re.escape(result)}[,)]")
  for line in comp.lines:
    found = sliced.search(line)
    if found and (found.group(1) == "dynamic-slice" or "dynamic-slice" in line.split("=", 1)[0]):
      return "reduce-scatter"
  return "all-reduce"


def collective_bytes(hlo: str, num_devices: int) -> dict[str, dict[str, float]]:
  """{kind: {"bytes": per device per step, "ops": executions per step}} from optimized HLO text."""
  comps, entry = _parse(hlo)
  out = {kind: {"bytes": 0.0, "ops": 0} for kind in COLLECTIVES}
  if entry is None:
    return out
  counts = _multiplicities(comps, entry)
  for name, comp in comps.items():
    times = counts.get(name, 0)
    if not times:
      continue
    for line in comp.lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      type_text, rest = _split_type(m.group(2))
      opcode = rest.split("(", 1)[0]
      base = opcode.removesuffix("-start")
      if base not in COLLECTIVES or opcode.endswith("-done"):
        continue
      sizes = _array_bytes(type_text)
      if not sizes:
        continue
      if opcode == "all-gather-start":
        size = sum(sizes[len(sizes) // 2 :])  # (operands..., results...)
      elif opcode == "collective-permute-start":
        size = sizes[1] if len(sizes) > 1 else sizes[0]  # (operand, result, contexts...)
      else:
        size = sum(sizes)
      g = _group_size(rest) or num_devices
      kind = base
      if base == "all-reduce":
        kind = _all_reduce_kind(m.group(1), rest, name, comp)
      if kind == "collective-permute":
        moved = size
      elif g <= 1:
        moved = 0.0
      elif kind == "all-reduce":
        moved = 2 * size * (g - 1) / g
      elif kind == "reduce-scatter" and base == "reduce-scatter":
        moved = size * (g - 1)  # its result is 1/g of the input
      else:  # all-gather, all-to-all, and the all-reduces that implement an all-gather or a reduce-scatter
        moved = size * (g - 1) / g
      out[kind]["bytes"] += moved * times
      out[kind]["ops"] += times
  return out


def memory(compiled, hbm_bytes: Optional[int] = None) -> dict:
  """Per-device memory of a compiled step in GiB, with the chip's HBM and whether the total fits in it."""
  mem = compiled.memory_analysis()
  out = {
      "argument_gib": mem.argument_size_in_bytes / GIB,
      "output_gib": mem.output_size_in_bytes / GIB,
      "temp_gib": mem.temp_size_in_bytes / GIB,
      "alias_gib": mem.alias_size_in_bytes / GIB,
      "code_gib": mem.generated_code_size_in_bytes / GIB,
  }
  # Donated arguments are aliased to outputs: counted once.
  out["total_gib"] = out["argument_gib"] + out["output_gib"] + out["temp_gib"] - out["alias_gib"] + out["code_gib"]
  if hbm_bytes:
    out["hbm_gib"] = hbm_bytes / GIB
    out["fits"] = out["total_gib"] <= out["hbm_gib"]
  return out


def compiler_flops(compiled) -> Optional[float]:
  """FLOPs per device by the compiler's cost model (None where the backend gives none).

  The TPU and CPU cost models count a while-loop body once, whatever its trip count, so under scan_layers this is
  about one layer's share plus everything outside the loop, not the step's total.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-exception-caught  # optional on some backends
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def memory_line(mem: dict) -> str:
  line = (
      f"memory per device: arguments {mem['argument_gib']:.3f} GiB, outputs {mem['output_gib']:.3f} GiB,"
      f" temporaries {mem['temp_gib']:.3f} GiB, aliased {mem['alias_gib']:.3f} GiB, code {mem['code_gib']:.3f} GiB"
      f" -> about {mem['total_gib']:.3f} GiB"
  )
  if "hbm_gib" in mem:
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    line += f" of {mem['hbm_gib']:.1f} GiB HBM: {verdict}"
  return line


def collectives_line(collectives: dict) -> str:
  parts = [f"{kind} {c['bytes'] / GIB:.3f} GiB ({c['ops']} ops)" for kind, c in collectives.items()]
  return "collectives per device per step: " + ", ".join(parts)
