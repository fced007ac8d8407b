"""Config keys: pipeline parallelism over the `stage` mesh axis (MaxText/layers/pipeline.py)."""

from MaxText.config.declare import BOOL, Derived, Int, Key, POS

TITLE = "pipeline parallelism"
KEYS = (
    Key(
        "num_pipeline_microbatches",
        -1,
        Int(-1),
        "micro-batches each train step's batch is split into for the pipeline (-1 = the stage count); needs"
        " ici/dcn_stage_parallelism > 1, at least one per stage, and a batch they divide",
    ),
    Key(
        "num_pipeline_repeats",
        1,
        POS,
        "times each micro-batch goes round the stages (> 1: MaxText's circular schedule; each stage holds that many"
        " non-adjacent layer groups and the bubble shrinks accordingly)",
    ),
    Key(
        "pipeline_remat_iterations",
        True,
        BOOL,
        "recompute each pipeline iteration's stage forward in the backward pass: an iteration keeps only its stage"
        " inputs instead of what its layers save (remat_policy) for all M x R + S - 1 iterations, for one more forward"
        " pass; false trades that memory for speed",
    ),
)

DERIVED = (
    Derived("pipeline_stages", int, "pipeline stages: ici_stage_parallelism x dcn_stage_parallelism (1 = no pipeline)"),
    Derived("pipeline_microbatches", int, "num_pipeline_microbatches with -1 resolved"),
)
