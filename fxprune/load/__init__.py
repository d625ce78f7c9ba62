"""Stage 1, load: a source string (`zoo:NAME`, `torchvision:NAME`,
`pkg.mod:factory`, a checkpoint file) to a module and an example input."""

from fxprune.load.sources import (
    CHECKPOINT_FORMAT,
    Loaded,
    apply_state_dict,
    check_input_shape,
    checkpoint_dict,
    load_source,
    load_state_dict_file,
    parse_input_shape,
    save_checkpoint,
    unused_aux_keys,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "Loaded",
    "apply_state_dict",
    "check_input_shape",
    "checkpoint_dict",
    "load_source",
    "load_state_dict_file",
    "parse_input_shape",
    "save_checkpoint",
    "unused_aux_keys",
]
