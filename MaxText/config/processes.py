"""Config keys: multi-process."""

from MaxText.config.declare import BOOL, Derived, Int, Key, NONNEG, POS, STR

TITLE = "multi-process"
KEYS = (
    Key(
        "coordinator_address",
        "",
        STR,
        'host:port of process 0 for jax.distributed ("" = single process or cluster auto-detect)',
    ),
    Key("num_processes", 0, NONNEG, "processes in the job (0 = detect from the environment; 1 = never initialize)"),
    Key("process_id", -1, Int(-1), "this process's index (-1 = detect)"),
    Key("jax_distributed_initialization_timeout", 300, POS, "seconds to wait for every process to join"),
    Key("skip_jax_distributed_system", False, BOOL, "never call jax.distributed.initialize"),
)

DERIVED = (
    Derived("process_count", int, "jax.process_count() once jax.distributed is up (1 for a single process)"),
    Derived("process_index", int, "jax.process_index(): this process's index in 0..process_count-1"),
)
