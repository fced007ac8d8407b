"""Data, tokenizers, metrics and conversion on gs:// (a GCS emulator) against the same files read locally.

Each test builds tiny local files, uploads them to the emulator's bucket and checks that reading them from gs://
gives exactly what reading the local copy gives (tokens, batches, params), that what is written to gs:// holds
what a local run writes, and that a missing object or bucket is one ConfigError naming the key and the path.
Runs only in a private network namespace (see the `gcs` fixture in conftest.py).
"""

import json
import pathlib
import struct

import numpy as np
import pytest

from MaxText import pyconfig
from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import tokenizer as tokenizers
from MaxText.tests import test_input_pipeline as tip
from MaxText.tests import test_tokenizer as ttok


def _upload(local: pathlib.Path, url: str):
  """Copies a local file or directory tree to gs://bucket/... ."""
  import fsspec  # pylint: disable=import-outside-toplevel

  fs, root = fsspec.core.url_to_fs(url)
  files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
  for f in files:
    fs.put_file(str(f), root if local.is_file() else f"{root}/{f.relative_to(local).as_posix()}")


def _same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------------------------ tokenizers


@pytest.fixture(scope="module", name="tok_dir")
def _tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  ttok._write_sentencepiece(d / "sp.model")  # pylint: disable=protected-access
  ttok._write_huggingface(d / "tokenizer.json")  # pylint: disable=protected-access
  ttok._write_tiktoken(d / "ranks.tiktoken")  # pylint: disable=protected-access
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
  return d


def test_each_tokenizer_kind_loads_from_gcs_like_the_local_file(gcs, tok_dir):
  del gcs
  _upload(tok_dir, "gs://bucket/tok")
  cases = [
      ("sentencepiece", "sp.model"),
      ("huggingface", "tokenizer.json"),
      ("huggingface", ""),  # the directory: tokenizer.json + tokenizer_config.json
      ("tiktoken", "ranks.tiktoken"),
  ]
  for kind, name in cases:
    local = tokenizers.load_tokenizer(tokenizers.TokenizerSpec(kind, str(tok_dir / name) if name else str(tok_dir)))
    remote = tokenizers.load_tokenizer(tokenizers.TokenizerSpec(kind, f"gs://bucket/tok/{name}".rstrip("/")))
    ids = local.encode(ttok.TEXT)
    assert len(ids) > 10 and remote.encode(ttok.TEXT) == ids, kind
    assert remote.decode(ids) == local.decode(ids)
    assert (remote.vocab_size, remote.bos_id, remote.eos_id, remote.pad_id) == (
        local.vocab_size,
        local.bos_id,
        local.eos_id,
        local.pad_id,
    )


def test_train_tokenizer_reads_and_writes_gcs_like_local_files(gcs, data, tmp_path):
  del gcs
  from MaxText import train_tokenizer  # pylint: disable=import-outside-toplevel

  _upload(data / "docs.jsonl", "gs://bucket/data/docs.jsonl")
  common = ["", "MaxText/configs/base.yml", "vocab_size=300", "log_config=false"]
  train_tokenizer.main(common + [f"grain_train_files={data}/docs.jsonl", f"tokenizer_path={tmp_path}/tok.model"])
  train_tokenizer.main(
      common + ["grain_train_files=gs://bucket/data/docs.jsonl", "tokenizer_path=gs://bucket/t/tok.model"]
  )
  from etils import epath  # pylint: disable=import-outside-toplevel

  assert epath.Path("gs://bucket/t/tok.model").read_bytes() == (tmp_path / "tok.model").read_bytes()


# ------------------------------------------------------------------------------------------------ grain, tfds, hf


