"""Conversations -> token ids, for supervised fine-tuning (use_sft) and for serving chat requests.

A conversation is rendered with a chat template: Jinja source with Hugging Face's variables (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`). The template is `chat_template_path` when set,
else the tokenizer's own (a Hugging Face tokenizer's chat_template.jinja or tokenizer_config.json), else
DEFAULT_TEMPLATE.

Which tokens are an assistant turn is read off the template itself: the conversation is rendered up to each
assistant message with the generation prompt, and up to the end of that message; the text in between is the turn.
Pieces are tokenized separately, so the prompt of every turn is exactly the token ids a server encodes for it (what
the model continues from at inference) and the turn is what it should generate. A template whose renderings are
not prefixes of one another (one that rewrites earlier turns) cannot be split this way and is refused, naming it.

Kept free of JAX imports: grain worker processes unpickle these.
"""

import functools
import json
from typing import Any, Optional, Sequence

from etils import epath

from MaxText.input_pipeline import tokenizer as tokenizers

# The template for tokenizers without one: every message is `<|role|>`, a newline, its content and a newline, and an
# assistant message ends with the eos token so a fine-tuned model learns to stop. (Rendered with trim_blocks, as
# Hugging Face renders templates, a newline right after a block tag is dropped: hence `{{ '\n' }}`.)
DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
_RECORD_CHARS = 160  # how much of a bad record an error quotes


class ChatError(ValueError):
  """A conversation that cannot be rendered or trained on; the message names the record or the template."""


def tokenizer_template(tokenizer_type: str, tokenizer_path: str) -> Optional[str]:
  """The tokenizer's own chat template (Jinja source), or None (SentencePiece and tiktoken never have one)."""
  if tokenizer_type != "huggingface" or not tokenizer_path:
    return None
  path = epath.Path(tokenizer_path)
  folder = path if path.is_dir() else path.parent
  if (folder / "chat_template.jinja").exists():
    return (folder / "chat_template.jinja").read_text()
  if (folder / "tokenizer_config.json").exists():
    template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
      template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None
  return None


def template_source(config) -> tuple[str, str]:
  """(Jinja source, where it came from) of the config's chat template; ConfigError when chat_template_path fails."""
  from MaxText.config_schema import ConfigError  # pylint: disable=import-outside-toplevel
  from MaxText.input_pipeline import file_sources  # pylint: disable=import-outside-toplevel

  if config.chat_template_path:
    path = file_sources.resolve_path(config.chat_template_path)
    try:
      return epath.Path(path).read_text(), path
    except OSError as e:
      raise ConfigError(f"chat_template_path: cannot read {path}: {e}") from None
  own = tokenizer_template(config.tokenizer_type, file_sources.resolve_path(config.tokenizer_path))
  if own:
    return own, f"the chat template of {config.tokenizer_path}"
  return DEFAULT_TEMPLATE, "the default chat template"


