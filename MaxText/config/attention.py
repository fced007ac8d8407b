"""Config keys: attention and positions."""

from MaxText.config.declare import BOOL, Float, Key, NONNEG, POS, Str

TITLE = "attention and positions"
KEYS = (
    Key(
        "attention",
        "dot_product",
        Str("dot_product", "autoselected", "flash", "paged"),
        "dot_product (einsum reference) | autoselected (cuDNN flash on GPU, else XLA) | flash (TPU splash); paged = "
        "dot_product for train/prefill, and decode over a paged KV cache (pagedattn_* keys)",
    ),
    Key("sliding_window_size", 0, NONNEG, "local attention window in tokens (0 = full causal attention)", model=True),
    Key("attn_logits_soft_cap", 0.0, Float(0.0), "tanh soft cap on attention logits (0 = off)", model=True),
    Key(
        "query_pre_attn_scalar",
        0.0,
        Float(0.0),
        "attention logits are scaled by query_pre_attn_scalar**-0.5 (0 = head_dim; Gemma 2/3)",
        model=True,
    ),
    Key(
        "sliding_window_pattern",
        0,
        NONNEG,
        "with sliding_window_size: every Nth layer (N, 2N, ...) attends globally, the rest locally (Gemma 2: 2, "
        "Gemma 3: 6); 0 = all local",
        model=True,
    ),
    Key("float32_qk_product", True, BOOL, "compute q.k in float32"),
    Key("float32_logits", True, BOOL, "softmax over attention logits in float32"),
    Key(
        "attention_causal_blocks",
        0,
        NONNEG,
        "dot_product skips masked work in blocks: over a causal sequence (train, prefill) queries split into N "
        "blocks, each attending only to keys up to its end (the masked upper triangle is skipped: (N+1)/2N of the "
        "work), and a prompt chunk over a KV cache (chunked prefill, prefix-cache hits) reads only the cache's filled "
        "blocks; 1 = neither; 0 = auto (4 on CPU, 1 elsewhere); resolves to 1 under sequence/context parallelism",
    ),
    Key(
        "rope_type",
        "default",
        Str("default", "llama3.1", "linear", "yarn", "none"),
        "default | llama3.1 | linear | yarn | none (no rotary embedding): rotary embedding frequency scheme",
        model=True,
    ),
    Key("rope_max_timescale", 10000, Float(1.0), "RoPE base (theta)", model=True),
    Key("rope_min_timescale", 1, Float(1.0), "smallest RoPE timescale", model=True),
    Key(
        "rope_scaling_factor",
        8.0,
        Float(1.0),
        "llama3.1 / linear / yarn: frequency (or position) scaling factor",
        model=True,
    ),
    Key("rope_low_freq_factor", 1.0, Float(0.0), "llama3.1: low-frequency wavelength factor", model=True),
    Key("rope_high_freq_factor", 4.0, Float(0.0), "llama3.1: high-frequency wavelength factor", model=True),
    Key(
        "rope_original_max_position_embeddings",
        8192,
        POS,
        "llama3.1 / yarn: context length the base model was trained at",
        model=True,
    ),
    Key(
        "rope_yarn_beta_fast",
        32.0,
        Float(0.0),
        "yarn: dimension pairs turning more often than this over the original context keep their frequency",
        model=True,
    ),
    Key(
        "rope_yarn_beta_slow",
        1.0,
        Float(0.0),
        "yarn: pairs turning less often than this are fully interpolated (divided by rope_scaling_factor)",
        model=True,
    ),
    Key(
        "rope_yarn_mscale",
        0.0,
        Float(0.0),
        "yarn: mscale; with rope_yarn_mscale_all_dim, rotated q/k are scaled by mscale(mscale)/mscale(all_dim); 0 = "
        "unset",
        model=True,
    ),
    Key(
        "rope_yarn_mscale_all_dim",
        0.0,
        Float(0.0),
        "yarn: mscale_all_dim; MLA multiplies its softmax scale by (0.1*all_dim*ln(factor)+1)^2 (DeepSeek); 0 = unset",
        model=True,
    ),
    Key(
        "attention_type",
        "mha",
        Str("mha", "mla"),
        "mha (multi-head, with GQA/MQA) | mla (Multi-head Latent Attention: DeepSeek, needs the keys below)",
        model=True,
    ),
    Key(
        "q_lora_rank",
        0,
        NONNEG,
        "MLA (DeepSeek): rank of the low-rank query projection, RMSNorm between its halves; 0 = one plain query "
        "projection",
        model=True,
    ),
    Key(
        "kv_lora_rank",
        512,
        POS,
        "MLA: width of the compressed key/value latent (the decode cache keeps it plus the rope key per token)",
        model=True,
    ),
    Key("qk_nope_head_dim", 128, POS, "MLA: per-head query/key dims without RoPE", model=True),
    Key(
        "qk_rope_head_dim",
        64,
        POS,
        "MLA: per-head query dims with RoPE; the rotated key of this width is shared by all heads",
        model=True,
    ),
    Key("v_head_dim", 128, POS, "MLA: per-head value dims", model=True),
    Key(
        "local_rope_max_timescale",
        0.0,
        Float(0.0),
        "RoPE base of sliding-window layers, unscaled (Gemma 3); 0 = same RoPE as the global layers",
        model=True,
    ),
    Key(
        "chunk_attn_window_size",
        0,
        NONNEG,
        "chunked attention (Llama 4): tokens attend only within their aligned chunk of this many positions, on RoPE "
        "layers; 0 = off",
        model=True,
    ),
    Key(
        "nope_layer_interval",
        0,
        NONNEG,
        "every Nth layer (N, 2N, ...) has no rotary embedding (NoPE) and full causal attention, never chunked (Llama "
        "4: 4); 0 = none",
        model=True,
    ),
    Key(
        "use_qk_l2_norm",
        False,
        BOOL,
        "weightless RMS (L2) norm of per-head queries and keys after RoPE, on RoPE layers only (Llama 4 Scout)",
        model=True,
    ),
    Key(
        "attn_temperature_tuning",
        False,
        BOOL,
        "NoPE layers scale queries by 1 + attn_temperature_scale * log(1 + floor((position + 1) / "
        "attn_temperature_floor_scale)) (Llama 4)",
        model=True,
    ),
    Key(
        "attn_temperature_floor_scale",
        8192,
        POS,
        "attn_temperature_tuning: positions per step of the log schedule",
        model=True,
    ),
    Key("attn_temperature_scale", 0.1, Float(0.0), "attn_temperature_tuning: strength of the query scaling", model=True),
)
