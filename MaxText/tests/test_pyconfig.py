"""Tests for MaxText.pyconfig: merge order, overrides, coercion, derived values and config errors.

Most cases build the Config in this process (conftest gives 8 CPU devices); a representative set runs the
real command line, `python3 -m MaxText.pyconfig ...`, to check what a user sees: exit code 2, one
`CONFIG ERROR:` line naming the key, and no traceback.
"""

import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
import yaml

from MaxText import pyconfig
from MaxText.config_schema import ConfigError, Field, SCHEMA

REPO_ROOT = pathlib.Path(pyconfig.__file__).resolve().parent.parent
BASE_YML = pyconfig.CONFIGS_DIR / "base.yml"
BASE = yaml.safe_load(BASE_YML.read_text())


def build(*args, environ=None, config="base.yml", **kwargs):
  """A Config from `config` plus key=value args, isolated from the caller's M_* environment."""
  return pyconfig.initialize(["prog", str(config), *args], environ={} if environ is None else environ, **kwargs)


def config_error(*args, **kwargs) -> str:
  with pytest.raises(ConfigError) as e:
    build(*args, **kwargs)
  return str(e.value)


@pytest.fixture(autouse=True, scope="module")
def _started_backend():
  # As in a real run, JAX is up before these configs are built, so a forced `hardware` cannot switch the
  # whole test process to another platform.
  jax.devices()


@pytest.fixture(name="models_dir")
def fixture_models_dir(tmp_path, monkeypatch):
  """A private configs/models/ with two model ymls, so tests do not depend on the shipped ones."""
  models = tmp_path / "models"
  (models / "family").mkdir(parents=True)
  (models / "tiny-test.yml").write_text(
      "base_emb_dim: 512  # model dims\nbase_num_query_heads: 8\nbase_num_kv_heads: 2\nbase_mlp_dim: 1024\n"
      "head_dim: 32\nmax_target_length: 128\nnormalization_layer_epsilon: 1.0e-6\n"
  )
  (models / "family" / "size.yml").write_text("base_num_decoder_layers: 2\n")
  monkeypatch.setattr(pyconfig, "MODELS_DIR", models)
  return models


# ---------------------------------------------------------------- merge order


def test_merge_order_yml_chain_model_env_cli_kwargs(tmp_path, models_dir):
  del models_dir
  (tmp_path / "parent.yml").write_text(
      "base_config: base.yml\nsteps: 11\nlearning_rate: 0.5\nbase_emb_dim: 111\neval_steps: 5\n"
      "max_prefill_predict_length: 32\n"
  )
  (tmp_path / "child.yml").write_text("base_config: parent.yml\nsteps: 22\nmodel_name: tiny-test\n")
  env = {"M_MAX_TARGET_LENGTH": "64", "M_LOG_PERIOD": "7", "M_CHECKPOINT_PERIOD": "9", "PATH": "/bin"}
  config = build("log_period=8", "eval_steps=3", "adam_b1=0.5", config=tmp_path / "child.yml", environ=env, adam_b1=0.8)

  assert config.adam_b2 == BASE["adam_b2"]  # base.yml default
  assert config.learning_rate == 0.5  # parent yml over base.yml
  assert config.steps == 22  # child yml over its parent
  assert config.base_emb_dim == 512  # model yml over the yml chain
  assert config.base_mlp_dim == 1024  # model yml over base.yml
  assert config.max_target_length == 64  # M_<KEY> env over the model yml
  assert config.checkpoint_period == 9  # env over base.yml
  assert config.log_period == 8  # key=value over env
  assert config.eval_steps == 3  # key=value over the yml chain
  assert config.adam_b1 == 0.8  # python kwargs over key=value
  assert config.model_keys == sorted(
      [
          "base_emb_dim",
          "base_num_query_heads",
          "base_num_kv_heads",
          "base_mlp_dim",
          "head_dim",
          "max_target_length",
          "normalization_layer_epsilon",
      ]
  )


def test_bare_config_name_resolves_in_configs_dir():
  assert build(config="base.yml").config_path == str(BASE_YML)
  assert build(config=os.path.relpath(BASE_YML)).config_path == str(BASE_YML)


