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
        "checkpoint_path",
        "",
        STR,
        "checkpoint to decode / api.load / start training from (local or gs://...): a run's checkpoints/ directory"
        " (its newest committed step) or one step or params-only checkpoint directory, either layer layout. Train:"
        " a full train state resumes its step and optimizer, params-only starts at step 0 (as load_full_state_path /"
        " load_parameters_path do; set at most one of the three). The run's own checkpoints still win on restart",
    ),
    Key(
        "param_checkpoint_output_path",
        "",
        STR,
        'generate_param_only_checkpoint: where to write ("" = {run_dir}/params)',
    ),
)

DERIVED = (Derived("checkpoint_dir", str, "{run_dir}/checkpoints: Orbax step checkpoints"),)
