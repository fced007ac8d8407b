"""Input pipelines on locally generated data: every dataset_type, determinism, resume, sharding, packing, errors."""

import json
import re

import jax
import numpy as np
import pytest

from MaxText import pyconfig, sharding
from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import create_data_iterators, distributed_batch, documents, file_sources, grain_pipeline
from MaxText.input_pipeline import packing
from MaxText.input_pipeline import synthetic
from MaxText.input_pipeline import tokenizer as tokenizers

LENGTH = 32
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_docs(n, prefix="doc", seed=0):
  rng = np.random.default_rng(seed)
  return [f"{prefix}{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(2, 16)))) for i in range(n)]


@pytest.fixture(scope="module", name="tok_path")
def _tok_path(tmp_path_factory):
  import sentencepiece  # pylint: disable=import-outside-toplevel

  path = tmp_path_factory.mktemp("tok") / "sp.model"
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(make_docs(300) + make_docs(50, "docA") + make_docs(50, "docB")),
      model_prefix=str(path.with_suffix("")),
      vocab_size=300,
      model_type="bpe",
      byte_fallback=True,
      pad_id=0,
      unk_id=1,
      bos_id=2,
      eos_id=3,
      minloglevel=2,
  )
  return str(path)


def make_config(tok_path, **overrides):
  values = dict(
      per_device_batch_size=1,
      max_target_length=LENGTH,
      max_prefill_predict_length=8,
      tokenizer_type="sentencepiece",
      tokenizer_path=tok_path,
      vocab_size=300,
      dataset_type="grain",
      num_epoch=1,
      grain_eval_files="",
  )
  values.update(overrides)
  return pyconfig.initialize(["", "base.yml"], **values)


def iterators(config):
  return create_data_iterators(config, sharding.create_mesh(config))


def host(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def take(it, n):
  return [host(next(it)) for _ in range(n)]


def doc_ids(batch, tok_path, prefix="doc"):
  """The document markers (e.g. 'doc17') at the start of every segment of a batch."""
  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec("sentencepiece", tok_path))
  found = []
  for tokens, seg in zip(batch["inputs"], batch["inputs_segmentation"]):
    for s in np.unique(seg[seg > 0]):
      match = re.match(rf"\s*({prefix}\d+) ", tok.decode(tokens[seg == s]))
      if match:
        found.append(match.group(1))
  return found


def write_jsonl(path, docs, column="text"):
  path.write_text("".join(json.dumps({column: d, "other": 1}) + "\n" for d in docs))
  return str(path)


def write_parquet(path, docs):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), str(path), row_group_size=16)
  return str(path)


def write_arrayrecord(path, records):
  # pylint: disable-next=import-outside-toplevel,no-name-in-module
  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  return str(path)


def tf_example(text):
  from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2  # pylint: disable=import-outside-toplevel

  feature = tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[text.encode()]))
  return tf_example_pb2.Example(features=tf_feature_pb2.Features(feature={"text": feature})).SerializeToString()


