"""Planted checkpoints: files an attacker could hand to fxprune.

Each `planted_files(directory, sentinel)` entry is a file that, if fxprune ran
anything read from it, would create `sentinel`. The Python-source payloads are
the bypasses of the old denylist (issue 14): each one created its sentinel
through the pre-fix `fxprune.load.module_from_code`.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

OLD_FORMAT = "fxprune-checkpoint"

# Python-source payloads: `S` is the sentinel path; each defines build_model().
_TAIL = "\n\nclass M(torch.nn.Module):\n    def forward(self, x):\n        return x\n\n\n" \
        "def build_model():\n    return M()\n"  # fmt: skip
SOURCE_PAYLOADS = {
    "module_attribute_exec": "import torch\nimport builtins\n"
    "builtins.exec(\"import os; os.system('touch {S}')\")" + _TAIL,
    "import_alias_exec": "import torch\nfrom builtins import exec as run\n"
    "run(\"import os; os.system('touch {S}')\")" + _TAIL,
    "os_via_torch_serialization": "import torch\nfrom torch.serialization import os\n"
    "os.makedirs('{S}')" + _TAIL,
    "subprocess_via_cpp_extension": "import torch\nimport torch.utils.cpp_extension as ext\n"
    "ext.subprocess.run(['touch', '{S}'])" + _TAIL,
    "os_via_torchvision_datasets": "import torch\nfrom torchvision.datasets.utils import os\n"
    "os.makedirs('{S}')" + _TAIL,
    "aliased_getattr": "import torch\nimport torch.serialization as ser\nget = getattr\n"
    "get(get(ser, 'os'), 'system')('touch {S}')" + _TAIL,
    "attrgetter_globals": "import torch\nimport operator\n"
    "g = operator.attrgetter('__init__.__globals__')(torch.nn.Module)\n"
    "g['__builtins__']['__import__']('os').makedirs('{S}')" + _TAIL,
    "pickle_loads_via_serialization": "import torch\nfrom torch.serialization import pickle\n"
    "pickle.loads({PICKLE!r})" + _TAIL,
    "default_argument": "import torch\nfrom torch.serialization import os\n\n\n"
    "def touch(x=os.makedirs('{S}')):\n    return x\n" + _TAIL,
    "plain_import_os": "import os\nos.system('touch {S}')" + _TAIL,
}

# `architecture: {kind: source}` naming callables that are not registry builders.
SOURCE_REFERENCES = {
    "source_os_abort": "os:abort",
    "source_tempfile_mkdtemp": "tempfile:mkdtemp",
    "source_this_file": "{SELF}",
    "source_pkg_factory": "tests.planted:touch_sentinel",
    "source_pathlib_traversal": "../../../etc/passwd",
}


class _Touch:
    """A pickled object whose `__reduce__` runs `os.system` when unpickled."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def touch_sentinel() -> None:  # what `source_pkg_factory` would call
    Path(os.environ.get("FXPRUNE_SENTINEL", "/nonexistent/sentinel")).touch()


def _old_checkpoint(architecture: dict) -> dict:
    return {
        "format": OLD_FORMAT,
        "fxprune_version": "0.1.0",
        "architecture": architecture,
        "state_dict": {},
        "input_shape": [1, 3, 8, 8],
        "extra": {},
    }


def _save(obj, path: Path) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getvalue())
    return path