def test_config_without_base_config_gets_base_defaults(tmp_path):
  (tmp_path / "alone.yml").write_text("steps: 5\n")
  config = build(config=tmp_path / "alone.yml")
  assert config.steps == 5
  assert config.learning_rate == BASE["learning_rate"]


def test_model_yml_applies_and_cli_override_is_logged(models_dir, caplog):
  del models_dir
  caplog.set_level(logging.INFO, logger="MaxText")
  config = build(
      "model_name=tiny-test", "base_emb_dim=1024", "head_dim=32", "normalization_layer_epsilon=1e-6", "steps=3"
  )
  assert config.emb_dim == 1024
  assert config.num_query_heads == 8 and config.num_kv_heads == 2
  overrides = [r.getMessage() for r in caplog.records if "Overriding model key" in r.getMessage()]
  # head_dim and the epsilon get the model's own values (1e-6 is a string to YAML 1.1) and steps is not a
  # model key: none of them is an override.
  assert overrides == ["Overriding model key base_emb_dim: 512 (from tiny-test.yml) -> 1024"]


def test_env_override_is_typed_and_cli_beats_env():
  assert build(environ={"M_STEPS": "17"}).steps == 17
  assert build("steps=18", environ={"M_STEPS": "17"}).steps == 18
  assert build(environ={"M_ENABLE_CHECKPOINTING": "false"}).enable_checkpointing is False


def test_nested_model_name(models_dir):
  del models_dir
  config = build("model_name=family/size")
  assert config.num_decoder_layers == 2
  assert config.run_name.startswith("family_size_")


def test_model_name_default_keeps_base_dims():
  config = build()
  assert (config.emb_dim, config.mlp_dim, config.num_decoder_layers) == (
      BASE["base_emb_dim"],
      BASE["base_mlp_dim"],
      BASE["base_num_decoder_layers"],
  )
  assert config.model_keys == []


def test_unknown_model_lists_available(models_dir):
  del models_dir
  message = config_error("model_name=nope")
  assert message.startswith("model_name:")
  assert "default, family/size, tiny-test" in message


def test_model_name_cannot_escape_models_dir():
  # ../base would otherwise load configs/base.yml as if it were a model.
  assert config_error("model_name=../base").startswith("model_name:")


# ---------------------------------------------------------------- type coercion


@pytest.mark.parametrize(
    "arg, key, expected",
    [
        ("steps=7", "steps", 7),
        ("steps=7.0", "steps", 7),
        ("learning_rate=3e-4", "learning_rate", 3e-4),  # YAML 1.1 reads 3e-4 as a string
        ("learning_rate=1", "learning_rate", 1.0),
        ("per_device_batch_size=2", "per_device_batch_size", 2.0),
        ("enable_checkpointing=false", "enable_checkpointing", False),
        ("enable_checkpointing=True", "enable_checkpointing", True),
        ("mlp_activations=[gelu, linear]", "mlp_activations", ["gelu", "linear"]),
        ("mlp_activations=['relu']", "mlp_activations", ["relu"]),
        ("run_name=123", "run_name", "123"),
        ("--steps=9", "steps", 9),
    ],
)
def test_cli_values_are_coerced_to_the_declared_type(arg, key, expected):
  value = getattr(build(arg), key)
  assert value == expected
  assert type(value) is type(expected)  # pylint: disable=unidiomatic-typecheck


