"""Config keys: metrics and profiling."""

from MaxText.config.declare import BOOL, Derived, Float, Key, NONNEG, POS, STR, Str

TITLE = "metrics and profiling"
KEYS = (
    Key("enable_tensorboard", True, BOOL, "write TensorBoard scalars under {run}/tensorboard"),
    Key(
        "metrics_file",
        "",
        STR,
        "also append per-step metrics as JSON lines to this path, local or gs://... (a bucket object is appended to"
        ' every log_period steps) ("" = off)',
    ),
    Key("write_metrics_to_run_dir", True, BOOL, "always append JSON-lines metrics to {run}/metrics/metrics.jsonl"),
    Key(
        "device_peak_tflops",
        0.0,
        Float(0.0),
        "per-device peak TFLOP/s for MFU (0 = use the known table; unknown device = no MFU)",
    ),
    Key("profiler", "", Str("", "xplane"), '"" | xplane: write a jax.profiler trace'),
    Key("profiler_steps", 5, POS, "steps to profile"),
    Key("skip_first_n_steps_for_profiler", 1, NONNEG, "steps to skip before profiling"),
)

DERIVED = (
    Derived("tensorboard_dir", str, "{run_dir}/tensorboard"),
    Derived("metrics_dir", str, "{run_dir}/metrics: metrics.jsonl when write_metrics_to_run_dir"),
)
