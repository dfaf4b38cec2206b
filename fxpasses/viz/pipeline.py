"""``visualize(gm, sites, out_dir)``: every picture of a graph in one call (DOT, SVG, HTML, both views)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch.fx as fx

from ..sites import Site
from .blocks import collapse
from .dot import to_dot
from .graph import to_networkx
from .page import write_html
from .svg import write_svg


def visualize(gm: fx.GraphModule, sites: Sequence[Site], out_dir: str | os.PathLike, *, collapsed: bool = True,
              full: bool = True, report: Any = None, depth: int = 2, title: str = "",
              renderer: str = "auto") -> dict[str, str]:
    """Write the pictures of ``gm`` and its sites into ``out_dir``.

    Files: ``graph.dot``, ``graph.svg``, ``graph.html`` (every node; ``full=True``) and
    ``blocks.dot``, ``blocks.svg``, ``blocks.html`` (the block view, ``collapsed=True``: the
    picture to open first for a whole U-Net).

    Args:
        gm, sites: the graph and the matcher's sites.
        out_dir: created if missing.
        report: a :class:`fxpasses.report.Report` whose tables go into the HTML files.
        depth: module-path levels per block (see :func:`collapse`).
        title: picture title (defaults to the report's title).
        renderer: see :func:`write_svg`.

    Returns:
        file name -> path of every file written.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    title = title or (getattr(report, "title", "") or "")
    g = to_networkx(gm, sites, title=title)
    paths: dict[str, str] = {}
    views = []
    if collapsed:
        views.append(("blocks", collapse(g, depth)))
    if full:
        views.append(("graph", g))
    for stem, view in views:
        dot_path = os.path.join(out_dir, f"{stem}.dot")
        with open(dot_path, "w", encoding="utf-8") as f:
            f.write(to_dot(view))
        paths[f"{stem}.dot"] = dot_path
        paths[f"{stem}.svg"] = os.path.join(out_dir, f"{stem}.svg")
        write_svg(view, paths[f"{stem}.svg"], renderer=renderer)
        with open(paths[f"{stem}.svg"], encoding="utf-8") as f:
            svg = f.read()
        paths[f"{stem}.html"] = os.path.join(out_dir, f"{stem}.html")
        write_html(view, paths[f"{stem}.html"], report=report, svg=svg)
    return paths
