"""Supervised fine-tuning data (use_sft): chat templates, completion-only loss masks, packing, truncation, errors.

The reference for which tokens are assistant turns is `transformers`' own `apply_chat_template(...,
return_assistant_tokens_mask=True)` on templates that mark assistant text with `{% generation %}`; MaxText ignores
those marks and finds the turns by rendering conversation prefixes, so the two are independent.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from MaxText import pyconfig, sharding, training
from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import chat, create_data_iterators
from MaxText.input_pipeline import tokenizer as tokenizers
from MaxText.tests import model_test_utils as mtu

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[UNK]"]
MARKERS = ["system", "user", "assistant", "<|system|>", "<|user|>", "<|assistant|>", "[INST]", "[/INST]"]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{% generation %} {{ m['content'] }} {{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)
_DEFAULT_TURN = "{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
# The default template with its assistant text marked for transformers (rendering the same text).
DEFAULT_MARKED = chat.DEFAULT_TEMPLATE.replace(
    _DEFAULT_TURN,
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}",
)
TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "default": DEFAULT_MARKED}


def _words(rng, lo=1, hi=6):
  return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def make_conversations(n, seed=0):
  """Conversations of 1-2 exchanges, some with a system message, some ending on an unanswered user turn."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    messages = [{"role": "system", "content": _words(rng)}] if i % 3 == 0 else []
    for _ in range(1 + i % 2):
      messages += [{"role": "user", "content": _words(rng)}, {"role": "assistant", "content": _words(rng)}]
    if i % 4 == 1:
      messages.append({"role": "user", "content": _words(rng)})
    out.append(messages)
  return out


def write_tokenizer(folder, template):
  """A word-level tokenizer.json (whitespace split), so tokenizing pieces equals tokenizing the whole text."""
  import tokenizers as hf_tokenizers  # pylint: disable=import-outside-toplevel

  folder.mkdir(parents=True, exist_ok=True)
  vocab = {w: i for i, w in enumerate(SPECIALS + MARKERS + WORDS)}
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([hf_tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIALS])
  tok.save(str(folder / "tokenizer.json"))
  config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": template}
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return folder


def hf_reference(folder, messages):
  """(ids, assistant mask) from transformers' apply_chat_template."""
  import transformers  # pylint: disable=import-outside-toplevel

  tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
  out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


@pytest.fixture(scope="module", name="tok_dirs")
def _tok_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft_tok")
  return {name: write_tokenizer(root / name, template) for name, template in TEMPLATES.items()}


def chat_format(folder):
  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec("huggingface", str(folder)))
  source = chat.tokenizer_template("huggingface", str(folder))
  return chat.ChatFormat(source, str(folder), tok)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_assistant_tokens_are_those_transformers_marks(tok_dirs, name):
  fmt = chat_format(tok_dirs[name])
  for messages in make_conversations(12):
    ids, trained = fmt.encode(messages, completion_only=True)
    want_ids, want_mask = hf_reference(tok_dirs[name], messages)
    assert ids == want_ids, messages
    assert trained == want_mask, messages
    assert any(trained)
    _, every = fmt.encode(messages, completion_only=False)
    assert all(every)


def test_the_default_template_renders_as_documented():
  import jinja2.sandbox  # pylint: disable=import-outside-toplevel

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
  text = env.from_string(chat.DEFAULT_TEMPLATE).render(
      messages=messages, add_generation_prompt=False, bos_token="<s>", eos_token="</s>"
  )
  assert text == "<s><|system|>\nS\n<|user|>\nU\n<|assistant|>\nA</s>\n"
  prompt = env.from_string(chat.DEFAULT_TEMPLATE).render(
      messages=messages[:2], add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
  )
  assert prompt == "<s><|system|>\nS\n<|user|>\nU\n<|assistant|>\n"


