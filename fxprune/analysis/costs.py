"""The paper's per-channel penalty λ (Ye et al. 2018, Eq. 2): the one place it lives.

Eq. 2, generalised to channel groups. For one channel class c of a group,
  cost(c) = Σ_producers k·c_in/groups + Σ_consumers k'·c_out'/groups + Σ_BN sites I_w·I_h
summed over every position the class occupies at each site (a Linear behind a
flatten reads a channel at H·W positions, so an fc over 4×4 maps counts as
k' = 4·4, as in the paper's ConvNet), k the kernel area (1 for Linear), a
depthwise conv counted once, and I_w·I_h the feature-map size at that BN site
(1 behind a Linear). λ(c) = cost(c) / (I_w^i·I_h^i), the size of the
network's INPUT image: the same divisor for every layer, as Eq. 2 is printed
(not each layer's own feature-map size, which would weigh deep layers 4× per
halving of the resolution). With one producer conv, one BN and convs behind
it, this is Eq. 2 exactly (the ConvNet at 32×32: conv1 5.761, conv2 4.281,
conv3 7.75, fc 3.011); a residual stream or a concatenation sums the cost of
every conv and BN its channel touches, over the same divisor.
"""

from __future__ import annotations

import math

import numpy as np
import torch.fx as fx
from torch import nn

from fxprune.analysis.groups import ChannelAnalysis, Site


def _nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _spatial(node: fx.Node) -> int:
    """I_w·I_h of a node's (N, C, *spatial) output; 1 for (N, F)."""
    return math.prod(node.meta["tensor_meta"].shape[2:])


def site_classes(node: fx.Node, site: Site, analysis: ChannelAnalysis, role: str) -> np.ndarray:
    """Class of every position of `site` (consumers index their input's channels)."""
    carrier = node.args[0] if role == "consumer" else node
    ids = carrier.meta["channels"].reshape(-1)
    return analysis.class_of[ids[site.positions]]


def _producer_cost(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return math.prod(module.kernel_size) * module.in_channels // module.groups


def _consumer_cost(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return math.prod(module.kernel_size) * module.out_channels // module.groups


def input_area(gm: fx.GraphModule) -> int:
    """I_w^i·I_h^i of the network's input image: the spatial size of the first input with
    spatial dimensions (N, C, H, W, ...); 1 when no input has any."""
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta") if node.op == "placeholder" else None
        shape = getattr(meta, "shape", None)
        if shape is not None and len(shape) >= 3:
            return math.prod(shape[2:])
    return 1


def class_costs(gm: fx.GraphModule, analysis: ChannelAnalysis) -> np.ndarray:
    """λ of every channel class (Eq. 2 generalised, see module docstring); 0 where no site."""
    nodes, cost = _nodes(gm), np.zeros(analysis.num_classes)
    for group in analysis.groups:
        for role, sites in (("producer", group.producers), ("consumer", group.consumers)):
            for site in sites:
                if role == "consumer" and site.kind == "depthwise":
                    continue  # its producer site already counts it
                module = gm.get_submodule(site.module)
                unit = _producer_cost(module) if role == "producer" else _consumer_cost(module)
                np.add.at(cost, site_classes(nodes[site.node], site, analysis, role), unit)
        for site in group.bn_sites:
            node = nodes[site.node]
            np.add.at(cost, site_classes(node, site, analysis, "bn"), _spatial(node))
    return cost / input_area(gm)


__all__ = ["class_costs", "input_area", "site_classes"]
