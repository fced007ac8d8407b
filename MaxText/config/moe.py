"""Config keys: mixture of experts (MaxText/layers/moe.py)."""

from MaxText.config.declare import BOOL, Float, Int, Key, NONNEG, POS, Str

TITLE = "mixture of experts (MaxText/layers/moe.py)"
KEYS = (
    Key("num_experts", 1, POS, "routed experts per MoE layer; 1 = dense model (no MoE layers)", model=True),
    Key("num_experts_per_tok", 1, POS, "experts each token is routed to (top-k)", model=True),
    Key("moe_mlp_dim", 768, POS, "hidden size of each routed (and each shared) expert", model=True),
    Key(
        "shared_experts",
        0,
        NONNEG,
        "shared experts every token passes through, each moe_mlp_dim wide (fused into one MLP); 0 = none",
        model=True,
    ),
    Key(
        "capacity_factor",
        -1.0,
        Float(),
        "<= 0: dropless (sorted tokens, grouped matmuls); > 0: each expert takes at most capacity_factor * tokens * k / "
        "num_experts tokens per batch row, the rest dropped",
    ),
    Key(
        "moe_grouped_matmul",
        "auto",
        Str("auto", "ragged_dot", "megablox", "tiled"),
        "dropless experts' grouped matmul: ragged_dot (jax.lax.ragged_dot, every backend) | megablox (the Pallas TPU "
        "gmm kernel, TPU only, with emb_dim and each device's moe_mlp_dim columns in multiples of 128; its weight "
        "gradient skips other experts' rows, where TPU's ragged_dot transpose is a masked dense matmul over all "
        "experts) | tiled (for CPU, where ragged_dot multiplies by every expert: each "
        "expert's rows padded to a block that holds the largest expert's (1 to 1.5x the mean) and multiplied as one "
        "batched matmul, rows past 1.5x by a loop of row tiles; the active FLOPs plus the padding the imbalance "
        "needs) | auto = megablox on TPU (ragged_dot where its tiles do not fit), tiled on CPU, ragged_dot on GPU",
    ),
    Key(
        "load_balance_loss_weight",
        0.0,
        Float(0.0),
        "weight of the Switch/GShard load-balancing loss (mean over MoE layers) added to the training loss; reported "
        "as moe_lb_loss",
    ),
    Key(
        "routed_score_func",
        "softmax",
        Str("softmax", "sigmoid"),
        "softmax | sigmoid: router scores from the router logits",
        model=True,
    ),
    Key(
        "routed_bias",
        False,
        BOOL,
        "a per-expert bias added to the scores for top-k selection only (DeepSeek V3); the weights use the unbiased "
        "scores",
        model=True,
    ),
    Key(
        "routed_bias_update_rate",
        0.0,
        Float(0.0),
        "aux-loss-free balancing (DeepSeek V3 used 0.001): after each step bias_i += rate * sign(mean load - "
        "load_i); 0 = frozen bias; needs routed_bias",
    ),
    Key("routed_scaling_factor", 1.0, Float(), "multiplies the routed experts' combine weights (DeepSeek)", model=True),
    Key("norm_topk_prob", False, BOOL, "renormalize the top-k weights to sum to 1 per token", model=True),
    Key(
        "n_routing_groups",
        -1,
        Int(-1),
        "group-limited routing: experts form this many groups, tokens pick from the best groups only; -1 = off",
        model=True,
    ),
    Key(
        "topk_routing_group",
        -1,
        Int(-1),
        "group-limited routing: groups kept per token (ranked by the sum of their top-2 scores, or max score without "
        "routed_bias)",
        model=True,
    ),
    Key(
        "first_num_dense_layers",
        0,
        NONNEG,
        "the first N decoder layers use the dense MLP (mlp_dim) instead of MoE",
        model=True,
    ),
    Key(
        "interleave_moe_layer_step",
        1,
        POS,
        "layer i (counting from 0) is MoE when (i + 1) % step == 0 and i >= first_num_dense_layers",
        model=True,
    ),
    Key(
        "moe_input_scaled_by_router",
        False,
        BOOL,
        "Llama 4: the router weight multiplies the expert input instead of its output (top-1)",
        model=True,
    ),
)
