"""Stage 1, load: a source string (`zoo:NAME`, `torchvision:NAME`,
`pkg.mod:factory`, a checkpoint file) to a module and an example input.
Checkpoints are data (`checkpoints.py`): nothing read from a file runs."""

from fxprune.load.checkpoints import (
    architecture_for,
    checked_shape,
    checkpoint_base,
)
from fxprune.load.sources import (
    CHECKPOINT_FORMAT,
    Loaded,
    Replay,
    apply_state_dict,
    check_input_shape,
    checkpoint_dict,
    load_source,
    load_state_dict_file,
    parse_input_shape,
    read_weights_only,
    save_checkpoint,
    unused_aux_keys,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "Loaded",
    "Replay",
    "architecture_for",
    "checked_shape",
    "checkpoint_base",
    "read_weights_only",
    "apply_state_dict",
    "check_input_shape",
    "checkpoint_dict",
    "load_source",
    "load_state_dict_file",
    "parse_input_shape",
    "save_checkpoint",
    "unused_aux_keys",
]
