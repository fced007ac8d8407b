"""Mixture of experts: a router picks `num_experts_per_tok` of `num_experts` gated-MLP experts per token.

Two ways to run the routed experts, equal up to float rounding when no token is dropped:
  dropless (capacity_factor <= 0)  token copies sorted by expert, one grouped matmul per projection (megablox on
                                   TPU, batched blocks on CPU, `jax.lax.ragged_dot` elsewhere); no token is dropped.
  capacity (capacity_factor > 0)   each batch row sends at most C = ceil(capacity_factor * seq * k / num_experts)
                                   tokens to each expert through dense one-hot dispatch/combine einsums; the expert
                                   dimension of the dispatched activations is sharded over the `expert` mesh axis.
Shared experts (DeepSeek, Llama 4) are one dense gated MLP that every token also passes through.

Each call returns, beside its output, what it measured as values (`aux`): the load-balancing loss (Switch
Transformer / GShard: num_experts * sum_i f_i * P_i) and the per-expert token counts (`expert_load`). The model
averages the loss over its MoE layers (`aux_loss`); the trainer sums the loads over the global batch and hands them
to `MoeBlock.post_update`, DeepSeek V3's aux-loss-free rule for the selection bias. Padding tokens (segment_ids == 0)
count in neither.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from MaxText import lora, sharding
from MaxText.layers import ops, params
from MaxText.layers.linears import MlpBlock, activation
from MaxText.layers.ops.grouped_matmul import tiled_grouped_matmul

GROUPED_MATMULS = ("ragged_dot", "megablox", "tiled")
_MEGABLOX_TILE = 512  # the largest tile along each of m, k, n; 1024 overflows tgmm's VMEM on v5e


def resolve_grouped_matmul(choice: str, hardware: str) -> str:
  """moe_grouped_matmul as the layer runs it (pyconfig resolves `auto` already; this covers configs built by hand)."""
  return ops.auto_grouped_matmul(hardware) if choice == "auto" else choice


def _axes(entry) -> tuple:
  """A PartitionSpec entry as a tuple of mesh axis names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array | tuple[jax.Array, ...],
    group_sizes: jax.Array,
    *,
    impl: str = "ragged_dot",
    interpret: bool = False,
    rows_per_group: int | None = None,
):
  """lhs [m, k] rows sorted by group, rhs [groups, k, n], group_sizes [groups] (summing to at most m) -> [m, n]:
  each group's rows times its matrix (a tuple of rhs: a tuple of products). `impl`: ragged_dot (jax.lax), tiled
  (ops/grouped_matmul.py, for CPU; sized by the expected `rows_per_group`; a tuple shares one layout of the rows) or
  megablox (the Pallas TPU gmm kernel; `interpret=True` runs it on CPU)."""
  if isinstance(rhs, (tuple, list)) and impl != "tiled":
    return tuple(grouped_matmul(lhs, r, group_sizes, impl=impl, interpret=interpret) for r in rhs)
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)
  if impl == "tiled":
    return tiled_grouped_matmul(lhs, rhs, group_sizes, rows_per_group)
  if impl != "megablox":
    raise ValueError(f"grouped matmul {impl!r} is not one of {GROUPED_MATMULS}")
  from jax.experimental.pallas.ops.tpu import megablox  # pylint: disable=import-outside-toplevel  # TPU-only op

  m, k = lhs.shape
  n = rhs.shape[2]
  # The kernel tiles m exactly: pad the rows to a whole tile. Zero rows past sum(group_sizes) belong to no group.
  tm = min(_MEGABLOX_TILE, -(-m // 128) * 128)
  padded = -(-m // tm) * tm
  if padded != m:
    lhs = jnp.pad(lhs, ((0, padded - m), (0, 0)))
  tiling = (tm, min(_MEGABLOX_TILE, k), min(_MEGABLOX_TILE, n))
  # gmm leaves rows past sum(group_sizes) unwritten, forward and in its lhs gradient: select them to zero on
  # both sides (a select's gradient is a select, so whatever is left there never reaches a real row).
  in_groups = (jnp.arange(padded) < jnp.sum(group_sizes))[:, None]
  lhs = jnp.where(in_groups, lhs, 0)
  out = megablox.gmm(lhs, rhs, group_sizes, lhs.dtype, tiling, None, None, False, interpret)
  return jnp.where(in_groups, out, 0)[:m]


class Router(nnx.Module):
  """Router logits x @ kernel [embed, num_experts] in float32, plus DeepSeek V3's selection-only bias."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    shape = (config.emb_dim, config.num_experts)
    self.kernel = nnx.Param(
        init(rngs.params(), shape, config.weight_dtype), out_sharding=("embed", None), eager_sharding=False
    )
    if config.routed_bias:
      zeros = jnp.zeros((config.num_experts,), config.weight_dtype)
      self.bias = params.RuleUpdated(zeros, out_sharding=(None,), eager_sharding=False)
    else:
      self.bias = None

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.dot(tokens.astype(jnp.float32), self.kernel[...].astype(jnp.float32))


def routing(
    logits: jax.Array,
    *,
    num_experts_per_tok: int,
    score_func: str = "softmax",
    bias: jax.Array | None = None,
    n_routing_groups: int = -1,
    topk_routing_group: int = -1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(combine weights [T, k] float32, expert ids [T, k] int32, scores [T, E] float32) for logits [T, E].

  Experts are chosen on the scores plus `bias` (selection only); with groups, only experts in the
  `topk_routing_group` best groups compete (group score: sum of its top-2 biased scores when there is a bias,
  as DeepSeek V3, else its best score, as DeepSeek V2). The weights are the unbiased scores of the chosen experts.
  """
  logits = logits.astype(jnp.float32)
  if score_func == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
  elif score_func == "sigmoid":
    scores = jax.nn.sigmoid(logits)
  else:
    raise ValueError(f"routed_score_func {score_func!r} is not one of ['sigmoid', 'softmax']")
  choice = scores if bias is None else scores + bias.astype(jnp.float32)
  if n_routing_groups > 0:
    t, e = choice.shape
    grouped = choice.reshape(t, n_routing_groups, e // n_routing_groups)
    if bias is not None:
      group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
      group_scores = grouped.max(-1)
    _, best_groups = jax.lax.top_k(group_scores, topk_routing_group)
    keep = jnp.zeros(group_scores.shape, bool).at[jnp.arange(t)[:, None], best_groups].set(True)
    choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)
  _, experts = jax.lax.top_k(choice, num_experts_per_tok)
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * routed_scaling_factor, experts.astype(jnp.int32), scores


def expert_counts(experts: jax.Array, num_experts: int, mask: jax.Array | None = None) -> jax.Array:
  """(token, slot) picks per expert [num_experts] float32 for experts [T, k]; tokens with mask [T] == 0 skipped."""
  one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)
  if mask is not None:
    one_hot = one_hot * mask.astype(jnp.float32)[:, None, None]
  return one_hot.sum(axis=(0, 1))


def load_balance_loss(
    scores: jax.Array,
    experts: jax.Array,
    num_experts: int,
    score_func: str = "softmax",
    mask: jax.Array | None = None,
) -> jax.Array:
  """num_experts * sum_i f_i * P_i over tokens [T]: f_i = (token, slot) picks of expert i / T, P_i = mean prob.

  The same quantity as transformers' `load_balancing_loss_func` for one layer (a perfectly balanced router gives
  k); sigmoid scores are normalized per token to a distribution first. With `mask` [T], only tokens whose mask is
  nonzero count (T is then their number), so padding neither skews nor dilutes the loss.
  """
  probs = scores if score_func == "softmax" else scores / (scores.sum(-1, keepdims=True) + 1e-20)
  if mask is None:
    mask = jnp.ones(experts.shape[:1], jnp.float32)
  mask = mask.astype(jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)
  f = expert_counts(experts, num_experts, mask) / n
  p = (probs * mask[:, None]).sum(axis=0) / n
  return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def capacity(seq_len: int, config) -> int:
  """Tokens each expert accepts per batch row on the capacity path."""
  return max(1, math.ceil(config.capacity_factor * seq_len * config.num_experts_per_tok / config.num_experts))


class ExpertLora(nnx.Module):
  """One LoRA adapter per routed expert of a MoeBlock kernel [E, in, out]: lora_a [E, in, rank] (random), lora_b
  [E, rank, out] (zero, so a fresh adapter changes nothing); the rank dimension is replicated."""

  def __init__(self, experts: int, n_in: int, n_out: int, rank: int, axes: tuple, config, *, rngs: nnx.Rngs):
    a_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2, batch_axis=0)
    self.lora_a = nnx.Param(
        a_init(rngs.params(), (experts, n_in, rank), config.weight_dtype),
        out_sharding=("exp", axes[0], None),
        eager_sharding=False,
    )
    self.lora_b = nnx.Param(
        jnp.zeros((experts, rank, n_out), config.weight_dtype), out_sharding=("exp", None, axes[1]), eager_sharding=False
    )


class MoeBlock(nnx.Module):
  """Routed experts (+ shared experts) replacing a layer's dense MLP: `y = moe(x [batch, seq, embed])`."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.config = config
    num_experts, emb, mlp = config.num_experts, config.emb_dim, config.moe_mlp_dim
    acts = tuple(config.mlp_activations)  # a gated [activation, "linear"] pair (checked with the config)
    self.activation = activation(acts[0])
    self.dtype = config.dtype
    self.gate = Router(config, rngs=rngs)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2, batch_axis=0)

    def expert_weights(shape, names):
      return nnx.Param(init(rngs.params(), shape, config.weight_dtype), out_sharding=names, eager_sharding=False)

    self.wi_0 = expert_weights((num_experts, emb, mlp), ("exp", "embed_no_exp", "mlp"))
    self.wi_1 = expert_weights((num_experts, emb, mlp), ("exp", "embed_no_exp", "mlp"))
    self.wo = expert_weights((num_experts, mlp, emb), ("exp", "mlp", "embed_no_exp"))
    self.lora_scale = lora.scale(config) if config.lora_rank > 0 else 0.0
    self.lora_dropout = config.lora_dropout
    for name, (n_in, n_out), (in_axis, out_axis) in (
        ("wi_0", (emb, mlp), ("embed_no_exp", "mlp")),
        ("wi_1", (emb, mlp), ("embed_no_exp", "mlp")),
        ("wo", (mlp, emb), ("mlp", "embed_no_exp")),
    ):
      adapter = None
      if config.lora_rank > 0 and f"moe_{name}" in config.lora_target_modules:
        adapter = ExpertLora(num_experts, n_in, n_out, config.lora_rank, (in_axis, out_axis), config, rngs=rngs)
      setattr(self, name + lora.EXPERT_SUFFIX, adapter)
    if config.shared_experts > 0:
      self.shared_experts = MlpBlock(
          emb,
          config.shared_experts * mlp,
          acts,
          rngs=rngs,
          dtype=config.dtype,
          weight_dtype=config.weight_dtype,
          matmul_backward=config.dense_matmul_backward,
          lora=lora.dense_kwargs(config),
      )
    else:
      self.shared_experts = None
    self.bias_update_rate = config.routed_bias_update_rate
    self.grouped_matmul = resolve_grouped_matmul(config.moe_grouped_matmul, config.hardware)
    self.interpret = False  # megablox in Pallas interpret mode (a CPU test's switch; TPU only otherwise)

  def route(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weights [T, k], experts [T, k], scores [T, E]) for tokens [T, embed]."""
    c = self.config
    # The bias only picks experts; train.py moves it by the load rule, so no gradient may reach it.
    bias = None if self.gate.bias is None else jax.lax.stop_gradient(self.gate.bias[...])
    return routing(
        self.gate(tokens),
        num_experts_per_tok=c.num_experts_per_tok,
        score_func=c.routed_score_func,
        bias=bias,
        n_routing_groups=c.n_routing_groups,
        topk_routing_group=c.topk_routing_group,
        norm_topk_prob=c.norm_topk_prob,
        routed_scaling_factor=c.routed_scaling_factor,
    )

  def __call__(
      self, x: jax.Array, *, segment_ids: jax.Array | None = None, lora_rng: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    """(output, aux) for x [B, S, embed]; aux = {"lb_loss": scalar, "expert_load": [num_experts]}.

    `segment_ids` [B, S] (0 = padding; None = no padding): padding is still computed but not counted.
    `lora_rng`: the adapters' dropout key (training with lora_dropout), else None.
    """
    c = self.config
    x = jnp.asarray(x)
    batch, seq, emb = x.shape
    tokens = x.reshape(batch * seq, emb)
    weights, experts, scores = self.route(tokens)
    routed_rng = lora.subkey(lora_rng, 1) if self.lora_dropout > 0 else None
    mask = None if segment_ids is None else (jnp.asarray(segment_ids) != 0).reshape(batch * seq)
    aux = {
        "lb_loss": load_balance_loss(scores, experts, c.num_experts, c.routed_score_func, mask),
        "expert_load": expert_counts(experts, c.num_experts, mask),
    }
    if c.capacity_factor > 0:
      out = self._capacity(x, weights.reshape(batch, seq, -1), experts.reshape(batch, seq, -1), routed_rng)
    else:
      out = self._dropless(tokens, weights, experts, routed_rng).reshape(batch, seq, emb)
    if self.shared_experts is not None:
      out = out + self.shared_experts(x, lora_rng=lora.subkey(lora_rng, 0))
    return sharding.with_logical_constraint(out.astype(x.dtype), sharding.EMBED_ACTIVATION), aux

  def post_update(self, stats: dict):
    """After an optimizer step: bias += rate * sign(mean load - load) with the step's summed `expert_load`.

    DeepSeek V3's aux-loss-free balancing. The bias gets no gradient (stop_gradient in `route`) and no weight decay
    (params.RuleUpdated), so this rule alone moves it; rate 0 leaves it exactly as it is.
    """
    if self.gate.bias is None or self.bias_update_rate == 0:
      return
    load = stats["expert_load"]
    delta = self.bias_update_rate * jnp.sign(load.mean(-1, keepdims=True) - load)
    bias = self.gate.bias
    bias[...] = (bias[...].astype(jnp.float32) + delta).astype(bias.dtype)

  def _kernels(self):
    return tuple(w[...].astype(self.dtype) for w in (self.wi_0, self.wi_1, self.wo))

  def _adapters(self) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{kernel name: (lora_a, lora_b)} of the kernels with routed-expert adapters."""
    out = {}
    for name in ("wi_0", "wi_1", "wo"):
      adapter = getattr(self, name + lora.EXPERT_SUFFIX)
      if adapter is not None:
        out[name] = (adapter.lora_a[...].astype(self.dtype), adapter.lora_b[...].astype(self.dtype))
    return out

  def _dropless(self, tokens: jax.Array, weights: jax.Array, experts: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Token copies sorted by expert through grouped matmuls, weighted, and summed back per token.

    Under a mesh each shard of the token batch sorts and multiplies its own tokens (shard_map): a global sort
    would gather every token onto every device, and the Pallas megablox kernel is opaque to GSPMD anyway. The
    expert weights stay split over the expert axes (each device holds num_experts / ep experts; GSPMD gathers them
    only along the FSDP axes) and along the MLP dim over the tensor axes. Each expert-parallel group all-gathers its
    tokens, every device runs its own experts on the group's tokens, and the partial outputs are reduce-scattered
    back to the tokens' shards (and summed over the tensor axes).
    """
    mesh = jax.sharding.get_abstract_mesh()
    wi_0, wi_1, wo = self._kernels()
    adapters = self._adapters()
    if mesh.empty or mesh.size == 1:
      return self._dropless_local(tokens, weights, experts, (wi_0, wi_1, wo), adapters, rng, (), ())
    c = self.config
    rules = c.logical_axis_rules
    token_spec = sharding.logical_to_mesh_spec(("activation_batch",), rules, mesh, experts.shape[:1])
    token_entry = token_spec[0] if len(token_spec) else None
    token_axes = _axes(token_entry)
    exp_spec = sharding.logical_to_mesh_spec(("exp",), rules, mesh, (c.num_experts,))
    exp_axes = tuple(a for a in _axes(exp_spec[0] if len(exp_spec) else None) if mesh.shape[a] > 1)
    used = set(token_axes) | set(exp_axes)
    mlp_spec = sharding.logical_to_mesh_spec(("mlp",), rules, mesh, (c.moe_mlp_dim,))
    mlp_axes = tuple(a for a in _axes(mlp_spec[0] if len(mlp_spec) else None) if a not in used)
    exp = exp_axes[0] if len(exp_axes) == 1 else (exp_axes or None)
    mlp = mlp_axes[0] if len(mlp_axes) == 1 else (mlp_axes or None)
    rows = P(token_entry, None)
    w_in, w_out = P(exp, None, mlp), P(exp, mlp, None)
    # Adapters: lora_a splits like its kernel's input side, lora_b like its output side; the rank is whole.
    adapter_specs = {
        name: (P(exp, None, None), P(exp, None, mlp)) if name != "wo" else (P(exp, mlp, None), P(exp, None, None))
        for name in adapters
    }

    def body(tokens, weights, experts, kernels, adapters, rng):
      return self._dropless_local(tokens, weights, experts, kernels, adapters, rng, exp_axes, mlp_axes, token_axes)

    in_specs = (rows, rows, rows, (w_in, w_in, w_out), adapter_specs, P())
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)(
        tokens, weights, experts, (wi_0, wi_1, wo), adapters, rng
    )

  def _dropless_local(
      self,
      tokens,
      weights,
      experts,
      kernels,
      adapters,
      rng,
      exp_axes: tuple,
      mlp_axes: tuple,
      token_axes: tuple = (),
  ) -> jax.Array:
    """_dropless on one shard: `exp_axes` split the experts (this device holds wi_0.shape[0] of them; the tokens
    of the group along those axes are gathered, the outputs reduce-scattered back), `mlp_axes` split the MLP dim
    (outputs summed). `adapters` {kernel name: (lora_a, lora_b)} add each expert's LoRA term; `rng` their dropout."""
    c = self.config
    wi_0, wi_1, wo = kernels
    gather = tuple(a for a in exp_axes if a in token_axes)  # expert axes the tokens are split over
    replicated = tuple(a for a in exp_axes if a not in token_axes)  # expert axes every token shard sees whole
    if gather:
      tokens, weights, experts = (jax.lax.all_gather(v, gather, axis=0, tiled=True) for v in (tokens, weights, experts))
    t, k = experts.shape
    local_experts = wi_0.shape[0]
    flat = experts.reshape(-1)
    if exp_axes:
      # This device's experts are [first, first + local_experts); other experts' copies sort last, outside every
      # group, so the grouped matmuls leave their rows zero.
      first = jax.lax.axis_index(exp_axes) * local_experts
      flat = flat - first
      flat = jnp.where((flat >= 0) & (flat < local_experts), flat, local_experts)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    w_sorted = weights.reshape(-1)[order][:, None]
    if exp_axes:
      w_sorted = jnp.where(flat[order][:, None] < local_experts, w_sorted, 0.0)
    xs = tokens.astype(self.dtype)[order // k]
    if c.moe_input_scaled_by_router:
      xs = (xs.astype(jnp.float32) * w_sorted).astype(self.dtype)
    # The expected rows per expert (other experts' copies on an expert-parallel shard belong to no group).
    rows_per_group = -(-t * k // c.num_experts)
    matmul = functools.partial(
        grouped_matmul, impl=self.grouped_matmul, interpret=self.interpret, rows_per_group=rows_per_group
    )
    # Dropout keys differ where the inputs do: per token shard (and per MLP shard for wo's input columns).
    token_rng = rng if rng is None or not token_axes else jax.random.fold_in(rng, jax.lax.axis_index(token_axes))
    column_rng = (
        token_rng if token_rng is None or not mlp_axes else jax.random.fold_in(token_rng, jax.lax.axis_index(mlp_axes))
    )

    def project(name, x, kernel, index, key, y=None):
      y = matmul(x, kernel, sizes) if y is None else y
      if name not in adapters:
        return y
      a, b = adapters[name]
      # The rank is far below a Pallas tile, so the adapter products stay ragged_dot on every backend.
      h = jax.lax.ragged_dot(lora.dropout(x, self.lora_dropout, lora.subkey(key, index)), a, sizes)
      return y + self.lora_scale * jax.lax.ragged_dot(h, b, sizes)

    y0 = y1 = None
    if self.grouped_matmul == "tiled":  # CPU: both input projections from one gather of the rows into blocks
      y0, y1 = matmul(xs, (wi_0, wi_1), sizes)
    h0 = checkpoint_name(project("wi_0", xs, wi_0, 0, token_rng, y0), "mlpwi_0")
    h1 = checkpoint_name(project("wi_1", xs, wi_1, 1, token_rng, y1), "mlpwi_1")
    hidden = checkpoint_name(self.activation(h0) * h1, "mlp_hidden")
    ys = checkpoint_name(project("wo", hidden, wo, 2, column_rng), "mlpwo").astype(jnp.float32)
    if mlp_axes:
      ys = jax.lax.psum(ys, mlp_axes)
    if not c.moe_input_scaled_by_router:
      ys = ys * w_sorted
    unsorted = ys[jnp.argsort(order)]  # a gather back to (token, slot) order
    out = unsorted.reshape(t, k, -1).sum(axis=1)
    if replicated:
      out = jax.lax.psum(out, replicated)
    if gather:
      out = jax.lax.psum_scatter(out, gather, scatter_dimension=0, tiled=True)
    return out

  def _capacity(self, x: jax.Array, weights: jax.Array, experts: jax.Array, rng: jax.Array | None) -> jax.Array:
    """GShard-style dispatch per batch row: first choices take expert slots before second choices, then by position."""
    c = self.config
    batch, seq, k = experts.shape
    cap = capacity(seq, c)
    mask = jax.nn.one_hot(experts, c.num_experts, dtype=jnp.int32)  # [B, S, k, E]
    by_priority = jnp.swapaxes(mask, 1, 2).reshape(batch, k * seq, c.num_experts)
    position = (jnp.cumsum(by_priority, axis=1) - 1).reshape(batch, k, seq, c.num_experts)
    position = jnp.swapaxes(position, 1, 2)  # [B, S, k, E]: the token's slot in that expert's buffer
    kept = mask * (position < cap)
    slots = jax.nn.one_hot(jnp.sum(position * kept, axis=-1), cap, dtype=jnp.float32)  # [B, S, k, C]
    routed = kept.astype(jnp.float32)[..., None] * slots[:, :, :, None, :]  # [B, S, k, E, C]
    dispatch = routed.sum(axis=2)
    combine = (routed * weights[:, :, :, None, None]).sum(axis=2)
    names = ("activation_batch_no_exp", "activation_exp", None, "activation_embed")
    if c.moe_input_scaled_by_router:
      dispatch, combine = combine, dispatch
    xe = jnp.einsum("bsd,bsec->becd", x.astype(jnp.float32), dispatch).astype(self.dtype)
    xe = sharding.with_logical_constraint(xe, names)
    wi_0, wi_1, wo = self._kernels()
    adapters = self._adapters()

    def project(name, inputs, kernel, index):
      y = jnp.einsum("beci,eio->beco", inputs, kernel)
      if name not in adapters:
        return y
      a, b = adapters[name]
      h = jnp.einsum("beci,eir->becr", lora.dropout(inputs, self.lora_dropout, lora.subkey(rng, index)), a)
      return y + self.lora_scale * jnp.einsum("becr,ero->beco", h, b)

    h0 = checkpoint_name(project("wi_0", xe, wi_0, 0), "mlpwi_0")
    h1 = checkpoint_name(project("wi_1", xe, wi_1, 1), "mlpwi_1")
    hidden = checkpoint_name(self.activation(h0) * h1, "mlp_hidden")
    ye = checkpoint_name(project("wo", hidden, wo, 2), "mlpwo")
    ye = sharding.with_logical_constraint(ye, names)
    return jnp.einsum("becd,bsec->bsd", ye.astype(jnp.float32), combine)


def _leaves_named(tree, name: str) -> list[jax.Array]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [leaf for path, leaf in flat if path and getattr(path[-1], "key", None) == name]


def aux_terms(aux, load_balance_loss_weight: float) -> dict:
  """The model's MoE terms from its layers' aux (see decoders.Transformer.aux_terms); empty without MoE layers.

  The load-balancing loss is the mean over MoE layers (scanned layers report stacked values); the expert loads are
  the stats (summed over micro-batches by the trainer).
  """
  lb = _leaves_named(aux, "lb_loss")
  stats = jax.tree_util.tree_map_with_path(lambda p, x: x if getattr(p[-1], "key", None) == "expert_load" else None, aux)
  if not lb:
    return {"loss": jnp.zeros((), jnp.float32), "metrics": {}, "stats": stats}
  mean = jnp.concatenate([v.reshape(-1) for v in lb]).mean()
  return {"loss": load_balance_loss_weight * mean, "metrics": {"moe_lb_loss": mean}, "stats": stats}


def stats_metrics(stats) -> dict:
  """{"moe_max_load_ratio": max load / mean load of the worst MoE layer} (1.0 = balanced); {} without MoE layers."""
  loads = _leaves_named(stats, "expert_load")
  if not loads:
    return {}
  ratios = [(v.max(-1) / jnp.maximum(v.mean(-1), 1e-9)).reshape(-1) for v in loads]
  return {"moe_max_load_ratio": jnp.concatenate(ratios).max()}


def moe_layer_flags(config) -> list[bool]:
  """Which decoder layers are MoE: i >= first_num_dense_layers and (i + 1) % interleave_moe_layer_step == 0."""
  if config.num_experts <= 1:
    return [False] * config.num_decoder_layers
  return [
      i >= config.first_num_dense_layers and (i + 1) % config.interleave_moe_layer_step == 0
      for i in range(config.num_decoder_layers)
  ]


_MEAN_AUX = ("lb_loss",)  # per-token means; the other aux values (expert token counts) add up over micro-batches


def microbatch_means(aux_sum, count: int):
  """Aux values summed over `count` equal micro-batches of one batch -> the batch's: means averaged, counts summed."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x / count if getattr(p[-1], "key", None) in _MEAN_AUX else x, aux_sum
  )
