"""Mixture of experts (layers/moe.py) and the heterogeneous decoder stack.

The MoE block is checked against a dense one-hot reference written here in numpy (every expert on every token,
combined by one-hot routing weights), the capacity path against dropless and against a numpy model of its
first-choices-first slot rule, expert-parallel meshes against the unsharded block, and the load-balancing loss
against its formula and transformers' `load_balancing_loss_func`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from MaxText import metrics, optimizers, pyconfig, sharding, train, training
from MaxText.config_schema import ConfigError
from MaxText.layers import decoders, model_creation, moe, scan_layout
from MaxText.layers.ops import grouped_matmul as grouped_matmul_ops
from MaxText.tests.model_test_utils import build, config_of, make_config
from MaxText.tests.model_test_utils import inputs as model_inputs
from MaxText.utils.ckpt_conversion import to_maxtext, weight_mapping

B, S = 2, 12

# Router variants: Mixtral, unnormalized top-k, DeepSeek V3 (sigmoid, bias, groups, scale, shared expert),
# DeepSeek V2 (softmax groups by best score), Llama 4 (sigmoid top-1 scaling the expert input, shared expert).
VARIANTS = {
    "mixtral": dict(),
    "softmax-top3-raw": dict(num_experts_per_tok=3, norm_topk_prob=False, num_experts=8),
    "deepseek3": dict(
        num_experts=8,
        routed_score_func="sigmoid",
        routed_bias=True,
        n_routing_groups=4,
        topk_routing_group=2,
        routed_scaling_factor=2.5,
        shared_experts=1,
    ),
    "deepseek2": dict(
        num_experts=8, num_experts_per_tok=3, n_routing_groups=4, topk_routing_group=2, norm_topk_prob=False
    ),
    "llama4": dict(
        num_experts_per_tok=1,
        routed_score_func="sigmoid",
        moe_input_scaled_by_router=True,
        norm_topk_prob=False,
        shared_experts=1,
    ),
}


def moe_config(**kw):
  return config_of(model_name="tests/tiny-mixtral", **kw)


def random_params(block: moe.MoeBlock, seed: int = 0) -> nnx.State:
  rng = np.random.default_rng(seed)
  state = nnx.state(block, nnx.Param)
  return jax.tree.map(
      lambda v: np.asarray(0.3 * rng.standard_normal(v.shape) / np.sqrt(v.shape[-2] if v.ndim > 1 else 1), v.dtype),
      state,
  )


def make_block(config, seed: int = 0) -> moe.MoeBlock:
  block = moe.MoeBlock(config, rngs=nnx.Rngs(0))
  nnx.update(block, random_params(block, seed))
  return block


def numpy_params(block) -> dict:
  flat = {
      "/".join(map(str, k)): np.asarray(v.get_value(), np.float64) for k, v in nnx.state(block, nnx.Param).flat_state()
  }
  return flat


def silu(x):
  return x / (1 + np.exp(-x))


def reference_routing(x, p, c):
  """(experts [T, k], weights [T, k]) by the routing rules, in float64."""
  logits = x @ p["gate/kernel"]
  if c.routed_score_func == "softmax":
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
  else:
    scores = 1 / (1 + np.exp(-logits))
  choice = scores + p.get("gate/bias", 0.0)
  t, e = choice.shape
  if c.n_routing_groups > 0:
    size = e // c.n_routing_groups
    for row in range(t):
      groups = choice[row].reshape(c.n_routing_groups, size)
      if c.routed_bias:
        group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
      else:
        group_score = groups.max(1)
      dropped = np.argsort(-group_score, kind="stable")[c.topk_routing_group :]
      for g in dropped:
        choice[row, g * size : (g + 1) * size] = -np.inf
  experts = np.argsort(-choice, axis=1, kind="stable")[:, : c.num_experts_per_tok]
  weights = np.take_along_axis(scores, experts, axis=1)
  if c.norm_topk_prob:
    weights = weights / weights.sum(1, keepdims=True)
  return experts, weights * c.routed_scaling_factor


def expert_mlp(x, p, j, prefix=""):
  if prefix:
    return (silu(x @ p[f"{prefix}/wi_0/kernel"]) * (x @ p[f"{prefix}/wi_1/kernel"])) @ p[f"{prefix}/wo/kernel"]
  return (silu(x @ p["wi_0"][j]) * (x @ p["wi_1"][j])) @ p["wo"][j]


def reference_moe(x, p, c, keep=None):
  """Dense one-hot MoE: every expert on every token, combined with one-hot routing weights (keep: [T, k] mask)."""
  tokens = x.reshape(-1, x.shape[-1]).astype(np.float64)
  experts, weights = reference_routing(tokens, p, c)
  if keep is not None:
    weights = weights * keep
  combine = np.zeros((tokens.shape[0], c.num_experts))
  np.put_along_axis(combine, experts, weights, axis=1)  # the k experts are distinct, so put == add
  if c.moe_input_scaled_by_router:
    out = np.zeros_like(tokens)
    for j in range(c.num_experts):
      out += (combine[:, j] != 0)[:, None] * expert_mlp(tokens * combine[:, j : j + 1], p, j)
  else:
    every = np.stack([expert_mlp(tokens, p, j) for j in range(c.num_experts)], axis=1)  # [T, E, D]
    out = np.einsum("te,ted->td", combine, every)
  if c.shared_experts:
    out = out + expert_mlp(tokens, p, None, prefix="shared_experts")
  return out.reshape(x.shape)


def inputs(seed=1, shape=(B, S, 64)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@nnx.jit
def run_block(block, x):
  out, aux = block(x)
  return out, aux["lb_loss"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dropless_equals_dense_one_hot_reference(variant):
  config = moe_config(**VARIANTS[variant])
  block = make_block(config)
  x = inputs()
  got, _ = run_block(block, x)
  np.testing.assert_allclose(np.asarray(got), reference_moe(x, numpy_params(block), config), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mixtral", "deepseek3", "llama4"])
def test_large_capacity_equals_dropless(variant):
  dropless = moe_config(**VARIANTS[variant])
  capacity = moe_config(**VARIANTS[variant], capacity_factor=float(dropless.num_experts))
  x = inputs()
  want, _ = run_block(make_block(dropless), x)
  got, _ = run_block(make_block(capacity), x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)


def test_capacity_drops_later_choices_first():
  """Per batch row, first choices of all tokens (in sequence order) fill expert slots before second choices."""
  config = moe_config(capacity_factor=0.5)
  block = make_block(config)
  x = inputs()
  p = numpy_params(block)
  cap = moe.capacity(S, config)
  experts, _ = reference_routing(x.reshape(-1, 64).astype(np.float64), p, config)
  experts = experts.reshape(B, S, -1)
  keep = np.zeros(experts.shape)
  for b in range(B):
    used = np.zeros(config.num_experts, int)
    for slot in range(experts.shape[2]):
      for s in range(S):
        e = experts[b, s, slot]
        keep[b, s, slot] = used[e] < cap
        used[e] += 1
  assert 0 < keep.sum() < keep.size  # some, not all, are dropped
  got, _ = run_block(block, x)
  want = reference_moe(x, p, config, keep=keep.reshape(B * S, -1))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_lb_loss_matches_formula_and_transformers():
  config = moe_config(num_experts=8, num_experts_per_tok=2)
  block = make_block(config)
  x = inputs()
  _, loss = run_block(block, x)
  tokens = x.reshape(-1, 64).astype(np.float64)
  p = numpy_params(block)
  logits = tokens @ p["gate/kernel"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts, _ = reference_routing(tokens, p, config)
  f = np.bincount(experts.reshape(-1), minlength=8) / tokens.shape[0]
  np.testing.assert_allclose(float(loss), 8 * np.sum(f * probs.mean(0)), rtol=1e-5)
  torch = pytest.importorskip("torch")
  mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
  hf = mixtral.load_balancing_loss_func((torch.from_numpy(logits.astype(np.float32)),), 8, 2)
  np.testing.assert_allclose(float(loss), float(hf), rtol=1e-5)


@pytest.mark.parametrize("capacity_factor", [-1.0, 2.0])
def test_expert_parallel_equals_unsharded(capacity_factor):
  """expert=4 x fsdp=2, and expert=2 x fsdp=2 x tensor=2 on 8 devices: outputs and gradients equal the unsharded."""
  kw = dict(VARIANTS["deepseek3"], capacity_factor=capacity_factor)
  x = inputs(shape=(8, S, 64))

  def loss_and_grads(block, x):
    def loss(block):
      y, aux = block(x)
      return jnp.mean(y**2) + aux["lb_loss"]

    return nnx.value_and_grad(loss)(block)

  want_loss, want_grads = nnx.jit(loss_and_grads)(make_block(moe_config(**kw)), x)
  for mesh_kw in (
      dict(ici_expert_parallelism=4, ici_fsdp_parallelism=2),
      dict(ici_expert_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2),
  ):
    config = moe_config(**kw, **mesh_kw)
    mesh = sharding.create_mesh(config)
    block = make_block(config)
    state = nnx.state(block)
    shardings = sharding.state_shardings(state, config.logical_axis_rules, mesh)
    assert shardings["wi_0"].spec[0] == "expert"  # the experts really are split
    with sharding.use_mesh(mesh, config.logical_axis_rules):
      nnx.update(block, jax.device_put(state, shardings))
      xs = jax.device_put(
          x, sharding.logical_to_sharding(("activation_batch", None, None), config.logical_axis_rules, mesh)
      )
      got_loss, got_grads = nnx.jit(loss_and_grads)(block, xs)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), got_grads, want_grads)


def test_dropless_expert_parallel_keeps_expert_weights_split():
  """Under expert=4 the dropless block's compiled forward and backward never gathers a full [num_experts, ...]
  expert weight: each device multiplies only its own experts (the tokens are gathered instead)."""
  config = moe_config(num_experts=8, ici_expert_parallelism=4, ici_fsdp_parallelism=2)
  mesh = sharding.create_mesh(config)
  block = make_block(config)
  state = nnx.state(block)
  x = inputs(shape=(8, S, 64))

  def loss_and_grads(block, x):
    return nnx.value_and_grad(lambda block: jnp.mean(block(x)[0] ** 2))(block)

  with sharding.use_mesh(mesh, config.logical_axis_rules):
    nnx.update(block, jax.device_put(state, sharding.state_shardings(state, config.logical_axis_rules, mesh)))
    hlo = nnx.jit(loss_and_grads).lower(block, x).compile().as_text()
  gathers = [line for line in hlo.splitlines() if "all-gather(" in line or "all-gather-start(" in line]
  assert gathers  # the tokens are gathered within each expert group
  full = [line for line in gathers if "[8,64,96]" in line or "[8,96,64]" in line]
  assert not full, full
  local = [line for line in gathers if "[2,64,96]" in line or "[2,96,64]" in line]
  assert local, gathers  # FSDP still gathers each device's 2 experts over the fsdp axis


# ---------------------------------------------------------------- the decoder stack


def test_moe_layer_flags_and_stack_layouts():
  flags = moe.moe_layer_flags(
      moe_config(base_num_decoder_layers=6, first_num_dense_layers=1, interleave_moe_layer_step=2)
  )
  assert flags == [False, True, False, True, False, True]
  assert moe.moe_layer_flags(config_of(model_name="tests/tiny-llama")) == [False, False]
  assert decoders.stack_layout([True] * 4) == decoders.StackLayout(4, 0, 1)
  assert decoders.stack_layout([False, True, True, True]) == decoders.StackLayout(4, 1, 1)
  assert decoders.stack_layout(flags) == decoders.StackLayout(6, 0, 2)
  layout = decoders.stack_layout([False, False, True, False, True])
  assert layout == decoders.StackLayout(5, 1, 2)
  assert [layout.locate(i) for i in range(5)] == [
      ("prefix", 0),
      ("block_0", 0),
      ("block_1", 0),
      ("block_0", 1),
      ("block_1", 1),
  ]


STACKS = {
    "dense-prefix": dict(model_name="tests/tiny-qwen3-moe"),  # layer 0 dense, then MoE
    "interleaved": dict(
        model_name="tests/tiny-mixtral",
        base_num_decoder_layers=5,
        first_num_dense_layers=1,
        interleave_moe_layer_step=2,
    ),
}


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_heterogeneous_stack_scanned_equals_unrolled(stack):
  """Scanned (prefix / block_<r> stacks) and unrolled layouts: scan_layout round trip and equal logits and lb loss."""
  kw = STACKS[stack]
  scanned, unrolled = build(**kw, scan_layers=True), build(**kw, scan_layers=False)  # same numbers, two layouts
  config = config_of(**kw)
  p_s = nnx.state(scanned, nnx.Param).to_pure_dict()
  p_u = nnx.state(unrolled, nnx.Param).to_pure_dict()
  groups = set(p_s["decoder"]["layers"])
  assert groups - {"prefix"} == {f"block_{r}" for r in range(len(groups - {"prefix"}))}
  assert list(p_u["decoder"]["layers"]) == list(range(config.num_decoder_layers))
  jax.tree.map(np.testing.assert_array_equal, scan_layout.unscanned_to_scanned(p_u, config.param_scan_axis), p_s)
  tokens, positions, _ = model_inputs()
  results = [run_model(m, tokens, positions) for m in (scanned, unrolled)]
  np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  assert results[0][1] > 0


@nnx.jit
def run_model(model, tokens, positions):
  out, aux = model(tokens, positions, return_aux=True)
  return out, model.aux_terms(aux)["metrics"]["moe_lb_loss"]


def test_dense_models_keep_their_param_tree():
  """A dense family never hears about MoE: decoder/layers/<param> scanned, no router or experts."""
  params = nnx.state(model_creation.abstract_model(config_of(model_name="tests/tiny-llama")), nnx.Param).to_pure_dict()
  assert sorted(params["decoder"]["layers"]) == [
      "mlp",
      "post_self_attention_layer_norm",
      "pre_self_attention_layer_norm",
      "self_attention",
  ]
  assert sorted(params["decoder"]["layers"]["mlp"]) == ["wi_0", "wi_1", "wo"]


def test_tflops_count_only_active_experts():
  config = make_config("tests/tiny-mixtral", num_experts=8, num_experts_per_tok=2, shared_experts=1)
  dense = make_config("tests/tiny-mixtral", num_experts=1, base_mlp_dim=3 * config.moe_mlp_dim)
  tokens = config.global_batch_size_to_train_on * config.max_target_length
  router = 3 * 2 * tokens * config.emb_dim * 8 * config.num_decoder_layers / 1e12 / config.num_devices
  total, weights, attention = metrics.training_tflops_per_device(config)
  dense_total, dense_weights, dense_attention = metrics.training_tflops_per_device(dense)
  assert attention == dense_attention
  np.testing.assert_allclose(weights, dense_weights + router, rtol=1e-12)
  np.testing.assert_allclose(total, dense_total + router, rtol=1e-12)


def test_config_errors_name_the_key():
  with pytest.raises(pyconfig.ConfigError, match="num_experts_per_tok"):
    make_config("tests/tiny-mixtral", num_experts_per_tok=5)
  with pytest.raises(pyconfig.ConfigError, match="n_routing_groups"):
    make_config("tests/tiny-mixtral", n_routing_groups=3)
  with pytest.raises(pyconfig.ConfigError, match="moe_input_scaled_by_router"):
    make_config("tests/tiny-mixtral", moe_input_scaled_by_router=True)
  with pytest.raises(pyconfig.ConfigError, match="routed_bias_update_rate"):
    make_config("tests/tiny-mixtral", routed_bias_update_rate=0.001)  # no routed_bias to update


def test_training_reports_lb_loss_and_learns(tmp_path):
  """A few steps of a tiny MoE (expert=4 x fsdp=2): loss falls and moe_lb_loss is reported."""
  config = pyconfig.initialize(
      ["", "base.yml"],
      model_name="tests/tiny-qwen3-moe",
      run_name="moe",
      base_output_directory=str(tmp_path),
      dataset_type="synthetic",
      steps=4,
      per_device_batch_size=1,
      max_target_length=32,
      max_prefill_predict_length=16,
      learning_rate=3e-3,
      warmup_steps_fraction=0.0,
      enable_checkpointing=False,
      enable_tensorboard=False,
      log_config=False,
      load_balance_loss_weight=0.5,
      ici_expert_parallelism=4,
      ici_fsdp_parallelism=2,
  )
  history = train.train(config)
  loss = np.array([h["learning/loss"] for h in history])
  lb = np.array([h["learning/moe_lb_loss"] for h in history])
  assert len(loss) == 4 and loss[-1] < loss[0]
  assert np.all(np.isfinite(lb)) and np.all(lb > 0)


def test_lb_loss_joins_the_training_objective():
  """loss_sums adds load_balance_loss_weight * lb * tokens; eval (aux_losses=False) leaves it out."""
  config = make_config("tests/tiny-qwen3-moe", load_balance_loss_weight=0.5, max_target_length=16)
  mesh = sharding.create_mesh(config)
  setup = training.TrainSetup(config, mesh)
  model = build(model_name="tests/tiny-qwen3-moe")
  params = nnx.state(model, nnx.Param).to_pure_dict()
  tokens, positions, _ = model_inputs()
  batch = {
      "inputs": tokens,
      "inputs_position": positions,
      "inputs_segmentation": np.ones_like(tokens),
      "targets": np.roll(tokens, -1, axis=1),
      "targets_segmentation": np.ones_like(tokens),
  }

  @jax.jit
  def both(params, batch):
    return [training.loss_sums(setup, params, batch, None, True, aux_losses=a) for a in (True, False)]

  (with_lb, aux), (without_lb, _) = both(params, batch)
  lb_sum = aux["metric_sums"]["moe_lb_loss"]  # lb * tokens
  assert float(lb_sum) > 0
  np.testing.assert_allclose(float(with_lb - without_lb), 0.5 * float(lb_sum), rtol=1e-5)


def is_routing_bias(path) -> bool:
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return names[-2:] == ["gate", "bias"]


def test_routing_bias_is_not_weight_decayed():
  """The selection bias gets no gradient; AdamW's decay must not erode it (kernels still decay)."""
  config = make_config("tests/tiny-mixtral", routed_bias=True, adam_weight_decay=0.1, warmup_steps_fraction=0.0)
  abstract = nnx.state(model_creation.abstract_model(config), nnx.Param)
  mask = training._pure(model_creation.weight_decay_mask(abstract))  # pylint: disable=protected-access
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  assert [m for p, m in flat if is_routing_bias(p)] == [False] and all(m for p, m in flat if not is_routing_bias(p))
  params = jax.tree.map(lambda a: jnp.ones(a.shape, jnp.float32), training._pure(abstract.to_pure_dict()))
  tx, _ = optimizers.create_optimizer(config, mask)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  layer = updates["decoder"]["layers"]["mlp"]
  assert np.all(np.asarray(layer["gate"]["bias"]) == 0)
  assert np.all(np.asarray(layer["gate"]["kernel"]) < 0)


