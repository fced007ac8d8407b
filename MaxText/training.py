"""The training step and what it needs: the state's layout and shardings from the config and mesh (TrainSetup),
the losses (language modelling, DPO), `train_step` / `eval_step` as pure functions of (state, batch) and their
jit-compilation with explicit shardings, and compiled-step files (MaxText.train_compile writes them, MaxText.train
loads them). The loop that runs them is MaxText/train.py.
"""

import functools
import logging
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import serialize_executable

from MaxText import checkpointing, context_parallel, lora, optimizers, sharding
from MaxText.config_schema import ConfigError
from MaxText.layers import decoders, model_creation
from MaxText.layers.ops import head_loss

logger = logging.getLogger("MaxText")


# ----------------------------------------------------------------------------- state


def _pure(tree):
  """nnx.State (possibly nested) -> plain nested dicts, keeping leaves as they are."""
  if isinstance(tree, (nnx.State, dict)):
    return {k: _pure(v) for k, v in tree.items()}
  return tree


def build_model_skeleton(config, mesh, with_decay_mask: bool = False):
  """(graphdef, rest, abstract params (pure dict), param shardings (pure dict)) without allocating weights.

  `with_decay_mask` appends the params-shaped weight-decay mask (model_creation.weight_decay_mask).
  """
  abstract_model = model_creation.abstract_model(config)
  graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
  shardings = _pure(sharding.state_shardings(abstract_params, config.logical_axis_rules, mesh))
  # Non-parameter state (e.g. RNG stream keys, reseeded every step) only needs placeholder values.
  rest = jax.tree.map(_placeholder, abstract_rest)
  out = (graphdef, rest, _pure(abstract_params.to_pure_dict()), shardings)
  return out + (_pure(model_creation.weight_decay_mask(abstract_params)),) if with_decay_mask else out


def _placeholder(leaf):
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.key(0) if leaf.shape == () else jax.random.split(jax.random.key(0), leaf.shape)
  return jnp.zeros(leaf.shape, leaf.dtype)


def _opt_state_shardings(abstract_opt_state, param_shardings, mesh):
  """Optimizer leaves whose key path ends with a parameter's path share that parameter's sharding."""
  by_path = dict(jax.tree_util.tree_flatten_with_path(param_shardings)[0])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def one(path, leaf):
    del leaf
    for start in range(len(path)):
      if tuple(path[start:]) in by_path:
        return by_path[tuple(path[start:])]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


class TrainSetup:
  """Everything the loop needs that depends only on the config and mesh."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.graphdef, self.rest, abstract_params, self.param_shardings, decay_mask = build_model_skeleton(
        config, mesh, with_decay_mask=True
    )
    # LoRA: the state's params are the adapters alone (what trains, has optimizer state and is checkpointed); the
    # frozen base is a separate argument of the step, loaded from load_parameters_path.
    self.lora = config.lora_rank > 0
    self.abstract_frozen = self.frozen_shardings = None
    if self.lora:
      self.abstract_frozen, abstract_params = lora.split(abstract_params)
      self.frozen_shardings, self.param_shardings = lora.split(self.param_shardings)
      decay_mask = lora.split(decay_mask)[1]
    # DPO without LoRA: the frozen argument is a copy of the starting params, the reference model. (Under LoRA the
    # reference is the base with the adapters off.)
    self.dpo_copy = config.use_dpo and not self.lora
    if self.dpo_copy:
      self.abstract_frozen, self.frozen_shardings = abstract_params, self.param_shardings
    self.has_frozen = self.lora or self.dpo_copy
    self.tx, self.schedule = optimizers.create_optimizer(config, decay_mask)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    self.abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": abstract_opt,
    }
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.state_shardings = {
        "step": replicated,
        "params": self.param_shardings,
        "opt_state": _opt_state_shardings(abstract_opt, self.param_shardings, mesh),
    }
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))  # trained ones
    self.num_frozen = lora.count(self.abstract_frozen) if self.lora else 0
    self.state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(self.abstract_state))

  def init_state(self):
    config = self.config

    def init():
      params = _pure(nnx.state(model_creation.get_model(config), nnx.Param).to_pure_dict())
      if self.lora:
        params = lora.split(params)[1]
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    return jax.jit(init, out_shardings=self.state_shardings)()

  def load_frozen(self):
    """The frozen step argument (LoRA: the base; DPO: the reference): the params of load_parameters_path, else the
    initialization from init_weights_seed (the same one init_state starts from)."""
    config = self.config
    what = "LoRA base" if self.lora else "DPO reference"
    if config.load_parameters_path:
      logger.info("%s: frozen parameters from %s", what, config.load_parameters_path)
      return checkpointing.load_params(
          config.load_parameters_path, self.abstract_frozen, self.frozen_shardings, config.param_scan_axis
      )
    logger.warning("%s: no load_parameters_path; frozen parameters from the random initialization", what)

    def init():
      params = _pure(nnx.state(model_creation.get_model(config), nnx.Param).to_pure_dict())
      return lora.split(params)[0] if self.lora else params

    return jax.jit(init, out_shardings=self.frozen_shardings)()

  def full_params(self, params, frozen):
    """The model's params: `params` itself, or under LoRA the frozen base with the adapters `params`."""
    return lora.combine(frozen, params) if self.lora else params

  def reference_params(self, params, frozen):
    """DPO's reference model: the base with zero adapters (LoRA), else the frozen copy of the starting params."""
    if self.lora:
      return lora.combine(frozen, jax.tree.map(jnp.zeros_like, params))
    return frozen

  def state_from_params(self, params):
    def fresh(params):
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    return jax.jit(fresh, in_shardings=(self.param_shardings,), out_shardings=self.state_shardings)(params)


