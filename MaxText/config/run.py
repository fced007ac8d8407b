"""Config keys: run."""

from MaxText.config.declare import BOOL, Derived, Key, STR, Str

TITLE = "run"
KEYS = (
    Key("run_name", "", STR, 'name of the run; "" derives <model_name>_<timestamp>. Re-using a run_name resumes it.'),
    Key(
        "model_name",
        "default",
        STR,
        'a yml under MaxText/configs/models/ (without .yml); "default" keeps this file\'s dims',
    ),
    Key(
        "base_output_directory",
        "outputs",
        STR,
        "root for {run_name}/{checkpoints,tensorboard,metrics}; local path or gs://",
    ),
    Key(
        "hardware",
        "auto",
        Str("auto", "cpu", "gpu", "tpu"),
        "auto | cpu | gpu | tpu: the backend to run on (auto detects)",
    ),
    Key(
        "reuse_host_memory",
        True,
        BOOL,
        "CPU backend (hardware cpu, or auto on a host without a GPU/TPU, whatever plugins are installed): glibc "
        "malloc keeps freed memory in one heap for reuse, so XLA's per-step temporaries are not fresh zero-filled "
        "pages each step",
    ),
    Key(
        "jax_cache_dir",
        "",
        STR,
        "local directory for JAX's persistent compilation cache (~ expanded, created if missing): programs that took "
        "1 s or more to compile are stored there and loaded by later runs of the same program, so a restarted "
        "server or a rerun starts without recompiling. Set by the entry points and api.load before they compile; not "
        "used by compile_topology compiles. "
        'Share it only between hosts with the same jax version, CPU and accelerator. "" = off',
    ),
    Key("log_config", True, BOOL, "log the resolved config at start"),
    Key(
        "save_config_to_output",
        True,
        BOOL,
        "write the resolved config to {base_output_directory}/{run_name}/config.yml",
    ),
    Key("log_level", "INFO", Str("DEBUG", "INFO", "WARNING", "ERROR"), "python logging level for MaxText's own loggers"),
)

DERIVED = (
    Derived("run_dir", str, "{base_output_directory}/{run_name}, absolute unless a URL (gs://...)"),
    Derived("config_path", str, "absolute path of the yml named on the command line"),
)
