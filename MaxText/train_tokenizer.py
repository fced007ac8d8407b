"""Trains a SentencePiece tokenizer on the configured dataset's training text.

    python3 -m MaxText.train_tokenizer MaxText/configs/base.yml tokenizer_path=out.model vocab_size=4096 [...]

Reads up to tokenizer_train_max_chars characters of the documents `dataset_type` (grain, tfds or hf) would train on,
and writes a BPE model with vocab_size pieces to tokenizer_path. The model keeps text exactly (no normalization,
whitespace and newlines preserved, unknown characters fall back to bytes), so decode(encode(text)) == text, and
uses ids pad=0, unk=1, bos=2, eos=3.
"""

import importlib
import io
import logging
import sys
from typing import Iterator

from etils import epath

from MaxText import pyconfig, storage
from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import documents

logger = logging.getLogger("MaxText")

_PIPELINES = {
    "grain": "MaxText.input_pipeline.grain_pipeline",
    "tfds": "MaxText.input_pipeline.tfds_pipeline",
    "hf": "MaxText.input_pipeline.hf_pipeline",
}
# SentencePiece skips longer sentences, so documents are fed paragraph by paragraph (and cut if still longer).
_MAX_SENTENCE_CHARS = 1 << 15


def training_text(config) -> Iterator[str]:
  """Paragraphs of the training documents, up to tokenizer_train_max_chars characters in all."""
  if config.dataset_type not in _PIPELINES:
    raise ConfigError(f"dataset_type: train_tokenizer needs real text (grain, tfds or hf), not {config.dataset_type!r}")
  sources = importlib.import_module(_PIPELINES[config.dataset_type]).train_sources(config)
  to_text = documents.ToText(config.train_data_columns)
  budget = config.tokenizer_train_max_chars
  for source in sources:
    for record in source.dataset:
      for paragraph in to_text.map(record).split("\n\n"):
        for start in range(0, len(paragraph), _MAX_SENTENCE_CHARS):
          piece = paragraph[start : start + _MAX_SENTENCE_CHARS]
          if not piece.strip():
            continue
          yield piece[:budget]
          budget -= len(piece)
          if budget <= 0:
            return


def train(config) -> bytes:
  """The serialized SentencePiece model trained on `config`'s data."""
  import sentencepiece  # pylint: disable=import-outside-toplevel

  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=training_text(config),
      model_writer=model,
      vocab_size=config.vocab_size,
      model_type="bpe",
      byte_fallback=True,
      split_digits=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      user_defined_symbols=["\n"],
      pad_id=0,
      unk_id=1,
      bos_id=2,
      eos_id=3,
      max_sentence_length=4 * _MAX_SENTENCE_CHARS,
      num_threads=2,
      minloglevel=2,
  )
  return model.getvalue()


def main(argv) -> None:
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
  storage.configure()
  config = pyconfig.initialize_or_exit(argv)
  if not config.tokenizer_path:
    pyconfig.exit_with_config_error(ConfigError("tokenizer_path: where to write the trained model"))
  try:
    if storage.is_remote(config.tokenizer_path):  # before training, not after
      storage.check_writable("tokenizer_path", str(storage.as_path(config.tokenizer_path).parent))
    model = train(config)
  except ConfigError as e:
    pyconfig.exit_with_config_error(e)
  except RuntimeError as e:  # SentencePiece rejects e.g. a vocab_size its text cannot fill
    pyconfig.exit_with_config_error(ConfigError(f"vocab_size: SentencePiece training failed: {e}"))
  out = epath.Path(config.tokenizer_path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(model)
  logger.info("Wrote a %d-piece SentencePiece model to %s", config.vocab_size, out)


if __name__ == "__main__":
  main(sys.argv)
