"""Mixture of experts: a router picks `num_experts_per_tok` of `num_experts` gated-MLP experts per token.

Two ways to run the routed experts, equal up to float rounding when no token is dropped:
  dropless (capacity_factor <= 0)  token copies sorted by expert, one grouped matmul (`jax.lax.ragged_dot`) per
                                   projection; no token is ever dropped and no compute is spent on padding.
  capacity (capacity_factor > 0)   each batch row sends at most C = ceil(capacity_factor * seq * k / num_experts)
                                   tokens to each expert through dense one-hot dispatch/combine einsums; the expert
                                   dimension of the dispatched activations is sharded over the `expert` mesh axis.
Shared experts (DeepSeek, Llama 4) are one dense gated MLP that every token also passes through.

The load-balancing loss (Switch Transformer / GShard: num_experts * sum_i f_i * P_i) of each call is kept in the
block's `lb_loss` variable (not a parameter); `lb_loss(model)` averages it over the MoE layers, for train.py.
Each call also keeps its per-expert token counts (`expert_load`); train.py sums them over the global batch and
applies DeepSeek V3's aux-loss-free rule to the selection bias (`update_routing_bias`). Padding tokens
(segment_ids == 0) count in neither.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from MaxText import sharding
from MaxText.layers.linears import MlpBlock, activation

_EMBED_NAMES = ("activation_batch", "activation_length", "activation_embed")


class MoeLbLoss(nnx.Variable):
  """A MoE layer's load-balancing loss from its latest call (a scalar; stacked over layers when scanned)."""


class MoeExpertLoad(nnx.Variable):
  """A MoE layer's (token, slot) picks per expert [num_experts] from its latest call, padding excluded."""


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
      self.bias = nnx.Param(zeros, out_sharding=(None,), eager_sharding=False)
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


class MoeBlock(nnx.Module):
  """Routed experts (+ shared experts) replacing a layer's dense MLP: `y = moe(x [batch, seq, embed])`."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.config = config
    num_experts, emb, mlp = config.num_experts, config.emb_dim, config.moe_mlp_dim
    acts = tuple(config.mlp_activations)
    if len(acts) != 2 or acts[1] != "linear":
      raise ValueError(f"mlp_activations {list(acts)}: MoE experts are gated MLPs, [activation, 'linear']")
    self.activation = activation(acts[0])
    self.dtype = config.dtype
    self.gate = Router(config, rngs=rngs)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2, batch_axis=0)

    def expert_weights(shape, names):
      return nnx.Param(init(rngs.params(), shape, config.weight_dtype), out_sharding=names, eager_sharding=False)

    self.wi_0 = expert_weights((num_experts, emb, mlp), ("exp", "embed_no_exp", "mlp"))
    self.wi_1 = expert_weights((num_experts, emb, mlp), ("exp", "embed_no_exp", "mlp"))
    self.wo = expert_weights((num_experts, mlp, emb), ("exp", "mlp", "embed_no_exp"))
    if config.shared_experts > 0:
      self.shared_experts = MlpBlock(
          emb,
          config.shared_experts * mlp,
          acts,
          rngs=rngs,
          dtype=config.dtype,
          weight_dtype=config.weight_dtype,
      )
    else:
      self.shared_experts = None
    self.lb_loss = MoeLbLoss(jnp.zeros((), jnp.float32))
    self.expert_load = MoeExpertLoad(jnp.zeros((num_experts,), jnp.float32))

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

  def __call__(self, x: jax.Array, *, deterministic: bool = True, segment_ids: jax.Array | None = None) -> jax.Array:
    """`segment_ids` [B, S] (0 = padding; None = no padding): padding is still computed but not counted."""
    del deterministic  # no dropout or routing noise inside the block
    c = self.config
    x = jnp.asarray(x)
    batch, seq, emb = x.shape
    tokens = x.reshape(batch * seq, emb)
    weights, experts, scores = self.route(tokens)
    mask = None if segment_ids is None else (jnp.asarray(segment_ids) != 0).reshape(batch * seq)
    self.lb_loss.set_value(load_balance_loss(scores, experts, c.num_experts, c.routed_score_func, mask))
    self.expert_load.set_value(expert_counts(experts, c.num_experts, mask))
    if c.capacity_factor > 0:
      out = self._capacity(x, weights.reshape(batch, seq, -1), experts.reshape(batch, seq, -1))
    else:
      out = self._dropless(tokens, weights, experts).reshape(batch, seq, emb)
    if self.shared_experts is not None:
      out = out + self.shared_experts(x)
    return sharding.with_logical_constraint(out.astype(x.dtype), _EMBED_NAMES)

  def _kernels(self):
    return tuple(w[...].astype(self.dtype) for w in (self.wi_0, self.wi_1, self.wo))

  def _dropless(self, tokens: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
    """Token copies sorted by expert through grouped matmuls, weighted, and summed back per token."""
    c = self.config
    t, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=c.num_experts).astype(jnp.int32)
    w_sorted = weights.reshape(-1)[order][:, None]
    xs = tokens.astype(self.dtype)[order // k]
    if c.moe_input_scaled_by_router:
      xs = (xs.astype(jnp.float32) * w_sorted).astype(self.dtype)
    wi_0, wi_1, wo = self._kernels()
    h0 = checkpoint_name(jax.lax.ragged_dot(xs, wi_0, sizes), "mlpwi_0")
    h1 = checkpoint_name(jax.lax.ragged_dot(xs, wi_1, sizes), "mlpwi_1")
    hidden = checkpoint_name(self.activation(h0) * h1, "mlp_hidden")
    ys = checkpoint_name(jax.lax.ragged_dot(hidden, wo, sizes), "mlpwo").astype(jnp.float32)
    if not c.moe_input_scaled_by_router:
      ys = ys * w_sorted
    unsorted = ys[jnp.argsort(order)]  # a gather back to (token, slot) order
    return unsorted.reshape(t, k, -1).sum(axis=1)

  def _capacity(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
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
    h0 = checkpoint_name(jnp.einsum("becd,edm->becm", xe, wi_0), "mlpwi_0")
    h1 = checkpoint_name(jnp.einsum("becd,edm->becm", xe, wi_1), "mlpwi_1")
    hidden = checkpoint_name(self.activation(h0) * h1, "mlp_hidden")
    ye = checkpoint_name(jnp.einsum("becm,emd->becd", hidden, wo), "mlpwo")
    ye = sharding.with_logical_constraint(ye, names)
    return jnp.einsum("becd,bsec->bsd", ye.astype(jnp.float32), combine)


def is_routing_bias(path) -> bool:
  """Whether a params key path (jax key path or names) is a MoE router's selection bias (`.../gate/bias`)."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return names[-2:] == ["gate", "bias"]


