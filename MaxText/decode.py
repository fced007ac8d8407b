"""Generates text with a trained model: `python3 -m MaxText.decode MaxText/configs/base.yml run_name=RUN prompt="..."`.

Loads `load_parameters_path` (or `load_full_state_path`, or the newest checkpoint of `run_name`), decodes `prompt`
or every non-blank line of `prompts_file` through the continuous-batching Scheduler the server uses
(per_device_batch_size x devices slots), each until EOS or max_target_length, and prints
``Input `<prompt>` -> `<output>` `` per prompt and a throughput summary.
Sampling follows `decode_sampling_*` (prompt i draws with decode_sampling_seed + i). Bad input (empty or too long
prompt, no or mismatched checkpoint) prints one `CONFIG ERROR:` line naming the key and exits with code 2.
"""

import logging
import sys
from typing import Sequence

import jax
from etils import epath

from MaxText import pyconfig, startup
from MaxText.config_schema import ConfigError
from MaxText.inference import engine as engine_lib
from MaxText.inference import loading
from MaxText.inference import request as request_lib
from MaxText.inference import scheduler as scheduler_lib
from MaxText.input_pipeline.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger("MaxText")


def read_prompts(config) -> tuple[str, list[str]]:
  """(config key the prompts came from, prompts): the lines of `prompts_file`, else `prompt`."""
  if config.prompts_file:
    path = epath.Path(config.prompts_file)
    if not path.is_file():
      raise ConfigError(f"prompts_file: {path} does not exist")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
      raise ConfigError(f"prompts_file: {path} holds no prompts (one per line)")
    return "prompts_file", prompts
  if not config.prompt.strip():
    raise ConfigError("prompt: the prompt is empty (set prompt=... or prompts_file=...)")
  return "prompt", [config.prompt]


def encode_prompts(config, tokenizer: Tokenizer, key: str, prompts: Sequence[str]) -> list[list[int]]:
  """Token ids per prompt (bos first when add_bos); ConfigError for a prompt that leaves no room in the context."""
  bos = [tokenizer.bos_id] if config.add_bos and tokenizer.bos_id is not None else []
  encoded = []
  for n, text in enumerate(prompts):
    ids = bos + tokenizer.encode(text)
    where = f"line {n + 1}" if key == "prompts_file" else "the prompt"
    if len(ids) == len(bos):
      raise ConfigError(f"{key}: {where} encodes to no tokens")
    if len(ids) >= config.max_target_length:  # longer than max_prefill_predict_length: prefilled in chunks
      raise ConfigError(
          f"{key}: {where} is {len(ids)} tokens, leaving no room to generate within max_target_length"
          f" {config.max_target_length} ({text[:40]!r}...)"
      )
    encoded.append(ids)
  return encoded


def run(config) -> request_lib.SchedulerStats:
  """Decodes and prints every prompt (through the Scheduler, as the server does); returns its statistics."""
  tokenizer = build_tokenizer(config)
  key, prompts = read_prompts(config)
  encoded = encode_prompts(config, tokenizer, key, prompts)
  engine = engine_lib.Engine(config)
  params = loading.load_params(config, engine.abstract_params, engine.param_shardings)
  logger.info(
      "Decoding %d prompt(s) in %d slots, %s sampling, cache of %d tokens%s",
      len(prompts),
      engine.dims.num_slots,
      config.decode_sampling_strategy,
      engine.dims.max_cache_length,
      " (int8)" if config.quantize_kvcache else "",
  )
  if config.quantization:
    stored = config.checkpoint_is_quantized or config.save_quantized_params_path
    stored = "int8 kernels + scales" if stored else "weights quantized at each call"
    logger.info("Matmuls quantized: %s (%s)", config.quantization, stored)
  scheduler = scheduler_lib.Scheduler(
      engine, params, max_prefills_per_step=engine.dims.num_slots, prefix_caching=config.enable_prefix_caching
  )
  scheduler.warmup_for([len(ids) for ids in encoded])
  outputs = scheduler_lib.decode_prompts(
      scheduler,
      encoded,
      stop_ids=() if tokenizer.eos_id is None else (tokenizer.eos_id,),
      sampling_params=engine.default_sampling.per_prompt(len(encoded)),
  )
  stats = scheduler.stats
  if jax.process_index() == 0:
    for text, ids in zip(prompts, outputs):
      if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
      print(f"Input `{text}` -> `{tokenizer.decode(ids)}`")
    print(stats.summary())
  return stats


def main(argv: Sequence[str]):
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  config = startup.start(argv, "decode")
  try:
    run(config)
  except ConfigError as e:
    pyconfig.exit_with_config_error(e)


if __name__ == "__main__":
  main(sys.argv)