def check_batch(batch, config, last_has_target=False):
  shape = (config.global_batch_size_to_load, config.max_target_length)
  for key in distributed_batch.BATCH_KEYS:
    assert batch[key].shape == shape and batch[key].dtype == np.int32, key
  seg, tseg = batch["inputs_segmentation"], batch["targets_segmentation"]
  # A target exists exactly where the next token continues the same document.
  has = tseg > 0
  assert np.array_equal(batch["targets"][:, :-1][has[:, :-1]], batch["inputs"][:, 1:][has[:, :-1]])
  assert last_has_target or not has[:, -1].any()
  assert np.all(seg[:, 1:][has[:, :-1]] == seg[:, :-1][has[:, :-1]])
  # Positions restart at 0 with every segment and count up within it.
  pos = batch["inputs_position"]
  starts = (seg > 0) & np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  assert np.all(pos[starts] == 0)
  inner = (seg[:, 1:] > 0) & ~starts[:, 1:]
  assert np.all(pos[:, 1:][inner] == pos[:, :-1][inner] + 1)
  assert np.all(pos[seg == 0] == 0) and np.all(batch["targets_position"][has] == pos[has])


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_resumable_and_learnable():
  config = pyconfig.initialize(
      ["", "base.yml"], dataset_type="synthetic", max_target_length=16, max_prefill_predict_length=8, eval_interval=2
  )
  a, evals = iterators(config)
  b, _ = iterators(config)
  first = take(a, 3)
  assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(first, take(b, 3)))
  check_batch(first[0], config, last_has_target=True)  # synthetic rows are one document longer than the row
  assert np.all(first[0]["inputs_segmentation"] == 1) and np.all(first[0]["targets_segmentation"] == 1)
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
  state = json.loads(json.dumps(a.get_state()))
  assert state == {"step": 3}
  expected = take(a, 2)
  b.set_state(state)
  assert all(np.array_equal(x["targets"], y["targets"]) for x, y in zip(expected, take(b, 2)))
  # Each row steps by a constant stride, so the data is learnable; eval has its own stream and rewinds.
  diffs = np.diff(first[0]["inputs"].astype(np.int64), axis=1) % (config.vocab_size - 1)
  assert np.all(diffs == diffs[:, :1])
  e0 = host(next(evals))
  assert not np.array_equal(e0["inputs"], first[0]["inputs"])
  evals.reset()
  assert np.array_equal(host(next(evals))["inputs"], e0["inputs"])
  other = pyconfig.initialize(["", "base.yml"], dataset_type="synthetic", data_shuffle_seed=1)
  assert not np.array_equal(host(next(iterators(other)[0]))["inputs"][:, :16], first[0]["inputs"])


def test_synthetic_rows_do_not_depend_on_the_process_split():
  whole = synthetic.synthetic_rows(0, 0, 5, range(8), 16, 1000)
  halves = [synthetic.synthetic_rows(0, 0, 5, rows, 16, 1000) for rows in (range(4), range(4, 8))]
  assert np.array_equal(whole["inputs"], np.concatenate([h["inputs"] for h in halves]))


def test_process_share_covers_every_row_once():
  config = pyconfig.initialize(["", "base.yml"], dataset_type="synthetic", per_device_batch_size=2)
  share = distributed_batch.process_share(config, sharding.create_mesh(config))
  assert share.local_batch == 16 and list(share.rows) == list(range(16))
  assert share.sharding.spec[0] is not None  # the batch really is split over the devices


# ------------------------------------------------------------------------------------------------ packing


def test_split_document_truncate_and_chunk():
  doc = list(range(10))
  assert packing.split_document(doc, 4, "truncate") == [[0, 1, 2, 3]]
  chunks = packing.split_document(doc, 4, "chunk")
  assert chunks == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
  # Every next-token pair of the document is in exactly one chunk.
  pairs = [(c[i], c[i + 1]) for c in chunks for i in range(len(c) - 1)]
  assert pairs == [(i, i + 1) for i in range(9)]
  assert packing.split_document([5], 4, "chunk") == []  # no target, nothing to train on
  assert packing.split_document(list(range(5)), 4, "chunk") == [[0, 1, 2, 3], [3, 4]]


def test_first_fit_packer():
  packer = packing.FirstFitPacker(length=10, max_open=2)
  emitted = []
  for n in (4, 5, 3, 6, 10, 2, 1):
    emitted += packer.add(list(range(100 * n, 100 * n + n)))
  emitted += packer.flush()
  lengths = [[len(d) for d in row] for row in emitted]
  # 4+5 share a row, 3 opens a second, 6 joins it; 10 fits nowhere with both rows open, so the fullest (first)
  # row goes out and 10, a full row, right after it; 2 opens a row; 1 fills [3, 6]; 2 is flushed at the end.
  assert lengths == [[4, 5], [10], [3, 6, 1], [2]]
  assert emitted[0][0] == (400, 401, 402, 403)