def sft_config(tok_dir, data, **overrides):
  values = dict(
      model_name="tests/tiny-llama",
      run_name="sft",
      per_device_batch_size=0.25,  # 2 rows on the 8 test devices
      max_target_length=96,
      tokenizer_type="huggingface",
      tokenizer_path=str(tok_dir),
      vocab_size=64,
      dataset_type="grain",
      grain_train_files=str(data),
      grain_eval_files="",
      train_data_columns=["messages"],
      use_sft=True,
      num_epoch=1,
      dtype="float32",
      weight_dtype="float32",
  )
  values.update(overrides)
  return pyconfig.initialize(["", "base.yml"], **values)


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def first_batch(config):
  it, _ = create_data_iterators(config, sharding.create_mesh(config))
  return {k: np.asarray(v) for k, v in next(it).items()}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_packed_loss_equals_assistant_tokens_of_each_conversation_alone(tok_dirs, tmp_path, name):
  conversations = make_conversations(16, seed=1)
  data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations])
  config = sft_config(tok_dirs[name], data)
  batch = first_batch(config)
  reference = {tuple(ids): mask for ids, mask in (hf_reference(tok_dirs[name], m) for m in conversations)}

  # Every packed segment is one whole conversation; several share a row.
  found = []
  for row in range(batch["inputs"].shape[0]):
    seg = batch["inputs_segmentation"][row]
    for s in np.unique(seg[seg > 0]):
      found.append(tuple(int(t) for t in batch["inputs"][row][seg == s]))
  assert all(f in reference for f in found)
  assert len(found) > batch["inputs"].shape[0]

  mesh = sharding.create_mesh(config)
  setup = training.TrainSetup(config, mesh)
  params = setup.init_state()["params"]
  loss_sum, aux = jax.jit(lambda p, b: training.loss_sums(setup, p, b, None, True, aux_losses=False))(params, batch)

  # Reference: each conversation alone in its own row; the loss of position i is -log p(token i+1) where
  # transformers marks token i+1 as assistant.
  width = max(len(f) for f in found)
  tokens = np.zeros((len(found), width), np.int32)
  segments = np.zeros((len(found), width), np.int32)
  for i, ids in enumerate(found):
    tokens[i, : len(ids)], segments[i, : len(ids)] = ids, 1
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
  model = nnx.merge(setup.graphdef, nnx.State(params), setup.rest)
  logits = np.asarray(mtu.forward(model, tokens, positions, segments), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  want_sum, want_count = 0.0, 0
  for i, ids in enumerate(found):
    mask = reference[ids]
    for pos in range(len(ids) - 1):
      if mask[pos + 1]:
        want_sum -= logp[i, pos, ids[pos + 1]]
        want_count += 1
  assert int(aux["total_weights"]) == want_count
  np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5)


def test_prompt_completion_columns_in_jsonl_and_parquet(tok_dirs, tmp_path):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec("huggingface", str(tok_dirs["chatml"])))
  strings = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "alpha beta", "completion": "gamma"}] * 2)
  lists = tmp_path / "pairs.parquet"
  pq.write_table(
      pa.table(
          {
              "prompt": [[{"role": "system", "content": "pi"}, {"role": "user", "content": "mu"}]] * 2,
              "completion": [[{"role": "assistant", "content": "nu xi"}]] * 2,
          }
      ),
      lists,
  )
  for data, prompt, reply in ((strings, "alpha beta", "gamma"), (lists, "pi mu", "nu xi")):
    batch = first_batch(sft_config(tok_dirs["chatml"], data, train_data_columns=["prompt", "completion"]))
    for row in range(2):
      targets = batch["targets"][row][batch["targets_segmentation"][row] != 0]
      assert tok.decode(targets).split() == reply.split() + ["<|im_end|>"]
      assert set(prompt.split()) <= set(tok.decode(batch["inputs"][row]).split())


def test_messages_stored_as_json_text(tok_dirs, tmp_path):
  messages = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta gamma"}]
  data = write_jsonl(tmp_path / "text.jsonl", [{"messages": json.dumps(messages)}] * 2)
  batch = first_batch(sft_config(tok_dirs["chatml"], data))
  ids, mask = hf_reference(tok_dirs["chatml"], messages)
  assert list(batch["inputs"][0][: len(ids)]) == ids
  assert int((batch["targets_segmentation"][0] != 0).sum()) == sum(mask)


def test_long_conversations_keep_their_assistant_turns():
  t, f = True, False
  # Two turns; the second ends past the row: the row ends after the first.
  ids = list(range(12))
  trained = [f, f, f, t, t, f, f, f, t, t, t, t]
  assert chat.fit(ids, trained, 8) == (ids[:5], trained[:5])
  # One long turn after a long prompt: bos + the last prompt tokens (half the row), then the turn, cut at the row.
  ids = list(range(20))
  trained = [f] * 10 + [t] * 10
  got_ids, got_trained = chat.fit(ids, trained, 8)
  assert got_ids == [0, 7, 8, 9, 10, 11, 12, 13]
  assert got_trained == [f, f, f, f, t, t, t, t]
  # Fits: unchanged.
  assert chat.fit(ids, trained, 20) == (ids, trained)


def test_sft_iterator_resumes_exactly(tok_dirs, tmp_path):
  data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in make_conversations(40, seed=2)])
  config = sft_config(tok_dirs["default"], data, max_target_length=48)
  mesh = sharding.create_mesh(config)
  it, _ = create_data_iterators(config, mesh)
  for _ in range(2):
    next(it)
  state = it.get_state()
  straight = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(2)]
  resumed, _ = create_data_iterators(config, mesh)
  resumed.set_state(json.loads(json.dumps(state)))
  for want in straight:
    got = next(resumed)
    for key, value in want.items():
      np.testing.assert_array_equal(np.asarray(got[key]), value)