def test_qwen3_moe_dense_layers_map_or_are_refused():
  """mlp_only_layers / decoder_sparse_step become first_num_dense_layers / interleave_moe_layer_step when they can."""
  hf = {
      "architectures": ["Qwen3MoeForCausalLM"],
      "hidden_size": 64,
      "intermediate_size": 128,
      "moe_intermediate_size": 32,
      "num_attention_heads": 4,
      "num_key_value_heads": 2,
      "head_dim": 16,
      "num_hidden_layers": 6,
      "vocab_size": 256,
      "num_experts_per_tok": 2,
  }
  _, keys = to_maxtext.model_keys(hf | {"num_experts": 8, "mlp_only_layers": [0, 1], "decoder_sparse_step": 2})
  assert (keys["num_experts"], keys["first_num_dense_layers"], keys["interleave_moe_layer_step"]) == (8, 2, 2)
  _, keys = to_maxtext.model_keys(hf | {"num_local_experts": 16})  # transformers 5.x's name
  assert (keys["num_experts"], keys["first_num_dense_layers"], keys["moe_mlp_dim"]) == (16, 0, 32)
  with pytest.raises(weight_mapping.UnsupportedCheckpointError, match="mlp_only_layers"):
    to_maxtext.model_keys(hf | {"num_experts": 8, "mlp_only_layers": [3]})


