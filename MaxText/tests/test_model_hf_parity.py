"""Logits parity with Hugging Face transformers (PyTorch, CPU) for the Llama layer, with weights copied across.

Tiny random models, non-trivial norm weights, sequences longer than the sliding window, and a Llama 3.1 RoPE
scaling whose three frequency bands all occur at this head_dim.
"""

import numpy as np
import pytest
from flax import nnx

from MaxText.layers import model_creation, scan_layout
from MaxText.tests.model_test_utils import config_of, forward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 24


def _hf_model(config, rope_parameters):
  common = dict(
      vocab_size=config.vocab_size,
      hidden_size=config.emb_dim,
      intermediate_size=config.mlp_dim,
      num_hidden_layers=config.num_decoder_layers,
      num_attention_heads=config.num_query_heads,
      num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim,
      rms_norm_eps=config.normalization_layer_epsilon,
      max_position_embeddings=64,
      tie_word_embeddings=False,
      rope_parameters=rope_parameters,
  )
  if config.sliding_window_size:
    hf_config = transformers.MistralConfig(sliding_window=config.sliding_window_size, **common)
    model = transformers.MistralForCausalLM(hf_config)
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
  model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model.eval()


def _to_maxtext(hf_model, config):
  """HF state dict -> MaxText unscanned pure dict -> scanned layout."""
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
  e, hq, hkv, d = config.emb_dim, config.num_query_heads, config.num_kv_heads, config.head_dim
  layers = {}
  for i in range(config.num_decoder_layers):
    p = f"model.layers.{i}."
    layers[i] = {
        "pre_self_attention_layer_norm": {"scale": sd[p + "input_layernorm.weight"]},
        "post_self_attention_layer_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
        "self_attention": {
            "query": {"kernel": sd[p + "self_attn.q_proj.weight"].T.reshape(e, hq, d)},
            "key": {"kernel": sd[p + "self_attn.k_proj.weight"].T.reshape(e, hkv, d)},
            "value": {"kernel": sd[p + "self_attn.v_proj.weight"].T.reshape(e, hkv, d)},
            "out": {"kernel": sd[p + "self_attn.o_proj.weight"].T.reshape(hq, d, e)},
        },
        "mlp": {
            "wi_0": {"kernel": sd[p + "mlp.gate_proj.weight"].T},
            "wi_1": {"kernel": sd[p + "mlp.up_proj.weight"].T},
            "wo": {"kernel": sd[p + "mlp.down_proj.weight"].T},
        },
    }
  params = {
      "token_embedder": {"embedding": sd["model.embed_tokens.weight"]},
      "decoder": {"layers": layers},
      "decoder_norm": {"scale": sd["model.norm.weight"]},
      "logits_dense": {"kernel": sd["lm_head.weight"].T},
  }
  return scan_layout.unscanned_to_scanned(params, config.param_scan_axis)


CASES = {
    "llama": (dict(), {"rope_type": "default", "rope_theta": 10000.0}),
    "llama3.1-rope": (
        dict(
            rope_type="llama3.1",
            rope_scaling_factor=8.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_position_embeddings=16,
        ),
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral-window": (dict(model_name="tests/tiny-mistral"), {"rope_type": "default", "rope_theta": 10000.0}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
  overrides, rope_parameters = CASES[case]
  config = config_of(**overrides)
  assert config.sliding_window_size in (0, 8) and SEQ > config.sliding_window_size
  hf = _hf_model(config, rope_parameters)
  model = model_creation.abstract_model(config)
  nnx.update(model, _to_maxtext(hf, config))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, SEQ)).astype(np.int32)
  positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)
  with torch.no_grad():
    expected = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  got = np.asarray(forward(model, tokens, positions, None))
  np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-4)
  log_p = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
  log_q = expected - np.logaddexp.reduce(expected, axis=-1, keepdims=True)
  assert (np.exp(log_q) * (log_q - log_p)).sum(-1).max() <= 1e-5
