"""Config keys: mesh and sharding."""

from MaxText.config.declare import BOOL, Derived, Int, Key, LIST, LIST_OF_STR, PAR

TITLE = "mesh and sharding"

MESH_AXES = (
    "data",
    "stage",
    "fsdp",
    "fsdp_transpose",
    "sequence",
    "context",
    "tensor",
    "tensor_sequence",
    "expert",
    "autoregressive",
)
# What each axis's ici_ (within a slice) and dcn_ (across slices) degree means.
_PARALLELISM_DOCS = {
    "data": ("data parallelism within a slice (-1 = fill)", "data parallelism across slices/hosts (-1 = fill)"),
    "stage": ("pipeline stages within a slice", "pipeline stages across slices"),
    "fsdp": ("fully sharded data parallelism within a slice (-1 = fill)", "FSDP across slices"),
    "fsdp_transpose": ("FSDP over the transposed weight axis", "transposed FSDP across slices"),
    "sequence": ("sequence parallelism within a slice", "sequence parallelism across slices"),
    "context": ("context parallelism within a slice", "context parallelism across slices"),
    "tensor": ("tensor (model) parallelism within a slice", "tensor parallelism across slices"),
    "tensor_sequence": ("tensor parallelism also sharding the sequence", "tensor-sequence parallelism across slices"),
    "expert": ("expert parallelism within a slice", "expert parallelism across slices"),
    "autoregressive": ("decode-time parallelism over the cache sequence", "autoregressive parallelism across slices"),
}
_FILLED = {"ici": "fsdp", "dcn": "data"}  # the axis whose default degree is -1
PARALLELISM_KEYS = tuple(
    Key(f"{where}_{axis}_parallelism", -1 if _FILLED[where] == axis else 1, PAR, _PARALLELISM_DOCS[axis][i])
    for i, where in enumerate(("ici", "dcn"))
    for axis in MESH_AXES
)

KEYS = (
    Key("mesh_axes", list(MESH_AXES), LIST_OF_STR, "device mesh axes, outer to inner"),
    *PARALLELISM_KEYS,
    Key(
        "num_slices",
        -1,
        Int(-1),
        "number of slices (granules) the devices form (-1 = detect: TPU slices, else processes)",
    ),
    Key(
        "logical_axis_rules",
        [
            ["activation_batch", ["data", "fsdp", "fsdp_transpose", "expert"]],
            ["activation_embed_and_logits_batch", ["data", "stage", "fsdp", "fsdp_transpose", "expert"]],
            ["activation_length", ["sequence", "context"]],
            ["activation_embed", ["tensor_sequence"]],
            ["activation_mlp", ["tensor", "tensor_sequence"]],
            ["activation_batch_no_exp", ["data", "fsdp", "fsdp_transpose"]],
            ["activation_exp", ["expert"]],
            ["activation_heads", ["tensor", "tensor_sequence"]],
            ["activation_kv_heads", ["tensor", "tensor_sequence"]],
            ["activation_kv", []],
            ["activation_vocab", ["tensor", "tensor_sequence"]],
            ["cache_batch", ["data", "fsdp", "fsdp_transpose", "expert"]],
            ["cache_sequence", ["autoregressive"]],
            ["cache_heads", ["tensor", "tensor_sequence"]],
            ["cache_kv", []],
            ["vocab", ["tensor", "tensor_sequence", "autoregressive"]],
            ["embed", ["fsdp", "sequence", "context", "expert"]],
            ["mlp", ["fsdp_transpose", "tensor", "tensor_sequence", "autoregressive"]],
            ["heads", ["tensor", "tensor_sequence", "autoregressive"]],
            ["q_heads", ["tensor", "tensor_sequence", "autoregressive"]],
            ["kv_heads", ["tensor", "tensor_sequence", "autoregressive"]],
            ["kv", []],
            ["norm", []],
            ["layers", ["stage"]],
            ["layers_stage", ["stage"]],
            ["layers_repeat", []],
            ["activation_stage", ["stage"]],
            ["exp", ["expert"]],
            ["embed_no_exp", ["fsdp", "sequence", "context"]],
        ],
        LIST,
        "logical axis name -> mesh axes it shards over (axes already used by another dim, or that do not divide it, "
        "are skipped)",
    ),
    Key("data_sharding", [list(MESH_AXES)], LIST, "mesh axes the input batch is split over"),
    Key(
        "context_parallel_load_balance",
        True,
        BOOL,
        "under context parallelism (n context shards), train on sequences cut into 2n chunks laid out so shard i "
        "holds chunks i and 2n-1-i: every shard gets an equal share of causal attention work",
    ),
    Key("allow_split_physical_axes", False, BOOL, "let the mesh builder split physical device axes (TPU)"),
)

DERIVED = (
    Derived(
        "num_devices", int, "devices in the job over all processes (jax.device_count()), or compile_topology's chips"
    ),
    Derived("ici_parallelism", list, "the ici_*_parallelism degrees in mesh_axes order, -1 filled"),
    Derived("dcn_parallelism", list, "the dcn_*_parallelism degrees in mesh_axes order, -1 filled"),
)