@pytest.mark.parametrize(
    "arg, key",
    [
        ("steps=abc", "steps"),
        ("steps=1.5", "steps"),
        ("steps=true", "steps"),
        ("steps=null", "steps"),
        ("steps=[1, 2]", "steps"),
        ("learning_rate=fast", "learning_rate"),
        ("enable_checkpointing=maybe", "enable_checkpointing"),
        ("enable_checkpointing=1", "enable_checkpointing"),
        ("mlp_activations=silu", "mlp_activations"),
        ("mlp_activations=[silu, [gelu]]", "mlp_activations"),
        ("hardware=fpga", "hardware"),
        ("dtype=float64", "dtype"),
        ("learning_rate=-0.1", "learning_rate"),
        ("dropout_rate=1.5", "dropout_rate"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps"),
        ("ici_fsdp_parallelism=-2", "ici_fsdp_parallelism"),
    ],
)
def test_wrong_type_or_range_names_the_key(arg, key):
  assert re.match(rf"{key}(\[\d+\])?: ", config_error(arg))


def test_wrong_type_from_env_and_kwargs_names_the_key():
  assert config_error(environ={"M_STEPS": "many"}).startswith("steps:")
  assert config_error(steps="many").startswith("steps:")
  assert config_error(run_name=["a"]).startswith("run_name:")


def test_nullable_field_accepts_null_and_others_do_not():
  assert Field(int, nullable=True).coerce("k", None) is None
  with pytest.raises(ConfigError, match="^k: null is not allowed"):
    Field(int).coerce("k", None)


# ---------------------------------------------------------------- derived values


@pytest.mark.parametrize(
    "scale, emb, heads, mlp, layers",
    [
        (1, 256, 4, 768, 4),
        (2, 256, 8, 1536, 4),
        (4, 512, 8, 1536, 4),
        (8, 512, 8, 1536, 8),
        (16, 512, 16, 3072, 8),
    ],
)
def test_global_parameter_scale(scale, emb, heads, mlp, layers):
  config = build(
      f"global_parameter_scale={scale}",
      "base_emb_dim=256",
      "base_num_query_heads=4",
      "base_num_kv_heads=2",
      "base_mlp_dim=768",
      "base_num_decoder_layers=4",
  )
  assert (config.emb_dim, config.num_query_heads, config.mlp_dim, config.num_decoder_layers) == (
      emb,
      heads,
      mlp,
      layers,
  )
  assert config.num_kv_heads == heads // 2


def test_global_parameter_scale_must_be_power_of_two():
  assert config_error("global_parameter_scale=3").startswith("global_parameter_scale:")


def test_run_name_default_and_output_directories():
  config = build("base_output_directory=gs://bucket/out/")
  assert re.fullmatch(r"default_\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d", config.run_name)
  named = build("run_name=exp1", "base_output_directory=/tmp/out")
  assert named.run_name == "exp1"
  assert named.run_dir == "/tmp/out/exp1"
  assert named.checkpoint_dir == "/tmp/out/exp1/checkpoints"
  assert named.tensorboard_dir == "/tmp/out/exp1/tensorboard"
  assert named.metrics_dir == "/tmp/out/exp1/metrics"
  assert config.checkpoint_dir == f"gs://bucket/out/{config.run_name}/checkpoints"


def test_devices_and_processes():
  config = build()
  assert (config.num_devices, config.process_count, config.process_index, config.num_slices) == (8, 1, 0, 1)
  assert config.hardware == "cpu"


@pytest.mark.parametrize(
    "per_device, accumulation, micro, global_batch",
    [(4, 1, 32, 32), (0.25, 1, 2, 2), (0.25, 4, 2, 8), (0.125, 3, 1, 3), (1.5, 2, 12, 24)],
)
def test_batch_sizes(per_device, accumulation, micro, global_batch):
  config = build(f"per_device_batch_size={per_device}", f"gradient_accumulation_steps={accumulation}")
  assert config.micro_batch_size_to_train_on == micro
  assert config.global_batch_size_to_train_on == global_batch
  assert config.global_batch_size_to_load == global_batch


def test_fractional_batch_tolerates_float_rounding(monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 25)
  assert build("per_device_batch_size=1.16").micro_batch_size_to_train_on == 29  # 1.16 * 25 = 28.999999999999996
  assert build("per_device_batch_size=0.28").micro_batch_size_to_train_on == 7  # 0.28 * 25 = 7.000000000000001


@pytest.mark.parametrize("per_device", [0.1, 0.0, 0.3])
def test_batch_must_be_whole_sequences(per_device):
  assert config_error(f"per_device_batch_size={per_device}").startswith("per_device_batch_size:")


@pytest.mark.parametrize(
    "args, steps, schedule_steps, warmup",
    [
        (["steps=100", "warmup_steps_fraction=0.1"], 100, 100, 10),
        (["steps=100", "learning_rate_schedule_steps=300", "warmup_steps_fraction=0.1"], 100, 300, 30),
        (["steps=-1", "learning_rate_schedule_steps=50", "warmup_steps_fraction=0.5"], 50, 50, 25),
    ],
)
def test_schedule_steps(args, steps, schedule_steps, warmup):
  config = build(*args)
  assert (config.steps, config.learning_rate_schedule_steps, config.warmup_steps) == (steps, schedule_steps, warmup)


def test_dtypes():
  config = build("dtype=bfloat16", "weight_dtype=float32")
  assert config.dtype == jnp.bfloat16 and config.weight_dtype == jnp.float32
  assert config.mu_dtype == jnp.float32  # "" follows weight_dtype
  assert build("weight_dtype=bfloat16", "mu_dtype=float32").mu_dtype == jnp.float32
  assert build("weight_dtype=bfloat16").mu_dtype == jnp.bfloat16


def test_resolved_yaml_round_trips():
  config = build("dtype=bfloat16", "run_name=r")
  dumped = yaml.safe_load(config.to_yaml())
  assert dumped["dtype"] == "bfloat16"
  assert dumped["run_name"] == "r"
  assert dumped["ici_parallelism"] == config.ici_parallelism


# ---------------------------------------------------------------- read-only


def test_config_is_read_only():
  config = build()
  with pytest.raises(AttributeError, match="read-only"):
    config.steps = 5
  with pytest.raises(AttributeError, match="read-only"):
    del config.steps
  config.mesh_axes.append("extra")
  config.logical_axis_rules[0][1].append("extra")
  config.to_dict()["mlp_activations"].append("relu")
  assert "extra" not in config.mesh_axes
  assert "extra" not in config.logical_axis_rules[0][1]
  assert config.mlp_activations == BASE["mlp_activations"]
  assert config.steps == BASE["steps"]


def test_building_a_config_has_no_process_side_effects(monkeypatch):
  def refuse(raw):
    raise AssertionError(f"pyconfig.initialize called distributed.setup({len(raw)} values)")

  monkeypatch.setattr(pyconfig.distributed, "setup", refuse)
  assert build("reuse_host_memory=true", "hardware=cpu").process_count == 1
  # Several processes are the start-up's job: asking pyconfig alone for them is an error, not a hang.
  assert config_error("coordinator_address=localhost:1", "num_processes=2", "process_id=0").startswith("num_processes:")


def test_unknown_attribute_suggests_a_key():
  with pytest.raises(AttributeError, match="'steps'"):
    _ = build().stepz


# ---------------------------------------------------------------- inconsistent settings and bad input


@pytest.mark.parametrize(
    "args, key",
    [
        (["base_num_query_heads=6", "base_num_kv_heads=4"], "base_num_query_heads"),
        (["max_target_length=32", "max_prefill_predict_length=64"], "max_prefill_predict_length"),
        (["head_dim=63"], "head_dim"),
        (["mlp_activations=[silu, swishy]"], "mlp_activations"),
        (["mlp_activations=[]"], "mlp_activations"),
        (["decoder_block=nofamily"], "decoder_block"),
        (["load_parameters_path=/a", "load_full_state_path=/b"], "load_parameters_path"),
        (["steps=0"], "steps"),
        (["steps=-1"], "steps"),
        (
            ["lr_schedule_type=wsd", "warmup_steps_fraction=0.5", "wsd_decay_steps_fraction=0.6"],
            "wsd_decay_steps_fraction",
        ),
        (["run_name=a/b"], "run_name"),
        (["mesh_axes=[data, fsdp, fsdp]"], "mesh_axes"),
        (["mesh_axes=[data, fsdp, warp]"], "mesh_axes"),
        (["mesh_axes=[data, fsdp]", "ici_tensor_parallelism=2"], "ici_tensor_parallelism"),
        (["mesh_axes=[data, fsdp]", "ici_tensor_parallelism=1"], "logical_axis_rules"),
        (["data_sharding=[[data, warp]]"], "data_sharding"),
        (["num_slices=2"], "num_slices"),
        (["hardware=gpu"], "hardware"),
        (["stepz=3"], "stepz"),
    ],
)
def test_inconsistent_settings_name_the_key(args, key):
  assert config_error(*args).startswith(key)


def test_argument_without_value_is_named():
  assert "'steps'" in config_error("steps")


def test_unknown_keys_suggest_and_say_where(tmp_path):
  assert config_error("stepz=3") == "stepz: unknown key in command-line arguments (did you mean 'steps'?)"
  assert "M_LEARNING_RAT" in config_error(environ={"M_LEARNING_RAT": "1"})
  assert "'learning_rate'" in config_error(environ={"M_LEARNING_RAT": "1"})
  assert config_error(stepz=3).startswith("stepz: unknown key in keyword overrides")
  (tmp_path / "typo.yml").write_text("base_config: base.yml\nlearning_rat: 0.1\n")
  message = config_error(config=tmp_path / "typo.yml")
  assert message.startswith("learning_rat:") and "typo.yml" in message and "'learning_rate'" in message


def test_bad_config_files(tmp_path):
  assert "not found" in config_error(config=tmp_path / "missing.yml")
  (tmp_path / "a.yml").write_text("base_config: b.yml\n")
  (tmp_path / "b.yml").write_text("base_config: a.yml\n")
  assert config_error(config=tmp_path / "a.yml").startswith("base_config: cycle")
  (tmp_path / "orphan.yml").write_text("base_config: nowhere.yml\n")
  assert "'nowhere.yml' not found" in config_error(config=tmp_path / "orphan.yml")
  (tmp_path / "broken.yml").write_text("steps: [1\n")
  assert "not valid YAML" in config_error(config=tmp_path / "broken.yml")
  (tmp_path / "list.yml").write_text("- steps\n")
  assert "mapping" in config_error(config=tmp_path / "list.yml")
  with pytest.raises(ConfigError, match="no config file given"):
    pyconfig.initialize(["prog"], environ={})


# ---------------------------------------------------------------- base.yml and the schema


def _base_yml_entries() -> list[tuple[str, str]]:
  """(key, the line that ends its value) for every top-level key of base.yml, in file order."""
  lines = BASE_YML.read_text().splitlines()
  entries = []
  for i, line in enumerate(lines):
    match = re.match(r"([A-Za-z_][A-Za-z0-9_]*):", line)
    if not match:
      continue
    end = i
    if line.split("#")[0].count("[") > line.split("#")[0].count("]"):  # a flow list spanning several lines
      while not lines[end].startswith("]"):
        end += 1
    entries.append((match.group(1), lines[end]))
  return entries


def test_every_base_yml_key_has_a_comment_and_a_schema_entry():
  entries = _base_yml_entries()
  keys = [k for k, _ in entries]
  assert len(keys) == len(set(keys)), "duplicate keys in base.yml"
  undocumented = [k for k, last in entries if not re.search(r"\s#\s*\S", re.sub(r'"[^"]*"', '""', last))]
  assert not undocumented, f"base.yml keys without a one-line comment: {undocumented}"
  assert set(keys) == set(BASE)
  assert not set(keys) - set(SCHEMA), "base.yml keys without a schema entry"
  assert not set(SCHEMA) - set(keys), "schema keys missing from base.yml"


def test_base_yml_defaults_satisfy_the_schema():
  for key, value in BASE.items():
    SCHEMA[key].coerce(key, value)


# ---------------------------------------------------------------- the command line, as a user runs it


def run_cli(*args, env=None):
  environ = {k: v for k, v in os.environ.items() if not k.startswith(pyconfig.ENV_PREFIX)}
  environ.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", **(env or {}))
  return subprocess.run(
      [sys.executable, "-m", "MaxText.pyconfig", *args],
      cwd=REPO_ROOT,
      env=environ,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


def test_cli_dry_run_prints_resolved_config():
  result = run_cli("MaxText/configs/base.yml", "steps=3", "per_device_batch_size=0.5", env={"M_EVAL_STEPS": "4"})
  assert result.returncode == 0, result.stderr
  resolved = yaml.safe_load(result.stdout)
  assert resolved["steps"] == 3
  assert resolved["eval_steps"] == 4
  assert resolved["num_devices"] == 8
  assert resolved["global_batch_size_to_train_on"] == 4
  assert "CONFIG ERROR" not in result.stderr


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["stepz=3"], {}, "stepz: unknown key in command-line arguments (did you mean 'steps'?)"),
        (["steps=abc"], {}, "steps: 'abc' is not a valid int"),
        ([], {"M_STEPS": "abc"}, "steps: 'abc' is not a valid int"),
        (["learning_rate=-1"], {}, "learning_rate: -1.0 is below the minimum"),
        (["model_name=no-such-model"], {}, "model_name: unknown model 'no-such-model'; available: default"),
        (["ici_fsdp_parallelism=4"], {}, "ici_*_parallelism: product of (ici_fsdp_parallelism=4) is 4"),
        (["base_num_query_heads=6", "base_num_kv_heads=4"], {}, "base_num_query_heads: 6 query heads"),
        (
            ["max_prefill_predict_length=512", "max_target_length=256"],
            {},
            "max_prefill_predict_length: 512 exceeds max_target_length 256",
        ),
        # With or without libtpu installed: this host has no TPU chip.
        (["hardware=tpu"], {}, "hardware: "),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(args, env, expected):
  result = run_cli("MaxText/configs/base.yml", *args, env=env)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("CONFIG ERROR:")]
  assert len(errors) == 1, result.stderr
  assert errors[0].startswith(f"CONFIG ERROR: {expected}"), errors[0]
  assert "Traceback" not in result.stderr
  assert result.stdout == ""
  if args == ["model_name=no-such-model"]:
    assert all(name in errors[0] for name in pyconfig.available_models())


