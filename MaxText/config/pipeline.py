"""Config keys: pipeline parallelism over the `stage` mesh axis (MaxText/layers/pipeline.py)."""

from MaxText.config.declare import Derived, Int, Key, POS

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
)

DERIVED = (
    Derived("pipeline_stages", int, "pipeline stages: ici_stage_parallelism x dcn_stage_parallelism (1 = no pipeline)"),
    Derived("pipeline_microbatches", int, "num_pipeline_microbatches with -1 resolved"),
)
