"""Config keys: serving (attention: paged; MaxText.serve)."""

from MaxText.config.declare import BOOL, Int, Key, NONNEG, POS, STR, Str

TITLE = "serving (attention: paged; MaxText.serve)"
API_KEY_ENV = "MAXTEXT_SERVE_API_KEY"
KEYS = (
    Key(
        "pagedattn_num_pages",
        256,
        Int(2),
        "KV pages per layer shared by all slots (page 0 is scratch; a request waits while pages run out)",
    ),
    Key("pagedattn_tokens_per_page", 16, POS, "tokens per KV page"),
    Key(
        "pagedattn_max_pages_per_slot",
        0,
        NONNEG,
        "page table width per slot (0 = enough pages for max_target_length tokens)",
    ),
    Key(
        "enable_prefix_caching",
        True,
        BOOL,
        "attention: paged: prompts that start with the same full pages of tokens share their KV pages (cached,"
        " evicted least recently used) and compute only the rest (the contiguous cache has no pages to share)",
    ),
    Key(
        "paged_attention_kernel",
        "auto",
        Str("auto", "jax", "mirror", "pallas"),
        "auto (pallas on GPU, and on TPU with dtype bfloat16, without sliding window; mirror on CPU; else jax) | jax"
        " (gather pages; any backend) | mirror (decode reads a contiguous copy of each slot's tokens kept beside the"
        " pages: contiguous-cache speed on CPU, where gathering pages is slow, for a contiguous cache's memory more) |"
        " pallas (the Pallas paged-attention kernel of GPU or TPU; TPU's reads K/V as bfloat16)",
    ),
    Key("serve_host", "127.0.0.1", STR, "MaxText.serve: address the HTTP server binds (0.0.0.0 for all interfaces)"),
    Key("port", 8000, Int(0, 65535), "MaxText.serve: HTTP port"),
    Key(
        "serve_api_key",
        "",
        STR,
        "MaxText.serve: every /v1 route and /metrics require `Authorization: Bearer <key>` (empty: the"
        f" {API_KEY_ENV} environment variable's value, which keeps the key off command lines; neither: no"
        " authentication). Redacted in logged and written configs",
        secret=True,
    ),
    Key(
        "serve_max_request_bytes",
        1 << 20,
        POS,
        "MaxText.serve: request bodies larger than this are refused (413) before they are parsed",
    ),
)
