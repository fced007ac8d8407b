"""Building the Transformer: concrete, abstract (shapes and logical names only), or initialized straight into shards.

The train loop typically does
    graphdef, abstract = nnx.split(abstract_model(config))
    shardings = sharding.state_shardings(abstract, config.logical_axis_rules, mesh)
    model = create_sharded_model(config, mesh)           # params materialize already sharded, never whole
"""

import functools
import math

import jax
from flax import nnx

from MaxText import sharding
from MaxText.layers import params as param_kinds
from MaxText.layers.decoders import Transformer


def default_rngs(config) -> nnx.Rngs:
  """Param init from `init_weights_seed`; dropout from a stream derived from it."""
  return nnx.Rngs(params=config.init_weights_seed, dropout=config.init_weights_seed + 1)


def _construct(config, rngs: nnx.Rngs) -> Transformer:
  # Params already opt out of eager sharding one by one; the context also covers variables flax transforms create.
  with nnx.use_eager_sharding(False):
    return Transformer(config, rngs)


def get_model(config, rngs: nnx.Rngs | None = None) -> Transformer:
  """A concrete Transformer, initialized under jit (eager init would compile one kernel per param shape)."""
  return nnx.jit(functools.partial(_construct, config))(default_rngs(config) if rngs is None else rngs)


def abstract_model(config) -> Transformer:
  """The Transformer with jax.ShapeDtypeStruct values: shapes, dtypes and logical names, no memory or compute.

  jax.eval_shape rather than nnx.eval_shape: under an active mesh the latter turns the *logical* names into
  shardings and fails; here values carry no sharding, wherever this is called.
  """
  graphdef = None

  def init():
    nonlocal graphdef
    graphdef, state = nnx.split(_construct(config, default_rngs(config)))
    return state

  state = jax.eval_shape(init)
  return nnx.merge(graphdef, state)


def model_shardings(config, mesh: jax.sharding.Mesh):
  """(graphdef, abstract state, NamedSharding tree matching the state) under the config's logical axis rules."""
  graphdef, abstract = nnx.split(abstract_model(config))
  return graphdef, abstract, sharding.state_shardings(abstract, config.logical_axis_rules, mesh)


def create_sharded_model(config, mesh: jax.sharding.Mesh) -> Transformer:
  """Initializes the params inside jit with out_shardings, so each device only ever holds its own shards.

  The rngs are built inside the jitted init from `init_weights_seed`, so the values equal `get_model(config)`'s.
  """
  graphdef, _, shardings = model_shardings(config, mesh)
  init = jax.jit(lambda: nnx.state(_construct(config, default_rngs(config))), out_shardings=shardings)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    state = init()
  return nnx.merge(graphdef, state)


def param_count(model_or_state) -> int:
  """Total number of parameter elements (nnx.Param only; works on abstract models/states too)."""
  if isinstance(model_or_state, nnx.State):
    params = nnx.filter_state(model_or_state, nnx.Param)
  else:
    params = nnx.state(model_or_state, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def weight_decay_mask(abstract_params: nnx.State) -> dict:
  """Params-shaped pure dict of bools: True where the optimizer's weight decay applies (not on RuleUpdated params)."""
  mask = jax.tree.map(param_kinds.trained_by_optimizer, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.State(mask).to_pure_dict() if isinstance(mask, nnx.State) else mask
