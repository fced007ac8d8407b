"""Config keys: LoRA adapters (parameter-efficient fine-tuning)."""

from MaxText.config.declare import Float, Key, LIST_OF_STR, NONNEG

TITLE = "lora"
# The projections an adapter can attach to: attention (query/key/value/out), dense MLPs and shared experts (wi_0/wi_1
# gated, wi plain, wo) and routed MoE experts (one adapter per expert).
DENSE_TARGETS = ("query", "key", "value", "out", "wi_0", "wi_1", "wi", "wo")
EXPERT_TARGETS = ("moe_wi_0", "moe_wi_1", "moe_wo")
# MLA (DeepSeek): query compression (wq_a -> wq_b, or `query` without it), the key/value latent (wkv_a) and its
# expansion (wkv_b); `out` as above.
MLA_TARGETS = ("wq_a", "wq_b", "wkv_a", "wkv_b")
TARGETS = DENSE_TARGETS + EXPERT_TARGETS + MLA_TARGETS
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
        "lora_dropout",
        0.0,
        Float(0.0, 1.0),
        "LoRA: dropout rate on each adapter's input during training (the frozen path and decoding never drop)",
    ),
    Key(
        "lora_target_modules",
        list(DENSE_TARGETS),
        LIST_OF_STR,
        "LoRA: projections that get adapters: query key value out (attention), wi_0 wi_1 wi wo (dense MLPs and shared"
        " experts), moe_wi_0 moe_wi_1 moe_wo (routed MoE experts, one adapter per expert: opt-in, they multiply the"
        " adapter size by num_experts), wq_a wq_b wkv_a wkv_b (MLA attention's own projections)",
    ),
)
