"""The decoder-only Transformer: token embedding -> decoder layer stack -> final norm -> logits.

Every family's decoder layer is the shared block (layers/blocks.py) wired by the family's spec (MaxText.models);
this module owns what every family shares: stacking the layers (nnx.scan over stacked params, or an unrolled list),
remat policies, dropout keys, the logits head, and the auxiliary values layers report (the model's auxiliary losses,
step metrics and post-update hook, which the trainer applies without knowing what produced them).
"""

import dataclasses
import math
from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from MaxText import models, sharding
from MaxText.layers import blocks, losses, moe, pipeline
from MaxText.layers.embeddings import Embed
from MaxText.layers.linears import DENSE_OUTPUT_NAME, DenseGeneral
from MaxText.layers.normalizations import create_norm
from MaxText.layers.ops.head_loss import fused_head_cross_entropy

LAYERS_PATH = ("decoder", "layers")  # where the layer stack sits in the model's state

_SAVE_QKV = ("query_proj", "key_proj", "value_proj")
# remat_policy -> what the backward pass may keep from the forward pass (None: no jax.checkpoint at all).
REMAT_POLICIES = {
    "none": None,
    # Weight matmuls are kept; attention scores (batched dots) and elementwise ops are recomputed. With
    # dense_matmul_backward=explicit DenseGeneral's matmul is a custom VJP (ops/matmul.py) that a dot-matching policy
    # cannot see, so it carries a name; with autodiff the same value is a plain dot (saved either way, once).
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT_NAME),
    ),
    "save_dot_except_mlp": jax.checkpoint_policies.save_only_these_names(*_SAVE_QKV, "out_proj"),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(*_SAVE_QKV),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def uses_dropout(config) -> bool:
  """Whether training draws dropout keys: residual dropout (dropout_rate) or LoRA adapter dropout (lora_dropout)."""
  lora_dropout = config.lora_rank > 0 and config.lora_dropout > 0
  return config.enable_dropout and (config.dropout_rate > 0 or lora_dropout)


def scan_axes(param_scan_axis: int) -> nnx.StateAxes:
  """Stacked-layer axis per variable kind: params at `param_scan_axis`, anything else (e.g. caches) at 0."""
  return nnx.StateAxes({nnx.Param: param_scan_axis, ...: 0})


@dataclasses.dataclass(frozen=True)
class StackLayout:
  """How layers of different kinds are stacked when scanned: `prefix` alike layers, then blocks of `period` layers.

  Scanned params sit at decoder/layers/<param> when every layer is alike (prefix 0, period 1), else at
  decoder/layers/prefix/<param> (layers 0..prefix-1) and decoder/layers/block_<r>/<param> (layers
  prefix + j * period + r, stacked over j).
  """

  num_layers: int
  prefix: int = 0
  period: int = 1

  @property
  def homogeneous(self) -> bool:
    return self.prefix == 0 and self.period == 1

  def groups(self) -> list[tuple[str, int, int]]:
    """(group name, stacked layer count, first layer) in layer order; the single group of a homogeneous stack is ""."""
    if self.homogeneous:
      return [("", self.num_layers, 0)]
    blocks = (self.num_layers - self.prefix) // self.period
    out = [("prefix", self.prefix, 0)] if self.prefix else []
    return out + [(f"block_{r}", blocks, self.prefix + r) for r in range(self.period)]

  def locate(self, layer: int) -> tuple[str, int]:
    """(group name, index in its stack) of a layer."""
    if self.homogeneous:
      return "", layer
    if layer < self.prefix:
      return "prefix", layer
    j, r = divmod(layer - self.prefix, self.period)
    return f"block_{r}", j

  def layer_indices(self, group: str) -> list[int]:
    if group in ("", "prefix"):
      return list(range(self.num_layers if group == "" else self.prefix))
    r = int(group[len("block_") :])
    return list(range(self.prefix + r, self.num_layers, self.period))