# ----------------------------------------------------------------------------- padding and aux-loss-free balancing


@nnx.jit
def run_block_masked(block, x, segment_ids):
  _, aux = block(x, segment_ids=segment_ids)
  return aux["lb_loss"], aux["expert_load"]


def test_padding_counts_in_neither_lb_loss_nor_loads():
  """segment_ids == 0 tokens are left out: the same loss and loads as a call on the real tokens alone."""
  config = moe_config(**VARIANTS["deepseek3"])
  block = make_block(config)
  x = inputs()
  segments = np.ones((B, S), np.int32)
  segments[0, 7:] = 0
  segments[1, 10:] = 0
  lb, load = run_block_masked(block, x, segments)
  real = x[segments != 0][None]  # [1, real tokens, embed]
  want_lb, want_load = run_block_masked(block, real, None)
  np.testing.assert_allclose(float(lb), float(want_lb), rtol=1e-6)
  experts, _ = reference_routing(real[0].astype(np.float64), numpy_params(block), config)
  np.testing.assert_array_equal(np.asarray(load), np.bincount(experts.reshape(-1), minlength=config.num_experts))
  np.testing.assert_array_equal(np.asarray(want_load), np.asarray(load))
  all_lb, _ = run_block_masked(block, x, None)
  assert abs(float(all_lb) - float(lb)) > 1e-4  # the padding would have changed the loss


