"""Config keys: ahead-of-time compilation for a TPU slice this machine does not have (MaxText/topology.py)."""

from MaxText.config.declare import Key, POS, STR

TITLE = "ahead-of-time compilation"
KEYS = (
    Key(
        "compile_topology",
        "",
        STR,
        "train_compile/decode_compile: TPU slice to compile for on this host, e.g. v5e-256, v5p-1024, v6e-64, v4-8 "
        '("" = the local devices); needs libtpu (DEVICE=tpu bash setup.sh)',
    ),
    Key("compile_topology_num_slices", 1, POS, "slices of compile_topology, joined over DCN (dcn_* degrees)"),
    Key(
        "compiled_trainstep_file",
        "",
        STR,
        'train_compile: write the serialized compiled train step here, to load on the target ("" = do not write)',
    ),
)