def stack_layout(kinds: Sequence[Hashable]) -> StackLayout:
  """The StackLayout for per-layer kinds: the shortest period, then the shortest alike prefix, that fits them."""
  n = len(kinds)
  for period in range(1, n + 1):
    for prefix in range(0, n - period + 1):
      if (n - prefix) % period or len(set(kinds[:prefix])) > 1:
        continue
      if all(kinds[i] == kinds[prefix + (i - prefix) % period] for i in range(prefix, n)):
        return StackLayout(n, prefix, period)
  raise AssertionError("unreachable: one block of all layers always fits")


def layer_layout(config) -> StackLayout:
  """The config's StackLayout: its layers' kinds are dense or MoE (moe.moe_layer_flags)."""
  return stack_layout(moe.moe_layer_flags(config))


def pipeline_schedule(config) -> pipeline.Schedule | None:
  """The config's pipeline schedule over the scan units after any dense prefix (None without stage parallelism)."""
  layout = layer_layout(config)
  units = layout.num_layers if layout.homogeneous else (layout.num_layers - layout.prefix) // layout.period
  return pipeline.schedule_from_config(config, units)


class LayerGroups(nnx.Module):
  """The scanned stacks of a stack whose layers differ (see StackLayout): attributes prefix, block_0, ..."""

  def __init__(self, groups: dict[str, nnx.Module]):
    for name, stack in groups.items():
      setattr(self, name, stack)


