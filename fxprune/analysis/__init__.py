"""Stage 3, analyse: channel ids on every activation, union-find groups of
channels that must be removed together, frozen channels with their reasons,
and the paper's per-channel cost (Eq. 2).

Where things live: `vocabulary` (which op is which), `rules` (one function
per op kind, looked up by op), `labeller` (walks the graph applying rules),
`groups` (union-find and the result records), `costs` (Eq. 2).
"""

from fxprune.analysis.costs import class_costs, site_classes
from fxprune.analysis.groups import (
    ANALYSIS_KEY,
    ChannelAnalysis,
    Group,
    Site,
    UnionFind,
    analyse,
    get_analysis,
)

__all__ = [
    "ANALYSIS_KEY",
    "ChannelAnalysis",
    "Group",
    "Site",
    "UnionFind",
    "analyse",
    "class_costs",
    "get_analysis",
    "site_classes",
]
