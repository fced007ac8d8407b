"""Config keys: checkpoints."""

from MaxText.config.declare import BOOL, Derived, Key, NONNEG, POS, STR

TITLE = "checkpoints"
KEYS = (
    Key("enable_checkpointing", True, BOOL, "save Orbax checkpoints"),
    Key("async_checkpointing", True, BOOL, "save in the background while training continues"),
    Key("checkpoint_period", 100, POS, "save every N steps (and at the end)"),
    Key("max_num_checkpoints_to_keep", 3, NONNEG, "keep at most this many step checkpoints (0 = keep all)"),
    Key("load_parameters_path", "", STR, "params-only checkpoint to start from (fresh optimizer, step 0)"),
    Key("load_full_state_path", "", STR, "full train state checkpoint to start from"),
    Key(
        "param_checkpoint_output_path",
        "",
        STR,
        'generate_param_only_checkpoint: where to write ("" = {run_dir}/params)',
    ),
)

DERIVED = (Derived("checkpoint_dir", str, "{run_dir}/checkpoints: Orbax step checkpoints"),)
