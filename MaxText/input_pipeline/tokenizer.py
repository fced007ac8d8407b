"""Tokenizers from local or bucket (gs://, s3://, ...) files: SentencePiece .model, HF tokenizer.json, .tiktoken.

All three share one small interface (`encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`) so the
data pipelines, the tokenizer trainer and decoding never ask which kind they hold. A `TokenizerSpec` is the
picklable description that grain worker processes rebuild their own tokenizer from.
"""

import base64
import dataclasses
import functools
import json
import re
from typing import Optional, Sequence

from etils import epath

from MaxText import storage
from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import file_sources

# Llama 3's pre-tokenization pattern, the default for tiktoken rank files.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's 256 special tokens (ids right after the ranks), the default when tokenizer_special_tokens is [].
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
) + tuple(f"<|reserved_special_token_{i}|>" for i in range(2, 247))

# Names Hugging Face tokenizer.json files commonly give their bos/eos/pad tokens, most specific first.
_HF_BOS = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]", "<|startoftext|>")
_HF_EOS = ("<|end_of_text|>", "</s>", "<eos>", "[SEP]", "<|endoftext|>", "<|im_end|>")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """Everything needed to load a tokenizer; plain values so it pickles into grain workers."""

  tokenizer_type: str
  path: str
  bos_token: str = ""
  eos_token: str = ""
  pad_token: str = ""
  special_tokens: tuple[str, ...] = ()
  pattern: str = ""

  @classmethod
  def from_config(cls, config) -> "TokenizerSpec":
    return cls(
        tokenizer_type=config.tokenizer_type,
        path=config.tokenizer_path,
        bos_token=config.tokenizer_bos_token,
        eos_token=config.tokenizer_eos_token,
        pad_token=config.tokenizer_pad_token,
        special_tokens=tuple(config.tokenizer_special_tokens),
        pattern=config.tiktoken_pattern,
    )