@pytest.mark.parametrize("scanned", [False, True])
def test_routing_bias_rule_by_hand(scanned):
  """post_update: bias_i += rate * sign(mean load - load_i) per MoE layer; kernels and dense layers untouched."""
  rate, loads = 0.25, np.array([[3.0, 1.0, 2.0, 2.0], [0.0, 4.0, 4.0, 0.0]])  # two MoE layers, 4 experts
  old_bias = np.array([[0.5, -0.5, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  want = old_bias + rate * np.array([[-1, 1, 0, 0], [1, -1, -1, 1]])
  kw = dict(num_experts=4, num_experts_per_tok=2, routed_bias=True, routed_bias_update_rate=rate)
  model = build(model_name="tests/tiny-deepseek3", scan_layers=scanned, **kw)  # layer 0 dense, 1 and 2 MoE
  before = nnx.state(model, nnx.Param).to_pure_dict()
  layers = model.decoder.layers
  if scanned:  # a dense prefix group and one stacked MoE group: loads stacked on axis 0, params on param_scan_axis 1
    layers.block_0.mlp.gate.bias[...] = old_bias.T
    stats = {"prefix": {}, "block_0": {"mlp": {"expert_load": jnp.asarray(loads)}}}
  else:
    for i in (1, 2):
      layers[i].mlp.gate.bias[...] = old_bias[i - 1]
    stats = {0: {}} | {i: {"mlp": {"expert_load": jnp.asarray(loads[i - 1])}} for i in (1, 2)}
  model.post_update(stats)
  after = nnx.state(model, nnx.Param).to_pure_dict()
  if scanned:
    np.testing.assert_array_equal(np.asarray(layers.block_0.mlp.gate.bias[...]).T, want)
  else:
    for i in (1, 2):
      np.testing.assert_array_equal(np.asarray(layers[i].mlp.gate.bias[...]), want[i - 1])
  flat_before, flat_after = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (before, after))
  untouched = [p for p in flat_before if not is_routing_bias(p)]
  assert untouched and all(np.array_equal(flat_before[p], flat_after[p]) for p in untouched)
  np.testing.assert_allclose(moe.stats_metrics(stats)["moe_max_load_ratio"], 2.0)  # layer 2: max 4 / mean 2


_BIAS_STEPS = 8


def _deepseek_run(rate: float, **kw):
  """Runs _BIAS_STEPS train steps of tiny-deepseek3 from skewed biases; (config, setup, states, metrics, batch)."""
  config = make_config(
      "tests/tiny-deepseek3",
      routed_bias_update_rate=rate,
      max_target_length=16,
      per_device_batch_size=1,
      learning_rate=1e-3,
      warmup_steps_fraction=0.0,
      adam_weight_decay=0.1,
      **kw,
  )
  mesh = sharding.create_mesh(config)
  setup = training.TrainSetup(config, mesh)
  rng = np.random.default_rng(0)
  rows = config.global_batch_size_to_train_on
  tokens = rng.integers(0, 256, (rows, 16)).astype(np.int32)
  segments = np.ones_like(tokens)
  segments[::2, 11:] = 0  # padding at the end of every other row
  batch = {
      "inputs": tokens,
      "inputs_position": np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape).copy(),
      "inputs_segmentation": segments,
      "targets": np.roll(tokens, -1, axis=1),
      "targets_segmentation": segments,
  }
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    state = jax.device_get(setup.init_state())
    # Experts 0 and 1 start favoured: most tokens pick them until the rule evens the loads.
    skew = np.array([0.3, 0.3, 0, 0, 0, 0, 0, 0], np.float32)
    state["params"] = jax.tree_util.tree_map_with_path(
        lambda p, v: np.broadcast_to(skew[:, None] if v.ndim == 2 else skew, v.shape).copy() if is_routing_bias(p) else v,
        state["params"],
    )
    state = jax.device_put(state, setup.state_shardings)
    step, _, _ = training.compile_train_step(setup, batch)
    states, history = [jax.device_get(state)], []
    for _ in range(_BIAS_STEPS):
      state, step_metrics = step(state, batch)
      states.append(jax.device_get(state))
      history.append(jax.device_get(step_metrics))
  return config, setup, states, history, batch


@pytest.fixture(scope="module")
def bias_runs():
  # rate > 0: scanned (prefix + MoE block groups), 2 micro-batches, experts sharded 2 ways; rate 0: unrolled.
  return {
      "on": _deepseek_run(0.02, gradient_accumulation_steps=2, ici_expert_parallelism=2),
      "off": _deepseek_run(0.0, scan_layers=False),
  }


def _biases(params) -> list[np.ndarray]:
  return [np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0] if is_routing_bias(p)]


