"""Tests for the device mesh, logical-axis sharding and multi-process start-up, on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from MaxText import distributed, pyconfig, sharding
from MaxText.config_schema import ConfigError, SCHEMA


def build(**overrides):
  return pyconfig.initialize(["prog", "base.yml"], environ={}, **overrides)


def mesh_of(**overrides):
  return sharding.create_mesh(build(**overrides))


# ---------------------------------------------------------------- mesh construction


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, {"fsdp": 8}),  # base.yml: ici_fsdp_parallelism=-1 takes every device
        ({"ici_data_parallelism": 2, "ici_tensor_parallelism": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
        ({"ici_fsdp_parallelism": 1, "ici_tensor_parallelism": -1}, {"tensor": 8}),
        (
            {"ici_fsdp_parallelism": 2, "ici_sequence_parallelism": 2, "ici_tensor_parallelism": 2},
            {"fsdp": 2, "sequence": 2, "tensor": 2},
        ),
        ({"ici_expert_parallelism": 4}, {"fsdp": 2, "expert": 4}),
        (
            {"ici_fsdp_parallelism": 1, "ici_data_parallelism": -1, "ici_autoregressive_parallelism": 2},
            {"data": 4, "autoregressive": 2},
        ),
    ],
)
def test_mesh_shapes(overrides, expected):
  config = build(**overrides)
  mesh = sharding.create_mesh(config)
  assert mesh.axis_names == tuple(config.mesh_axes)
  assert dict(mesh.shape) == {axis: expected.get(axis, 1) for axis in mesh.axis_names}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  assert mesh.axis_types == (AxisType.Auto,) * len(mesh.axis_names)


def test_mesh_over_a_subset_of_axes():
  mesh = mesh_of(
      mesh_axes=["data", "fsdp", "tensor"],
      ici_data_parallelism=2,
      ici_tensor_parallelism=2,
      logical_axis_rules=[["activation_batch", ["data", "fsdp"]], ["mlp", ["tensor"]]],
      data_sharding=[["data", "fsdp"]],
  )
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_filled_degrees_are_in_the_config():
  config = build(ici_tensor_parallelism=2)
  assert config.ici_parallelism == [1, 1, 4, 1, 1, 1, 2, 1, 1, 1]
  assert config.dcn_parallelism == [1] * 10  # dcn_data_parallelism=-1 fills the single slice


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"ici_tensor_parallelism": 3}, "ici_tensor_parallelism=3"),  # -1 cannot fill 8 / 3
        ({"ici_fsdp_parallelism": 4}, "ici_fsdp_parallelism=4"),  # product 4, not 8
        ({"ici_fsdp_parallelism": 16}, "ici_fsdp_parallelism=16"),
        ({"ici_data_parallelism": 4, "ici_tensor_parallelism": 4}, "ici_tensor_parallelism=4"),
        ({"ici_data_parallelism": -1}, "ici_data_parallelism, ici_fsdp_parallelism"),  # two fills
        ({"ici_data_parallelism": 0}, "ici_data_parallelism"),
        ({"dcn_fsdp_parallelism": 2}, "dcn_fsdp_parallelism=2"),  # one slice cannot be split over dcn
        ({"num_slices": 2}, "num_slices"),
    ],
)
def test_impossible_meshes_are_config_errors(overrides, named):
  with pytest.raises(ConfigError) as e:
    build(**overrides)
  assert named in str(e.value)


def test_create_mesh_rejects_a_device_count_that_does_not_match():
  with pytest.raises(ConfigError, match="does not cover 4 devices"):
    sharding.create_mesh(build(), devices=jax.devices()[:4])


# ---------------------------------------------------------------- logical axis rules


@pytest.fixture(name="mesh222")
def fixture_mesh222():
  return mesh_of(ici_data_parallelism=2, ici_tensor_parallelism=2)  # data=2, fsdp=2 (filled), tensor=2


RULES = [
    ["batch", ["data", "fsdp"]],
    ["wide", ["fsdp", "tensor"]],
    ["other", ["tensor", "data"]],
    ["staged", ["stage", "fsdp"]],
    ["none", []],
    ["single", "tensor"],
]


@pytest.mark.parametrize(
    "logical, shape, expected",
    [
        (("batch", None), (8, 3), P(("data", "fsdp"))),
        ((None, "wide"), (3, 8), P(None, ("fsdp", "tensor"))),
        (("wide", "other"), (8, 8), P(("fsdp", "tensor"), "data")),  # tensor already used: other falls to data
        (("other", "wide"), (8, 8), P(("tensor", "data"), "fsdp")),
        (("batch", "wide"), (8, 8), P(("data", "fsdp"), "tensor")),
        (("wide",), (2,), P("fsdp")),  # fsdp x tensor = 4 does not divide 2
        (("wide",), (6,), P("fsdp")),
        (("wide",), (3,), P()),  # nothing divides 3: replicated
        (("batch",), (4,), P(("data", "fsdp"))),
        (("staged",), (8,), P("fsdp")),  # stage has size 1 and is skipped
        (("none", "single"), (4, 4), P(None, "tensor")),
        (("wide", "wide"), (8, 8), P(("fsdp", "tensor"))),  # a mesh axis shards one dimension only
        (("wide",), None, P(("fsdp", "tensor"))),  # shape unknown: no divisibility check
    ],
)
def test_logical_rules_to_partition_specs(mesh222, logical, shape, expected):
  assert sharding.logical_to_mesh_spec(logical, RULES, mesh222, shape) == expected


def test_first_rule_for_a_name_wins(mesh222):
  rules = [["x", ["tensor"]], ["x", ["data"]]]
  assert sharding.logical_to_mesh_spec(("x",), rules, mesh222, (8,)) == P("tensor")


def test_unknown_logical_name_is_an_error(mesh222):
  with pytest.raises(ValueError, match="'nope'"):
    sharding.logical_to_mesh_spec(("nope",), RULES, mesh222)


@pytest.mark.parametrize(
    "overrides, logical, shape, expected",
    [
        ({}, ("embed", "mlp"), (256, 768), P("fsdp")),  # plain FSDP shards the embed dimension
        ({}, ("vocab", "embed"), (32000, 256), P(None, "fsdp")),
        ({"ici_tensor_parallelism": 2}, ("embed", "heads", "kv"), (256, 4, 64), P("fsdp", "tensor")),
        ({"ici_tensor_parallelism": 2}, ("embed", "mlp"), (256, 768), P("fsdp", "tensor")),
        ({"ici_tensor_parallelism": 2}, ("embed", "kv_heads", "kv"), (256, 1, 64), P("fsdp")),  # 1 kv head
        (
            {"ici_tensor_parallelism": 2},
            ("activation_batch", "activation_length", "activation_embed"),
            (8, 16, 256),
            P("fsdp"),
        ),
        ({"ici_stage_parallelism": 2}, ("layers", "embed", "mlp"), (4, 256, 768), P("stage", "fsdp")),
        ({"ici_expert_parallelism": 2}, ("exp", "embed", "mlp"), (4, 256, 768), P("expert", "fsdp")),
    ],
)
def test_shipped_rules(overrides, logical, shape, expected):
  config = build(**overrides)
  mesh = sharding.create_mesh(config)
  assert sharding.logical_to_mesh_spec(logical, config.logical_axis_rules, mesh, shape) == expected


# ---------------------------------------------------------------- data sharding


@pytest.mark.parametrize(
    "overrides, batch, expected",
    [
        ({}, 32, P("fsdp")),
        ({"ici_data_parallelism": 2, "ici_tensor_parallelism": 2}, 8, P(("data", "fsdp", "tensor"))),
        ({"ici_data_parallelism": 2, "ici_tensor_parallelism": 2}, 4, P(("data", "fsdp"))),
        ({}, 4, P()),  # a batch smaller than the fsdp axis is replicated rather than unshardable
        (
            {"ici_data_parallelism": 2, "ici_tensor_parallelism": 2, "data_sharding": ["data", "tensor"]},
            8,
            P(("data", "tensor")),
        ),  # a flat list of axes works too
    ],
)
def test_data_sharding(overrides, batch, expected):
  config = build(**overrides)
  mesh = sharding.create_mesh(config)
  spec = sharding.data_sharding(config, mesh, (batch, 16))
  assert spec.spec == expected
  array = jax.device_put(np.zeros((batch, 16), np.int32), spec)
  assert array.addressable_shards[0].data.shape[0] == batch // int(np.prod([mesh.shape[a] for a in _axes(expected)]))


def _axes(spec):
  first = spec[0] if len(spec) else None
  return () if first is None else (first if isinstance(first, tuple) else (first,))


# ---------------------------------------------------------------- parameter trees and activations


class _Tiny(nnx.Module):

  def __init__(self):
    self.kernel = nnx.Param(jnp.zeros((16, 32)), out_sharding=("embed", "mlp"), eager_sharding=False)
    self.odd = nnx.Param(jnp.zeros((3, 32)), out_sharding=("embed", "mlp"), eager_sharding=False)
    self.bias = nnx.Param(jnp.zeros((32,)))
    self.count = nnx.Variable(jnp.zeros((), jnp.int32))


def test_state_shardings_follow_logical_names():
  config = build(ici_tensor_parallelism=2)
  mesh = sharding.create_mesh(config)
  for state in (nnx.state(_Tiny()), nnx.state(nnx.eval_shape(_Tiny))):
    specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(state, config.logical_axis_rules, mesh))
    assert specs["kernel"] == P("fsdp", "tensor")
    assert specs["odd"] == P(None, "tensor")  # 3 rows do not split over fsdp=4
    assert specs["bias"] == P()  # no logical names: replicated
    assert specs["count"] == P()


def test_with_logical_constraint_inside_use_mesh():
  config = build(ici_tensor_parallelism=2)
  mesh = sharding.create_mesh(config)
  x = jnp.ones((8, 4))
  constrain = jax.jit(lambda a: sharding.with_logical_constraint(a * 2, ("activation_batch", "activation_mlp")))
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    assert constrain(x).sharding.spec == P("fsdp", "tensor")
  # Outside use_mesh the constraint is a no-op, so model code also runs unsharded.
  assert sharding.with_logical_constraint(x, ("activation_batch", "activation_mlp")) is x


# ---------------------------------------------------------------- hardware and jax.distributed


def _raw(**overrides):
  """Coerced base.yml values, as distributed.setup receives them."""
  values = yaml.safe_load((pyconfig.CONFIGS_DIR / "base.yml").read_text())
  values.update(overrides)
  return {k: SCHEMA[k].coerce(k, v) for k, v in values.items()}


@pytest.fixture(name="initialize_calls")
def fixture_initialize_calls(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(distributed, "_backends_initialized", lambda: False)
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  return calls


def test_single_process_never_starts_jax_distributed(initialize_calls, monkeypatch):
  distributed.setup(_raw())
  monkeypatch.setenv("SLURM_NTASKS", "4")
  distributed.setup(_raw(num_processes=1))
  distributed.setup(_raw(skip_jax_distributed_system=True, coordinator_address="host:1234", num_processes=2))
  assert not initialize_calls


# The configured 300 s belongs to the watchdog; JAX's own deadline trails it.
GRACED = 300 + distributed.JAX_DEADLINE_GRACE_SECONDS


def test_config_keys_start_jax_distributed(initialize_calls):
  distributed.setup(_raw(coordinator_address="localhost:1234", num_processes=2, process_id=1))
  assert initialize_calls == [
      {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1, "initialization_timeout": GRACED}
  ]


def test_cluster_environment_starts_jax_distributed(initialize_calls, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "2")
  distributed.setup(_raw())
  assert initialize_calls == [{"initialization_timeout": GRACED}]  # jax's own cluster detection fills the rest


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"num_processes": 2, "process_id": 0}, "coordinator_address"),
        ({"num_processes": 2, "coordinator_address": "h:1"}, "process_id"),
    ],
)
def test_incomplete_multiprocess_settings(initialize_calls, overrides, key):
  with pytest.raises(ConfigError, match=f"^{key}:"):
    distributed.setup(_raw(**overrides))
  assert not initialize_calls


def test_multiprocess_after_jax_started_is_a_config_error(initialize_calls, monkeypatch):
  monkeypatch.setattr(distributed, "_backends_initialized", lambda: True)
  with pytest.raises(ConfigError, match="before any JAX computation"):
    distributed.setup(_raw(coordinator_address="h:1", num_processes=2, process_id=0))
  assert not initialize_calls


def test_hardware_detection():
  jax.devices()
  assert distributed.detect_hardware("auto") == "cpu"
  assert distributed.detect_hardware("cpu") == "cpu"
  with pytest.raises(ConfigError, match="^hardware: asked for 'gpu'"):
    distributed.detect_hardware("gpu")
