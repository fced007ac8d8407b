"""Config keys: numerics and memory."""

from MaxText.config.declare import BOOL, DTYPES, Int, Key, POS, Str

TITLE = "numerics and memory"
# Quantization modes whose kernels can be stored quantized (int8 + scale): checkpoint_is_quantized and
# save_quantized_params_path need one.
STORED_QUANTIZATION = ("int8", "int8w")
KEYS = (
    Key("dtype", "float32", Str(*DTYPES), "activation/compute dtype: float32 | bfloat16 | float16"),
    Key("weight_dtype", "float32", Str(*DTYPES), "parameter storage dtype"),
    Key(
        "quantization",
        "",
        Str("", "int8", "int8w", "fp8"),
        '"" | int8 (weights+activations) | int8w (weights only) | fp8 (e4m3 fwd, e5m2 grads): quantized attention/MLP'
        " matmuls",
    ),
    Key("scan_layers", True, BOOL, "stack decoder layers with nnx.scan (fast compile); false unrolls them"),
    Key("param_scan_axis", 1, Int(0, 1), "axis of the stacked layer dimension in scanned parameters"),
    Key(
        "remat_policy",
        "full",
        Str("none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full"),
        "none | minimal | save_dot_except_mlp | save_qkv_proj | full: activations kept for backward",
    ),
    # Backend-specific ops: "auto" resolves by `hardware` (pyconfig), to the CPU-tuned op on CPU and the plain
    # one elsewhere, so the layers read a concrete choice.
    Key(
        "dense_matmul_backward",
        "auto",
        Str("auto", "autodiff", "explicit"),
        "how DenseGeneral's weight gradient is computed: explicit = a custom VJP with two plain contractions (the "
        "CPU-tuned path) | autodiff = JAX's own transpose | auto = explicit on CPU, autodiff elsewhere",
    ),
    Key(
        "head_loss",
        "auto",
        Str("auto", "logits", "fused"),
        "fused = output head + cross-entropy in one custom VJP that never hands [batch, seq, vocab] logits to "
        "autodiff (CPU-tuned) | logits = the plain path | auto = fused on CPU, logits elsewhere",
    ),
    Key(
        "num_vocab_tiling",
        1,
        POS,
        "training: compute the output head + loss in this many sequence chunks, one at a time (forward and "
        "backward), so only one chunk's [batch, seq / N, vocab] logits is live; must divide max_target_length "
        "(1 = off)",
    ),
)