@pytest.fixture(scope="module", name="data")
def _data(tmp_path_factory):
  d = tmp_path_factory.mktemp("gdata")
  docs = tip.make_docs(120)
  (d / "text").mkdir()
  (d / "deep" / "er").mkdir(parents=True)
  for i in range(3):
    (d / "text" / f"part{i}.txt").write_text("\n".join(docs[i::3]) + "\n")
  tip.write_jsonl(d / "deep" / "a.jsonl", docs[:60])
  tip.write_jsonl(d / "deep" / "er" / "b.jsonl", docs[60:])
  tip.write_jsonl(d / "docs.jsonl", docs)
  tip.write_parquet(d / "docs.parquet", docs)
  # ArrayRecordWriter cannot write gs://: written here and uploaded, as a user would.
  tip.write_arrayrecord(d / "docs.array_record", [json.dumps({"text": t}).encode() for t in docs])
  tip.write_arrayrecord(d / "ex.arrayrecord", [tip.tf_example(t) for t in docs])
  tfds_root = d / "tfds"
  tip._tfds_dir(tfds_root, docs)  # pylint: disable=protected-access
  return d


def _batches(tok, n=2, **overrides):
  return tip.take(tip.iterators(tip.make_config(tok, vocab_size=320, **overrides))[0], n)


@pytest.mark.parametrize(
    "files",
    [
        "docs.array_record",
        "ex.arrayrecord",
        "docs.parquet",
        "docs.jsonl",
        "text/part*.txt",
        "deep/**/*.jsonl",  # epath refuses `**` on gs://
        "docs.jsonl:1;text/part[01].txt:2",
    ],
)
def test_grain_files_from_gcs_give_the_local_batches(gcs, tok_dir, data, files):
  del gcs
  _upload(tok_dir / "sp.model", "gs://bucket/tok/sp.model")
  _upload(data, "gs://bucket/data")
  local = ";".join(f"{data}/{part}" for part in files.split(";"))
  remote = ";".join(f"gs://bucket/data/{part}" for part in files.split(";"))
  want = _batches(str(tok_dir / "sp.model"), grain_train_files=local)
  got = _batches("gs://bucket/tok/sp.model", grain_train_files=remote)
  _same_batches(got, want)
  assert tip.doc_ids(want[0], str(tok_dir / "sp.model"))  # real documents, not padding


def test_tfds_and_hf_data_files_from_gcs_give_the_local_batches(gcs, tok_dir, data, tmp_path, monkeypatch):
  del gcs
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  _upload(data, "gs://bucket/data")
  tok = str(tok_dir / "sp.model")
  tfds = dict(dataset_type="tfds", dataset_name="maxtext_tiny_docs")
  _same_batches(
      _batches(tok, dataset_path="gs://bucket/data/tfds", **tfds), _batches(tok, dataset_path=str(data / "tfds"), **tfds)
  )
  hf = dict(dataset_type="hf", hf_path="parquet")
  _same_batches(
      _batches(tok, hf_data_files="gs://bucket/data/docs.parquet", **hf),
      _batches(tok, hf_data_files=str(data / "docs.parquet"), **hf),
  )
  import datasets  # pylint: disable=import-outside-toplevel

  datasets.Dataset.from_dict({"text": tip.make_docs(40)}).save_to_disk(str(tmp_path / "saved"))
  _upload(tmp_path / "saved", "gs://bucket/saved")
  _same_batches(
      _batches(tok, dataset_type="hf", hf_path="gs://bucket/saved"),
      _batches(tok, dataset_type="hf", hf_path=str(tmp_path / "saved")),
  )


def _eval_batches(tok, n=2, **overrides):
  return tip.take(tip.iterators(tip.make_config(tok, vocab_size=320, eval_interval=3, **overrides))[1], n)


