"""Config keys: decode."""

from MaxText.config.declare import BOOL, Float, Key, NONNEG, POS, STR, Str

TITLE = "decode"
KEYS = (
    Key("max_prefill_predict_length", 64, POS, "longest prompt the prefill accepts (cache prefix length)"),
    Key("prompt", "I love to", STR, "prompt for MaxText.decode"),
    Key(
        "decode_sampling_strategy",
        "composite",
        Str("greedy", "weighted", "topk", "nucleus", "composite"),
        "greedy | weighted | topk | nucleus | composite (top-k -> top-p -> temperature)",
    ),
    Key("decode_sampling_temperature", 0.8, Float(0.0), "sampling temperature (0 = greedy)"),
    Key("decode_sampling_top_k", 40, NONNEG, "top-k for topk/composite (0 = off)"),
    Key("decode_sampling_nucleus_p", 0.95, Float(0.0, 1.0), "top-p for nucleus/composite (1.0 = off)"),
    Key("decode_sampling_seed", 0, NONNEG, "seed of the sampling random stream (same seed and prompts: same output)"),
    Key("prompts_file", "", STR, "MaxText.decode: a text file with one prompt per line (instead of `prompt`)"),
    Key("quantize_kvcache", False, BOOL, "store the KV cache as int8 with a float32 scale per token and head"),
    Key(
        "checkpoint_is_quantized",
        False,
        BOOL,
        "decode: the params checkpoint holds int8 kernels + scales (needs quantization int8|int8w)",
    ),
    Key(
        "save_quantized_params_path",
        "",
        STR,
        'decode: write the loaded params, int8-quantized, as a params-only checkpoint here ("" = off)',
    ),
)
