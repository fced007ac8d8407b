"""Tokenizers built from small local files: round trips, special ids, and clear errors."""

import base64
import json
import subprocess
import sys

import pytest

from MaxText import pyconfig
from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import tokenizer as tokenizers

TEXT = "The quick brown fox jumps over the lazy dog.\n  Indented line: x = 1 + 2\nUnicode: héllo wörld ✓ 中文\n"
CORPUS = [TEXT] + [f"line {i}: the cat sat on the mat number {i * 7} and ran away." for i in range(200)]


def _write_sentencepiece(path):
  import sentencepiece  # pylint: disable=import-outside-toplevel

  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS),
      model_prefix=str(path.with_suffix("")),
      vocab_size=320,
      model_type="bpe",
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      user_defined_symbols=["\n"],
      pad_id=0,
      unk_id=1,
      bos_id=2,
      eos_id=3,
      minloglevel=2,
  )
  return path


def _write_huggingface(path):
  import tokenizers  # pylint: disable=import-outside-toplevel,redefined-outer-name

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400,
      special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(CORPUS, trainer)
  tok.save(str(path))
  return path


def _write_tiktoken(path):
  ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"at", b" c", b" cat"]
  path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
  return path


@pytest.fixture(scope="module", name="files")
def _files(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  return {
      "sentencepiece": _write_sentencepiece(d / "sp.model"),
      "huggingface": _write_huggingface(d / "tokenizer.json"),
      "tiktoken": _write_tiktoken(d / "ranks.tiktoken"),
  }


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface", "tiktoken"])
def test_round_trip_and_special_ids(files, kind):
  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec(kind, str(files[kind])))
  ids = tok.encode(TEXT)
  assert ids and all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == TEXT
  assert tok.bos_id is not None and tok.eos_id is not None and tok.bos_id != tok.eos_id
  assert 0 <= tok.pad_id < tok.vocab_size
  # Special tokens come from the pipeline's add_bos/add_eos, never from encode itself.
  assert tok.bos_id not in ids and tok.eos_id not in ids


def test_sentencepiece_ids(files):
  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec("sentencepiece", str(files["sentencepiece"])))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)


def test_huggingface_specials_from_names(files):
  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec("huggingface", str(files["huggingface"])))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_huggingface_tokenizer_config_and_override(files, tmp_path):
  d = tmp_path / "hf"
  d.mkdir()
  (d / "tokenizer.json").write_bytes(files["huggingface"].read_bytes())
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "</s>"}, "eos_token": "</s>"}))
  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec("huggingface", str(d)))
  assert tok.bos_id == tok.eos_id == 2
  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec("huggingface", str(d), bos_token="<s>"))
  assert tok.bos_id == 1


def test_tiktoken_specials_follow_ranks(files):
  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec("tiktoken", str(files["tiktoken"])))
  assert tok.bos_id == 262 and tok.eos_id == 263  # Llama 3's <|begin_of_text|>, <|end_of_text|> after 262 ranks
  assert tok.vocab_size == 262 + 256
  assert tok.encode(" the cat")[:1] == [258]
  # Text that looks like a special token stays text.
  assert tok.bos_id not in tok.encode("<|begin_of_text|>")
  custom = tokenizers.TokenizerSpec(
      "tiktoken", str(files["tiktoken"]), special_tokens=("<s>", "</s>", "<pad>"), pad_token="<pad>"
  )
  tok = tokenizers.load_tokenizer(custom)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (262, 263, 264, 265)


def test_errors(files, tmp_path):
  with pytest.raises(ConfigError, match="tokenizer_path: .*does not exist"):
    tokenizers.load_tokenizer(tokenizers.TokenizerSpec("sentencepiece", str(tmp_path / "missing.model")))
  with pytest.raises(ConfigError, match="tokenizer_path: required"):
    tokenizers.load_tokenizer(tokenizers.TokenizerSpec("sentencepiece", ""))
  with pytest.raises(ConfigError, match="cannot load .* as a sentencepiece"):
    tokenizers.load_tokenizer(tokenizers.TokenizerSpec("sentencepiece", str(files["tiktoken"])))
  with pytest.raises(ConfigError, match="tokenizer_bos_token: '<nope>' is not a token"):
    tokenizers.load_tokenizer(tokenizers.TokenizerSpec("huggingface", str(files["huggingface"]), bos_token="<nope>"))


def test_vocab_size_must_cover_tokenizer(files):
  config = pyconfig.initialize(
      ["", "base.yml"], tokenizer_type="huggingface", tokenizer_path=str(files["huggingface"]), vocab_size=100
  )
  with pytest.raises(ConfigError, match="vocab_size: 100 is smaller than the tokenizer's 400"):
    tokenizers.build_tokenizer(config)


def test_train_tokenizer_from_configured_dataset(tmp_path):
  from MaxText import train_tokenizer  # pylint: disable=import-outside-toplevel

  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"body": t}) + "\n" for t in CORPUS * 3))
  out = tmp_path / "trained.model"
  config = pyconfig.initialize(
      ["", "base.yml"],
      dataset_type="grain",
      grain_train_files=str(data),
      train_data_columns=["body"],
      tokenizer_path=str(out),
      vocab_size=400,
  )
  out.write_bytes(train_tokenizer.train(config))
  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec("sentencepiece", str(out)))
  assert tok.vocab_size == 400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.decode(tok.encode(TEXT)) == TEXT


def test_train_tokenizer_cli_reports_config_errors(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "MaxText.train_tokenizer",
          "MaxText/configs/base.yml",
          "dataset_type=grain",
          f"grain_train_files={tmp_path}/none-*.jsonl",
          f"tokenizer_path={tmp_path}/out.model",
          "hardware=cpu",
      ],
      capture_output=True,
      text=True,
      check=False,
      cwd=str(tokenizers.file_sources.REPO_ROOT),
  )
  assert result.returncode == 2, result.stderr
  assert "CONFIG ERROR: grain_train_files: glob" in result.stderr and "matches no files" in result.stderr
