"""Stage 4, train: ISTA on BatchNorm scales (the paper's method), the baselines
(slimming, L1 filters, SFP), data sources and the trainer."""

from fxprune.train.trainer import (
    MODES,
    DemoRecipe,
    TrainConfig,
    TrainResult,
    demo_recipe,
    evaluate,
    snapshot_path,
    train,
)

__all__ = [
    "MODES",
    "DemoRecipe",
    "TrainConfig",
    "TrainResult",
    "demo_recipe",
    "evaluate",
    "snapshot_path",
    "train",
]