def test_training_shorter_than_the_prefill_default_is_not_refused():
  """max_prefill_predict_length (default 64) is a decode key: a train run with 32-token sequences starts; decoding
  that short a cache is refused, naming the key."""
  argv = ["", "MaxText/configs/base.yml", "max_target_length=32"]
  assert pyconfig.initialize(argv, program="train").max_target_length == 32
  for program in ("decode", "serve"):
    with pytest.raises(ConfigError, match="max_prefill_predict_length: 64 exceeds max_target_length 32"):
      pyconfig.initialize(argv, program=program)


def test_cli_missing_config_file_exits_2():
  result = run_cli("MaxText/configs/no_such.yml", "steps=3")
  assert result.returncode == 2
  assert result.stderr.startswith("CONFIG ERROR: config file 'MaxText/configs/no_such.yml' not found")
  assert "Traceback" not in result.stderr


_REFAULT_PROBE = """
import ctypes, resource, sys
from MaxText import distributed, pyconfig, startup
build = startup.start if sys.argv[3] == "startup" else pyconfig.initialize
build(["", sys.argv[1], "hardware=cpu", "reuse_host_memory=" + sys.argv[2]])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def faults_of_a_fresh_256_mib_buffer():  # malloc itself, as XLA's allocator does (numpy asks for huge pages)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ptr = libc.malloc(256 << 20)
  ctypes.memset(ptr, 1, 256 << 20)  # touch every page
  libc.free(ptr)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_fresh_256_mib_buffer()  # the heap grows to hold it once
print(distributed.reuse_host_memory_applied(), faults_of_a_fresh_256_mib_buffer())
"""


@pytest.mark.parametrize("reuse, build_with", [(True, "startup"), (False, "startup"), (True, "initialize")])
def test_reuse_host_memory_stops_refaulting_freed_buffers(reuse, build_with):
  """With reuse_host_memory (before JAX starts), a big buffer freed and allocated again reuses the same pages;
  without it glibc maps fresh ones, faulted in (and zero-filled) again: 65536 4 KiB pages for 256 MiB.
  Only the entry points' start-up applies it: pyconfig.initialize has no side effects."""
  applied_expected = reuse and build_with == "startup"
  out = subprocess.run(
      [sys.executable, "-c", _REFAULT_PROBE, str(BASE_YML), str(reuse).lower(), build_with],
      env={k: v for k, v in os.environ.items() if not k.startswith(pyconfig.ENV_PREFIX)},
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  applied, faults = out.stdout.split()[-2:]
  assert applied == str(applied_expected)
  if applied_expected:
    assert int(faults) < 2000
  else:
    assert int(faults) > 30000