@functools.lru_cache(maxsize=8)
def _compile(source: str, origin: str):
  import jinja2  # pylint: disable=import-outside-toplevel
  import jinja2.ext  # pylint: disable=import-outside-toplevel
  import jinja2.sandbox  # pylint: disable=import-outside-toplevel

  class Generation(jinja2.ext.Extension):
    """Hugging Face's `{% generation %}...{% endgeneration %}` (its own assistant-mask marker): rendered as is."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.Scope(body, lineno=lineno)

  def raise_exception(message):
    raise ChatError(f"{origin}: {message}")

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
  env.globals["raise_exception"] = raise_exception
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise ChatError(f"{origin} is not a valid Jinja template: {e} (line {e.lineno})") from None


class ChatFormat:
  """A chat template bound to a tokenizer: renders conversations and encodes them with the loss mask."""

  def __init__(self, source: str, origin: str, tokenizer: tokenizers.Tokenizer):
    self.source, self.origin = source, origin
    self.tokenizer = tokenizer
    self._template = _compile(source, origin)
    self._specials = {
        "bos_token": tokenizer.piece(tokenizer.bos_id) if tokenizer.bos_id is not None else "",
        "eos_token": tokenizer.piece(tokenizer.eos_id) if tokenizer.eos_id is not None else "",
    }

  def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    import jinja2  # pylint: disable=import-outside-toplevel

    try:
      return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **self._specials)
    except (jinja2.TemplateError, TypeError, AttributeError, KeyError, IndexError) as e:
      raise ChatError(f"{self.origin} does not render: {type(e).__name__}: {e}") from None

  def encode_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The token ids a model continues to answer `messages` (rendered with the generation prompt)."""
    return self.tokenizer.encode_special(self.render(messages, add_generation_prompt=True))

  def encode(
      self, messages: Sequence[dict[str, Any]], completion_only: bool, first: int = 0
  ) -> tuple[list[int], list[bool]]:
    """A whole conversation: (token ids, trained) where trained[i] says token i is a target of the loss.

    With `completion_only`, exactly the tokens of assistant turns from message `first` on are trained; otherwise
    every token is.
    """
    ids, trained, done = [], [], ""
    full = self.render(messages, add_generation_prompt=False)
    for i, message in enumerate(messages):
      if message["role"] != "assistant" or i < first:
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      after = self.render(messages[: i + 1], add_generation_prompt=False)
      if not (before.startswith(done) and after.startswith(before) and full.startswith(after)):
        raise ChatError(
            f"{self.origin} renders a conversation differently from its beginnings (it rewrites earlier turns),"
            " so assistant turns cannot be told apart; set chat_template_path to a template that renders turns"
            " incrementally, or sft_train_on_completion_only=false"
        )
      for text, is_turn in ((before[len(done) :], False), (after[len(before) :], True)):
        piece = self.tokenizer.encode_special(text) if text else []
        ids += piece
        trained += [is_turn or not completion_only] * len(piece)
      done = after
    rest = self.tokenizer.encode_special(full[len(done) :]) if len(full) > len(done) else []
    return ids + rest, trained + [not completion_only] * len(rest)


def from_config(config, tokenizer: tokenizers.Tokenizer) -> ChatFormat:
  """The config's chat template bound to `tokenizer`; a template that does not compile is a ConfigError."""
  from MaxText.config_schema import ConfigError  # pylint: disable=import-outside-toplevel

  source, origin = template_source(config)
  try:
    return ChatFormat(source, origin, tokenizer)
  except ChatError as e:
    raise ConfigError(f"chat_template_path: {e}") from None


@functools.lru_cache(maxsize=8)
def chat_format(source: str, origin: str, tokenizer: tokenizers.Tokenizer) -> ChatFormat:
  """A ChatFormat made once per process (grain workers each make their own)."""
  return ChatFormat(source, origin, tokenizer)


def _quote(record: Any) -> str:
  text = repr(record)
  return text if len(text) <= _RECORD_CHARS else text[:_RECORD_CHARS] + "..."


def _as_messages(value: Any, role: Optional[str], column: str, record: Any) -> list[dict[str, Any]]:
  """A column's messages: a list of them, or a string that is one message of `role` (None: a JSON list of them)."""
  if isinstance(value, bytes):
    value = value.decode("utf-8", errors="replace")
  if isinstance(value, str) and role is None:
    try:
      value = json.loads(value)  # a messages column stored as JSON text (tf.Example, text records)
    except ValueError:
      raise ChatError(f"column {column!r} must hold a list of messages, got text: {_quote(record)}") from None
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  if isinstance(value, (list, tuple)):
    return list(value)
  raise ChatError(
      f"column {column!r} must be a string or a list of messages, got {type(value).__name__}: {_quote(record)}"
  )


