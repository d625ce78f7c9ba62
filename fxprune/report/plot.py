"""Plots for papers and READMEs (matplotlib, the optional extra ``plot``, Agg backend).

- per-layer channel widths of several models as grouped bars (from
  :func:`fxprune.report.count_model`), layers in the call order of the first model;
- a training log (the monitor's JSON lines, ``fxprune train --out X.pt`` writes
  ``X.jsonl``): cross-entropy, lasso term and γ sparsity per epoch.

Figures are written atomically; nothing is shown on screen.
"""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fxprune.errors import DataError, FxpruneError, UsageError
from fxprune.files import atomic_write
from fxprune.report.counts import ModelCounts

MAX_LABELLED_LAYERS = 60  # beyond this, only every k-th layer name is printed


def _pyplot() -> Any:
    if importlib.util.find_spec("matplotlib") is None:
        raise FxpruneError("fxprune plot needs matplotlib: pip install 'fxprune[plot]'")
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (works without a display)
    import matplotlib.pyplot as plt

    return plt


def layer_widths(counts: ModelCounts) -> dict[str, int]:
    """Output widths of the Conv/Linear layers, keyed by a name that survives flattening.

    ``fxprune compile --emit-py`` checkpoints flatten ``layer1.0.conv1`` to
    ``layer1_0_conv1``; both map to the same key.
    """
    return {
        name.replace(".", "_"): layer.out_channels
        for name, layer in counts.layers.items()
        if "BatchNorm" not in layer.kind
    }


def read_training_log(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a training monitor's JSON lines (step events skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise DataError(f"cannot read training log {path}: {err.strerror or err}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{number} is not a JSON line") from None
        if isinstance(record, dict) and "epoch" in record and "ce" in record:
            if record.get("event", "epoch") == "epoch":
                records.append(record)
    if not records:
        raise DataError(f"{path} has no epoch records (keys epoch, ce, lasso, sparsity)")
    return records


def plot_report(
    out: Path,
    models: Sequence[tuple[str, ModelCounts]] = (),
    log: Sequence[dict[str, Any]] | None = None,
    *,
    force: bool = False,
    title: str | None = None,
) -> Path:
    """Write a PNG (or any matplotlib format, by suffix) with the channel bars of ``models``
    on top and, with ``log``, the training curves below. Returns the written path."""
    if not models and not log:
        raise UsageError("nothing to plot: give models and/or a training log (--log)")
    plt = _pyplot()
    n_layers = len(layer_widths(models[0][1])) if models else 0
    rows = [bool(models), bool(log)]
    width = min(28.0, max(9.0, 0.18 * n_layers * max(1, len(models))))
    heights = [4.8] * rows[0] + [3.4] * rows[1]
    fig = plt.figure(figsize=(width, sum(heights) + 0.6), layout="constrained")
    grid = fig.add_gridspec(len(heights), 3, height_ratios=heights)
    if models:
        _channel_bars(fig.add_subplot(grid[0, :]), models)
    if log:
        row = len(heights) - 1
        _training_curves([fig.add_subplot(grid[row, i]) for i in range(3)], log)
    if title:
        fig.suptitle(title)
    fmt = Path(out).suffix.lstrip(".") or "png"

    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=120)
        tmp.write_bytes(buffer.getvalue())

    try:
        return atomic_write(out, write, force=force)
    finally:
        plt.close(fig)


def _channel_bars(ax: Any, models: Sequence[tuple[str, ModelCounts]]) -> None:
    """Grouped bars: one group per layer of the first model, one bar per model."""
    base = layer_widths(models[0][1])
    names = list(base)
    bar = 0.8 / len(models)
    for i, (label, counts) in enumerate(models):
        widths = layer_widths(counts)
        heights = [widths.get(name, 0) for name in names]  # 0: layer removed
        positions = [x + (i - (len(models) - 1) / 2) * bar for x in range(len(names))]
        ax.bar(positions, heights, width=bar, label=label)
    step = max(1, -(-len(names) // MAX_LABELLED_LAYERS))
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels(names[::step], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("output channels")
    ax.set_title("Conv/Linear output channels per layer (call order)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left")


def _training_curves(axes: Sequence[Any], log: Sequence[dict[str, Any]]) -> None:
    """Cross-entropy, lasso term (ρ·Σλ|γ| when ρ is logged) and sparsity per epoch."""
    epochs = [r["epoch"] for r in log]
    ce_ax, lasso_ax, sparse_ax = axes
    ce_ax.plot(epochs, [r["ce"] for r in log], "o-", label="train cross-entropy")
    if all("test_loss" in r for r in log):
        ce_ax.plot(epochs, [r["test_loss"] for r in log], "s--", label="test loss")
    ce_ax.set_title("cross-entropy")
    weighted = all(r.get("rho") for r in log)
    lasso = [r.get("lasso", 0.0) * (r["rho"] if weighted else 1.0) for r in log]
    lasso_ax.plot(epochs, lasso, "o-", color="tab:red")
    lasso_ax.set_title("lasso term ρ·Σλ|γ|" if weighted else "lasso term Σλ|γ|")
    sparse_ax.plot(epochs, [100 * r.get("sparsity", 0.0) for r in log], "o-",
                   color="tab:green", label="γ = 0 (%)")  # fmt: skip
    if all("accuracy" in r for r in log):
        sparse_ax.plot(epochs, [100 * r["accuracy"] for r in log], "s--",
                       color="tab:purple", label="test accuracy (%)")  # fmt: skip
    sparse_ax.set_ylim(-2, 102)
    sparse_ax.set_title("sparsity and accuracy")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


__all__ = [
    "MAX_LABELLED_LAYERS",
    "layer_widths",
    "plot_report",
    "read_training_log",
]