# ----------------------------------------------------------------------------- loss and step


def _forward(setup: TrainSetup, params, batch, dropout_key, deterministic: bool):
  """(model, final hidden states, auxiliary outputs) of the model with `params` on the batch's inputs."""
  model = nnx.merge(setup.graphdef, nnx.State(params), setup.rest)
  hidden, model_aux = model(
      batch["inputs"],
      batch["inputs_position"],
      batch["inputs_segmentation"],
      deterministic=deterministic,
      rngs=None if deterministic else nnx.Rngs(dropout=dropout_key),
      return_hidden=True,
      return_aux=True,
  )
  return model, hidden, model_aux


def loss_sums(
    setup: TrainSetup, params, batch, dropout_key, deterministic: bool, aux_losses: bool = True, reference=None
):
  """(sum of masked per-token loss, aux) for one (micro) batch; the caller divides by total weights.

  The model's auxiliary terms (Transformer.aux_terms) are per-token means, so they enter the sums times the
  micro-batch's token count: after the division they are token-weighted means over micro-batches. `aux_losses`
  False (eval) leaves the auxiliary loss out of the objective. aux["stats"] is summed over micro-batches as is.
  With use_dpo the sums are DPO's instead (dpo_loss_sums), over preference pairs, with `reference` the frozen
  reference model's params.
  """
  if setup.config.use_dpo:
    return dpo_loss_sums(setup, params, reference, batch, dropout_key, deterministic, aux_losses)
  config = setup.config
  model, hidden, model_aux = _forward(setup, params, batch, dropout_key, deterministic)
  per_token, z_loss = head_loss.tiled_cross_entropy(
      model, hidden, batch["targets"], config.z_loss_multiplier, config.num_vocab_tiling
  )
  mask = (batch["targets_segmentation"] != 0).astype(jnp.float32)
  tokens = mask.sum()
  terms = model.aux_terms(model_aux)
  aux = {
      "total_weights": tokens,
      "z_loss_sum": (z_loss * mask).sum(),
      "metric_sums": {k: v * tokens for k, v in terms["metrics"].items()},
      "stats": terms["stats"],
  }
  total = (per_token * mask).sum()
  if aux_losses:
    total = total + terms["loss"] * tokens
  return total, aux


def _sequence_logps(setup: TrainSetup, params, batch, dropout_key, deterministic: bool):
  """(log-probabilities of segment 1 and 2 of every row [B, 2], the model, its auxiliary outputs)."""
  config = setup.config
  model, hidden, model_aux = _forward(setup, params, batch, dropout_key, deterministic)
  per_token, _ = head_loss.tiled_cross_entropy(model, hidden, batch["targets"], 0.0, config.num_vocab_tiling)
  seg = batch["targets_segmentation"]
  logps = jnp.stack([-(per_token * (seg == s)).sum(-1) for s in (1, 2)], axis=-1)
  return logps, model, model_aux