def test_grain_and_hf_eval_files_from_gcs_give_the_local_eval_batches(gcs, tok_dir, data):
  """grain_eval_files and hf_eval_files on gs:// (the eval iterator) read what the local copies give."""
  del gcs
  _upload(data, "gs://bucket/data")
  tok = str(tok_dir / "sp.model")
  grain = dict(grain_train_files=str(data / "docs.jsonl"))
  want = _eval_batches(tok, grain_eval_files=str(data / "docs.parquet"), **grain)
  _same_batches(_eval_batches(tok, grain_eval_files="gs://bucket/data/docs.parquet", **grain), want)
  assert tip.doc_ids(want[0], tok)  # real documents, not padding
  hf = dict(dataset_type="hf", hf_path="json", hf_data_files=str(data / "docs.jsonl"))
  _same_batches(
      _eval_batches(tok, hf_eval_files="gs://bucket/data/deep/a.jsonl", **hf),
      _eval_batches(tok, hf_eval_files=str(data / "deep" / "a.jsonl"), **hf),
  )


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"tokenizer_path": "gs://bucket/tok/missing.model"}, "tokenizer_path: gs://bucket/tok/missing.model does not"),
        ({"tokenizer_path": "gs://nobucket/sp.model"}, "tokenizer_path: bucket gs://nobucket does not exist"),
        ({"grain_train_files": "gs://bucket/data/missing.jsonl"}, "grain_train_files: gs://bucket/data/missing.jsonl"),
        ({"grain_train_files": "gs://nobucket/d/*.jsonl"}, "grain_train_files: bucket gs://nobucket does not"),
        ({"dataset_type": "tfds", "dataset_path": "gs://bucket/nothing"}, "dataset_path: gs://bucket/nothing does not"),
    ],
)
def test_missing_object_or_bucket_is_a_config_error_naming_key_and_path(gcs, tok_dir, data, overrides, message):
  del gcs
  _upload(tok_dir / "sp.model", "gs://bucket/tok/sp.model")
  _upload(data / "docs.jsonl", "gs://bucket/data/docs.jsonl")
  values = {"tokenizer_path": "gs://bucket/tok/sp.model", "grain_train_files": "gs://bucket/data/docs.jsonl", **overrides}
  with pytest.raises(ConfigError, match=message):
    tip.iterators(tip.make_config(values.pop("tokenizer_path"), vocab_size=320, **values))


def test_no_credentials_is_a_config_error_naming_key_and_path(gcs, tok_dir, data, monkeypatch):
  """Real gs:// (no emulator) without application-default credentials: named at once, no client retries."""
  del gcs
  from MaxText import storage  # pylint: disable=import-outside-toplevel

  for var in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("NO_GCE_CHECK", "true")  # never ask a metadata server (none is reachable here anyway)
  monkeypatch.setenv("CLOUDSDK_CONFIG", "/nonexistent")  # no gcloud application-default credentials file
  monkeypatch.setattr(storage, "_credentials_checked", {})
  for key, value in (("grain_train_files", "gs://b/data/**/*.jsonl"), ("tokenizer_path", "gs://b/tok/sp.model")):
    values = {"tokenizer_path": str(tok_dir / "sp.model"), "grain_train_files": str(data / "docs.jsonl"), key: value}
    with pytest.raises(ConfigError, match=f"{key}: no credentials for gs://b/"):
      tip.iterators(tip.make_config(values.pop("tokenizer_path"), vocab_size=320, **values))


# ------------------------------------------------------------------------------------------------ metrics