class Tokenizer:
  """Text <-> ids. `bos_id`/`eos_id` are None when the tokenizer has no such token."""

  vocab_size: int
  bos_id: Optional[int]
  eos_id: Optional[int]
  pad_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def piece(self, token_id: int) -> str:
    """The text of one token as a template writes it (`</s>`, `<|eot_id|>`, ...), special tokens included."""
    raise NotImplementedError

  def encode_special(self, text: str) -> list[int]:
    """Like encode, but the text of the bos and eos tokens becomes their ids (rendered chat templates hold them)."""
    specials = {self.piece(t): t for t in (self.bos_id, self.eos_id) if t is not None}
    specials = {k: v for k, v in specials.items() if k}
    if not specials:
      return self.encode(text)
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text):
      if part in specials:
        ids.append(specials[part])
      elif part:
        ids += self.encode(part)
    return ids

  def _resolve_special(self, spec: TokenizerSpec, token_to_id) -> None:
    """Applies tokenizer_{bos,eos,pad}_token overrides; an unknown token name is a config error."""
    for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id")):
      name = getattr(spec, key)
      if not name:
        continue
      token_id = token_to_id(name)
      if token_id is None:
        raise ConfigError(f"tokenizer_{key}: {name!r} is not a token of {spec.path}")
      setattr(self, attr, token_id)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece .model; bos/eos/pad are the ids the model was trained with (pad -1 becomes 0)."""

  def __init__(self, spec: TokenizerSpec):
    import sentencepiece  # pylint: disable=import-outside-toplevel

    self._sp = sentencepiece.SentencePieceProcessor(model_proto=epath.Path(spec.path).read_bytes())
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.pad_id = max(self._sp.pad_id(), 0)

    def token_to_id(piece):
      token_id = self._sp.piece_to_id(piece)
      return None if token_id == self._sp.unk_id() and piece != self._sp.id_to_piece(token_id) else token_id

    self._resolve_special(spec, token_to_id)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))


class HuggingFaceTokenizer(Tokenizer):
  """A `tokenizers` tokenizer.json; bos/eos/pad from a sibling tokenizer_config.json or common token names."""

  def __init__(self, spec: TokenizerSpec):
    import tokenizers  # pylint: disable=import-outside-toplevel

    path = epath.Path(spec.path)
    if path.is_dir():
      path = path / "tokenizer.json"
    self._tok = tokenizers.Tokenizer.from_str(path.read_text())
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    declared = _hf_declared_specials(path.parent / "tokenizer_config.json")
    self.bos_id = self._first_known(declared.get("bos_token"), *_HF_BOS)
    self.eos_id = self._first_known(declared.get("eos_token"), *_HF_EOS)
    pad = self._first_known(declared.get("pad_token"), *_HF_PAD)
    self.pad_id = 0 if pad is None else pad
    self._resolve_special(spec, self._tok.token_to_id)

  def _first_known(self, *names) -> Optional[int]:
    for name in names:
      if name and self._tok.token_to_id(name) is not None:
        return self._tok.token_to_id(name)
    return None

  def encode(self, text: str) -> list[int]:
    # Special tokens are added by the pipeline (add_bos/add_eos), not by the tokenizer's post-processor.
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def piece(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id)) or ""

  def encode_special(self, text: str) -> list[int]:
    return self.encode(text)  # a tokenizer.json's added tokens are matched in the text already


def _hf_declared_specials(config_path: epath.Path) -> dict[str, str]:
  if not config_path.exists():
    return {}
  try:
    data = json.loads(config_path.read_text())
  except ValueError:
    return {}
  out = {}
  for key in ("bos_token", "eos_token", "pad_token"):
    value = data.get(key)
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
      value = value.get("content")
    if isinstance(value, str):
      out[key] = value
  return out


class TiktokenTokenizer(Tokenizer):
  """A tiktoken BPE ranks file (`base64token rank` per line) plus special tokens numbered after the ranks."""

  def __init__(self, spec: TokenizerSpec):
    import tiktoken  # pylint: disable=import-outside-toplevel

    ranks = {}
    for number, line in enumerate(epath.Path(spec.path).read_bytes().splitlines(), 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
      except ValueError:
        raise ConfigError(f"tokenizer_path: {spec.path} line {number} is not `base64token rank`") from None
    specials = spec.special_tokens or LLAMA3_SPECIAL_TOKENS
    first = max(ranks.values(), default=-1) + 1
    self._special_ids = {token: first + i for i, token in enumerate(specials)}
    self._enc = tiktoken.Encoding(
        name=epath.Path(spec.path).name,
        pat_str=spec.pattern or LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=self._special_ids,
    )
    self.vocab_size = self._enc.n_vocab
    self.bos_id = self._special_ids.get(specials[0]) if specials else None
    self.eos_id = self._special_ids.get(specials[1]) if len(specials) > 1 else None
    self.pad_id = 0
    self._resolve_special(spec, self._special_ids.get)

  def encode(self, text: str) -> list[int]:
    # Text that merely looks like a special token is encoded as ordinary text.
    return self._enc.encode(text, allowed_special=set(), disallowed_special=())

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode([int(i) for i in ids])

  def piece(self, token_id: int) -> str:
    return self._enc.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")

  def encode_special(self, text: str) -> list[int]:
    return self._enc.encode(text, allowed_special="all")


_KINDS = {
    "sentencepiece": SentencePieceTokenizer,
    "huggingface": HuggingFaceTokenizer,
    "tiktoken": TiktokenTokenizer,
}


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: TokenizerSpec) -> Tokenizer:
  """Loads (once per process) the tokenizer `spec` describes; ConfigError names the key when it cannot."""
  if not spec.path:
    raise ConfigError("tokenizer_path: required for real data (set it to a .model, tokenizer.json or .tiktoken file)")
  spec = dataclasses.replace(spec, path=file_sources.resolve_path(spec.path))
  storage.check_readable("tokenizer_path", spec.path)  # missing bucket / object / credentials, named
  try:
    return _KINDS[spec.tokenizer_type](spec)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ConfigError(f"tokenizer_path: cannot load {spec.path} as a {spec.tokenizer_type} tokenizer: {e}") from None


def build_tokenizer(config) -> Tokenizer:
  """The config's tokenizer, checked against vocab_size so no id can index past the embedding table."""
  tok = load_tokenizer(TokenizerSpec.from_config(config))
  if tok.vocab_size > config.vocab_size:
    raise ConfigError(
        f"vocab_size: {config.vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens"
        f" ({config.tokenizer_path})"
    )
  return tok