def test_rows_and_batch_shift():
  rows = [packing.row_arrays([[5, 6, 7], [8, 9]], 6, 0), packing.row_arrays([[1, 2, 3, 4, 5, 6]], 6, 0)]
  batch = packing.make_batch(rows, 3, 0)
  assert batch["inputs"][0].tolist() == [5, 6, 7, 8, 9, 0]
  assert batch["inputs_segmentation"][0].tolist() == [1, 1, 1, 2, 2, 0]
  assert batch["inputs_position"][0].tolist() == [0, 1, 2, 0, 1, 0]
  assert batch["targets"][0].tolist() == [6, 7, 0, 9, 0, 0]
  assert batch["targets_segmentation"][0].tolist() == [1, 1, 0, 2, 0, 0]
  assert batch["targets"][1].tolist() == [2, 3, 4, 5, 6, 0]
  assert not batch["inputs_segmentation"][2].any()  # padding row added to fill the batch


def test_record_to_text_and_mixture_syntax():
  assert documents.ToText(["title", "text"]).map({"title": b"T", "text": "body", "n": 1}) == "T\nbody"
  assert documents.ToText(["text"]).map("raw line") == "raw line"
  parsed = file_sources.parse_mixture("gs://b/x-*.jsonl:0.5; /data/y.parquet ;c:2", "grain_train_files")
  assert parsed == [("gs://b/x-*.jsonl", 0.5), ("/data/y.parquet", 1.0), ("c", 2.0)]


# ------------------------------------------------------------------------------------------------ each dataset_type


@pytest.fixture(scope="module", name="data")
def _data(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  docs = make_docs(120)
  (d / "text").mkdir()
  for i in range(3):
    (d / "text" / f"part{i}.txt").write_text("\n".join(docs[i::3]) + "\n\n")
  return {
      "docs": docs,
      "dir": d,
      "jsonl": write_jsonl(d / "docs.jsonl", docs),
      "parquet": write_parquet(d / "docs.parquet", docs),
      "text": str(d / "text" / "part*.txt"),
      "arrayrecord_json": write_arrayrecord(d / "json.array_record", [json.dumps({"text": t}).encode() for t in docs]),
      "arrayrecord_example": write_arrayrecord(d / "ex.arrayrecord", [tf_example(t) for t in docs]),
      "arrayrecord_raw": write_arrayrecord(d / "raw.array_record", [t.encode() for t in docs]),
  }


def _tfds_dir(root, docs):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core import registered  # pylint: disable=import-outside-toplevel

  # Each call defines the builder anew over its own docs; a second call in one process (test_gcs_data uses this
  # helper too) would otherwise fail tfds' duplicate-name check.
  registered._DATASET_REGISTRY.pop("maxtext_tiny_docs", None)  # pylint: disable=protected-access

  class MaxtextTinyDocs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # no downloads; also skips tfds' code-path lookup, which needs importlib_resources here

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(docs[:100]), "validation": self._generate_examples(docs[100:])}

    def _generate_examples(self, split_docs):  # pylint: disable=arguments-differ
      for i, text in enumerate(split_docs):
        yield i, {"text": text}

  builder = MaxtextTinyDocs(data_dir=str(root), file_format="array_record")
  builder.download_and_prepare()
  return builder.data_dir


GRAIN_KINDS = ["jsonl", "parquet", "text", "arrayrecord_json", "arrayrecord_example", "arrayrecord_raw"]


@pytest.mark.parametrize("kind", GRAIN_KINDS)
def test_grain_formats(tok_path, data, kind):
  config = make_config(tok_path, grain_train_files=data[kind])
  train, evals = iterators(config)
  assert evals is None
  batches = take(train, 3)
  for b in batches:
    check_batch(b, config)
  seen = [d for b in batches for d in doc_ids(b, tok_path)]
  assert len(seen) > 10 and set(seen) <= {f"doc{i}" for i in range(120)}
  assert np.mean(batches[0]["inputs_segmentation"] > 0) > 0.9  # packing fills rows


