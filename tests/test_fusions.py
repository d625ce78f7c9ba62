"""Deployment fusions: BatchNorms folded into convs (also through an exact border
term) compute the same function as the compact model, and compact models script.

These tests check folding and rounding, not input dependence: a random-init
mobilenet_v2 at 64 px barely depends on its input, so they pass allow_constant."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fxprune.compile import CompileOptions
from fxprune.compile.fusions import fuse_for_deployment
from fxprune.export import export_torchscript
from fxprune.modules import BorderTerm
from fxprune.pipeline import compile_analysed, open_source
from fxprune.testing import randomize_batchnorm, zero_random
from fxprune.verify import TOLERANCE, relative_error, verify_equal


def _batchnorms(gm) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())


@pytest.mark.parametrize(
    ("source", "shape"),
    [("zoo:resnet20", None), ("zoo:convnet", None), ("torchvision:mobilenet_v2", (1, 3, 64, 64))],
)
def test_folded_model_matches_the_compact_model(source, shape):
    analysed = open_source(source, input_shape=shape)
    randomize_batchnorm(analysed.traced.gm)
    zero_random(analysed.traced.gm, 0.5)
    compact = compile_analysed(analysed, allow_constant=True).result.gm
    fused, notes = fuse_for_deployment(compact)
    assert _batchnorms(compact) > 0 and _batchnorms(fused) == 0, notes
    x = analysed.traced.example
    assert verify_equal(compact, fused, x) <= TOLERANCE
    assert verify_equal(analysed.traced.gm, fused, x) <= TOLERANCE
    assert _batchnorms(compact) > 0  # the input is not mutated


def test_border_terms_are_scaled_by_the_folded_batchnorm():
    analysed = open_source("zoo:resnet20")
    randomize_batchnorm(analysed.traced.gm)
    zero_random(analysed.traced.gm, 0.5)
    compact = compile_analysed(analysed, allow_constant=True).result.gm
    borders = [m for m in compact.modules() if isinstance(m, BorderTerm)]
    assert borders, "the test pattern must produce exact border terms"
    fused, _ = fuse_for_deployment(compact)
    x = torch.randn(2, 3, 40, 24)  # another resolution: border maps differ
    assert verify_equal(compact, fused, x) <= TOLERANCE


def test_border_terms_are_cached_for_the_traced_size_and_computed_for_others():
    """The term is read from a buffer at the traced size only; every other size,
    TorchScript (scripted, frozen, traced) and a loaded state_dict stay exact."""
    analysed = open_source("zoo:resnet20")
    randomize_batchnorm(analysed.traced.gm)
    zero_random(analysed.traced.gm, 0.5)
    original, x = analysed.traced.gm, analysed.traced.example
    compact = compile_analysed(analysed, allow_constant=True).result.gm
    borders = [m for m in compact.modules() if isinstance(m, BorderTerm)]
    assert borders and all(b.size and b.cached.numel() > 0 for b in borders)
    assert borders[0].size == list(x.shape[2:])  # the first conv's input: the example's
    other = torch.randn(2, 3, 40, 24)
    for inp in (x, other):
        assert verify_equal(original, compact, inp) <= TOLERANCE
    frozen = torch.jit.freeze(torch.jit.script(fuse_for_deployment(compact)[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(compact, x, check_trace=False)  # must not freeze the cache
    assert not [w for w in caught if "modules.py" in str(w.filename)]  # nor warn about it
    with torch.no_grad():
        expected = original(other)
        for artifact in (frozen, traced):
            assert relative_error(expected, artifact(other)) <= TOLERANCE
    state = {key: value.clone() for key, value in compact.state_dict().items()}
    assert not any(key.endswith(".cached") for key in state)
    for border in borders:  # a placeholder kernel (as a replayed checkpoint has) ...
        border.kernel.zero_()
        border.refresh()
    assert verify_equal(original, compact, x) > TOLERANCE
    compact.load_state_dict(state)  # ... is refreshed with the loaded one
    assert verify_equal(original, compact, x) <= TOLERANCE


def test_preactivation_batchnorm_is_left_alone():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3))
    gm = torch.fx.symbolic_trace(model).eval()
    fused, notes = fuse_for_deployment(gm)
    assert notes == [] and _batchnorms(fused) == 1


def test_compiled_models_script_instead_of_tracing(tmp_path):
    analysed = open_source("zoo:convnet")
    zero_random(analysed.traced.gm, 0.3)
    compact = compile_analysed(analysed, allow_constant=True).result.gm
    result = export_torchscript(compact, analysed.traced.example, tmp_path / "c.ts", metadata={})
    assert result.method == "script", result.warnings
    assert result.max_rel_error <= TOLERANCE


@pytest.mark.parametrize("round_to", [8, 16])
def test_round_to_keeps_widths_multiples_and_stays_exact(round_to):
    analysed = open_source("torchvision:mobilenet_v2", input_shape=(1, 3, 64, 64))
    randomize_batchnorm(analysed.traced.gm)
    zero_random(analysed.traced.gm, 0.5, seed=1)
    plain = compile_analysed(analysed, allow_constant=True).result
    options = CompileOptions(round_to=round_to, min_width=round_to)
    rounded = compile_analysed(analysed, options=options, allow_constant=True).result
    widths = [m.out_channels for m in rounded.gm.modules() if isinstance(m, nn.Conv2d)]
    full = [m.out_channels for m in analysed.traced.gm.modules() if isinstance(m, nn.Conv2d)]
    assert rounded.removed_classes < plain.removed_classes
    for width, before in zip(widths, full, strict=True):
        assert width % round_to == 0 or width == before, (width, before)
    x = analysed.traced.example
    assert verify_equal(analysed.traced.gm, rounded.gm, x) <= TOLERANCE


def test_emitted_python_with_border_terms_runs_and_scripts(tmp_path):
    """`--emit-py` source inlines BorderTerm: it imports, loads the weights (the
    cached term is refreshed), and matches the compact model eager and scripted."""
    import importlib.util

    from fxprune.export.python import emit_python, flat_module

    analysed = open_source("zoo:resnet20")
    randomize_batchnorm(analysed.traced.gm)
    zero_random(analysed.traced.gm, 0.5)
    compact = compile_analysed(analysed, allow_constant=True).result.gm
    assert any(isinstance(m, BorderTerm) for m in compact.modules())
    path = tmp_path / "emitted_compact.py"
    path.write_text(emit_python(compact))
    assert "fxprune" not in "".join(
        line for line in path.read_text().splitlines() if line.startswith(("import", "from"))
    )
    spec = importlib.util.spec_from_file_location("emitted_compact", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_model().eval()
    model.load_state_dict(flat_module(compact).state_dict())
    for x in (analysed.traced.example, torch.randn(2, 3, 40, 24)):
        assert verify_equal(compact, model, x) <= TOLERANCE
        with torch.no_grad():
            assert relative_error(compact(x), torch.jit.script(model)(x)) <= TOLERANCE