def expert_loads(model: nnx.Module) -> dict:
  """The MoE layers' `expert_load` counts as a pure dict laid out like the params ({} without MoE layers)."""
  return nnx.state(model, MoeExpertLoad).to_pure_dict()


def max_load_ratio(loads: dict) -> jax.Array:
  """max load / mean load of the worst MoE layer (1.0 = perfectly balanced; 1.0 without MoE layers)."""
  # Stacked (scanned) leaves are [layers, experts].
  ratios = [(v.max(-1) / jnp.maximum(v.mean(-1), 1e-9)).reshape(-1) for v in jax.tree.leaves(loads)]
  if not ratios:
    return jnp.ones((), jnp.float32)
  return jnp.concatenate(ratios).max()


def update_routing_bias(old_params: dict, new_params: dict, loads: dict, rate: float, scan_axis: int) -> dict:
  """`new_params` with each router bias set to its `old_params` value + rate * sign(mean load - load) (DeepSeek V3).

  `loads` is `expert_loads(...)` summed over the step's global batch. Whatever the optimizer did to a bias is
  discarded, so the rule alone moves it (rate 0 keeps it exactly). Scanned loads are stacked on axis 0, scanned
  params on `scan_axis`.
  """
  params = jax.tree.map(lambda x: x, new_params)  # a fresh dict tree to write into

  def visit(load_tree, old, new, path):
    for key, value in load_tree.items():
      if isinstance(value, dict):
        visit(value, old[key], new[key], path + (key,))
      elif key == "expert_load" and isinstance(new.get("gate"), dict) and "bias" in new["gate"]:
        delta = rate * jnp.sign(value.mean(-1, keepdims=True) - value)
        if delta.ndim == 2:
          delta = jnp.moveaxis(delta, 0, scan_axis)
        bias = old["gate"]["bias"]
        if delta.shape != bias.shape:
          raise ValueError(f"{'/'.join(map(str, path))}: loads {value.shape} do not match the bias {bias.shape}")
        new["gate"] = dict(new["gate"], bias=(bias.astype(jnp.float32) + delta).astype(bias.dtype))

  visit(loads, old_params, params, ())
  return params


def lb_loss(model: nnx.Module) -> jax.Array:
  """Mean load-balancing loss over the model's MoE layers from its latest call (0.0 without MoE layers)."""
  values = [v.reshape(-1) for v in jax.tree.leaves(nnx.state(model, MoeLbLoss))]
  if not values:
    return jnp.zeros((), jnp.float32)
  return jnp.concatenate(values).mean()
