"""The quickstart corpus: English reference text from Python's own `pydoc_data` module, built on first use.

Every Python installation ships `pydoc_data.topics` (the language reference sections `help()` shows), so the
corpus needs no download and no third-party text lives in the repository. Each topic is one document; a fixed
subset of topics is held out for eval. The files go to assets/data/ (git-ignored).

    python3 -m MaxText.input_pipeline.quickstart_data     # (re)build the corpus and print its size
"""

import json
import os
import pathlib
import sys
import tempfile

from MaxText.input_pipeline import file_sources

DATA_DIR = file_sources.REPO_ROOT / "assets" / "data"
TRAIN_FILE = DATA_DIR / "pydoc_train.jsonl"
EVAL_FILE = DATA_DIR / "pydoc_eval.jsonl"
_EVAL_EVERY = 16  # every 16th topic (sorted by name) is eval data


def documents() -> list[dict[str, str]]:
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel

  return [{"title": name, "text": text.strip()} for name, text in sorted(topics.topics.items()) if text.strip()]


def _write_jsonl(path: pathlib.Path, docs) -> None:
  # Write-then-rename so concurrent first uses (several processes, parallel tests) never see a partial file.
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps(doc, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def build(force: bool = False) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes the train and eval JSON-lines files unless they already exist."""
  if force or not (TRAIN_FILE.exists() and EVAL_FILE.exists()):
    docs = documents()
    _write_jsonl(TRAIN_FILE, [d for i, d in enumerate(docs) if i % _EVAL_EVERY != _EVAL_EVERY - 1])
    _write_jsonl(EVAL_FILE, [d for i, d in enumerate(docs) if i % _EVAL_EVERY == _EVAL_EVERY - 1])
  return TRAIN_FILE, EVAL_FILE


def build_if_default(pattern: str) -> None:
  """Builds the corpus when `pattern` names one of its files and that file is missing (first use)."""
  if "://" in pattern:  # a bucket, never the corpus
    return
  path = pathlib.Path(pattern)
  candidates = [path] if path.is_absolute() else [pathlib.Path.cwd() / path, file_sources.REPO_ROOT / path]
  if any(c.resolve() in (TRAIN_FILE, EVAL_FILE) and not c.exists() for c in candidates):
    build()


def main() -> None:
  for path in build(force="--force" in sys.argv):
    lines = path.read_text(encoding="utf-8").splitlines()
    chars = sum(len(json.loads(line)["text"]) for line in lines)
    print(f"{path}: {len(lines)} documents, {chars} characters")


if __name__ == "__main__":
  main()
