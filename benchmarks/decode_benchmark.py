"""Decode throughput of the engine against Hugging Face `generate`, in one process on this machine.

  python3 benchmarks/decode_benchmark.py [--batch-sizes 1 8] [--prompt-length 64] [--new-tokens 64] [--repeats 5]
      [--skip-hf] [CONFIG] [key=value ...]

Defaults to llama-small (vocab 32000, emb 512, 8 layers, 8 heads x 64, mlp 1408), f32, random weights, greedy. For each
batch size it reports the median over `--repeats` rounds (ours and HF's interleaved) of:
  prefill tokens/s   prompt tokens / time of one prefill call over the whole batch
  generate tokens/s  new tokens / time of the generate steps (every slot active, one token per slot per step)
  end-to-end         new tokens / (prefill + insert + generate steps): what HF's generate number measures
and the same-dims `transformers` LlamaForCausalLM (torch CPU, torch.set_num_threads(2), random weights): its
prefill (one forward over the prompts) and `generate(max_new_tokens=N, min_new_tokens=N)` greedy tokens/s.
The machine may be shared: compare numbers from the same run only.
"""

import argparse
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from MaxText import startup
from MaxText.inference import engine as engine_lib
from MaxText.layers import model_creation

LLAMA_SMALL = [
    "model_name=llama-small",
    "dtype=float32",
    "weight_dtype=float32",
    "log_config=false",
    "enable_checkpointing=false",
    "decode_sampling_strategy=greedy",  # as HF's generate(do_sample=False)
]


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


class MaxTextRunner:
  """The engine with `batch` slots, cache of prompt + new tokens, random params; one measurement per call."""

  def __init__(self, config, batch: int, prompt_length: int, new_tokens: int):
    self.engine = engine_lib.Engine(
        config, num_slots=batch, max_prefill_length=prompt_length, max_cache_length=prompt_length + new_tokens
    )
    model = model_creation.create_sharded_model(self.engine.config, self.engine.mesh)
    self.params = nnx.state(model, nnx.Param).to_pure_dict()
    self.prompts = _prompts(config, batch, prompt_length)
    self.batch, self.prompt_length, self.new_tokens = batch, prompt_length, new_tokens
    self.state = self.engine.init_decode_state()
    for _ in range(2):  # compiles everything, then one warm run
      self.measure()

  def _prefill(self):
    return jax.block_until_ready(self.engine.prefill(self.params, self.prompts, self.prompt_length))

  def measure(self) -> dict:
    """tokens/s of: one prefill; the generate steps after insert; prefill + insert + steps (end to end)."""
    start = time.perf_counter()
    prefix = self._prefill()
    prefill_s = time.perf_counter() - start
    self.state = self.engine.insert(prefix, self.state, list(range(self.batch)))
    jax.block_until_ready(self.state)
    insert_s = time.perf_counter() - start - prefill_s
    start = time.perf_counter()
    for _ in range(self.new_tokens - 1):  # the first new token came from prefill
      self.state, tokens = self.engine.generate(self.params, self.state)
    np.asarray(tokens)
    generate_s = time.perf_counter() - start
    return {
        "prefill": self.batch * self.prompt_length / prefill_s,
        "generate": self.batch * (self.new_tokens - 1) / generate_s,
        "end_to_end": self.batch * self.new_tokens / (prefill_s + insert_s + generate_s),
    }


class HFRunner:
  """transformers LlamaForCausalLM with the config's dims and random weights (torch CPU, 2 threads)."""

  def __init__(self, config, batch: int, prompt_length: int, new_tokens: int):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(2)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.emb_dim,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_decoder_layers,
        num_attention_heads=config.num_query_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.normalization_layer_epsilon,
        rope_theta=config.rope_max_timescale,
        max_position_embeddings=max(2048, prompt_length + new_tokens),
        tie_word_embeddings=config.logits_via_embedding,
    )
    self.torch = torch
    self.model = transformers.LlamaForCausalLM(hf_config).eval()
    self.prompts = torch.from_numpy(_prompts(config, batch, prompt_length).astype(np.int64))
    self.mask = torch.ones_like(self.prompts)
    self.batch, self.prompt_length, self.new_tokens = batch, prompt_length, new_tokens
    for _ in range(2):  # warm up (torch builds kernels per new shape; the cache grows every step)
      self.measure()

  def _forward(self):
    with self.torch.no_grad():
      self.model(input_ids=self.prompts, attention_mask=self.mask)

  def _generate(self):
    with self.torch.no_grad():
      out = self.model.generate(
          input_ids=self.prompts,
          attention_mask=self.mask,
          max_new_tokens=self.new_tokens,
          min_new_tokens=self.new_tokens,
          do_sample=False,
          pad_token_id=0,
      )
    assert out.shape == (self.batch, self.prompt_length + self.new_tokens)

  def measure(self) -> dict:
    """tokens/s of one forward over the prompts (prefill) and of generate (new tokens / its whole time)."""
    return {
        "prefill": self.batch * self.prompt_length / _seconds(self._forward),
        "generate": self.batch * self.new_tokens / _seconds(self._generate),
    }


def _prompts(config, batch: int, prompt_length: int) -> np.ndarray:
  return np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt_length)).astype(np.int32)


def _medians(rounds: list[dict]) -> dict:
  return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--prompt-length", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-hf", action="store_true")
  args, rest = parser.parse_known_args(argv[1:])
  config_file = rest[0] if rest and "=" not in rest[0] else "MaxText/configs/base.yml"
  overrides = [r for r in rest if "=" in r]
  length = args.prompt_length + args.new_tokens
  config = startup.start(
      ["", config_file, *LLAMA_SMALL, f"max_target_length={length}", *overrides],
      max_prefill_predict_length=args.prompt_length,
  )
  print(
      f"{config.model_name}: emb {config.emb_dim}, {config.num_decoder_layers} layers, vocab {config.vocab_size},"
      f" {config.dtype.name}; prompt {args.prompt_length} tokens, {args.new_tokens} new tokens;"
      f" jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}"
  )
  header = f"{'batch':>5} | {'system':<16} | {'prefill tok/s':>13} | {'generate tok/s':>14} | {'end-to-end tok/s':>16}"
  print(header)
  print("-" * len(header))
  for batch in args.batch_sizes:
    runners = {"ours": MaxTextRunner(config, batch, args.prompt_length, args.new_tokens)}
    if not args.skip_hf:
      runners["hf"] = HFRunner(config, batch, args.prompt_length, args.new_tokens)
    rounds = {name: [] for name in runners}
    for _ in range(args.repeats):  # interleaved, so load on a shared machine hits both alike
      for name, runner in runners.items():
        rounds[name].append(runner.measure())
    ours = _medians(rounds["ours"])
    print(
        f"{batch:>5} | {'MaxText engine':<16} | {ours['prefill']:>13.1f} | {ours['generate']:>14.1f} |"
        f" {ours['end_to_end']:>16.1f}"
    )
    if not args.skip_hf:
      hf = _medians(rounds["hf"])
      print(f"{batch:>5} | {'HF generate':<16} | {hf['prefill']:>13.1f} | {'':>14} | {hf['generate']:>16.1f}")
      print(
          f"{batch:>5} | {'ratio':<16} | {ours['prefill'] / hf['prefill']:>12.2f}x |"
          f" {ours['generate'] / hf['generate']:>13.2f}x | {ours['end_to_end'] / hf['generate']:>15.2f}x"
      )
    sys.stdout.flush()


if __name__ == "__main__":
  main(sys.argv)
