"""Document-level steps of the text pipeline: record -> text -> token-id pieces that fit one row.

Kept free of JAX imports: grain worker processes unpickle these transforms and should not pay for importing JAX.
"""

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import chat, packing
from MaxText.input_pipeline import tokenizer as tokenizers


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """The config values the pipeline needs, as plain values (a Config does not pickle into workers)."""

  tokenizer: tokenizers.TokenizerSpec
  columns: tuple[str, ...]
  max_target_length: int
  add_bos: bool
  add_eos: bool
  packing: bool
  packing_bins: int
  long_document_mode: str
  seed: int
  num_epoch: int
  worker_count: int
  streams: int
  rows_per_stream: int
  sft: bool = False
  dpo: bool = False
  completion_only: bool = True
  chat_template: str = ""  # Jinja source (use_sft)
  chat_origin: str = ""  # where it came from, for errors

  @classmethod
  def from_config(cls, config) -> "PipelineOptions":
    rows = config.global_batch_size_to_load
    streams = config.data_streams or rows
    if rows % streams:
      raise ConfigError(
          f"data_streams: {streams} does not divide the global batch of {rows} rows; use a divisor of it, or 0 for"
          " one stream per row"
      )
    template, origin = "", ""
    if config.use_sft or config.use_dpo:
      checked = chat.from_config(config, tokenizers.build_tokenizer(config))  # a broken template fails here
      template, origin = checked.source, checked.origin
    return cls(
        tokenizer=tokenizers.TokenizerSpec.from_config(config),
        columns=tuple(config.train_data_columns),
        max_target_length=config.max_target_length,
        add_bos=config.add_bos,
        add_eos=config.add_eos,
        packing=config.packing,
        packing_bins=config.packing_bins,
        long_document_mode=config.long_document_mode,
        seed=config.data_shuffle_seed,
        num_epoch=config.num_epoch,
        worker_count=config.grain_worker_count,
        streams=streams,
        rows_per_stream=rows // streams,
        sft=config.use_sft,
        dpo=config.use_dpo,
        completion_only=config.sft_train_on_completion_only,
        chat_template=template,
        chat_origin=origin,
    )


def _as_text(value: Any) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  if isinstance(value, np.ndarray) and value.shape == ():
    return _as_text(value.item())
  return value if isinstance(value, str) else str(value)


class ToText(grain.transforms.Map):
  """A record -> its document text (the named columns joined by newlines; str/bytes records are the text)."""

  def __init__(self, columns: Sequence[str]):
    self._columns = tuple(columns)

  def map(self, element):
    if isinstance(element, dict):
      return "\n".join(_as_text(element[c]) for c in self._columns)
    return _as_text(element)


class Tokenize(grain.experimental.FlatMapTransform):
  """Text -> the token-id pieces (with bos/eos) that each fit one row; empty documents give nothing."""

  max_fan_out = 1 << 20  # documents are chunked, so one may give many rows

  def __init__(self, options: PipelineOptions):
    self._options = options

  def flat_map(self, element):
    o = self._options
    tok = tokenizers.load_tokenizer(o.tokenizer)  # cached per process, so each grain worker loads it once
    ids = tok.encode(element)
    if not ids:
      return []
    if o.add_bos and tok.bos_id is not None:
      ids = [tok.bos_id] + ids
    if o.add_eos and tok.eos_id is not None:
      ids = ids + [tok.eos_id]
    return packing.split_document(ids, o.max_target_length, o.long_document_mode)


class EncodeChat(grain.experimental.FlatMapTransform):
  """use_sft: a conversation record -> one sequence of (signed, see chat.signed) token ids that fits a row."""

  max_fan_out = 1

  def __init__(self, options: PipelineOptions):
    self._options = options

  def flat_map(self, element):
    o = self._options
    tok = tokenizers.load_tokenizer(o.tokenizer)
    chat_format = chat.chat_format(o.chat_template, o.chat_origin, tok)
    ids, trained = chat_format.encode(chat.conversation(element, o.columns), o.completion_only)
    ids, trained = chat.fit(ids, trained, o.max_target_length)
    return [chat.signed(ids, trained)] if len(ids) >= 2 else []


class EncodePreference(grain.experimental.FlatMapTransform):
  """use_dpo: a (prompt, chosen, rejected) record -> (chosen, rejected) signed token sequences, each at most half a row.

  Only the answers' tokens are trained (their log-probabilities enter the DPO loss); a pair where either side keeps
  fewer than two tokens is dropped.
  """

  max_fan_out = 1

  def __init__(self, options: PipelineOptions):
    self._options = options

  def flat_map(self, element):
    o = self._options
    chat_format = chat.chat_format(o.chat_template, o.chat_origin, tokenizers.load_tokenizer(o.tokenizer))
    prompt, chosen, rejected = chat.preference(element, o.columns)
    pair = []
    for answer in (chosen, rejected):
      ids, trained = chat_format.encode(prompt + answer, completion_only=True, first=len(prompt))
      ids, trained = chat.fit(ids, trained, o.max_target_length // 2)
      if len(ids) < 2 or not any(trained[1:]):
        return []
      pair.append(chat.signed(ids, trained))
    return [tuple(pair)]