def test_tfds_data_source(tok_path, data, tmp_path):
  builder_dir = _tfds_dir(tmp_path, data["docs"])
  by_name = make_config(
      tok_path, dataset_type="tfds", dataset_path=str(tmp_path), dataset_name="maxtext_tiny_docs", eval_interval=5
  )
  train, evals = iterators(by_name)
  check_batch(take(train, 1)[0], by_name)
  assert set(doc_ids(host(next(evals)), tok_path)) <= {f"doc{i}" for i in range(100, 120)}
  by_dir = make_config(tok_path, dataset_type="tfds", dataset_path=str(builder_dir))
  assert doc_ids(take(iterators(by_dir)[0], 1)[0], tok_path)
  with pytest.raises(ConfigError, match="eval_split: split 'test' not in"):
    iterators(
        make_config(tok_path, dataset_type="tfds", dataset_path=str(builder_dir), eval_interval=5, eval_split="test")
    )
  with pytest.raises(ConfigError, match="dataset_name: 'no_such_ds' under .* is not a prepared TFDS dataset"):
    iterators(make_config(tok_path, dataset_type="tfds", dataset_path=str(tmp_path), dataset_name="no_such_ds"))


@pytest.mark.parametrize("builder,kind", [("json", "jsonl"), ("parquet", "parquet"), ("text", "text")])
def test_hf_local_files(tok_path, data, builder, kind):
  config = make_config(
      tok_path,
      dataset_type="hf",
      hf_path=builder,
      hf_data_files=data[kind],
      hf_eval_files=data[kind],
      eval_interval=3,
  )
  train, evals = iterators(config)
  b = take(train, 2)
  check_batch(b[1], config)
  assert doc_ids(b[0], tok_path) and doc_ids(host(next(evals)), tok_path)


def test_hf_saved_dataset_dir_and_resume(tok_path, data, tmp_path):
  import datasets  # pylint: disable=import-outside-toplevel

  saved = tmp_path / "saved"
  docs = data["docs"]
  datasets.DatasetDict(
      {
          "train": datasets.Dataset.from_dict({"text": docs[:100]}),
          "validation": datasets.Dataset.from_dict({"text": docs[100:]}),
      }
  ).save_to_disk(str(saved))
  config = make_config(tok_path, dataset_type="hf", hf_path=str(saved), eval_interval=2)
  _assert_resumes(config, skip=2, then=3)


# ------------------------------------------------------------------------------------------------ determinism, resume


def _assert_resumes(config, skip, then):
  a, _ = iterators(config)
  take(a, skip)
  state = json.loads(json.dumps(a.get_state()))  # the train loop stores it as JSON
  expected = take(a, then)
  b, _ = iterators(config)
  b.set_state(state)
  got = take(b, then)
  for x, y in zip(expected, got):
    for key in distributed_batch.BATCH_KEYS:
      assert np.array_equal(x[key], y[key]), key


def test_same_seed_same_batches_other_seed_other_order(tok_path, data):
  config = make_config(tok_path, grain_train_files=data["jsonl"])
  first = take(iterators(config)[0], 4)
  again = take(iterators(config)[0], 4)
  assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(first, again))
  other = take(iterators(make_config(tok_path, grain_train_files=data["jsonl"], data_shuffle_seed=7))[0], 4)
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(first, other))


@pytest.mark.parametrize("packed", [True, False])
def test_resume_mid_epoch_and_across_epochs(tok_path, data, packed):
  # 120 short docs in rows of 32 tokens, batches of 8 rows: an epoch is a handful of batches.
  config = make_config(tok_path, grain_train_files=data["jsonl"], num_epoch=3, packing=packed)
  _assert_resumes(config, skip=3, then=8)


def test_resume_with_worker_processes(tok_path, data):
  config = make_config(tok_path, grain_train_files=data["parquet"], grain_worker_count=1)
  _assert_resumes(config, skip=2, then=2)