def _events(blobs):
  """{tag: [(step, value)]} from TensorBoard event files' bytes (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  out = {}
  for data in blobs:
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def _metrics_config(base, metrics_file, **kw):
  return pyconfig.initialize(
      ["", "base.yml"],
      base_output_directory=base,
      run_name="m",
      metrics_file=metrics_file,
      log_period=3,
      enable_tensorboard=True,
      log_config=False,
      **kw,
  )


def _log(config, steps):
  from MaxText import metrics  # pylint: disable=import-outside-toplevel

  logger = metrics.MetricLogger(config, tflops_per_step=1.0)
  for step in steps:
    logger.log_step(step, {"learning/loss": 10.0 / (step + 1), "learning/total_weights": 64.0}, 0.5)
  logger.close()


def test_metrics_file_and_tensorboard_on_gcs_hold_the_local_scalars(gcs, tmp_path):
  import fsspec  # pylint: disable=import-outside-toplevel

  # Two runs (the second a resume appending to the same files), each flushing every log_period=3 steps.
  local_events = []
  for steps in (range(0, 8), range(8, 12)):
    _log(_metrics_config(str(tmp_path), str(tmp_path / "m.jsonl")), steps)
    _log(_metrics_config("gs://bucket/runs", "gs://bucket/metrics/m.jsonl"), steps)
    # tensorboardX names a file by the second it opened it: a run in the same second would overwrite it.
    for f in sorted((tmp_path / "m" / "tensorboard").glob("events.out.tfevents.*")):
      local_events.append(f.read_bytes())
      f.unlink()
  fs = fsspec.filesystem("gs")
  local_lines = (tmp_path / "m.jsonl").read_text().splitlines()
  remote_lines = fs.cat_file("bucket/metrics/m.jsonl").decode().splitlines()
  assert [json.loads(x)["step"] for x in remote_lines] == list(range(12))
  strip = lambda lines: [{k: v for k, v in json.loads(x).items() if not k.startswith("perf/")} for x in lines]
  assert strip(remote_lines) == strip(local_lines)
  assert fs.cat_file("bucket/runs/m/metrics/metrics.jsonl").decode().splitlines() == remote_lines
  assert not [n for n in gcs.list("bucket", "metrics/") if n != "metrics/m.jsonl"]  # no compose pieces left

  remote_names = sorted(gcs.list("bucket", "runs/m/tensorboard/"))
  remote = [fs.cat_file(f"bucket/{name}") for name in remote_names]
  want = _events(local_events)
  assert want["learning/loss"] == [(s, pytest.approx(10.0 / (s + 1))) for s in range(12)]
  assert _events(remote) == want
  # Bounded pieces: one object per flush with the events since the last one, each uploaded once (tensorboardX's
  # own gs:// writer would re-upload the whole file: 1 + 2 + ... + n pieces' worth of bytes).
  assert len(remote_names) == 4 + 2  # run 1: flushes at steps 0, 3, 6 and close (7); run 2: 9 and close (10, 11)
  assert sum(map(len, remote)) < 1.2 * sum(map(len, local_events))


def test_appending_without_compose_rewrites_the_object():
  """Schemes without GCS compose (s3://, ...) append by rewriting; fsspec's memory:// stands in for one here."""
  import fsspec  # pylint: disable=import-outside-toplevel
  from MaxText import metrics  # pylint: disable=import-outside-toplevel

  fs = fsspec.filesystem("memory")
  fs.pipe_file("/runs/m.jsonl", b"earlier run\n")
  appender = metrics._BucketAppender("memory://runs/m.jsonl")  # pylint: disable=protected-access
  for line in ("a\n", "b\n"):
    appender.write(line)
    appender.flush()
  appender.write("c\n")
  appender.close()
  assert fs.cat_file("/runs/m.jsonl") == b"earlier run\na\nb\nc\n"


def test_metrics_file_in_a_missing_bucket_fails_before_training(gcs):
  del gcs
  with pytest.raises(ConfigError, match="metrics_file: cannot write to gs://nobucket/x: bucket gs://nobucket does"):
    _log(_metrics_config("gs://bucket/runs", "gs://nobucket/x/m.jsonl"), [])


# ------------------------------------------------------------------------------------------------ conversion


def _tiny_hf_checkpoint(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """A random tiny Llama checkpoint (config.json + model.safetensors + tokenizer.json) written without torch."""
  from MaxText import models  # pylint: disable=import-outside-toplevel
  from MaxText.tests import model_test_utils as mtu  # pylint: disable=import-outside-toplevel
  from MaxText.utils.ckpt_conversion import to_maxtext  # pylint: disable=import-outside-toplevel

  config_json = models.tiny_hf_config(models.get("llama2"), "llama")
  _, keys = to_maxtext.model_keys(config_json)
  config = pyconfig.initialize(["", "base.yml"], log_config=False, **keys)
  rng = np.random.default_rng(0)
  tensors = {}
  for rule in models.get(config.decoder_block).hf.weights(config):
    for i in rule.layer_indices(config.num_decoder_layers) if rule.per_layer else [None]:
      for name, shape in zip(rule.hf_names(i), rule.hf_shapes):
        tensors[name] = rng.standard_normal(shape).astype(np.float32)
  mtu.write_checkpoint(directory, config_json, tensors)
  ttok._write_huggingface(directory / "tokenizer.json")  # pylint: disable=protected-access
  return tensors


def test_hf_conversion_from_and_to_gcs_gives_the_local_params(gcs, tmp_path):
  del gcs
  from MaxText.tests import model_test_utils as mtu  # pylint: disable=import-outside-toplevel
  from MaxText.utils.ckpt_conversion import to_huggingface, to_maxtext  # pylint: disable=import-outside-toplevel

  tensors = _tiny_hf_checkpoint(tmp_path / "hf")
  _upload(tmp_path / "hf", "gs://bucket/hf")
  to_maxtext.convert(str(tmp_path / "hf"), str(tmp_path / "mt"), ["scan_layers=true"])
  to_maxtext.convert("gs://bucket/hf", "gs://bucket/mt", ["scan_layers=true"])

  from etils import epath  # pylint: disable=import-outside-toplevel

  remote_yml = epath.Path("gs://bucket/mt/model.yml").read_text()
  assert 'tokenizer_path: "gs://bucket/hf/tokenizer.json"' in remote_yml
  assert "load_parameters_path=gs://bucket/mt/params" in remote_yml
  config = mtu.converted_config(tmp_path / "mt", True)
  want, got = mtu.load_flat_params(config, tmp_path / "mt" / "params"), mtu.load_flat_params(
      config, "gs://bucket/mt/params"
  )
  assert want.keys() == got.keys() and want
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg="/".join(map(str, path)))

  # And back: MaxText params on gs:// -> Hugging Face files on gs://, sharded, with the tokenizer files.
  config = mtu.converted_config(
      tmp_path / "mt",
      True,
      load_parameters_path="gs://bucket/mt/params",
      tokenizer_type="huggingface",
      tokenizer_path="gs://bucket/hf/tokenizer.json",
  )
  to_huggingface.convert(config, "gs://bucket/back", max_shard_bytes=100_000)
  back = mtu.read_safetensors("gs://bucket/back")
  assert back.keys() == tensors.keys()
  for name, value in tensors.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  assert epath.Path("gs://bucket/back/model.safetensors.index.json").exists()
  assert epath.Path("gs://bucket/back/tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()


def test_converter_with_a_missing_hf_model_path_exits_2_naming_it(gcs, capsys):
  del gcs
  from MaxText.utils.ckpt_conversion import to_maxtext  # pylint: disable=import-outside-toplevel

  with pytest.raises(SystemExit) as e:
    to_maxtext.main(["", "hf_model_path=gs://nobucket/hf", "output_directory=gs://bucket/out"])
  assert e.value.code == 2
  assert "hf_model_path: bucket gs://nobucket does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ params-only writers


def test_quantized_and_param_only_checkpoints_written_to_gcs_read_back(gcs):
  """save_quantized_params_path (decode) and param_checkpoint_output_path (generate_param_only_checkpoint) on gs://."""
  del gcs
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from MaxText import checkpointing, generate_param_only_checkpoint  # pylint: disable=import-outside-toplevel
  from MaxText.inference import engine as engine_lib, loading  # pylint: disable=import-outside-toplevel
  from MaxText.tests import model_test_utils as mtu  # pylint: disable=import-outside-toplevel

  float_params = nnx.state(mtu.build(), nnx.Param).to_pure_dict()
  checkpointing.save_params("gs://bucket/float", float_params)
  save_cfg = mtu.config_of(
      quantization="int8", load_parameters_path="gs://bucket/float", save_quantized_params_path="gs://bucket/int8"
  )
  engine = engine_lib.Engine(save_cfg, num_slots=1)
  saved = loading.load_params(save_cfg, engine.abstract_params, engine.param_shardings)
  load_cfg = mtu.config_of(quantization="int8", load_parameters_path="gs://bucket/int8", checkpoint_is_quantized=True)
  loaded = loading.load_params(load_cfg, engine.abstract_params, engine.param_shardings)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), saved, loaded)

  export_cfg = mtu.config_of(load_parameters_path="gs://bucket/float", param_checkpoint_output_path="gs://bucket/export")
  assert generate_param_only_checkpoint.export(export_cfg) == "gs://bucket/export"
  exported = mtu.load_flat_params(export_cfg, "gs://bucket/export")
  want = mtu.load_flat_params(export_cfg, "gs://bucket/float")
  assert exported.keys() == want.keys() and want
  for path, value in want.items():
    np.testing.assert_array_equal(exported[path], value, err_msg="/".join(map(str, path)))
