"""Config keys: LoRA adapters (parameter-efficient fine-tuning)."""

from MaxText.config.declare import Float, Key, LIST_OF_STR, NONNEG

TITLE = "lora"
# The projections an adapter can attach to: attention (query/key/value/out) and MLP (wi_0/wi_1 gated, wi plain, wo).
TARGETS = ("query", "key", "value", "out", "wi_0", "wi_1", "wi", "wo")
KEYS = (
    Key(
        "lora_rank",
        0,
        NONNEG,
        "LoRA: rank of the adapters (0 = off); the base weights are frozen (no optimizer state) and checkpoints hold"
        " only the adapters, the base coming from load_parameters_path",
    ),
    Key("lora_alpha", 16.0, Float(0.0), "LoRA: adapter outputs are scaled by lora_alpha / lora_rank"),
    Key(
        "lora_target_modules",
        list(TARGETS),
        LIST_OF_STR,
        "LoRA: projections that get adapters: query key value out (attention), wi_0 wi_1 wi wo (dense MLPs and shared"
        " experts; routed MoE experts have none)",
    ),
)