def test_epochs_and_end_of_data(tok_path, data, tmp_path):
  one = make_config(tok_path, grain_train_files=data["jsonl"], packing=False, long_document_mode="truncate")
  train, _ = iterators(one)
  seen = [d for b in train for d in doc_ids(host(b), tok_path)]  # ends with StopIteration (single process)
  # Each document is one row; each of the 8 streams (one per row) holds 15 of them.
  assert len(seen) == len(set(seen)) == 120
  two = make_config(tok_path, grain_train_files=data["jsonl"], packing=False, long_document_mode="truncate", num_epoch=2)
  seen2 = [d for b in iterators(two)[0] for d in doc_ids(host(b), tok_path)]
  assert len(seen2) == 240 and seen2[:120] != seen2[120:] and sorted(seen2[:120]) == sorted(seen2[120:])
  # 100 documents: streams 0-3 hold 13, streams 4-7 hold 12; their rows of the 13th batch are padding.
  odd = make_config(
      tok_path,
      grain_train_files=write_jsonl(tmp_path / "odd.jsonl", make_docs(100)),
      packing=False,
      long_document_mode="truncate",
  )
  batches = [host(b) for b in iterators(odd)[0]]
  assert len(batches) == 13 and len({d for b in batches for d in doc_ids(b, tok_path)}) == 100
  last = batches[-1]["inputs_segmentation"]
  assert last[:4, 0].all() and not last[4:].any()


@pytest.fixture(name="simulate")
def _simulate(monkeypatch):
  """Builds the train iterator of a process that holds the given rows of the global batch.

  Such an iterator yields just those rows, as numpy: once this fixture has built one, no iterator in the test
  assembles global arrays any more.
  """

  def build(config, rows, **overrides):
    config = make_config(config.tokenizer_path, **{**_overrides(config), **overrides})
    share = distributed_batch.ProcessShare(None, (config.global_batch_size_to_load, LENGTH), np.asarray(rows))
    monkeypatch.setattr(distributed_batch, "process_share", lambda *_: share)
    monkeypatch.setattr(distributed_batch, "to_global", lambda _, local: local)
    return iterators(config)[0]

  return build


def _overrides(config):
  keys = ("grain_train_files", "num_epoch", "data_streams", "packing", "long_document_mode", "grain_worker_count")
  return {k: getattr(config, k) for k in keys}


def _assert_same(a, b):
  for key in distributed_batch.BATCH_KEYS:
    assert np.array_equal(a[key], b[key]), key


def _blocks(processes):
  per = 8 // processes
  return [range(p * per, (p + 1) * per) for p in range(processes)]


@pytest.mark.parametrize("streams", [0, 4])
def test_global_batch_does_not_depend_on_the_process_count(tok_path, data, simulate, streams):
  """1 process x 8 devices gives the same global batches as 2 or 8 processes, also after each resumes."""
  config = make_config(tok_path, grain_train_files=data["jsonl"], num_epoch=3, data_streams=streams)
  reference = take(iterators(config)[0], 8)  # real global arrays over 8 devices
  for processes in (2, 8):  # with data_streams=4, 8 processes each feed half a stream
    its = [simulate(config, rows) for rows in _blocks(processes)]
    first = [take(it, 4) for it in its]
    states = [json.loads(json.dumps(it.get_state())) for it in its]  # what each process checkpoints
    resumed = []
    for rows, state in zip(_blocks(processes), states):
      it = simulate(config, rows)
      it.set_state(state)
      resumed.append(take(it, 4))
    for step in range(8):
      parts = [f[step] if step < 4 else r[step - 4] for f, r in zip(first, resumed)]
      _assert_same({k: np.concatenate([p[k] for p in parts]) for k in distributed_batch.BATCH_KEYS}, reference[step])
  # Elastic: the states of 8 processes, merged, resume a 1-process run at the same place.
  merged = {"streams": {k: v for state in states for k, v in state["streams"].items()}}
  whole = simulate(config, range(8))
  whole.set_state(merged)
  for got, expected in zip(take(whole, 4), reference[4:]):
    _assert_same(got, expected)