BAD_RECORDS = [
    ([{"role": "user", "content": "alpha"}], "without an assistant turn"),
    ([{"role": "user", "content": "alpha"}, {"role": "robot", "content": "beta"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "alpha"}, {"role": "assistant"}], "a message must be"),
]


@pytest.mark.parametrize("messages,message", BAD_RECORDS)
def test_bad_conversations_are_config_errors_quoting_the_record(tok_dirs, tmp_path, messages, message):
  good = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"}]
  data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": messages}] + [{"messages": good}] * 3)
  with pytest.raises(ConfigError, match=message) as err:
    first_batch(sft_config(tok_dirs["chatml"], data))
  assert str(data) in str(err.value) and "alpha" in str(err.value)


def test_bad_templates_and_settings_are_config_errors(tok_dirs, tmp_path):
  data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in make_conversations(8)])
  broken = tmp_path / "broken.jinja"
  broken.write_text("{% for m in messages %}{{ m['content'] }")
  with pytest.raises(ConfigError, match=r"chat_template_path: .*broken.jinja is not a valid Jinja template"):
    first_batch(sft_config(tok_dirs["chatml"], data, chat_template_path=str(broken)))
  refusing = tmp_path / "refusing.jinja"
  refusing.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system prompts') }}{% endif %}x")
  with pytest.raises(ConfigError, match="no system prompts"):
    first_batch(sft_config(tok_dirs["chatml"], data, chat_template_path=str(refusing)))
  # A template that rewrites earlier turns (here: it shows only the last message) cannot be split into turns.
  last_only = tmp_path / "last_only.jinja"
  last_only.write_text("{{ messages[-1]['content'] }}{% if add_generation_prompt %} go{% endif %}")
  with pytest.raises(ConfigError, match="renders a conversation differently from its beginnings"):
    first_batch(sft_config(tok_dirs["chatml"], data, chat_template_path=str(last_only)))
  with pytest.raises(ConfigError, match="chat_template_path: cannot read"):
    first_batch(sft_config(tok_dirs["chatml"], data, chat_template_path=str(tmp_path / "missing.jinja")))
  with pytest.raises(ConfigError, match="train_data_columns: use_sft reads one column"):
    sft_config(tok_dirs["chatml"], data, train_data_columns=["a", "b", "c"])
  with pytest.raises(ConfigError, match="use_sft: reads conversations through dataset_type grain or hf"):
    sft_config(tok_dirs["chatml"], data, dataset_type="synthetic")


def _segments(batch):
  """Every packed conversation of a batch as (token ids, targets where trained)."""
  out = []
  for row in range(batch["inputs"].shape[0]):
    seg, tseg = batch["inputs_segmentation"][row], batch["targets_segmentation"][row]
    for s in np.unique(seg[seg > 0]):
      out.append((tuple(batch["inputs"][row][seg == s]), tuple(batch["targets"][row][tseg == s])))
  return sorted(out)


def test_grain_arrayrecord_and_hf_sources_give_the_same_conversations(tok_dirs, tmp_path):
  from MaxText.tests.test_input_pipeline import write_arrayrecord  # pylint: disable=import-outside-toplevel

  records = [{"messages": m} for m in make_conversations(40, seed=3)]
  jsonl = write_jsonl(tmp_path / "chat.jsonl", records)
  arrayrecord = write_arrayrecord(tmp_path / "chat.arrayrecord", [json.dumps(r).encode() for r in records])
  # The same records in the same order: every source shuffles record indices alike.
  kw = dict(data_streams=1)
  want = _segments(first_batch(sft_config(tok_dirs["chatml"], jsonl, **kw)))
  assert len(want) > 2
  assert _segments(first_batch(sft_config(tok_dirs["chatml"], arrayrecord, **kw))) == want
  hf = sft_config(tok_dirs["chatml"], "", dataset_type="hf", hf_path="json", hf_data_files=str(jsonl), **kw)
  assert _segments(first_batch(hf)) == want


def test_a_bad_record_later_in_the_data_stops_the_run_naming_it(tok_dirs, tmp_path):
  good = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"}]
  bad = [{"role": "user", "content": "kappa lambda"}]
  data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": good}] * 30 + [{"messages": bad}])
  # Eval data is read in order, one conversation per row here, so the bad record comes at the 16th batch.
  config = sft_config(tok_dirs["chatml"], data, grain_eval_files=str(data), eval_interval=10, packing=False)
  _, it = create_data_iterators(config, sharding.create_mesh(config))
  next(it)
  with pytest.raises(chat.ChatError, match="without an assistant turn.*kappa lambda"):
    for _ in range(20):
      next(it)