def test_routing_bias_follows_the_rule_in_training(bias_runs):
  """One train step moves each bias by rate * sign(mean - load), loads over the global batch without padding."""
  config, setup, states, _, batch = bias_runs["on"]
  params = states[0]["params"]

  @jax.jit
  def loads(params):
    model = nnx.merge(setup.graphdef, nnx.State(params), setup.rest)
    _, aux = model(batch["inputs"], batch["inputs_position"], batch["inputs_segmentation"], return_aux=True)
    return model.aux_terms(aux)["stats"]

  load = np.asarray(jax.tree.leaves(loads(params))[0])  # scanned MoE block: [moe layers, experts]
  real = int((batch["inputs_segmentation"] != 0).sum())
  np.testing.assert_array_equal(load.sum(-1), real * config.num_experts_per_tok)
  want = (_biases(params)[0].T + 0.02 * np.sign(load.mean(-1, keepdims=True) - load)).T
  np.testing.assert_allclose(_biases(states[1]["params"])[0], want, rtol=0, atol=1e-7)


def test_zero_rate_freezes_bias_and_optimizer_never_moves_it(bias_runs):
  _, _, states, _, _ = bias_runs["off"]
  first, last = states[0]["params"], states[-1]["params"]
  assert len(_biases(first)) == 2  # two unrolled MoE layers
  for before, after in zip(_biases(first), _biases(last)):
    np.testing.assert_array_equal(after, before)
  flat_first = jax.tree_util.tree_flatten_with_path(first)[0]
  kernels = [(p, v) for p, v in flat_first if "gate" in str(p) and "kernel" in str(p)]
  moved = dict(jax.tree_util.tree_flatten_with_path(last)[0])
  assert kernels and all(not np.array_equal(v, moved[p]) for p, v in kernels)  # the router kernel itself trains


