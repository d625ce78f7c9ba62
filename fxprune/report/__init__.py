"""Stage 7, report: fvcore parameter and FLOP counts, paper-style tables,
latency benchmarks and plots."""

from fxprune.report.counts import LayerCount, ModelCounts, ModelSummary, count_model
from fxprune.report.tables import FORMATS, format_count, layer_table, summary_table

__all__ = [
    "FORMATS",
    "LayerCount",
    "ModelCounts",
    "ModelSummary",
    "count_model",
    "format_count",
    "layer_table",
    "summary_table",
]