def conversation(record: Any, columns: Sequence[str], need_answer: bool = True) -> list[dict[str, Any]]:
  """The messages of one record: one column of messages, or prompt + completion columns; checked.

  A prompt/completion string is a user/assistant message. Raises ChatError quoting the record when it has no
  assistant turn, a message is not {role, content}, or a role is not one of ROLES.
  """
  if not isinstance(record, dict) or any(c not in record for c in columns):
    raise ChatError(f"a chat record must have the columns {list(columns)} (train_data_columns), got {_quote(record)}")
  if len(columns) == 1:
    messages = _as_messages(record[columns[0]], None, columns[0], record)
  else:
    prompt, completion = columns
    messages = _as_messages(record[prompt], "user", prompt, record) + _as_messages(
        record[completion], "assistant", completion, record
    )
  out = []
  for message in messages:
    if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
      raise ChatError(f"a message must be {{'role': ..., 'content': text}}, got {_quote(message)} in {_quote(record)}")
    if message["role"] not in ROLES:
      raise ChatError(f"unknown role {message['role']!r} (known: {', '.join(ROLES)}) in {_quote(record)}")
    out.append({k: v for k, v in message.items() if v is not None})  # Arrow fills keys other rows have with None
  if need_answer and not any(m["role"] == "assistant" for m in out):
    raise ChatError(f"a conversation without an assistant turn has nothing to train on: {_quote(record)}")
  return out


def preference(record: Any, columns: Sequence[str]) -> tuple[list[dict], list[dict], list[dict]]:
  """(prompt, chosen, rejected) messages of a preference record with columns [prompt, chosen, rejected].

  Each column is a string (the prompt a user message, the answers assistant messages) or a list of messages; both
  answers need an assistant turn. Raises ChatError quoting the record otherwise.
  """
  if not isinstance(record, dict) or any(c not in record for c in columns):
    raise ChatError(
        f"a preference record must have the columns {list(columns)} (train_data_columns), got {_quote(record)}"
    )
  prompt_col, chosen_col, rejected_col = columns
  prompt = conversation({"m": _as_messages(record[prompt_col], "user", prompt_col, record)}, ["m"], need_answer=False)
  answers = []
  for column in (chosen_col, rejected_col):
    answer = conversation({"m": _as_messages(record[column], "assistant", column, record)}, ["m"], need_answer=False)
    if not any(m["role"] == "assistant" for m in answer):
      raise ChatError(f"column {column!r} has no assistant message: {_quote(record)}")
    answers.append(answer)
  return prompt, answers[0], answers[1]


def fit(ids: Sequence[int], trained: Sequence[bool], length: int) -> tuple[list[int], list[bool]]:
  """A conversation cut to `length` tokens so that it keeps trained tokens.

  It ends after the last trained run (an assistant turn) that ends within `length`; when not even the first ends
  within it, the prompt before that turn keeps its first token (bos) and its last tokens, at most half the row, and
  the turn fills the rest of the row, cut at its end.
  """
  ids, trained = list(ids), list(trained)
  if len(ids) <= length:
    return ids, trained
  ends = [i + 1 for i in range(len(ids)) if trained[i] and (i + 1 == len(ids) or not trained[i + 1])]
  within = [e for e in ends if e <= length]
  if within:
    return ids[: within[-1]], trained[: within[-1]]
  start = trained.index(True) if any(trained) else 0
  keep = min(start, max(1, length // 2))  # prompt tokens kept: the first and the last keep - 1
  picked = list(range(min(1, keep))) + list(range(start - keep + 1, start)) + list(range(start, len(ids)))
  picked = picked[:length]
  return [ids[i] for i in picked], [trained[i] for i in picked]


def signed(ids: Sequence[int], trained: Sequence[bool]) -> tuple[int, ...]:
  """One sequence of ints for the packer: an untrained token t is stored as -(t + 1) (see packing.row_arrays)."""
  return tuple(t if keep else -t - 1 for t, keep in zip(ids, trained))
