"""Config keys: training."""

from MaxText.config.declare import BOOL, DTYPES, Derived, Float, Int, Key, NONNEG, POS, Str

TITLE = "training"
KEYS = (
    Key("steps", 300, Int(-1), "total training steps (-1 = use learning_rate_schedule_steps)"),
    Key(
        "per_device_batch_size",
        4.0,
        Float(0.0),
        "sequences per device per step (fractional allowed if the global batch is whole)",
    ),
    Key("max_target_length", 256, Int(2), "sequence length of training examples"),
    Key("gradient_accumulation_steps", 1, POS, "micro-batches per optimizer step"),
    Key("learning_rate", 0.002, Float(0.0), "peak learning rate"),
    Key("lr_schedule_type", "cosine", Str("cosine", "constant", "wsd"), "cosine | constant | wsd"),
    Key("warmup_steps_fraction", 0.1, Float(0.0, 1.0), "fraction of schedule steps spent in linear warmup"),
    Key("learning_rate_schedule_steps", -1, Int(-1), "length of the schedule (-1 = steps)"),
    Key(
        "cosine_learning_rate_final_fraction",
        0.1,
        Float(0.0, 1.0),
        "final lr as a fraction of learning_rate (cosine and wsd)",
    ),
    Key("wsd_decay_steps_fraction", 0.1, Float(0.0, 1.0), "wsd: fraction of schedule steps spent decaying"),
    Key("wsd_decay_style", "linear", Str("linear", "cosine"), "wsd: linear | cosine decay shape"),
    Key("adam_b1", 0.9, Float(0.0, 1.0), "AdamW beta1"),
    Key("adam_b2", 0.95, Float(0.0, 1.0), "AdamW beta2"),
    Key("adam_eps", 1e-08, Float(0.0), "AdamW epsilon (outside the root)"),
    Key("adam_eps_root", 0.0, Float(0.0), "AdamW epsilon inside the root"),
    Key("adam_weight_decay", 0.1, Float(0.0), "AdamW decoupled weight decay"),
    Key("mu_dtype", "", Str("", *DTYPES), 'dtype of Adam\'s first moment ("" = weight_dtype)'),
    Key("gradient_clipping_threshold", 1.0, Float(0.0), "global-norm gradient clipping (0 = off)"),
    Key("z_loss_multiplier", 0.0, Float(0.0), "weight of the z-loss (log Z squared) term"),
    Key("dpo_beta", 0.1, Float(0.0), "use_dpo: beta, the strength of the implicit KL penalty to the reference model"),
    Key(
        "dpo_label_smoothing",
        0.0,
        Float(0.0, 0.5),
        "use_dpo: assumed probability that a preference label is flipped (conservative DPO; 0 = plain DPO)",
    ),
    Key("init_weights_seed", 0, NONNEG, "seed for parameter initialization"),
    Key("enable_dropout", True, BOOL, "allow dropout (dropout_rate, lora_dropout)"),
    Key("abort_on_nan_loss", True, BOOL, "stop the run at the first NaN/Inf loss"),
    Key("eval_interval", -1, Int(-1), "run eval every N steps (-1 = never)"),
    Key("eval_steps", 1, POS, "batches per eval"),
    Key("log_period", 100, POS, "flush TensorBoard (and metrics files in a bucket) every N steps"),
)

DERIVED = (
    Derived("warmup_steps", int, "linear warmup steps: warmup_steps_fraction of learning_rate_schedule_steps"),
    Derived("micro_batch_size_to_train_on", int, "sequences per micro-batch over all devices"),
    Derived("global_batch_size_to_train_on", int, "sequences per optimizer step (micro batch x accumulation steps)"),
    Derived("global_batch_size_to_load", int, "sequences the input pipeline loads per step, over all processes"),
)
