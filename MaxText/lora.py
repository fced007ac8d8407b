"""LoRA: low-rank adapters on the dense projections, trained while the base weights stay frozen.

With `lora_rank` > 0 every projection named in `lora_target_modules` (layers/linears.DenseGeneral) holds `lora_a`
[in..., rank] and `lora_b` [rank, out...] next to its kernel and computes x.W + (lora_alpha / lora_rank) x.A.B.
Routed MoE experts (targets moe_wi_0, moe_wi_1, moe_wo) hold one adapter per expert in a sibling module
`<kernel>_lora` (`lora_a` [experts, in, rank], `lora_b` [experts, rank, out]). During training the adapter's input
goes through dropout at `lora_dropout` (the base path never does).
Parameters are pure nested dicts everywhere outside the modules; `split` separates the adapters (leaves named lora_a
or lora_b) from the base, `combine` puts them back, and `merge` folds the adapters into the kernels (W + s A.B) for
a plain model: export, or a checkpoint any config without LoRA loads.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

ADAPTER_NAMES = ("lora_a", "lora_b")
EXPERT_SUFFIX = "_lora"  # routed experts' adapters: mlp/wi_0 -> mlp/wi_0_lora/{lora_a, lora_b}


def scale(config) -> float:
  return config.lora_alpha / config.lora_rank


def dense_kwargs(config) -> Callable[[str], dict]:
  """name -> the LoRA arguments of the DenseGeneral of that name ({} when it gets no adapter)."""

  def kwargs(name: str) -> dict:
    if config.lora_rank > 0 and name in config.lora_target_modules:
      return {"lora_rank": config.lora_rank, "lora_scale": scale(config), "lora_dropout": config.lora_dropout}
    return {}

  return kwargs


def subkey(rng: jax.Array | None, index: int) -> jax.Array | None:
  """The dropout key of one projection (by its place in the module) from the module's key; None stays None."""
  return None if rng is None else jax.random.fold_in(rng, index)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """An adapter's input under inverted dropout (kept entries scaled by 1 / (1 - rate)); unchanged without a key."""
  if rng is None or rate <= 0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def is_adapter(path: tuple) -> bool:
  return str(getattr(path[-1], "key", path[-1])) in ADAPTER_NAMES


def split(params: dict) -> tuple[dict, dict]:
  """(base, adapters): the params pure dict without the adapter leaves, and the adapter leaves alone."""
  flat = traverse_util.flatten_dict(params)
  base = {k: v for k, v in flat.items() if not is_adapter(k)}
  adapters = {k: v for k, v in flat.items() if is_adapter(k)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def combine(base: dict, adapters: dict) -> dict:
  """The full params pure dict from `split`'s two halves."""
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(adapters))
  return traverse_util.unflatten_dict(flat)


def count(adapters: dict) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


def kernel_path(module: tuple) -> tuple:
  """The path of the kernel an adapter module (the path above its lora_a/lora_b) belongs to."""
  name = str(module[-1])
  if name.endswith(EXPERT_SUFFIX):
    return module[:-1] + (name[: -len(EXPERT_SUFFIX)],)
  return module + ("kernel",)


def _delta(a, b, kernel_ndim: int, param_scan_axis: int, expert: bool):
  """s-less A.B in the kernel's layout: [in..., out...] or [experts, in, out], stacked over layers at param_scan_axis.

  Batch axes (the layer stack, the experts) are the extra dimensions of a and b beyond a kernel's in + out.
  """
  batch = a.ndim + b.ndim - kernel_ndim - 2
  product = lambda x, y: jnp.tensordot(x, y, axes=1)
  if expert:  # [experts, in, rank] or stacked: [experts, layers, ...] / [layers, experts, ...], batch axes leading
    for _ in range(batch):
      product = jax.vmap(product)
    return product(a, b)
  if batch == 0:
    return product(a, b)
  a, b = jnp.moveaxis(a, param_scan_axis, 0), jnp.moveaxis(b, param_scan_axis, 0)
  return jnp.moveaxis(jax.vmap(product)(a, b), 0, param_scan_axis)


def merge(params: dict, lora_scale: float, param_scan_axis: int) -> dict:
  """Params with every adapter folded into its kernel (in float32, cast back) and the adapter leaves removed.

  Int8 kernels with their `kernel_scale` (QLoRA's base) are dequantized and come out float32, scales dropped.
  """
  flat = traverse_util.flatten_dict(params)
  out = {k: v for k, v in flat.items() if not is_adapter(k)}
  for key in flat:
    if str(key[-1]) != "lora_a":
      continue
    module = key[:-1]
    path = kernel_path(module)
    kernel = flat[path]
    a, b = flat[module + ("lora_a",)], flat[module + ("lora_b",)]
    expert = path[-1] != "kernel"
    delta = _delta(a.astype(jnp.float32), b.astype(jnp.float32), kernel.ndim, param_scan_axis, expert)
    scale = None if expert else out.pop(module + ("kernel_scale",), None)
    if scale is None:
      out[path] = (kernel.astype(jnp.float32) + lora_scale * delta).astype(kernel.dtype)
    else:
      out[path] = kernel.astype(jnp.float32) * scale.astype(jnp.float32) + lora_scale * delta
  for key in [k for k in out if str(k[-1]) == "kernel_scale"]:  # int8 kernels without an adapter
    module = key[:-1]
    out[module + ("kernel",)] = out[module + ("kernel",)].astype(jnp.float32) * out.pop(key).astype(jnp.float32)
  return traverse_util.unflatten_dict(out)


def target_dims(v: dict[str, Any]) -> dict[str, tuple[int, int]]:
  """(in, out) sizes of each targetable projection a resolved config dict `v` builds."""
  emb, mlp, moe_mlp = v["emb_dim"], v["mlp_dim"], v["moe_mlp_dim"]
  dims = {"wi_0": (emb, mlp), "wi_1": (emb, mlp), "wi": (emb, mlp), "wo": (mlp, emb)}
  if v["num_experts"] > 1:
    dims.update(moe_wi_0=(emb, moe_mlp), moe_wi_1=(emb, moe_mlp), moe_wo=(moe_mlp, emb))
  if v["attention_type"] != "mla":
    q, kv = v["num_query_heads"] * v["head_dim"], v["num_kv_heads"] * v["head_dim"]
    return dims | {"query": (emb, q), "key": (emb, kv), "value": (emb, kv), "out": (q, emb)}
  heads, rope, q_rank, kv_rank = v["num_query_heads"], v["qk_rope_head_dim"], v["q_lora_rank"], v["kv_lora_rank"]
  qk = v["qk_nope_head_dim"] + rope
  if q_rank > 0:
    dims.update(wq_a=(emb, q_rank), wq_b=(q_rank, heads * qk))
  else:
    dims["query"] = (emb, heads * qk)
  dims.update(wkv_a=(emb, kv_rank + rope), wkv_b=(kv_rank, heads * (v["qk_nope_head_dim"] + v["v_head_dim"])))
  return dims | {"out": (heads * v["v_head_dim"], emb)}