def dpo_loss_sums(setup: TrainSetup, params, reference, batch, dropout_key, deterministic: bool, aux_losses: bool):
  """DPO over the batch's (chosen = segment 1, rejected = segment 2) pairs, summed; total_weights counts pairs.

  With policy and reference log-probabilities of each answer, the implicit rewards are r = beta * (log pi - log
  pi_ref), and each pair costs -(1 - eps) log sigmoid(r_chosen - r_rejected) - eps log sigmoid(r_rejected - r_chosen)
  (eps = dpo_label_smoothing).
  """
  config = setup.config
  policy, model, model_aux = _sequence_logps(setup, params, batch, dropout_key, deterministic)
  ref, _, _ = _sequence_logps(setup, jax.lax.stop_gradient(reference), batch, None, True)
  rewards = config.dpo_beta * (policy - jax.lax.stop_gradient(ref))
  margin = rewards[:, 0] - rewards[:, 1]
  eps = config.dpo_label_smoothing
  per_pair = -(1.0 - eps) * jax.nn.log_sigmoid(margin) - eps * jax.nn.log_sigmoid(-margin)
  seg = batch["targets_segmentation"]
  valid = ((seg == 1).any(-1) & (seg == 2).any(-1)).astype(jnp.float32)  # padding rows hold no pair
  pairs = valid.sum()
  terms = model.aux_terms(model_aux)
  metric_sums = {k: v * pairs for k, v in terms["metrics"].items()}
  metric_sums |= {
      "dpo_reward_chosen": (rewards[:, 0] * valid).sum(),
      "dpo_reward_rejected": (rewards[:, 1] * valid).sum(),
      "dpo_reward_margin": (margin * valid).sum(),
      "dpo_accuracy": ((margin > 0) * valid).sum(),
  }
  aux = {"total_weights": pairs, "z_loss_sum": jnp.zeros(()), "metric_sums": metric_sums, "stats": terms["stats"]}
  total = (per_pair * valid).sum()
  if aux_losses:
    total = total + terms["loss"] * pairs
  return total, aux


def train_step(setup: TrainSetup, state, batch, frozen=None):
  """One optimizer step over `gradient_accumulation_steps` micro-batches (exact token-weighted mean).

  Gradients are taken with respect to state["params"] only; `frozen` is LoRA's base (state["params"] being the
  adapters) or DPO's reference model.
  """
  config = setup.config
  deterministic = not decoders.uses_dropout(config)
  step_key = jax.random.fold_in(jax.random.key(config.init_weights_seed), state["step"])

  def objective(p, b, k):
    reference = setup.reference_params(p, frozen) if config.use_dpo else None
    return loss_sums(setup, setup.full_params(p, frozen), b, k, deterministic, reference=reference)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  ga = config.gradient_accumulation_steps
  if ga == 1:
    (loss_sum, aux), grads = grad_fn(state["params"], batch, step_key)
  else:
    # Micro-batch i takes rows i, i+ga, ...: every device keeps its own rows, so no resharding is needed.
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // ga, ga) + x.shape[1:]), 0, 1), batch)

    def accumulate(carry, xs):
      i, mb = xs
      (l, a), g = grad_fn(state["params"], mb, jax.random.fold_in(step_key, i))
      acc_l, acc_a, acc_g = carry
      return (acc_l + l, jax.tree.map(jnp.add, acc_a, a), jax.tree.map(jnp.add, acc_g, g)), None

    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])
    first = jax.tree.map(lambda x: x[0], micro)
    aux_shapes = jax.eval_shape(grad_fn, state["params"], first, step_key)[0][1]
    zeros_a = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shapes)
    (loss_sum, aux, grads), _ = jax.lax.scan(accumulate, (jnp.zeros(()), zeros_a, zeros_g), (jnp.arange(ga), micro))
  weights = jnp.maximum(aux["total_weights"], 1.0)
  grads = jax.tree.map(lambda g, p: (g / weights).astype(p.dtype), grads, state["params"])
  updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # The model's own update rules (e.g. a MoE routing bias set by its load rule) see the step's summed stats.
  model = nnx.merge(setup.graphdef, nnx.State(setup.full_params(params, frozen)), setup.rest)
  model.post_update(aux["stats"])
  params = _pure(nnx.state(model, nnx.Param).to_pure_dict())
  if setup.lora:
    params = lora.split(params)[1]
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
  step_metrics = {
      "learning/loss": loss_sum / weights,
      "learning/z_loss": aux["z_loss_sum"] / weights,
      "learning/total_weights": aux["total_weights"],
      "learning/grad_norm": optax.global_norm(grads),
      "learning/param_norm": optax.global_norm(params),
      "learning/current_learning_rate": setup.schedule(state["step"]),
  }
  step_metrics |= {f"learning/{k}": v / weights for k, v in aux["metric_sums"].items()}
  step_metrics |= {f"learning/{k}": v for k, v in model.stats_metrics(aux["stats"]).items()}
  return new_state, step_metrics