def test_worker_count_does_not_change_the_data(tok_path, data, simulate):
  config = make_config(tok_path, grain_train_files=data["jsonl"], num_epoch=3)
  reference = take(simulate(config, range(4, 8)), 7)
  workers = simulate(config, range(4, 8), grain_worker_count=3)  # streams 4, 5, 6, 7 over 3 workers
  for got, expected in zip(take(workers, 3), reference):
    _assert_same(got, expected)
  # A state saved with workers resumes without them, and the other way round; reset rewinds a resumed iterator.
  inline = simulate(config, range(4, 8))
  inline.set_state(json.loads(json.dumps(workers.get_state())))
  for got, expected in zip(take(inline, 3), reference[3:6]):
    _assert_same(got, expected)
  workers.set_state(inline.get_state())
  _assert_same(take(workers, 1)[0], reference[6])
  workers.reset()
  _assert_same(take(workers, 1)[0], reference[0])


def test_process_shares_are_disjoint_and_cover_the_data(tok_path, data, simulate):
  config = make_config(tok_path, grain_train_files=data["jsonl"], packing=False, long_document_mode="truncate")
  seen = []
  for rows in _blocks(2):
    # One real process: the iterator stops at the end of the data.
    seen.append([int(d[3:]) for b in simulate(config, rows) for d in doc_ids(b, tok_path)])
  # Stream k (row k) reads every 8th record from the k-th: process 0 never touches the records of rows 4-7.
  assert {i % 8 for i in seen[0]} == {0, 1, 2, 3} and {i % 8 for i in seen[1]} == {4, 5, 6, 7}
  assert sorted(seen[0] + seen[1]) == list(range(120))


def test_file_level_split_opens_only_own_files(tok_path, data):
  config = make_config(tok_path, grain_train_files=data["text"])
  source = grain_pipeline.sources_from_files(data["text"], "grain_train_files", config)[0]
  # Three files over three streams: stream i reads file i (documents i, i+3, ...), whole, and no other.
  assert [list(source.part(i, 3)) for i in range(3)] == [data["docs"][i::3] for i in range(3)]
  assert sorted(source.dataset) == sorted(data["docs"])


def test_data_streams_must_divide_the_batch(tok_path, data):
  with pytest.raises(ConfigError, match="data_streams: 3 does not divide the global batch of 8 rows"):
    iterators(make_config(tok_path, grain_train_files=data["jsonl"], data_streams=3))


def test_weighted_mixture(tok_path, tmp_path):
  a = write_jsonl(tmp_path / "a.jsonl", make_docs(400, "docA"))
  b = write_jsonl(tmp_path / "b.jsonl", make_docs(400, "docB"))
  config = make_config(tok_path, grain_train_files=f"{a}:3;{b}:1", packing=False, long_document_mode="truncate")
  batches = take(iterators(config)[0], 10)
  names = [d for batch in batches for d in doc_ids(batch, tok_path, prefix="doc[AB]")]
  share_a = sum(n.startswith("docA") for n in names) / len(names)
  assert 0.65 < share_a < 0.85, share_a


def test_padding_mode_puts_one_document_per_row(tok_path, data):
  config = make_config(tok_path, grain_train_files=data["jsonl"], packing=False, long_document_mode="truncate")
  b = take(iterators(config)[0], 1)[0]
  check_batch(b, config)
  assert np.all(b["inputs_segmentation"].max(axis=1) == 1)
  assert np.all(b["inputs"][:, 0] == 2)  # add_bos


