"""Pictures of rewritten FX graphs: networkx graph, block-level collapse, DOT, SVG and HTML.

Pipeline::

    g = to_networkx(gm, sites)          # one node per FX node (parameters hidden)
    b = collapse(g, depth=2)            # one node per module block (down_blocks.0.resnets.1, ...)
    to_dot(b); write_svg(b, "blocks.svg"); write_html(b, "blocks.html", report=report)
    visualize(gm, sites, "out/")        # all of the above for both views

Matched sites are filled with their family's color (GroupNorm blue, attention orange, GELU
green), rejected sites are grey and dashed, ``fusediff::`` ops have a bold border, and each site is
a cluster. The block view labels each block with its module type, op count, GFLOPs and the
patterns it holds; it is the picture to look at for a whole U-Net (thousands of nodes in the full
view). ``write_svg`` uses Graphviz ``dot`` when it is on ``PATH`` and otherwise a built-in layered
layout written in pure Python (networkx ``topological_generations`` layers, barycenter ordering,
dummy nodes for long edges), so SVG and HTML work on machines without Graphviz.

Modules: :mod:`.graph` (FX -> networkx), :mod:`.blocks` (block view), :mod:`.style` (colors,
labels, clusters), :mod:`.dot` (DOT text), :mod:`.layout` (built-in layout, hub stubs),
:mod:`.svg` (SVG renderers), :mod:`.page` (HTML), :mod:`.pipeline` (:func:`visualize`).
"""
from __future__ import annotations

from .blocks import TOP_LEVEL, collapse, group_key
from .dot import DOT_LARGE, DOT_MAX_NODES, to_dot
from .graph import fused_op_family, to_networkx
from .layout import HUB_FANOUT, HUB_MAX_SPAN, MAX_DUMMY_SPAN, with_stubs
from .page import write_html
from .pipeline import visualize
from .style import FAMILY_COLORS, FONT, IO_COLORS, PLAIN_COLORS, REJECTED_COLORS, family_colors
from .svg import render_svg, write_svg

__all__ = [
    "DOT_LARGE", "DOT_MAX_NODES", "FAMILY_COLORS", "FONT", "HUB_FANOUT", "HUB_MAX_SPAN", "IO_COLORS",
    "MAX_DUMMY_SPAN", "PLAIN_COLORS", "REJECTED_COLORS", "TOP_LEVEL",
    "collapse", "family_colors", "fused_op_family", "group_key", "render_svg", "to_dot", "to_networkx",
    "visualize", "with_stubs", "write_html", "write_svg",
]
