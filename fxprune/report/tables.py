"""Tables a paper can print: per-layer widths, parameters and FLOPs before and
after compile, and the paper's Table 1/2 summary. Rendered with tabulate (text,
github, latex) or written as csv/json with exact integers."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from fxprune.errors import UsageError
from fxprune.report.counts import FLOPS_UNIT, LayerCount, ModelCounts, ModelSummary

FORMATS = ("text", "github", "latex", "csv", "json")
_UNITS = ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "K"))


# --------------------------------------------------------------------------- formatting


def format_count(n: int | float) -> str:
    """Human-readable count: 1986760 -> '1.99M', 309655 -> '309.7K', 512 -> '512'."""
    for i, (scale, unit) in enumerate(_UNITS):
        if abs(n) < scale:
            continue
        text = _scaled(n / scale)
        if abs(float(text)) >= 1000 and i > 0:  # 999960 reads 1.00M, not 1000.0K
            scale, unit = _UNITS[i - 1]
            text = _scaled(n / scale)
        return f"{text}{unit}"
    return f"{int(n)}" if float(n).is_integer() else f"{n:.3g}"


def _scaled(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def format_percent(part: int, whole: int) -> str:
    """``part`` as a percentage of ``whole``, one decimal; '–' when ``whole`` is 0."""
    return f"{100.0 * part / whole:.1f}%" if whole else "–"


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


_LATEX_ESCAPES = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\^{}"}


def _latex(cell: Any) -> str:
    text = str(cell).replace("\\", r"\textbackslash{}")
    text = "".join(_LATEX_ESCAPES.get(c, c) for c in text)
    return text.replace("→", r"$\rightarrow$").replace("–", "--")


def _render(headers: list[str], rows: list[list[Any]], fmt: str, align: Sequence[str]) -> str:
    """Render display rows with tabulate; latex cells are escaped and use ``latex_raw``."""
    if fmt == "latex":
        headers = [_latex(h) for h in headers]
        rows = [[_latex(cell) for cell in row] for row in rows]
    tablefmt = {"text": "simple", "github": "github", "latex": "latex_raw"}[fmt]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, colalign=align, disable_numparse=True)


def _csv(records: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"unknown table format {fmt!r}: choose one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- layer table


def layer_table(before: ModelCounts, after: ModelCounts | None = None, *, fmt: str = "text") -> str:
    """Per-layer table of widths, parameters and FLOPs, with a whole-model totals row.

    With ``after``, layers are matched by name: a layer missing after compile shows as
    removed, one that only exists after as added; the kept columns are after/before.
    ``fmt`` is one of text, github, latex (a ``tabular``), csv or json (exact integers).
    """
    _check_format(fmt)
    pairs = _pair_layers(before, after)
    if fmt in ("csv", "json"):
        records = [_layer_record(n, b, a, compared=after is not None) for n, b, a in pairs]
        records.append(_totals_record(before, after))
        if fmt == "csv":
            return _csv(records)
        payload = {"flops_unit": FLOPS_UNIT, "layers": records[:-1], "totals": records[-1]}
        payload["unsupported_ops"] = {"before": before.unsupported_ops}
        if after is not None:
            payload["unsupported_ops"]["after"] = after.unsupported_ops
        return json.dumps(payload, sort_keys=True, indent=2)
    if after is None:
        headers = ["layer", "kind", "in", "out", "params", "FLOPs"]
        rows = [_single_row(b) for _, b, _ in pairs]
        rows.append(
            ["total (model)", "", "", "", *map(format_count, (before.params, before.flops))]
        )
        return _render(headers, rows, fmt, ["left", "left"] + ["right"] * 4)
    headers = ["layer", "kind", "channels", "params", "params after", "FLOPs", "FLOPs after"]
    headers += ["params kept", "FLOPs kept"]
    rows = [_compare_row(name, b, a) for name, b, a in pairs]
    rows.append(_compare_totals(before, after))
    return _render(headers, rows, fmt, ["left", "left"] + ["right"] * 7)


Pair = tuple[str, LayerCount | None, LayerCount | None]


def _pair_layers(before: ModelCounts, after: ModelCounts | None) -> list[Pair]:
    later = after.layers if after is not None else {}
    pairs: list[Pair] = [(name, b, later.get(name)) for name, b in before.layers.items()]
    return pairs + [(name, None, a) for name, a in later.items() if name not in before.layers]


def _single_row(layer: LayerCount) -> list[Any]:
    return [layer.name, layer.kind, layer.in_channels, layer.out_channels] + [
        format_count(layer.params),
        format_count(layer.flops),
    ]


def _compare_row(name: str, b: LayerCount | None, a: LayerCount | None) -> list[Any]:
    kind = (b or a).kind  # type: ignore[union-attr]
    width_before = b.out_channels if b else "–"
    width_after = a.out_channels if a else "removed"
    params = (b.params if b else 0, a.params if a else 0)
    flops = (b.flops if b else 0, a.flops if a else 0)
    return [name, kind, f"{width_before} → {width_after}", *map(format_count, params)] + [
        *map(format_count, flops),
        format_percent(params[1], params[0]),
        format_percent(flops[1], flops[0]),
    ]


def _compare_totals(before: ModelCounts, after: ModelCounts) -> list[Any]:
    counts = [before.params, after.params, before.flops, after.flops]
    return ["total (model)", "", "", *map(format_count, counts)] + [
        format_percent(after.params, before.params),
        format_percent(after.flops, before.flops),
    ]


def _status(b: LayerCount | None, a: LayerCount | None, compared: bool) -> str:
    if not compared:
        return "counted"
    if a is None:
        return "removed"
    if b is None:
        return "added"
    return "pruned" if a.out_channels < b.out_channels else "kept"


def _layer_record(
    name: str, b: LayerCount | None, a: LayerCount | None, *, compared: bool
) -> dict[str, Any]:
    record: dict[str, Any] = {"layer": name, "kind": (b or a).kind}  # type: ignore[union-attr]
    for tag, layer in (("before", b), ("after", a)):
        for key in ("in_channels", "out_channels", "params", "flops"):
            record[f"{key}_{tag}"] = getattr(layer, key) if layer else None
    return record | {"status": _status(b, a, compared)}


def _totals_record(before: ModelCounts, after: ModelCounts | None) -> dict[str, Any]:
    record: dict[str, Any] = {"layer": "total", "kind": "model"}
    for tag, counts in (("before", before), ("after", after)):
        record |= {f"in_channels_{tag}": None, f"out_channels_{tag}": None}
        record[f"params_{tag}"] = counts.params if counts else None
        record[f"flops_{tag}"] = counts.flops if counts else None
    return record | {"status": "total"}


# --------------------------------------------------------------------------- summary table


def summary_table(rows: Sequence[ModelSummary], *, names: Sequence[str], fmt: str = "text") -> str:
    """The paper's Table 1/2: one row per model, ratios relative to the first model.

    Columns: model, params, params %, FLOPs, FLOPs %, accuracy (percent, '–' if None),
    channel widths joined by '-'. csv/json carry exact integers and ratios as fractions.
    """
    _check_format(fmt)
    if not rows or len(rows) != len(names):
        raise UsageError(
            f"summary_table needs one name per model: {len(names)} names, {len(rows)} rows"
        )
    base = rows[0]
    if fmt in ("csv", "json"):
        records = [_summary_record(name, row, base) for name, row in zip(names, rows, strict=True)]
        if fmt == "csv":
            return _csv([r | {"channels": "-".join(map(str, r["channels"]))} for r in records])
        return json.dumps({"flops_unit": FLOPS_UNIT, "models": records}, sort_keys=True, indent=2)
    headers = ["model", "params", "params %", "FLOPs", "FLOPs %", "accuracy (%)", "channels"]
    table = [
        [name, format_count(row.params), format_percent(row.params, base.params)]
        + [format_count(row.flops), format_percent(row.flops, base.flops)]
        + ["–" if row.accuracy is None else f"{row.accuracy:.1f}", _widths(row.channels)]
        for name, row in zip(names, rows, strict=True)
    ]
    return _render(headers, table, fmt, ["left"] + ["right"] * 5 + ["left"])


def _widths(channels: Sequence[int]) -> str:
    return "-".join(map(str, channels)) if channels else "–"


def _summary_record(name: str, row: ModelSummary, base: ModelSummary) -> dict[str, Any]:
    return {
        "model": name,
        "params": row.params,
        "params_ratio": _ratio(row.params, base.params),
        "flops": row.flops,
        "flops_ratio": _ratio(row.flops, base.flops),
        "accuracy": row.accuracy,
        "channels": list(row.channels),
    }


__all__ = [
    "FORMATS",
    "Pair",
    "format_count",
    "format_percent",
    "layer_table",
    "summary_table",
]
