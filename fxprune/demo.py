"""`make demo`: the whole pipeline on built-in data, in 5 to 14 minutes on 2 CPU cores.

Train the paper's CIFAR ConvNet on the generated `synthetic` data set, ISTA-train
it (BN γ → exact zeros), compile the dead channels away (exactly: the compact
model computes the ISTA-trained one's function), fine-tune the compact model
briefly as the paper does, export `small.ts` (verified in a separate process)
and print the paper-style table. Outputs go
to `out/demo/` (this demo's own folder; rerunning replaces them).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fxprune.load import load_source
from fxprune.pipeline import (
    artifact_metadata,
    compile_analysed,
    export_model,
    loaded_module,
    open_module,
)
from fxprune.report import ModelSummary, count_model, summary_table
from fxprune.train import demo_recipe, evaluate, train
from fxprune.train.data import load_data
from fxprune.train.progress import step_line
from fxprune.verify import relative_error, run_model

OUT = Path("out/demo")


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def _progress(stage: str):
    def report(record: dict) -> None:
        if record.get("event") == "step":
            line = step_line(record, prefix=f"[demo] {stage} ")
            if line:
                print(line, file=sys.stderr, flush=True)
            return
        keys = ("epoch", "ce", "lasso", "sparsity", "accuracy")
        shown = {k: v for k, v in record.items() if k in keys}
        fields = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
        say(f"{stage} " + " ".join(fields))

    return report


def compile_trained(model: torch.nn.Module, example: torch.Tensor, test: DataLoader) -> tuple:
    """Trace and compile a trained model; returns (traced, result, max relative error of the
    compiled model on 8 random inputs, compiled model's accuracy on `test`)."""
    analysed = open_module(loaded_module(model, example))
    compiled = compile_analysed(analysed)
    x = torch.randn(8, *example.shape[1:])
    traced, result = analysed.traced, compiled.result
    error = relative_error(run_model(traced.gm, x), run_model(result.gm, x))
    _, accuracy = evaluate(result.gm, test)
    return traced, result, error, accuracy


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    recipe = demo_recipe()
    data = load_data(recipe.data, batch_size=recipe.pretrain.batch_size, seed=0)
    loaded = load_source(recipe.source, input_shape=data.input_shape)
    model = loaded.module
    analysed = open_module(loaded)
    traced, analysis = analysed.traced, analysed.analysis
    say(f"{recipe.source}: {analysis.summary()}")
    common = {"gm": traced.gm, "analysis": analysis, "source": recipe.source}
    say(f"1/5 training the ConvNet normally for {recipe.pretrain.epochs} epochs")
    base = train(model, data, recipe.pretrain, out_path=OUT / "base.pt", resume=None,
                 progress=_progress("base"), **common)  # fmt: skip
    base_acc = base.test_accuracy
    say(f"2/5 ISTA training for {recipe.ista.epochs} epochs (γ → exact zeros)")
    ista = train(model, data, recipe.ista, out_path=OUT / "ista.pt", resume=None,
                 progress=_progress("ista"), **common)  # fmt: skip
    say("3/5 compiling: removing dead channels and folding constants")
    traced, result, error, compact_acc = compile_trained(model, loaded.example, data.test)
    compact = result.gm
    tuned_acc = compact_acc
    if recipe.finetune is not None:
        say(f"4/5 fine-tuning the compact model for {recipe.finetune.epochs} epochs")
        reopened = open_module(loaded_module(compact, loaded.example, "compiled"))
        tuned = train(compact, data, recipe.finetune, out_path=None, resume=None,
                      progress=_progress("finetune"), gm=reopened.traced.gm,
                      analysis=reopened.analysis)  # fmt: skip
        tuned_acc = tuned.test_accuracy
    say("5/5 exporting out/demo/small.ts (verified in a separate process)")
    before, after = count_model(traced.gm, loaded.example), count_model(compact, loaded.example)
    metadata = artifact_metadata(recipe.source, loaded.example, before, after, demo=True)
    export_model(compact.eval(), loaded.example, OUT / "small.ts", "torchscript",
                 metadata=metadata, force=True)  # fmt: skip
    rows = [
        ModelSummary.from_counts(before, 100 * ista.test_accuracy),
        ModelSummary.from_counts(after, 100 * compact_acc),
        ModelSummary.from_counts(after, 100 * tuned_acc),
    ]
    names = ["ConvNet (ISTA-trained)", "compiled (exact)", "compiled + fine-tuned"]
    print(summary_table(rows, names=names, fmt="text"))
    print(f"base accuracy {100 * base_acc:.1f}% · after ISTA {100 * ista.test_accuracy:.1f}% · "
          f"compiled {100 * compact_acc:.1f}% · fine-tuned {100 * tuned_acc:.1f}% · "
          f"channel sparsity {100 * ista.sparsity:.1f}% · "
          f"removed {result.removed_classes} of {result.total_classes} channels · "
          f"compile max relative error {error:.1e}")  # fmt: skip
    print(f"wrote {OUT / 'small.ts'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "OUT",
    "compile_trained",
    "main",
    "say",
]
