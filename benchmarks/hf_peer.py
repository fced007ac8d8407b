"""Hugging Face `transformers` (torch, CPU) on the same model as a MaxText config: the peer in side-by-side benchmarks.

The HF config comes from the checkpoint converter's mapping (`to_huggingface.hf_config_json`), so any family the
converter exports can be benchmarked, with the same dims, vocab, norms and RoPE as the MaxText model.
"""

import time

import numpy as np

from MaxText.utils.ckpt_conversion import to_huggingface


def _torch(threads: int):
  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(threads)
  return torch


def hf_model(config, *, threads: int = 2, attn_implementation: str = "sdpa"):
  """A randomly initialised transformers CausalLM with the config's architecture, in the config's compute dtype."""
  import transformers  # pylint: disable=import-outside-toplevel

  torch = _torch(threads)
  fields = dict(to_huggingface.hf_config_json(config))
  model_type = fields.pop("model_type")
  for key in ("architectures", "dtype", "torch_dtype"):
    fields.pop(key, None)
  hf_config = transformers.AutoConfig.for_model(model_type, **fields)
  hf_config._attn_implementation = attn_implementation  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config)
  if np.dtype(config.dtype).name == "bfloat16":
    model = model.to(torch.bfloat16)
  return model


class HFTrainRunner:
  """One AdamW training step of the HF model on a fixed random batch (global batch x max_target_length tokens).

  `compiled=True` is the torch.compile peer: the model's forward (and with it, through AOTAutograd, its backward) and
  the clip + AdamW update are each compiled by inductor, which is how torch users speed up CPU training; the first
  steps (the warm-up below) pay the compile.
  """

  def __init__(self, config, *, threads: int = 2, attn_implementation: str = "sdpa", compiled: bool = False):
    torch = _torch(threads)
    self.torch = torch
    self.model = hf_model(config, threads=threads, attn_implementation=attn_implementation).train()
    self.optimizer = torch.optim.AdamW(
        self.model.parameters(), lr=1e-4, betas=(config.adam_b1, config.adam_b2), weight_decay=config.adam_weight_decay
    )
    self.clip = config.gradient_clipping_threshold
    self.forward = torch.compile(self.model) if compiled else self.model
    self.update = torch.compile(self._update) if compiled else self._update
    shape = (config.global_batch_size_to_train_on, config.max_target_length)
    rng = np.random.default_rng(0)
    self.tokens = torch.from_numpy(rng.integers(3, config.vocab_size, shape).astype(np.int64))
    self.tokens_per_step = shape[0] * shape[1]
    self.attn_implementation = attn_implementation
    start = time.perf_counter()
    for _ in range(2 if compiled else 1):  # warm-up: allocator and kernel selection (and the compiles)
      self.step()
    self.warmup_seconds = time.perf_counter() - start

  def _update(self):
    if self.clip > 0:  # as MaxText's optax chain does
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.optimizer.step()

  def step(self) -> float:
    out = self.forward(input_ids=self.tokens, labels=self.tokens)
    out.loss.backward()
    self.update()
    self.optimizer.zero_grad(set_to_none=True)
    return out.loss.item()

  def measure(self, steps: int) -> list[float]:
    """Seconds of each of `steps` training steps."""
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.step()
      times.append(time.perf_counter() - start)
    return times