def _blocks(layer_rngs: jax.Array | None, start: int, period: int) -> jax.Array | None:
  """Per-layer dropout keys from layer `start` on, as [blocks, period]."""
  if layer_rngs is None:
    return None
  rest = layer_rngs[start:]
  return rest.reshape((rest.shape[0] // period, period) + rest.shape[1:])


def _with_value(var: nnx.Variable, value, names_fn, axis: int) -> nnx.Variable:
  """A copy of a stacked Param holding `value`, its logical names mapped by names_fn(names, axis)."""
  new = var.replace(value)
  names = var.get_metadata().get("out_sharding")
  if names:
    new.set_metadata(out_sharding=names_fn(tuple(names), axis))
  return new


def _reshaped_stack(stack: nnx.Module, axis: int, value_fn, names_fn) -> nnx.Module:
  """The stack with each Param's layer axis (at `axis`) reshaped by value_fn(value, axis) and renamed by names_fn."""
  graphdef, state = nnx.split(stack)

  def one(path, var):
    if not isinstance(var, nnx.Param):
      raise ValueError(f"pipelined layers hold only parameters; {'/'.join(map(str, path))} is {type(var).__name__}")
    return path, _with_value(var, value_fn(var.get_value(), axis), names_fn, axis)

  return nnx.merge(graphdef, nnx.State.from_flat_path([one(*pv) for pv in state.flat_state()]))


class DecoderStack(nnx.Module):
  """num_decoder_layers decoder layers, scanned (one stacked copy of the params) or unrolled (a list).

  Scanned params carry an extra axis at `param_scan_axis` with logical name "layers"; `scanned_to_unscanned` and
  `unscanned_to_scanned` (MaxText.layers.scan_layout) convert a state between the two layouts.

  Calling the stack returns (x, aux): aux mirrors `self.layers` (a dict by layer index when unrolled; the stacked
  layers' aux with a leading layer axis when scanned, by group name when the layers differ), so each layer's values
  sit at that layer's module path.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    spec = models.get(config.decoder_block).block
    self.num_layers = config.num_decoder_layers
    self.scan_layers = config.scan_layers
    self.param_scan_axis = config.param_scan_axis
    self.remat_policy = config.remat_policy
    moe_flags = moe.moe_layer_flags(config)
    self.layout = layer_layout(config)

    def make_stacked(n, first, out_axes, metadata):
      @nnx.split_rngs(splits=n)
      @nnx.vmap(in_axes=(0,), out_axes=out_axes, transform_metadata=metadata)
      def make(rngs):
        return blocks.DecoderBlock(config, spec, rngs=rngs, use_moe=moe_flags[first])

      return make(rngs)

    def make_groups(out_axes, metadata) -> dict[str, nnx.Module]:
      return {name: make_stacked(n, first, out_axes, metadata) for name, n, first in self.layout.groups()}

    self.pipeline = pipeline_schedule(config)
    if self.scan_layers:
      groups = make_groups(scan_axes(self.param_scan_axis), {nnx.PARTITION_NAME: "layers"})
      if self.pipeline is not None:  # [units] -> [R, S, Lps] on the layer axis: each stage holds only its layers
        for name in self._pipelined_groups():
          groups[name] = _reshaped_stack(groups[name], self.param_scan_axis, self._to_pipelined, pipeline.pipelined_names)
      self.layers = groups[""] if self.layout.homogeneous else LayerGroups(groups)
    else:
      # Built stacked and then split, so a seed gives the same weights in either layout.
      layers = [None] * self.num_layers
      for name, stack in make_groups(0, {}).items():
        graphdef, stacked = nnx.split(stack)
        for j, i in enumerate(self.layout.layer_indices(name)):
          layers[i] = nnx.merge(graphdef, jax.tree.map(lambda x, j=j: x[j], stacked))
      self.layers = nnx.List(layers)

  def _pipelined_groups(self) -> list[str]:
    return [""] if self.layout.homogeneous else [f"block_{r}" for r in range(self.layout.period)]

  def _stacks(self) -> dict[str, nnx.Module]:
    """The scanned stacks by group name ("" for a homogeneous stack)."""
    if self.layout.homogeneous:
      return {"": self.layers}
    return {name: getattr(self.layers, name) for name, _, _ in self.layout.groups()}

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      segment_ids: jax.Array | None,
      *,
      deterministic: bool,
      model_mode: str,
      dropout_rng: jax.Array | None,
  ) -> tuple[jax.Array, dict]:
    layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, self.num_layers)
    run = dict(deterministic=deterministic, model_mode=model_mode)
    if not self.scan_layers:
      aux = {}
      for i, layer in enumerate(self.layers):
        # A static index: each unrolled layer compiles just its own kind of attention.
        rng = None if layer_rngs is None else layer_rngs[i]
        x, aux[i] = self._layer_fn(i, positions, segment_ids, **run)(layer, x, rng)
      return x, aux

    indices = jnp.arange(self.num_layers, dtype=jnp.int32)
    if self.layout.homogeneous and self.pipeline is None:
      x, aux = self._scan([self.layers], x, positions, segment_ids, _blocks(layer_rngs, 0, 1), indices[:, None], **run)
      return x, aux[0]
    p, period = self.layout.prefix, self.layout.period
    aux = {}
    if p:
      prefix_rngs = None if layer_rngs is None else _blocks(layer_rngs[:p], 0, 1)
      x, (aux["prefix"],) = self._scan(
          [self.layers.prefix], x, positions, segment_ids, prefix_rngs, indices[:p, None], **run
      )
    if self.pipeline is not None:
      x, block_aux = self._pipelined(x, positions, segment_ids, **run)
    else:
      stacks = [getattr(self.layers, f"block_{r}") for r in range(period)]
      block_rngs = _blocks(layer_rngs, p, period)
      x, block_aux = self._scan(stacks, x, positions, segment_ids, block_rngs, indices[p:].reshape(-1, period), **run)
    if self.layout.homogeneous:
      return x, block_aux[0]
    aux.update({f"block_{r}": a for r, a in enumerate(block_aux)})
    return x, aux

  def _layer_fn(self, layer_index, positions, segment_ids, *, deterministic: bool, model_mode: str):
    """One layer's call (remat-wrapped per remat_policy): (layer, x, dropout_rng) -> (x, aux).

    Each layer is told its index (`layer_index`): families with a local/global attention pattern need it.
    """

    def apply(layer, y, rng):
      return layer(
          y,
          positions,
          segment_ids,
          deterministic=deterministic,
          model_mode=model_mode,
          dropout_rng=rng,
          layer_index=layer_index,
      )

    if self.remat_policy == "none":
      return apply
    policy = REMAT_POLICIES[self.remat_policy]  # a declared choice (MaxText/config), checked with the config
    # Inside scan, CSE across iterations cannot happen, so prevent_cse only costs speed there.
    return nnx.remat(apply, policy=policy, prevent_cse=not self.scan_layers)

  def _scan(self, stacks, x, positions, segment_ids, rngs, layer_indices, *, deterministic, model_mode):
    """Scans `stacks` (one per position in a block of consecutive layers) over their stacked axis.

    layer_indices [units, len(stacks)]; rngs the same shape of dropout keys, or None. Returns (x, [aux per stack]).
    """
    run = dict(deterministic=deterministic, model_mode=model_mode)

    @nnx.scan(
        in_axes=(scan_axes(self.param_scan_axis), nnx.Carry, 0, 0),
        out_axes=(nnx.Carry, 0),
        transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def step(layers, y, rngs, layer_indices):
      # One scan iteration runs a block of consecutive layers (one layer unless dense and MoE layers interleave).
      aux = []
      for r, layer in enumerate(layers):
        fn = self._layer_fn(layer_indices[r], positions, segment_ids, **run)
        y, layer_aux = fn(layer, y, None if rngs is None else rngs[r])
        aux.append(layer_aux)
      return y, aux

    return step(stacks, x, rngs, layer_indices)

  def _pipelined(self, x, positions, segment_ids, *, deterministic, model_mode):
    """The pipelined units (MaxText.layers.pipeline) on x; returns (x, [aux per block position]) like _scan."""
    schedule, axis = self.pipeline, self.param_scan_axis
    first_layer, period = self.layout.prefix, self.layout.period
    stacks = [self._stacks()[name] for name in self._pipelined_groups()]
    splits = [nnx.split(stack) for stack in stacks]
    flats = [list(state.flat_state()) for _, state in splits]
    weights = [[var.get_value() for _, var in flat] for flat in flats]

    def stage_fn(stage_weights, h, pos, seg, first_unit):
      layers = []
      for (graphdef, _), flat, values in zip(splits, flats, stage_weights):
        state = nnx.State.from_flat_path(
            [(p, _with_value(var, value, pipeline.unpipelined_names, axis)) for (p, var), value in zip(flat, values)]
        )
        layers.append(nnx.merge(graphdef, state))
      units = first_unit + jnp.arange(schedule.per_stage, dtype=jnp.int32)
      indices = first_layer + units[:, None] * period + jnp.arange(period, dtype=jnp.int32)[None, :]
      return self._scan(layers, h, pos, seg, None, indices, deterministic=deterministic, model_mode=model_mode)

    x, aux = pipeline.run(schedule, stage_fn, weights, x, positions, segment_ids, axis)
    return x, moe.microbatch_means(aux, schedule.microbatches)

  def post_update(self, stats: dict):
    """Runs each layer's post-update rule (blocks.DecoderBlock.post_update) with its part of `stats` (aux-shaped)."""
    if not self.scan_layers:
      for i, layer in enumerate(self.layers):
        layer.post_update(stats[i])
      return
    pipelined = self._pipelined_groups() if self.pipeline is not None else []
    for name, stack in self._stacks().items():
      own = stats[name] if name else stats
      if not jax.tree.leaves(own):
        continue
      axis = self.param_scan_axis
      target = stack
      if name in pipelined:  # the rules run per canonical layer: view [R, S, Lps] as [units] for them
        target = _reshaped_stack(stack, axis, pipeline.from_pipelined, pipeline.unpipelined_names)
      nnx.vmap(lambda layer, s: layer.post_update(s), in_axes=(scan_axes(axis), 0))(target, own)
      if target is not stack:
        back = _reshaped_stack(target, axis, self._to_pipelined, pipeline.pipelined_names)
        nnx.update(stack, nnx.state(back))

  def _to_pipelined(self, value, axis: int):
    return pipeline.to_pipelined(value, axis, self.pipeline.stages, self.pipeline.repeats)

  def init_cache(self, batch: int, length: int, **cache_options):
    """Gives every module of the layers that has `init_cache` (attention) an empty KV cache of [batch, length].

    `cache_options` go to each module's init_cache (e.g. `paged=PageSpec(...)` for the paged cache).

    In the scanned stack the cache gets the stacked layer count as a leading dim (scan_axes() stacks it on axis 0).
    """
    stacks = list(self.layers) if not self.scan_layers else list(self._stacks().values())
    for layer in stacks:
      stack = ()
      if self.scan_layers:
        stack = (jax.tree.leaves(nnx.state(layer, nnx.Param))[0].shape[self.param_scan_axis],)
      for module in [m for _, m in nnx.iter_modules(layer) if m is not layer and hasattr(m, "init_cache")]:
        module.init_cache(batch, length, stack, **cache_options)


class Transformer(nnx.Module):
  """Decoder-only language model. Call: logits = model(tokens, positions, segment_ids, deterministic=, model_mode=).

  tokens/positions/segment_ids are int32 [batch, seq]; positions restart at 0 in each packed segment; segment_ids
  (None = one unpacked sequence per row) keep packed documents from attending to each other, 0 marks padding.
  Logits are [batch, seq, vocab] (float32 when cast_logits_to_fp32).
  """

  def __init__(self, config, rngs: nnx.Rngs):
    self.dtype = config.dtype
    self.logits_via_embedding = config.logits_via_embedding
    self.logits_dot_in_fp32 = config.logits_dot_in_fp32
    self.cast_logits_to_fp32 = config.cast_logits_to_fp32
    self.final_logits_soft_cap = config.final_logits_soft_cap
    self.head_loss = config.head_loss  # "fused" | "logits": how cross_entropy meets the head (ops/head_loss.py)
    self.load_balance_loss_weight = config.load_balance_loss_weight
    kw = dict(dtype=config.dtype, weight_dtype=config.weight_dtype)
    self.token_embedder = Embed(config.vocab_size, config.emb_dim, rngs=rngs, **kw)
    self.decoder = DecoderStack(config, rngs=rngs)
    self.decoder_norm = create_norm(config, config.emb_dim)
    if self.logits_via_embedding:
      self.logits_dense = None
    else:
      self.logits_dense = DenseGeneral(
          config.emb_dim,
          config.vocab_size,
          kernel_axes=("embed", "vocab"),
          rngs=rngs,
          matmul_backward=config.dense_matmul_backward,
          **kw,
      )
    # Gemma scales token embeddings (in the activation dtype, as its reference does); GPT-3 adds learned positions.
    self.embedding_scale = math.sqrt(config.emb_dim) if config.scale_embedding_by_sqrt_dim else None
    if config.trainable_position_size > 0:
      # Positions past the table embed as NaN (jnp.take's fill), so an overlong sequence fails loudly.
      self.position_embedder = Embed(
          config.trainable_position_size, config.emb_dim, rngs=rngs, axes=(None, "embed"), **kw
      )
    else:
      self.position_embedder = None
    self.uses_dropout = uses_dropout(config)
    # A stream of its own, so training can reseed it (nnx.reseed) or pass `rngs=` per step.
    self.dropout_rngs = nnx.Rngs(dropout=rngs.dropout()) if self.uses_dropout else None

  def __call__(
      self,
      tokens: jax.Array,
      positions: jax.Array,
      segment_ids: jax.Array | None = None,
      *,
      deterministic: bool = True,
      model_mode: str = "train",
      rngs: nnx.Rngs | None = None,
      logits_at: jax.Array | None = None,
      return_hidden: bool = False,
      return_aux: bool = False,
  ) -> jax.Array | tuple[jax.Array, dict]:
    """`logits_at` [batch] (decode): logits only at that token of each row, [batch, 1, vocab].

    `return_hidden`: the final-normed hidden states [batch, seq, embed] instead of logits (for `cross_entropy`).
    `return_aux`: (output, aux) with what the layers reported (see `aux_terms`, `post_update`).
    """
    dropout_rng = None
    if self.uses_dropout and not deterministic:
      dropout_rng = (rngs if rngs is not None else self.dropout_rngs).dropout()
    x = sharding.with_logical_constraint(self.embed(tokens, positions), sharding.EMBED_AND_LOGITS_ACTIVATION)
    x, aux = self.decoder(
        x, positions, segment_ids, deterministic=deterministic, model_mode=model_mode, dropout_rng=dropout_rng
    )
    x = sharding.with_logical_constraint(x, sharding.EMBED_AND_LOGITS_ACTIVATION)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = self.decoder_norm(x)
    out = x if return_hidden else self.logits(x)
    return (out, aux) if return_aux else out

  # ---------------------------------------------------------------- auxiliary values (what the trainer sums)

  def aux_terms(self, aux: dict) -> dict:
    """One forward pass's auxiliary terms from its `aux`:
    {"loss": scalar added to the training objective (a per-token mean, like the cross-entropy),
     "metrics": {name: scalar}, logged as learning/<name> (token-weighted means over micro-batches),
     "stats": a pytree the trainer sums over the step's micro-batches for `stats_metrics` and `post_update`}.
    """
    return moe.aux_terms(aux, self.load_balance_loss_weight)

  @staticmethod
  def stats_metrics(stats) -> dict:
    """Metrics of the step's summed stats (e.g. the worst MoE layer's max/mean expert load)."""
    return moe.stats_metrics(stats)

  def post_update(self, stats):
    """After the optimizer step (params already updated): the layers' own update rules, with the summed stats."""
    self.decoder.post_update(stats)

  def cross_entropy(self, hidden: jax.Array, targets: jax.Array, z_loss_multiplier: float):
    """Per-token (loss, z_loss) of final-normed hidden states against targets [batch, seq].

    With head_loss=fused a plain matmul head (no logit soft cap, quantization or bias) takes the fused head + loss
    (ops/head_loss.py), which never hands the [batch, seq, vocab] logits to autodiff; otherwise the logits first.
    """
    kernel = vocab_major = None
    if self.head_loss == "fused" and self.final_logits_soft_cap <= 0:
      if self.logits_dense is None:
        kernel, vocab_major = self.token_embedder.embedding[...], True
      elif self.logits_dense.quant is None and self.logits_dense.bias is None:
        kernel, vocab_major = self.logits_dense.kernel[...], False
    if kernel is None:
      return losses.cross_entropy(self.logits(hidden), targets, z_loss_multiplier)
    compute_dtype = jnp.float32 if self.logits_dot_in_fp32 else self.dtype
    return fused_head_cross_entropy(hidden, kernel, targets, z_loss_multiplier, vocab_major, compute_dtype)

  def init_cache(self, batch: int, length: int, **cache_options):
    """Empty KV caches for model_mode "prefill"/"autoregressive": `batch` rows of up to `length` tokens."""
    self.decoder.init_cache(batch, length, **cache_options)

  def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Input embeddings [batch, seq, embed]: token embeddings (scaled for Gemma), plus learned positions (GPT-3)."""
    x = self.token_embedder(tokens)
    if self.embedding_scale is not None:
      x = x * jnp.asarray(self.embedding_scale, x.dtype)
    if self.position_embedder is not None:
      x = x + self.position_embedder(positions)
    return x

  def logits(self, x: jax.Array) -> jax.Array:
    """Output head on the final-normed hidden states [batch, seq, embed]."""
    compute_dtype = jnp.float32 if self.logits_dot_in_fp32 else self.dtype
    if self.logits_dense is None:
      logits = self.token_embedder.attend(x, compute_dtype=compute_dtype)
    else:
      logits = self.logits_dense(x, compute_dtype=compute_dtype)
    if self.cast_logits_to_fp32:
      logits = logits.astype(jnp.float32)
    if self.final_logits_soft_cap > 0:
      logits = self.final_logits_soft_cap * jnp.tanh(logits / self.final_logits_soft_cap)
    return sharding.with_logical_constraint(logits, sharding.LOGITS_ACTIVATION)
