"""Backend-specific ops behind config keys that pyconfig resolves (`auto` picks by `hardware`).

Each op has a plain implementation (JAX autodiff, XLA's own fusion and layouts), the default on GPU and TPU, and
where XLA:CPU needs help a CPU-tuned one with the same math (values and gradients agree to rounding):

- matmul.py     DenseGeneral's matmul; `dense_matmul_backward`: "autodiff" | "explicit" (a written-out backward).
- head_loss.py  the output head + cross-entropy; `head_loss`: "logits" (logits, then the loss) | "fused".
- grouped_matmul.py  the dropless MoE's grouped matmul on CPU (`moe_grouped_matmul: tiled`); megablox (TPU) and
                `jax.lax.ragged_dot` are called from layers/moe.py.
- attention.py  the attention core: dot_product (with `attention_causal_blocks` query blocks), cuDNN through
                `jax.nn.dot_product_attention` (`attention=autoselected`), Pallas splash on TPU (`attention=flash`).

The layers take resolved values. What `auto` means per backend is written once, here, free of JAX so that config
code can import it without starting a backend.
"""

from MaxText.config import choices

# The resolved values: the declared choices (MaxText/config/numerics.py) less "auto".
DENSE_MATMUL_BACKWARDS = tuple(c for c in choices("dense_matmul_backward") if c != "auto")
HEAD_LOSSES = tuple(c for c in choices("head_loss") if c != "auto")
CPU_CAUSAL_BLOCKS = 4  # llama-small's train step: 4 blocks beat 1 and 8 (benchmarks/RESULTS.md)


def auto_dense_matmul_backward(hardware: str) -> str:
  """`dense_matmul_backward: auto` on `hardware` ("cpu", "gpu", "tpu")."""
  return "explicit" if hardware == "cpu" else "autodiff"


def auto_head_loss(hardware: str) -> str:
  """`head_loss: auto` on `hardware`."""
  return "fused" if hardware == "cpu" else "logits"


def auto_grouped_matmul(hardware: str, megablox_fits: bool = True) -> str:
  """`moe_grouped_matmul: auto`: megablox on TPU (its tgmm weight gradient skips the other experts' rows, where
  ragged_dot's transpose on TPU is a dense masked matmul over every expert) when its 128-lane tiles fit the MoE's
  widths, tiled on CPU (XLA:CPU's ragged_dot multiplies every row by every expert), ragged_dot otherwise."""
  if hardware == "tpu":
    return "megablox" if megablox_fits else "ragged_dot"
  return "tiled" if hardware == "cpu" else "ragged_dot"


def auto_causal_blocks(hardware: str, sequence_sharded: bool) -> int:
  """`attention_causal_blocks: 0` (auto): query blocks on CPU, and one block whenever the sequence (or context)
  mesh axis shards, since slicing a sharded sequence into blocks would reshard it."""
  return CPU_CAUSAL_BLOCKS if hardware == "cpu" and not sequence_sharded else 1
