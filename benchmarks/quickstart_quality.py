"""How much of the quickstart corpus a trained run reproduces: greedy continuations of corpus openings.

    python3 benchmarks/quickstart_quality.py run_name=quickstart [key=value ...]

Loads the run's latest checkpoint (MaxText/configs/base.yml plus the overrides, as MaxText.decode does), takes the
beginning of every 3rd training document (its title, underline and the first words of its first paragraph), and
decodes greedily from each. Prints each continuation, then the mean length (in words) of the longest stretch of
each continuation found word for word in the training text, and the share of the continuations' word 4-grams that
occur in it. A model that has learned the corpus continues "The "for" statement is used" with the reference's own
words; one that has not repeats a few frequent phrases. Eval loss is the training run's own `eval at step N` line
(`eval_interval=STEPS eval_steps=40` covers the whole eval file). Results: benchmarks/RESULTS.md.
"""

import json
import pathlib
import re
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo root, from any directory
# pylint: disable=wrong-import-position
from MaxText import api  # noqa: E402
from MaxText.input_pipeline import quickstart_data  # noqa: E402

# pylint: enable=wrong-import-position

PROMPT_WORDS = 5
NEW_TOKENS = 32
EVERY = 3


def _words(text: str) -> list[str]:
  return text.split()


def _openings(docs: list[dict]) -> list[str]:
  """Every EVERY-th document's beginning up to the first PROMPT_WORDS words of its first prose paragraph: its
  title and underline included, since every training document starts so (a bare sentence right after bos looks
  like a title to the model)."""
  first_words = re.compile(r"\n\s*\n((?:\S+\s+){%d}\S+)" % (PROMPT_WORDS - 1))
  prompts = []
  for doc in docs[::EVERY]:
    for paragraph in first_words.finditer(doc["text"]):
      words = _words(doc["text"][paragraph.start(1) :])
      if len(words) > 2 * PROMPT_WORDS and words[0][:1].isupper():
        prompts.append(doc["text"][: paragraph.end(1)])
        break
  return prompts


def longest_verbatim(words: list[str], corpus: str) -> int:
  """The most consecutive words of `words` that occur together in `corpus` (words joined by single spaces)."""
  best = 0
  for i in range(len(words)):
    j = i + best + 1  # only a longer stretch can raise best
    while j <= len(words) and f" {' '.join(words[i:j])} " in corpus:
      best, j = j - i, j + 1
  return best


def ngrams(words: list[str], n: int = 4) -> list[tuple[str, ...]]:
  return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def ngram_share(words: list[str], corpus_grams: set, n: int = 4) -> float:
  grams = ngrams(words, n)
  return sum(g in corpus_grams for g in grams) / len(grams) if grams else 0.0


def main(argv: list[str]) -> None:
  bad = [arg for arg in argv if "=" not in arg]
  if bad or not argv:
    sys.exit(f"usage: quickstart_quality.py run_name=RUN [key=value ...] (config overrides); got {bad or 'none'}")
  overrides = dict(arg.split("=", 1) for arg in argv)
  model = api.load("MaxText/configs/base.yml", **{"dtype": "float32", **overrides})
  train_file, _ = quickstart_data.build()
  with open(train_file, encoding="utf-8") as f:
    docs = [json.loads(line) for line in f]
  corpus_words = [w for d in docs for w in _words(d["text"])]
  corpus = f" {' '.join(corpus_words)} "
  grams = set(ngrams(corpus_words))
  tok = model.tokenizer
  prompts = _openings(docs)
  ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
  outputs = model.generate(ids, max_new_tokens=NEW_TOKENS, strategy="greedy", stop_on_eos=True)
  runs, shares = [], []
  for prompt, new in zip(prompts, outputs):
    text = tok.decode(new)
    words = _words(text)
    runs.append(longest_verbatim(words, corpus))
    shares.append(ngram_share(words, grams))
    print(f"...{prompt[-40:]!r} -> {text!r}  (longest verbatim run {runs[-1]} words)")
  print(
      f"\n{len(prompts)} prompts, {NEW_TOKENS} greedy tokens each: longest verbatim run {statistics.mean(runs):.1f}"
      f" words (mean), word 4-grams found in the training text {100 * statistics.mean(shares):.0f}%"
  )


if __name__ == "__main__":
  main(sys.argv[1:])
