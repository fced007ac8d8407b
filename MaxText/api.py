"""Python API: load a checkpoint, get full-forward logits, generate token ids (the decode engine underneath).

    from MaxText import api
    model = api.load("MaxText/configs/base.yml", load_parameters_path="...", dtype="float32")  # kwargs: config keys
    logits = model.logits(token_ids)          # int [B, S] -> float32 np.ndarray [B, S, vocab]
    new_ids = model.generate([[2, 17, 9]], max_new_tokens=32, strategy="greedy")  # list of lists of new ids
    model.tokenizer.decode(new_ids[0])

`generate` runs the same engine and continuous-batching Scheduler as `python3 -m MaxText.decode` and the server;
greedy picks the argmax of the logits the full forward gives at each position (up to float rounding of the cached
attention).
"""

import functools
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx

from MaxText import pyconfig, sharding, startup, storage, training
from MaxText.config_schema import ConfigError
from MaxText.inference import engine as engine_lib
from MaxText.inference import loading, sampling
from MaxText.inference import scheduler as scheduler_lib
from MaxText.input_pipeline.tokenizer import Tokenizer, build_tokenizer


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Model:
  """A model with loaded params. Build it with `load`, or from a params pure dict: `Model(config, params)`."""

  def __init__(self, config, params, mesh: Optional[jax.sharding.Mesh] = None):
    # Unrolled layers, as the engine runs them (the layout of `params` does not matter).
    self.config = engine_lib.unrolled_config(config)
    self.mesh = mesh if mesh is not None else sharding.create_mesh(config)
    self._graphdef, self._rest, _, self._param_shardings = training.build_model_skeleton(self.config, self.mesh)
    self.params = jax.device_put(engine_lib.unrolled_params(params, self.config.param_scan_axis), self._param_shardings)
    self._schedulers: dict[engine_lib.EngineDims, scheduler_lib.Scheduler] = {}

    @jax.jit
    def forward(params, tokens):
      model = nnx.merge(self._graphdef, nnx.State(params), self._rest)
      positions = jax.numpy.broadcast_to(jax.numpy.arange(tokens.shape[1], dtype=jax.numpy.int32), tokens.shape)
      return model(tokens, positions, None).astype(jax.numpy.float32)

    self._forward = forward

  @functools.cached_property
  def tokenizer(self) -> Tokenizer:
    """The config's tokenizer (loaded on first use): encode(text) -> ids, decode(ids) -> text, bos_id, eos_id."""
    return build_tokenizer(self.config)

  def logits(self, token_ids) -> np.ndarray:
    """Full forward pass (no cache) over int ids [B, S] (or [S]) -> float32 logits [B, S, vocab] (or [S, vocab])."""
    ids = np.asarray(token_ids, np.int32)
    if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
      raise ValueError(f"token_ids must be a non-empty [batch, seq] (or [seq]) int array, got shape {ids.shape}")
    with sharding.use_mesh(self.mesh, self.config.logical_axis_rules):
      out = np.asarray(self._forward(self.params, np.atleast_2d(ids)))
    return out if ids.ndim == 2 else out[0]

  def _scheduler(self, num_slots: int, max_prefill_length: int, max_cache_length: int) -> scheduler_lib.Scheduler:
    dims = engine_lib.EngineDims(num_slots, max_prefill_length, max_cache_length)
    if dims not in self._schedulers:
      engine = engine_lib.Engine(
          self.config,
          self.mesh,
          num_slots=num_slots,
          max_prefill_length=max_prefill_length,
          max_cache_length=max_cache_length,
      )
      self._schedulers[dims] = scheduler_lib.Scheduler(
          engine, self.params, max_prefills_per_step=num_slots, prefix_caching=self.config.enable_prefix_caching
      )
    return self._schedulers[dims]

  def generate(
      self,
      prompts: Sequence[Sequence[int]],
      max_new_tokens: int = 32,
      strategy: str = "greedy",
      temperature: float = 1.0,
      top_k: int = 0,
      top_p: float = 1.0,
      seed: int = 0,
      stop_on_eos: bool = True,
  ) -> list[list[int]]:
    """New token ids for each prompt (a list of token ids; no bos is added).

    Decodes up to `max_new_tokens` per prompt; with `stop_on_eos` a prompt stops at the tokenizer's eos, which
    ends its list. Prompts longer than max_prefill_predict_length are prefilled in chunks of that length; prompts
    that would outgrow max_target_length get a larger cache (one compile per size). Same arguments and seed: same
    ids (prompt i draws with seed + i, whatever else is decoded beside it).
    """
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, (list, tuple, np.ndarray)) for p in prompts):
      raise TypeError("prompts must be a list of token-id lists, e.g. [[2, 17, 9]]")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
      return []
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, ids in enumerate(prompts):
      if not ids:
        raise ValueError(f"prompt {i} is empty")
      if min(ids) < 0 or max(ids) >= self.config.vocab_size:
        raise ValueError(f"prompt {i} has ids outside [0, vocab_size={self.config.vocab_size})")
    settings = sampling.SamplingParams.from_strategy(strategy, temperature, top_k, top_p, seed)
    longest = max(len(ids) for ids in prompts)
    prefill_length = self.config.max_prefill_predict_length  # longer prompts are prefilled in chunks of it
    cache_length = max(self.config.max_target_length, _round_up(longest + max_new_tokens, 64))
    num_slots = min(len(prompts), self.config.micro_batch_size_to_train_on)
    stop_id = None
    if stop_on_eos:
      try:
        stop_id = self.tokenizer.eos_id
      except ConfigError as e:
        raise ValueError(
            f"stop_on_eos needs the config's tokenizer for its eos id ({e}); or pass stop_on_eos=False"
        ) from None
    return scheduler_lib.decode_prompts(
        self._scheduler(num_slots, prefill_length, cache_length),
        prompts,
        max_new_tokens=max_new_tokens,
        stop_ids=() if stop_id is None else (stop_id,),
        sampling_params=settings.per_prompt(len(prompts)),
    )


def load(config_path: str, **config_keys) -> Model:
  """A Model from a config file and config keys; params from load_parameters_path / load_full_state_path / run_name.

  Raises config_schema.ConfigError for bad keys, a missing checkpoint or one that does not match the config.
  """
  storage.configure()  # as the entry points do: STORAGE_EMULATOR_HOST implies the clients' emulator settings
  config = engine_lib.unrolled_config(pyconfig.initialize(["", config_path], **config_keys))
  startup.use_compile_cache(config)
  mesh = sharding.create_mesh(config)
  _, _, abstract_params, param_shardings = training.build_model_skeleton(config, mesh)
  params = loading.load_params(config, abstract_params, param_shardings)
  return Model(config, params, mesh)