def test_bos_eos_flags(tok_path, data):
  config = make_config(tok_path, grain_train_files=data["jsonl"], packing=False, add_bos=False, add_eos=True)
  b = take(iterators(config)[0], 1)[0]
  assert not np.any(b["inputs"] == 2)
  lengths = b["inputs_segmentation"].sum(axis=1)
  short = lengths < LENGTH  # documents that were not cut end with eos
  assert np.all(b["inputs"][short, lengths[short] - 1] == 3)


def test_eval_iterator_rewinds_and_pads_when_done(tok_path, data):
  config = make_config(tok_path, grain_train_files=data["jsonl"], grain_eval_files=data["parquet"], eval_interval=10)
  _, evals = iterators(config)
  first = host(next(evals))
  n = 1
  while host(next(evals))["inputs_segmentation"].any():
    n += 1
  assert n >= 2
  assert not host(next(evals))["targets_segmentation"].any()  # still padding, never StopIteration
  evals.reset()
  assert np.array_equal(host(next(evals))["inputs"], first["inputs"])


def test_quickstart_defaults():
  config = pyconfig.initialize(["", "base.yml"], per_device_batch_size=1)
  train, _ = iterators(config)
  batch = take(train, 1)[0]
  check_batch(batch, config)
  tok = tokenizers.build_tokenizer(config)
  text = tok.decode(batch["inputs"][0])
  assert len(re.findall(r"\b(the|and|of|is)\b", text)) >= 3, text


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"grain_train_files": "{dir}/missing.jsonl"}, r"grain_train_files: .*missing.jsonl does not exist"),
        ({"grain_train_files": "{dir}/nothing-*.jsonl"}, r"grain_train_files: glob .* matches no files"),
        ({"grain_train_files": "{dir}/empty.jsonl"}, r"grain_train_files: .*empty.jsonl is empty"),
        ({"grain_train_files": "{dir}/docs.jsonl", "train_data_columns": ["body"]}, r"train_data_columns: \['body'\]"),
        ({"grain_train_files": "{dir}/docs.parquet", "train_data_columns": ["body"]}, r"train_data_columns: \['body'\]"),
        ({"grain_train_files": "{dir}/few.jsonl"}, r"few.jsonl: yields fewer than one batch"),
        ({"grain_train_files": "{dir}/docs.jsonl", "eval_interval": 5}, r"grain_eval_files: required"),
        ({"grain_train_files": "{dir}/docs.jsonl", "tokenizer_path": "{dir}/no.model"}, r"tokenizer_path: .* not exist"),
        ({"grain_train_files": "{dir}/docs.jsonl", "vocab_size": 100}, r"vocab_size: 100 is smaller"),
        ({"grain_train_files": "{dir}/docs.unknown"}, r"grain_file_type: cannot tell the format"),
        ({"grain_train_files": "{dir}/docs.jsonl:0"}, r"grain_train_files: weight 0.0"),
        ({"dataset_type": "hf", "hf_path": "json", "hf_data_files": "{dir}/none*.json"}, r"hf_data_files: glob"),
        (
            {"dataset_type": "hf", "hf_path": "json", "hf_data_files": "{dir}/docs.jsonl", "train_data_columns": ["x"]},
            r"train_data_columns: \['x'\] not in",
        ),
        ({"dataset_type": "tfds", "dataset_path": "{dir}/nope"}, r"dataset_path: .*nope does not exist"),
    ],
)
def test_bad_input_is_a_config_error(tok_path, data, overrides, message):
  d = data["dir"]
  (d / "empty.jsonl").write_text("")
  (d / "docs.unknown").write_text("x\n")
  write_jsonl(d / "few.jsonl", ["alpha beta"] * 3)
  values = {k: v.format(dir=d) if isinstance(v, str) else v for k, v in overrides.items()}
  with pytest.raises(ConfigError, match=message):
    iterators(make_config(values.pop("tokenizer_path", tok_path), **values))


def test_max_target_length_below_two_is_rejected():
  with pytest.raises(ConfigError, match="max_target_length"):
    pyconfig.initialize(["", "base.yml"], max_target_length=1)