def eval_step(setup: TrainSetup, params, batch, frozen=None):
  reference = setup.reference_params(params, frozen) if setup.config.use_dpo else None
  full = setup.full_params(params, frozen)
  loss_sum, aux = loss_sums(setup, full, batch, None, deterministic=True, aux_losses=False, reference=reference)
  return {"eval/loss_sum": loss_sum, "eval/total_weights": aux["total_weights"]}


def compile_train_step(setup: TrainSetup, batch_shapes):
  data_shardings = {k: sharding.data_sharding(setup.config, setup.mesh, v.shape) for k, v in batch_shapes.items()}
  replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
  # Batches enter both steps in load-balanced order under context parallelism (identity otherwise).
  enter = functools.partial(context_parallel.reorder_batch, config=setup.config)
  # Under LoRA or DPO both take the frozen params (base or reference) as a last argument.
  frozen = (setup.frozen_shardings,) if setup.has_frozen else ()
  step = jax.jit(
      lambda state, batch, *base: train_step(setup, state, enter(batch), *base),
      in_shardings=(setup.state_shardings, data_shardings) + frozen,
      out_shardings=(setup.state_shardings, replicated),
      donate_argnums=(0,),
  )
  evaluate = jax.jit(
      lambda params, batch, *base: eval_step(setup, params, enter(batch), *base),
      in_shardings=(setup.param_shardings, data_shardings) + frozen,
      out_shardings=replicated,
  )
  return step, evaluate, data_shardings


def _signature(tree) -> list[tuple]:
  """(shape, dtype) of every array leaf: what a compiled step takes."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  return [(tuple(x.shape), str(x.dtype)) for x in leaves]


def save_compiled_step(compiled, path: str):
  """Serializes a compiled train step (executable + argument/result trees), as MaxText.train_compile writes it."""
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  with epath.Path(path).open("wb") as f:
    pickle.dump(
        {"executable": payload, "in_tree": in_tree, "out_tree": out_tree, "inputs": _signature(compiled.args_info)}, f
    )


def load_compiled_step(path: str, args):
  """The step save_compiled_step wrote, loaded on this backend; ConfigError unless it takes `args`' structure."""
  try:
    with epath.Path(path).open("rb") as f:
      saved = pickle.load(f)
  except (OSError, pickle.UnpicklingError, KeyError, EOFError) as e:
    raise ConfigError(f"compiled_trainstep_file: cannot read {path}: {e}") from None
  if saved["in_tree"] != jax.tree.structure((args, {})) or saved["inputs"] != _signature(args):
    raise ConfigError(
        f"compiled_trainstep_file: {path} was compiled for another model, optimizer or batch layout than this"
        " config's; compile it again with python3 -m MaxText.train_compile and the same keys"
    )
  try:
    return serialize_executable.deserialize_and_load(saved["executable"], saved["in_tree"], saved["out_tree"])
  except Exception as e:  # pylint: disable=broad-exception-caught  # XLA raises plain RuntimeErrors
    raise ConfigError(
        f"compiled_trainstep_file: {path} does not load on this backend ({jax.default_backend()}, "
        f"{jax.device_count()} devices); it must run on the topology it was compiled for: {e}"
    ) from None