def planted_files(directory: Path, sentinel: Path) -> dict[str, Path]:
    """name -> planted file in `directory` (created now); none may create `sentinel`."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    raw = pickle.dumps(_Touch(sentinel))
    for name, template in SOURCE_PAYLOADS.items():
        code = template.replace("{S}", str(sentinel)).replace("{PICKLE!r}", repr(raw))
        files[name] = _save(
            _old_checkpoint({"kind": "python", "code": code}), directory / f"{name}.pt"
        )
    for name, reference in SOURCE_REFERENCES.items():
        path = directory / f"{name}.pt"
        arch = {"kind": "source", "source": reference.replace("{SELF}", str(path))}
        files[name] = _save(_old_checkpoint(arch), path)
    files.update(_pickle_payloads(directory, sentinel))
    files.update(_plan_payloads(directory))
    files.update(_not_checkpoints(directory))
    assert list(files) == planted_names()
    return files


def _plan(base, steps, shape=(1, 3, 32, 32)) -> dict:
    ckpt = _old_checkpoint({"kind": "plan", "base": base, "steps": steps})
    ckpt["format_version"], ckpt["input_shape"] = 2, list(shape)
    return ckpt


def _step(plan: dict, shape=(1, 3, 32, 32), submodule=None) -> dict:
    return {"input_shape": list(shape), "submodule": submodule, "plan": plan}


CONVNET_CLASSES = 877  # channel classes of zoo:convnet's analysis


PICKLE_NAMES = (
    "reduce_whole_file",
    "reduce_in_extra",
    "reduce_in_state_dict",
    "raw_pickle_protocol0",
    "zip_with_reduce",
)
NOT_CHECKPOINT_NAMES = ("torchscript_archive", "random_bytes", "text_file")


def planted_names() -> list[str]:
    """The names `planted_files` returns, without writing anything."""
    return [*SOURCE_PAYLOADS, *SOURCE_REFERENCES, *PICKLE_NAMES, *_plan_cases(),
            *NOT_CHECKPOINT_NAMES]  # fmt: skip


def _plan_payloads(directory: Path) -> dict[str, Path]:
    """Data-only checkpoints (format 2) that name code or do not fit their base."""
    files = {}
    for name, ckpt in _plan_cases().items():
        path = directory / f"{name}.pt"
        if ckpt["architecture"].get("base") == "{SELF}":
            ckpt["architecture"]["base"] = str(path)
        files[name] = _save(ckpt, path)
    return files


def _plan_cases() -> dict[str, dict]:
    good = {"num_classes": CONVNET_CLASSES, "removed": [], "constant_branches": [], "absorbed": {}}
    cases = {
        "plan_factory_without_arch": _plan("tests.planted:touch_sentinel", []),
        "plan_base_os_abort": _plan("os:abort", []),
        "plan_base_builtins_exec": _plan("builtins:exec", []),
        "plan_base_self_path": _plan("{SELF}", []),
        "plan_kind_unknown": {**_plan("zoo:convnet", []), "architecture": {"kind": "pickle"}},
        "plan_steps_not_a_list": _plan("zoo:convnet", "import os"),
        "plan_unknown_node": _plan(
            "zoo:convnet", [_step({**good, "absorbed": {"no_such_node": "border"}})]
        ),
        "plan_bad_absorb_kind": _plan("zoo:convnet", [_step({**good, "absorbed": {"x": "exec"}})]),
        "plan_removes_everything": _plan(
            "zoo:convnet", [_step({**good, "removed": list(range(CONVNET_CLASSES))})]
        ),
        "plan_wrong_class_count": _plan("zoo:convnet", [_step({**good, "num_classes": 3})]),
        "plan_submodule_payload": _plan("zoo:convnet", [_step(good, submodule="__class__")]),
        "plan_huge_input_shape": _plan("zoo:convnet", [], shape=(1, 3, 100000, 100000)),
        "plan_negative_input_shape": _plan("zoo:convnet", [], shape=(1, -3, 32, 32)),
    }
    return cases


def _not_checkpoints(directory: Path) -> dict[str, Path]:
    """Files that are no checkpoint at all: refused as such, never unpickled."""
    files = {"torchscript_archive": directory / "torchscript_archive.pt"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(files["torchscript_archive"]))
    files["random_bytes"] = directory / "random_bytes.pt"
    files["random_bytes"].write_bytes(bytes(range(256)) * 16)
    files["text_file"] = directory / "text_file.pt"
    files["text_file"].write_text("import os\nos.system('echo pwned')\n")
    return files


def _pickle_payloads(directory: Path, sentinel: Path) -> dict[str, Path]:
    files = {}
    touch = _Touch(sentinel)
    files["reduce_whole_file"] = _save(touch, directory / "reduce_whole_file.pt")
    ckpt = _old_checkpoint({"kind": "source", "source": "zoo:convnet"})
    ckpt["extra"] = {"note": touch}
    files["reduce_in_extra"] = _save(ckpt, directory / "reduce_in_extra.pt")
    ckpt = _old_checkpoint({"kind": "source", "source": "zoo:convnet"})
    ckpt["state_dict"] = {"weight": touch}
    files["reduce_in_state_dict"] = _save(ckpt, directory / "reduce_in_state_dict.pt")
    path = directory / "raw_pickle_protocol0.pt"
    path.write_bytes(pickle.dumps(touch, protocol=0))
    files["raw_pickle_protocol0"] = path
    path = directory / "zip_with_reduce.pt"
    with zipfile.ZipFile(path, "w") as archive:  # a torch-style zip whose data.pkl is a payload
        archive.writestr("archive/data.pkl", pickle.dumps(touch, protocol=2))
        archive.writestr("archive/version", "3\n")
    files["zip_with_reduce"] = path
    return files