def test_global_arrays_are_sharded_over_devices(tok_path, data):
  config = make_config(tok_path, grain_train_files=data["jsonl"])
  batch = next(iterators(config)[0])
  assert len(batch["inputs"].sharding.device_set) == jax.device_count()
  assert batch["inputs"].addressable_shards[0].data.shape == (1, LENGTH)


# ------------------------------------------------------------------------------------------------ two real processes

_WORKER = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_platforms", "cpu")
import numpy as np
from MaxText import sharding, startup
from MaxText.input_pipeline import create_data_iterators
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
config = startup.start(  # joins jax.distributed first, as an entry point does
    ["", "base.yml", f"coordinator_address=127.0.0.1:{port}", "num_processes=2", f"process_id={pid}"] + sys.argv[4:]
)
train, _ = create_data_iterators(config, sharding.create_mesh(config))
batches = []
for _ in range(int(config.steps)):
  shards = sorted(next(train)["inputs"].addressable_shards, key=lambda s: s.index[0].start)
  batches.append({"rows": [r for s in shards for r in range(*s.index[0].indices(8))],
                  "inputs": np.concatenate([np.asarray(s.data) for s in shards]).tolist()})
json.dump({"process_count": jax.process_count(), "devices": jax.device_count(), "batches": batches}, open(out, "w"))
"""


def _run_two_processes(tmp_path, args):
  import os  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  root = tokenizers.file_sources.REPO_ROOT
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  common = ["max_target_length=32", "max_prefill_predict_length=8", "per_device_batch_size=2", "log_config=false"]
  procs = [
      subprocess.Popen(
          [sys.executable, str(script), str(i), str(port), str(tmp_path / f"out{i}.json")] + common + args,
          cwd=str(root),
          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))},
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  for p in procs:
    output, _ = p.communicate(timeout=120)
    assert p.returncode == 0, output[-3000:]
  return [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]


def test_two_processes_read_disjoint_shares(tok_path, data, tmp_path):
  """2 processes x 2 devices over jax.distributed: each feeds its own rows of the global batch from its own data."""
  synth = _run_two_processes(tmp_path, ["dataset_type=synthetic", "steps=2", "vocab_size=300"])
  assert synth[0]["process_count"] == 2 and synth[0]["devices"] == 4
  for step in range(2):
    rows = [synth[p]["batches"][step]["rows"] for p in range(2)]
    assert sorted(rows[0] + rows[1]) == list(range(8)) and not set(rows[0]) & set(rows[1])
    # Synthetic data depends only on the global row, so 2 processes see what 1 process would.
    for p in range(2):
      expected = synthetic.synthetic_rows(0, 0, step, rows[p], LENGTH, 300)["inputs"]
      assert np.array_equal(np.array(synth[p]["batches"][step]["inputs"]), expected)
  args = [f"tokenizer_path={tok_path}", "vocab_size=300", f"grain_train_files={data['jsonl']}", "num_epoch=1"]
  args += ["packing=false", "long_document_mode=truncate", "steps=7", "eval_interval=-1"]
  real = _run_two_processes(tmp_path, args)
  seen = []
  for p in range(2):
    batches = {"inputs": np.array([r for b in real[p]["batches"] for r in b["inputs"]])}
    batches["inputs_segmentation"] = (batches["inputs"] != 0).astype(np.int32)
    seen.append(doc_ids(batches, tok_path))
  # 60 documents each; 7 steps of 4 rows per process reads 28 of them.
  assert len(seen[0]) == len(seen[1]) == 28 and not set(seen[0]) & set(seen[1])
  # And together they are exactly the batches of one process with 8 devices.
  config = make_config(tok_path, grain_train_files=data["jsonl"], packing=False, long_document_mode="truncate")
  for step, expected in enumerate(take(iterators(config)[0], 7)):
    for p in range(2):
      rows = real[p]["batches"][step]["rows"]
      assert np.array_equal(np.array(real[p]["batches"][step]["inputs"]), expected["inputs"][rows])
