"""Stage 1, load: a source string to `(module, example_input)`.

Sources:
  zoo:NAME               a model of fxprune's registry (`fxprune zoo list`)
  torchvision:NAME       any torchvision model, built with weights=None
  package.module:factory import the module and call the factory (named by the user)
  FILE.pt                an fxprune checkpoint (data only: fxprune.checkpoints), read
                         with weights_only; a whole pickled nn.Module only with
                         trust_pickle=True
`weights` loads a state_dict into the model (strict; mismatches are named).
Nothing read from a file is executed, imported or called.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fxprune.errors import CheckpointError, FxpruneError, LoadError, UsageError, first_line
from fxprune.load.checkpoints import (
    CHECKPOINT_FORMAT,
    FACTORY,
    REGISTRY_PREFIXES,
    architecture_for,
    checked_shape,
    checkpoint_base,
    checkpoint_dict,
    save_checkpoint,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "Loaded",
    "Replay",
    "apply_state_dict",
    "checkpoint_dict",
    "load_source",
    "load_state_dict_file",
    "MAX_EXAMPLE_ELEMENTS",
    "check_input_shape",
    "parse_input_shape",
    "read_weights_only",
    "save_checkpoint",
    "unused_aux_keys",
]

# Re-applies a checkpoint's compile steps to its rebuilt base (fxprune.pipeline owns it).
Replay = Callable[[nn.Module, list, str], nn.Module]


@dataclass
class Loaded:
    """A model ready to trace: `module` (eval mode), `example` input, and where
    it came from. `submodule` is a hint for models fx cannot trace whole."""

    module: nn.Module
    example: torch.Tensor
    source: str
    input_shape: tuple[int, ...]
    submodule: str | None = None
    meta: dict = field(default_factory=dict)
    architecture: dict | None = None  # what a checkpoint of this model records (data only)


MAX_INPUT_RANK = 5  # N, C, D, H, W (video); a classifier's (N, F) is rank 2
MAX_EXAMPLE_ELEMENTS = 2**25  # 128 MiB of float32: a 4K frame fits, a 100000² image does not


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """Parse `N,C,H,W` (or NxCxHxW) into a shape that passes `check_input_shape`;
    UsageError (exit 2) otherwise."""
    if text is None or text == "":
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(
            f"--input-shape '{text}' is not a list of integers like 1,3,224,224"
        ) from None
    return check_input_shape(shape, "--input-shape", error=UsageError)


def check_input_shape(
    shape: object, origin: str, *, error: type[FxpruneError] = LoadError
) -> tuple[int, ...]:
    """`shape` as a tuple of ints if it is a usable example-input shape: rank 2 to
    MAX_INPUT_RANK, every size positive, at most MAX_EXAMPLE_ELEMENTS elements (the
    example input is allocated, and the model's activations scale with it). Raises
    `error` with one line naming `origin` (the option, checkpoint or factory) otherwise.
    """
    sizes = list(shape) if isinstance(shape, (list, tuple)) else None
    if sizes is None or not all(isinstance(d, int) and not isinstance(d, bool) for d in sizes):
        raise error(f"{origin}: input shape {shape!r} is not a list of integers like 1,3,224,224")
    text = ",".join(map(str, sizes))
    if not 2 <= len(sizes) <= MAX_INPUT_RANK:
        raise error(f"{origin}: input shape {text} has rank {len(sizes)}; "
                    f"give 2 to {MAX_INPUT_RANK} sizes, e.g. 1,3,32,32")  # fmt: skip
    if any(d <= 0 for d in sizes):
        raise error(f"{origin}: input shape {text} has a size ≤ 0; every size must be positive")
    if math.prod(sizes) > MAX_EXAMPLE_ELEMENTS:
        raise error(
            f"{origin}: input shape {text} has {math.prod(sizes):.3g} elements, more than the "
            f"{MAX_EXAMPLE_ELEMENTS:.3g} fxprune allocates for an example input: use a smaller "
            "shape (a fully convolutional model compiles at any resolution)"
        )
    return tuple(sizes)


def load_source(
    source: str,
    *,
    weights: str | Path | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    seed: int = 0,
    arch: str | None = None,
    replay: Replay | None = None,
) -> Loaded:
    """Turn `source` into a model and an example input (see module docstring).
    `seed` draws the example and, for a registry or factory model, its initial
    weights.

    Only `source` and `arch` (both from the command line) are ever imported or
    called; a checkpoint file is read as data. Compiled checkpoints need
    `replay` (`fxprune.pipeline.load_model` passes it). Every failure is a
    LoadError/CheckpointError/UsageError with one line.
    """
    registry = source.startswith(REGISTRY_PREFIXES)
    if registry or (FACTORY.match(source) and not Path(source).exists()):
        # a model built here starts from random weights: the same for the same seed
        # (the caller's global random state is left as it was)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loaded = _load_registry(source) if registry else _load_factory(source)
    else:
        loaded = _load_file(Path(source), trust_pickle=trust_pickle, arch=arch, replay=replay)
    if weights is not None:
        load_state_dict_file(loaded.module, Path(weights), trust_pickle=trust_pickle)
    if input_shape is not None:
        loaded.input_shape = check_input_shape(input_shape, "--input-shape", error=UsageError)
    else:
        loaded.input_shape = check_input_shape(loaded.input_shape, f"{source}'s input_shape")
    loaded.module.eval()
    generator = torch.Generator().manual_seed(seed)
    loaded.example = torch.randn(loaded.input_shape, generator=generator)
    return loaded


def _load_registry(source: str) -> Loaded:
    from fxprune import zoo

    prefix, name = source.split(":", 1)
    if prefix == "torchvision":
        factory, _kind, shape, submodule = zoo.torchvision_builder(name)
        module = factory()
    else:
        info = zoo.model_info(name)
        module, shape, submodule = zoo.create_model(name), info.input_shape, info.submodule
    return Loaded(module, torch.empty(0), source, tuple(shape), submodule,
                  architecture=architecture_for(source))  # fmt: skip


def _load_factory(source: str) -> Loaded:
    module_name, factory_name = source.split(":")
    # libraries print banners (Ultralytics' settings notice): keep stdout for our output
    with contextlib.redirect_stdout(sys.stderr):
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as exc:
            raise LoadError(f"cannot import {source}: {exc}") from None
        try:
            module = factory()
        except Exception as exc:
            raise LoadError(f"{source}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise LoadError(f"{source}() returned {type(module).__name__}, not an nn.Module")
    shape = getattr(module, "input_shape", None) or (1, 3, 224, 224)
    shape = check_input_shape(shape, f"{source}().input_shape")
    return Loaded(module, torch.empty(0), source, shape, architecture=architecture_for(source))


def read_weights_only(path: Path, *, weights: bool = False):
    """torch.load with weights_only=True, turning every failure into one line.

    Only a file that really pickles Python objects (the weights-only unpickler met a
    class it does not allow) is called that, and only a model source is pointed to
    --trust-pickle (`weights=True`: the file came from --weights, where it does not apply).
    Anything else that fails to parse is called corrupt or not a checkpoint.
    """
    if not path.exists():
        raise LoadError(f"{path}: no such file (give a .pt file, zoo:NAME or torchvision:NAME)")
    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise LoadError(f"{path} is not a regular file (a device or pipe), not a checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript artifact (a program, not data): fxprune reads checkpoints "
            "and state_dicts; serve an artifact you trust with `fxprune serve`"
        )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise CheckpointError(_pickled_objects(path, weights)) from None
        raise CheckpointError(_corrupt(path, exc)) from None
    except MemoryError:
        raise CheckpointError(f"{path} is too large to load into memory") from None
    except Exception as exc:  # a foreign or damaged file fails anywhere in the unpickler
        raise CheckpointError(_corrupt(path, exc)) from None


def _is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript code in it (torch.load would hand it to torch.jit.load)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 2)[1:2] == ["code"] or n.endswith("/constants.pkl") for n in names)


def _pickled_objects(path: Path, weights: bool) -> str:
    what = f"{path} pickles Python objects (e.g. a whole nn.Module), which can run arbitrary code"
    if weights:
        return f"{what}; --weights needs a state_dict: torch.save(model.state_dict(), path)"
    return (f"{what}; save a state_dict or an fxprune checkpoint instead, "
            "or pass --trust-pickle if you trust the file")  # fmt: skip


def _corrupt(path: Path, exc: BaseException) -> str:
    # the unpickler's own messages (a bad opcode, a KeyError) say nothing to a user;
    # the zip reader's first sentence does ("not a ZIP archive", "failed finding central")
    detail = f": {first_line(exc).split('. ')[0]}" if isinstance(exc, RuntimeError) else ""
    return f"{path} is corrupt or truncated, or not a checkpoint (a file torch.save wrote){detail}"


def _load_file(path: Path, *, trust_pickle: bool, arch: str | None, replay) -> Loaded:
    if trust_pickle and path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{path} could not be unpickled: {first_line(exc)}") from None
    else:
        obj = read_weights_only(path)
    if isinstance(obj, nn.Module):
        shape = getattr(obj, "input_shape", None) or (1, 3, 224, 224)
        return Loaded(obj, torch.empty(0), str(path), check_input_shape(shape, str(path)))
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return _from_checkpoint(path, obj, arch, replay)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoadError(
            f"{path} is a bare state_dict: name the architecture (zoo:NAME, torchvision:NAME "
            f"or pkg.mod:factory) and pass the file with --weights {path}"
        )
    raise CheckpointError(f"{path} is not an fxprune checkpoint, state_dict or model")


def load_state_dict_file(module: nn.Module, path: Path, *, trust_pickle: bool = False) -> None:
    """Load a state_dict file (or an fxprune checkpoint's) into `module`, strictly."""
    obj = read_weights_only(path, weights=True)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj["state_dict"]
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state_dict")
    apply_state_dict(module, obj, str(path))


def apply_state_dict(module: nn.Module, state: dict, origin: str) -> None:
    """Strict load that names the first missing, unexpected or wrong-shaped key."""
    own = module.state_dict()
    unused = unused_aux_keys(module, state)
    state = {k: v for k, v in state.items() if k not in unused}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise CheckpointError(f"{origin}: missing key '{missing[0]}' ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(
            f"{origin}: unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected)"
        )
    for key, value in own.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape:
            got = tuple(getattr(state[key], "shape", ()))
            raise CheckpointError(
                f"{origin}: '{key}' has shape {got}, the model expects {tuple(value.shape)}"
            )
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{origin}: '{key}' contains NaN or Inf values")
    module.load_state_dict(state, strict=True)


_AUX_HEADS = ("aux1", "aux2", "AuxLogits")  # googlenet's two, inception_v3's one


def unused_aux_keys(module: nn.Module, state: dict) -> set[str]:
    """The keys of torchvision's auxiliary classifier heads (googlenet `aux1.`/`aux2.`,
    inception_v3 `AuxLogits.`) when `module` is a torchvision model built without them:
    official weights carry those heads, and eval mode never runs them. Nothing else."""
    if not type(module).__module__.startswith("torchvision.models."):
        return set()
    absent = {h for h in _AUX_HEADS if hasattr(module, h) and getattr(module, h) is None}
    return {k for k in state if isinstance(k, str) and k.split(".")[0] in absent}


# -- fxprune checkpoints ------------------------------------------------------
def _from_checkpoint(path: Path, ckpt: dict, arch: str | None, replay: Replay | None) -> Loaded:
    """Rebuild the base (registry, or the factory the user named), re-apply the
    compile steps through `replay`, then load the state_dict strictly."""
    base, steps = checkpoint_base(ckpt, str(path), arch)
    shape = checked_shape(ckpt.get("input_shape"), str(path))
    module = _build(base)
    if steps:
        if replay is None:
            raise ValueError("a compiled checkpoint needs fxprune.pipeline.load_model")
        module = replay(module, steps, str(path))
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint holds no state_dict")
    apply_state_dict(module, state, str(path))
    architecture = {"kind": "plan", "base": base, "steps": steps}
    extra = ckpt.get("extra") if isinstance(ckpt.get("extra"), dict) else {}
    return Loaded(module, torch.empty(0), str(path), shape, meta=dict(extra),
                  architecture=architecture)  # fmt: skip


def _build(base: str) -> nn.Module:
    loaded = _load_registry(base) if base.startswith(REGISTRY_PREFIXES) else _load_factory(base)
    return loaded.module
