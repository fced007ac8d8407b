"""Config keys: model dims."""

from MaxText.config.declare import BOOL, Derived, Float, Key, LIST_OF_STR, NONNEG, POS, STR, Str

TITLE = "model dims"
# Names allowed in mlp_activations (layers/linears.py maps each to its function; a test keeps the two equal).
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_tanh", "relu", "linear", "tanh", "sigmoid")
KEYS = (
    Key(
        "global_parameter_scale",
        1,
        POS,
        "multiplies emb/mlp dims and heads (x sqrt) and layers for quick scaling; a power of two",
        model=True,
    ),
    Key("base_emb_dim", 256, POS, "hidden size before global_parameter_scale", model=True),
    Key("base_num_query_heads", 4, POS, "query heads before global_parameter_scale", model=True),
    Key("base_num_kv_heads", 4, POS, "key/value heads (GQA/MQA when fewer than query heads)", model=True),
    Key("base_mlp_dim", 768, POS, "MLP hidden size before global_parameter_scale", model=True),
    Key("base_num_decoder_layers", 4, POS, "decoder layers before global_parameter_scale", model=True),
    Key("head_dim", 64, POS, "per-head dimension of queries, keys and values", model=True),
    Key(
        "vocab_size",
        4096,
        POS,
        "embedding rows; tokenizers must not produce ids at or above this (4096: the quickstart tokenizer)",
        model=True,
    ),
    Key(
        "decoder_block",
        "llama2",
        STR,
        "which family file builds the decoder layer (a module name under MaxText/models/)",
        model=True,
    ),
    Key(
        "mlp_activations",
        ["silu", "linear"],
        LIST_OF_STR,
        "activations of the MLP's input projections; two means a gated MLP",
        model=True,
    ),
    Key("normalization_layer_epsilon", 1e-05, Float(0.0), "epsilon of RMSNorm/LayerNorm", model=True),
    Key("logits_via_embedding", False, BOOL, "tie the output projection to the token embedding", model=True),
    Key("final_logits_soft_cap", 0.0, Float(0.0), "tanh soft cap on final logits (0 = off)", model=True),
    Key("logits_dot_in_fp32", False, BOOL, "compute the final logits matmul in float32"),
    Key("cast_logits_to_fp32", True, BOOL, "return logits as float32 for the loss"),
    Key("use_qk_norm", False, BOOL, "RMSNorm on per-head queries and keys before RoPE", model=True),
    Key(
        "normalization_type",
        "rmsnorm",
        Str("rmsnorm", "layernorm"),
        "rmsnorm | layernorm (LayerNorm with a bias, GPT-3): the kind of every model norm except QK norm",
        model=True,
    ),
    Key(
        "normalization_scale_offset",
        0.0,
        Float(),
        "norms scale by (offset + scale): 1.0 is Gemma's (1 + scale), its scales initialized to 0",
        model=True,
    ),
    Key("use_bias", False, BOOL, "biases on the attention and MLP projections (GPT-3)", model=True),
    Key("scale_embedding_by_sqrt_dim", False, BOOL, "multiply token embeddings by sqrt(emb_dim) (Gemma)", model=True),
    Key(
        "trainable_position_size",
        0,
        NONNEG,
        "rows of a learned position-embedding table added to token embeddings (GPT-3); 0 = none",
        model=True,
    ),
    Key("dropout_rate", 0.0, Float(0.0, 1.0), "dropout on residual branches during training"),
)

DERIVED = (
    Derived("emb_dim", int, "hidden size: base_emb_dim scaled by global_parameter_scale"),
    Derived("num_query_heads", int, "query heads: base_num_query_heads scaled by global_parameter_scale"),
    Derived("num_kv_heads", int, "key/value heads: base_num_kv_heads scaled by global_parameter_scale"),
    Derived("mlp_dim", int, "MLP hidden size: base_mlp_dim scaled by global_parameter_scale"),
    Derived("num_decoder_layers", int, "decoder layers: base_num_decoder_layers scaled by global_parameter_scale"),
    Derived("model_keys", list, "the keys the model_name yml sets, sorted"),
)
