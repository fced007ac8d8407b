"""Checks a MaxText checkpoint's logits against Hugging Face transformers (or a golden file of its logits).

    python3 -m MaxText.tests.forward_pass_logit_checker CONFIG load_parameters_path=P --hf_model_path=DIR \\
        [--golden_logits=FILE.npz] [--write_golden=FILE.npz] [--max_kl=1e-5] [--max_abs_diff=1e-3] \\
        [--min_top_k_agreement=0.95] [--top_k=5] [--batch=2] [--num_tokens=32] [--seed=0] [key=value ...]

Feeds the same token ids (seeded random, or the golden file's) to both models and reports, per token, the KL
divergence KL(HF || MaxText) of the next-token distributions, the largest |logit difference| and how many of the
top-k tokens agree. Exits 0 within the thresholds, 1 past any of them, 2 on bad arguments. `--write_golden` saves
the reference tokens and logits, so machines without torch can check against the file later. The defaults are the
float32 parity bounds; bfloat16 checkpoints need looser ones (e.g. --max_kl=1e-2 --max_abs_diff=0.5).
"""

import dataclasses
import logging
import sys
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from MaxText import checkpointing, pyconfig
from MaxText.config_schema import ConfigError
from MaxText.layers import model_creation
from MaxText.utils.ckpt_conversion import cli

logger = logging.getLogger("MaxText")

TOOL_KEYS = (
    "hf_model_path",
    "golden_logits",
    "write_golden",
    "max_kl",
    "max_abs_diff",
    "min_top_k_agreement",
    "top_k",
    "batch",
    "num_tokens",
    "seed",
)
USAGE = (
    "python3 -m MaxText.tests.forward_pass_logit_checker CONFIG load_parameters_path=P"
    " (--hf_model_path=DIR | --golden_logits=FILE)"
)


def load_model(config) -> nnx.Module:
  """The config's Transformer with params from config.load_parameters_path (any layout), on one device."""
  model = model_creation.abstract_model(config)
  abstract = nnx.state(model, nnx.Param).to_pure_dict()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: device, abstract)
  nnx.update(model, checkpointing.load_params(config.load_parameters_path, abstract, shardings, config.param_scan_axis))
  return model


@nnx.jit
def _forward(model, tokens, positions):
  return model(tokens, positions, None)


def maxtext_logits(model: nnx.Module, tokens: np.ndarray) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  return np.asarray(_forward(model, tokens.astype(np.int32), positions), np.float32)


def hf_logits(hf_model_path: str, tokens: np.ndarray) -> np.ndarray:
  """transformers' float32 logits (eager attention: the reference masks, sliding windows included)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_model_path, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


@dataclasses.dataclass
class Comparison:
  kl: np.ndarray  # [batch, seq] KL(reference || got) of the next-token distributions
  max_abs_diff: float
  top1_agreement: float  # fraction of tokens whose argmax agrees
  top_k_agreement: float  # mean fraction of the reference's top-k found in got's top-k

  def failures(self, max_kl: float, max_abs_diff: float, min_top_k_agreement: float) -> list[str]:
    out = []
    if self.kl.max() > max_kl:
      out.append(f"max per-token KL {self.kl.max():.3e} > {max_kl:g}")
    if self.max_abs_diff > max_abs_diff:
      out.append(f"max |logit diff| {self.max_abs_diff:.3e} > {max_abs_diff:g}")
    if self.top_k_agreement < min_top_k_agreement:
      out.append(f"top-k agreement {self.top_k_agreement:.3f} < {min_top_k_agreement:g}")
    return out


def compare(got: np.ndarray, reference: np.ndarray, top_k: int = 5) -> Comparison:
  if got.shape != reference.shape:
    raise ValueError(f"logits shapes differ: MaxText {got.shape}, reference {reference.shape}")
  got, reference = got.astype(np.float64), reference.astype(np.float64)
  log_p = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
  log_q = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  k = min(top_k, got.shape[-1])
  top_ref = np.argsort(-reference, axis=-1)[..., :k]
  top_got = np.argsort(-got, axis=-1)[..., :k]
  overlap = (top_ref[..., :, None] == top_got[..., None, :]).any(-1).mean(-1)
  return Comparison(
      kl=kl,
      max_abs_diff=float(np.abs(got - reference).max()),
      top1_agreement=float((top_ref[..., 0] == top_got[..., 0]).mean()),
      top_k_agreement=float(overlap.mean()),
  )


def report(c: Comparison, top_k: int) -> str:
  row, token = divmod(int(np.argmax(c.kl)), c.kl.shape[1])
  return "\n".join(
      [
          f"per-token KL(reference || MaxText): max {c.kl.max():.3e} (row {row}, token {token}), mean {c.kl.mean():.3e}",
          f"max |logit diff|: {c.max_abs_diff:.3e}",
          f"top-1 agreement: {c.top1_agreement:.4f}, top-{top_k} agreement: {c.top_k_agreement:.4f}",
      ]
  )


def main(argv: Sequence[str]) -> int:
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
  try:
    if len(argv) < 2 or "=" in argv[1]:
      raise ConfigError(f"no config file given; usage: {USAGE}")
    own, overrides = cli.split_args(argv[2:], TOOL_KEYS)
    if not (own.get("hf_model_path") or own.get("golden_logits")):
      raise ConfigError(f"hf_model_path: give --hf_model_path or --golden_logits; usage: {USAGE}")
    config = pyconfig.initialize(["", argv[1], *overrides], log_config=False)
    if not config.load_parameters_path:
      raise ConfigError(f"load_parameters_path: required; usage: {USAGE}")
    try:
      top_k, batch, num_tokens, seed = (
          int(own.get(k, d)) for k, d in (("top_k", 5), ("batch", 2), ("num_tokens", 32), ("seed", 0))
      )
      max_kl, max_abs, min_top_k = (
          float(own.get(k, d)) for k, d in (("max_kl", 1e-5), ("max_abs_diff", 1e-3), ("min_top_k_agreement", 0.95))
      )
    except ValueError as e:
      raise ConfigError(f"checker arguments: {e}") from None
  except ConfigError as e:
    pyconfig.exit_with_config_error(e)

  if own.get("golden_logits"):
    golden = np.load(own["golden_logits"])
    tokens, reference = golden["tokens"], golden["logits"]
  else:
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, num_tokens)).astype(np.int32)
    reference = hf_logits(own["hf_model_path"], tokens)
    if own.get("write_golden"):
      np.savez(own["write_golden"], tokens=tokens, logits=reference)
      print(f"wrote reference tokens and logits to {own['write_golden']}")
  comparison = compare(maxtext_logits(load_model(config), tokens), reference, top_k)
  print(report(comparison, top_k))
  failures = comparison.failures(max_kl, max_abs, min_top_k)
  print("FAIL: " + "; ".join(failures) if failures else "PASS")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