def test_bias_rule_evens_the_loads(bias_runs):
  """From biases that favour two experts, the rule lowers the worst layer's max/mean load; a frozen bias does not."""
  on = [h["learning/moe_max_load_ratio"] for h in bias_runs["on"][3]]
  off = [h["learning/moe_max_load_ratio"] for h in bias_runs["off"][3]]
  np.testing.assert_allclose(on[0], off[0], rtol=0.05)  # same start and batch (layouts may round a near-tie apart)
  assert on[-1] < 0.8 * on[0] and on[-1] < 0.8 * off[-1], (on, off)


@pytest.mark.parametrize("impl, rows", [("megablox", 200), ("megablox", 1024), ("tiled", 200), ("tiled", 1024)])
def test_grouped_matmul_equals_ragged_dot(impl, rows):
  """moe_grouped_matmul=megablox (the Pallas TPU kernel, interpreted on CPU) and tiled (the CPU loop) give
  ragged_dot's values and gradients, an empty group and rows that are not a whole tile included."""
  sizes = jnp.array([rows // 4, 0, rows // 2, rows - rows // 4 - rows // 2], jnp.int32)
  _assert_grouped_matmul_equals_ragged_dot(impl, rows, sizes)


def _assert_grouped_matmul_equals_ragged_dot(impl, rows, sizes, pair=False, **kw):
  """Values and gradients against ragged_dot's; `pair`: two right-hand sides in one call (a tuple of products)."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (rows, 64))
  w = jax.random.normal(keys[1], (sizes.shape[0], 64, 96)) / 8
  w = (w, jax.random.normal(keys[2], (sizes.shape[0], 64, 32)) / 8) if pair else w

  def loss(impl, **kw):
    def f(x, w):
      out = moe.grouped_matmul(x, w, sizes, impl=impl, interpret=True, **kw)
      return sum(jnp.sum(jnp.sin((i + 1) * y)) for i, y in enumerate(out if pair else (out,)))

    return f

  got = jax.value_and_grad(loss(impl, **kw), argnums=(0, 1))(x, w)
  want = jax.value_and_grad(loss("ragged_dot"), argnums=(0, 1))(x, w)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4), got, want)


@pytest.mark.parametrize(
    "sizes, rows_per_group, block",
    [
        ([128, 128, 128, 128], None, 128),  # even: blocks of the mean size
        ([140, 116, 128, 128], None, 144),  # largest 1.09x the mean: the 1.125x block
        ([150, 110, 128, 124], None, 160),  # 1.17x: the 1.25x block
        ([190, 66, 128, 128], None, 192),  # 1.48x: the 1.5x block
        ([400, 40, 32, 40], None, 192),  # 3.1x: the 1.5x block and 208 rows through the overflow loop
        ([70, 0, 90, 40], 64, 96),  # 312 rows in no group (an expert-parallel shard's other experts)
        ([3, 1, 0, 9], None, 8),  # under the 8-row minimum block, one row over it
    ],
)
def test_tiled_grouped_matmul_blocks_and_overflow_equal_ragged_dot(sizes, rows_per_group, block):
  """The CPU grouped matmul gives ragged_dot's values and gradients whichever block size the group sizes pick,
  with and without rows past its blocks, for one right-hand side and for two."""
  sizes = jnp.array(sizes, jnp.int32)
  rows = 512 if rows_per_group or sum(sizes.tolist()) == 512 else int(sizes.sum())
  blocks = grouped_matmul_ops._blocks(jnp.zeros((rows, 1)), (jnp.zeros((4, 1, 1)),), rows_per_group)
  parts = [lambda s, b=b: jnp.array(b) for b in blocks]
  assert int(grouped_matmul_ops._by_block(parts, blocks, sizes)) == block, blocks
  _assert_grouped_matmul_equals_ragged_dot("tiled", rows, sizes, rows_per_group=rows_per_group)
  # Two right-hand sides (the gated MLP's input projections) sharing one layout of the rows.
  _assert_grouped_matmul_equals_ragged_dot("tiled", rows, sizes, pair=True, rows_per_group=rows_per_group)


@pytest.mark.parametrize("impl", ["megablox", "tiled"])
def test_grouped_matmul_moe_block_sharded_equals_ragged_dot_unsharded(impl):
  """The MoE block with megablox (interpreted) or tiled per shard under expert=2 x fsdp=2 x tensor=2 equals the
  unsharded ragged_dot block, values and gradients."""
  x = inputs(shape=(8, S, 64))

  def loss_and_grads(block, x):
    return nnx.value_and_grad(lambda block: jnp.mean(block(x)[0] ** 2))(block)

  want_loss, want_grads = nnx.jit(loss_and_grads)(make_block(moe_config(moe_grouped_matmul="ragged_dot")), x)
  config = moe_config(ici_expert_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2)
  mesh = sharding.create_mesh(config)
  block = make_block(config)
  block.grouped_matmul, block.interpret = impl, True  # the config refuses megablox off TPU
  state = nnx.state(block)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    nnx.update(block, jax.device_put(state, sharding.state_shardings(state, config.logical_axis_rules, mesh)))
    got_loss, got_grads = nnx.jit(loss_and_grads)(block, x)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), got_grads, want_grads)


def test_megablox_off_tpu_is_a_config_error():
  with pytest.raises(ConfigError, match=r"^moe_grouped_matmul: megablox .* TPU only, but the backend is 'cpu'"):
    moe_config(moe_grouped_matmul="megablox")
  assert moe.MoeBlock(moe_config(), rngs=nnx.Rngs(0)).grouped_matmul == "tiled"  # auto on CPU
  assert moe.resolve_grouped_matmul("auto", "gpu") == "ragged_dot"
