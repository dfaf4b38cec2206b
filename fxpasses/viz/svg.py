"""SVG output: the built-in pure-Python renderer and :func:`write_svg` (Graphviz ``dot`` when on PATH).

``write_svg`` uses Graphviz ``dot`` when it is on ``PATH`` and the graph is not too large for it,
and otherwise the built-in layered layout (:mod:`.layout`), so SVG and HTML work on machines
without Graphviz.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess

import networkx as nx

from .dot import DOT_MAX_NODES, to_dot
from .layout import _FONT_PX, _LINE_H, _layout, with_stubs
from .style import FONT, _clusters, _e, _shape_str, _tooltip

log = logging.getLogger("fusediff.fxpasses")


def render_svg(g: nx.DiGraph, *, stubs: bool = True) -> str:
    """SVG text of ``g`` from the built-in pure-Python layered layout (no Graphviz)."""
    if stubs:
        g = with_stubs(g)
    blocks = g.graph.get("view") == "blocks"
    lay = _layout(g, blocks)
    x, y, size = lay["x"], lay["y"], lay["size"]
    margin = 24.0
    title = g.graph.get("title") or ("fusediff block view" if blocks else "fusediff graph")
    top = 34.0
    real = list(g.nodes)
    if x:
        min_x = min(x[n] - size[n][0] / 2 for n in x)
        max_x = max(x[n] + size[n][0] / 2 for n in x)
    else:
        min_x = max_x = 0.0
    clusters = _clusters(g)
    boxes = []
    for c in sorted(clusters, key=lambda c: -c["height"]):  # outer boxes first, drawn below
        ms = [m for m in c["members"] if m in x]
        if not ms:
            continue
        pad = 10.0 + 8.0 * c["height"]
        x0 = min(x[m] - size[m][0] / 2 for m in ms) - pad
        x1 = max(x[m] + size[m][0] / 2 for m in ms) + pad
        y0 = min(y[m] - size[m][1] / 2 for m in ms) - pad - 11
        y1 = max(y[m] + size[m][1] / 2 for m in ms) + pad
        boxes.append((c, x0, y0, x1, y1))
        min_x, max_x = min(min_x, x0), max(max_x, x1)
    dx = margin - min_x
    width = max_x - min_x + 2 * margin
    width = max(width, len(title) * 7.5 + 2 * margin)
    height = lay["height"] + top + 2 * margin
    fs = _FONT_PX[blocks]
    lh = _LINE_H[blocks]

    def X(v: float) -> float:
        return round(v + dx, 1)

    def Y(v: float) -> float:
        return round(v + top + margin, 1)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}" font-size="{fs}">',
           "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" "
           "markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#8a8a8a\"/>"
           "</marker></defs>",
           f'<rect x="0" y="0" width="{width:.0f}" height="{height:.0f}" fill="#ffffff"/>',
           f'<text x="{width / 2:.0f}" y="{margin + 8:.0f}" text-anchor="middle" font-size="14" '
           f'font-weight="bold">{_e(title)}</text>']
    out.append('<g class="clusters">')
    for c, x0, y0, x1, y1 in boxes:
        dash = ' stroke-dasharray="5,3"' if c["dashed"] else ""
        out.append(f'<g class="cluster" id="{_e(c["id"])}"><title>{_e(c["label"])}</title>'
                   f'<rect x="{X(x0)}" y="{Y(y0)}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" rx="6" '
                   f'fill="{c["fill"]}" stroke="{c["border"]}"{dash}/>'
                   f'<text x="{X(x0) + 6}" y="{Y(y0) + 11}" font-size="9" fill="#555555">{_e(c["label"])}</text></g>')
    out.append("</g>")
    out.append('<g class="edges" fill="none" stroke="#8a8a8a" stroke-width="1">')
    for (u, v), chain in lay["chains"].items():
        rev = (v, u) in lay["reversed"]
        pts = []
        for i, n in enumerate(chain):
            h = size[n][1] / 2
            if i == 0:
                pts.append((x[n], y[n] + h))
            elif i == len(chain) - 1:
                pts.append((x[n], y[n] - h))
            else:
                pts.append((x[n], y[n] - 1))
                pts.append((x[n], y[n] + 1))
        d = f"M{X(pts[0][0])},{Y(pts[0][1])}"
        for (x0_, y0_), (x1_, y1_) in zip(pts, pts[1:]):
            my = (y0_ + y1_) / 2
            d += f" C{X(x0_)},{Y(my)} {X(x1_)},{Y(my)} {X(x1_)},{Y(y1_)}"
        marker = ' marker-start="url(#arrow)"' if rev else ' marker-end="url(#arrow)"'
        dash = ' stroke-dasharray="4,3"' if rev else ""
        src, dst = (v, u) if rev else (u, v)
        tip = _shape_str(g.edges[src, dst].get("shape")) if g.has_edge(src, dst) else ""
        out.append(f'<path d="{d}"{marker}{dash}><title>{_e(src)} → {_e(dst)} {_e(tip)}</title></path>')
        if blocks and tip and len(chain) == 2 and g.in_degree(dst) == 1 and g.out_degree(src) == 1:
            lx, ly = (pts[0][0] + pts[1][0]) / 2, (pts[0][1] + pts[1][1]) / 2
            out.append(f'<text x="{X(lx) + 4}" y="{Y(ly) + 3}" font-size="8" fill="#777777" stroke="none">'
                       f'{_e(tip)}</text>')
    out.append("</g>")
    out.append('<g class="nodes">')
    for n in real:
        a = g.nodes[n]
        st = lay["styles"][n]
        w, h = size[n]
        cx, cy = X(x[n]), Y(y[n])
        stroke_w = 2.4 if st["bold"] else (1.4 if a.get("matched") else 1.0)
        dash = ' stroke-dasharray="4,3"' if st["dashed"] else ""
        common = f'fill="{st["fill"]}" stroke="{st["border"]}" stroke-width="{stroke_w}"{dash}'
        if st["shape"] == "ellipse":
            shape = f'<ellipse cx="{cx}" cy="{cy}" rx="{w / 2:.1f}" ry="{h / 2:.1f}" {common}/>'
        else:
            shape = f'<rect x="{cx - w / 2:.1f}" y="{cy - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" rx="5" {common}/>'
        ls = lay["lines"][n]
        y0 = cy - (len(ls) - 1) * lh / 2 + fs * 0.35
        if st.get("stub"):
            out.append(f'<g class="stub"><title>{_e(_tooltip(n, a))}</title>{shape}<text x="{cx}" y="{cy + 3:.1f}" '
                       f'text-anchor="middle" font-size="8" fill="#666666">{_e(ls[0])}</text></g>')
            continue
        texts = []
        for i, s in enumerate(ls):
            weight = ' font-weight="bold"' if i == 0 else ""
            color = "#222222" if i == 0 else "#555555"
            texts.append(f'<text x="{cx}" y="{y0 + i * lh:.1f}" text-anchor="middle" fill="{color}"{weight}>{_e(s)}</text>')
        out.append(f'<g class="node" id="{_e(n)}"><title>{_e(_tooltip(n, a))}</title>{shape}{"".join(texts)}</g>')
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


def write_svg(g: nx.DiGraph, path: str | os.PathLike, *, renderer: str = "auto", timeout: float = 120.0) -> str:
    """Write ``g`` as SVG; returns the renderer used (``"graphviz"`` or ``"builtin"``).

    Args:
        renderer: ``"auto"`` (Graphviz ``dot`` when on PATH, else built-in), ``"graphviz"``
            or ``"builtin"``. A failing or slow ``dot`` falls back to the built-in layout.
        timeout: seconds ``dot`` may take.
    """
    if renderer not in ("auto", "graphviz", "builtin"):
        raise ValueError(f"write_svg: renderer must be 'auto', 'graphviz' or 'builtin', got {renderer!r}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    svg, used = _svg_text(g, renderer, timeout)
    with open(path, "w", encoding="utf-8") as f:
        f.write(svg)
    log.info("visualize: wrote %s (%d nodes) with the %s renderer", path, g.number_of_nodes(), used)
    return used


def _svg_text(g: nx.DiGraph, renderer: str = "auto", timeout: float = 120.0) -> tuple[str, str]:
    if renderer not in ("auto", "graphviz", "builtin"):
        raise ValueError(f"write_svg: renderer must be 'auto', 'graphviz' or 'builtin', got {renderer!r}")
    used = "builtin"
    svg = None
    dot = shutil.which("dot")
    if renderer == "auto" and dot and g.number_of_nodes() > DOT_MAX_NODES:
        log.info("visualize: %d nodes > DOT_MAX_NODES=%d: using the built-in layout instead of graphviz "
                 "(the block view is the picture to read for a graph this size)", g.number_of_nodes(), DOT_MAX_NODES)
        dot = None
    if renderer in ("auto", "graphviz") and dot:
        try:
            proc = subprocess.run([dot, "-Tsvg"], input=to_dot(g).encode("utf-8"), capture_output=True,
                                  timeout=timeout, check=True)
            svg = proc.stdout.decode("utf-8")
            used = "graphviz"
        except (subprocess.SubprocessError, OSError) as e:
            log.warning("visualize: graphviz dot failed (%s); using the built-in layout", str(e)[:200])
    elif renderer == "graphviz" and not shutil.which("dot"):
        log.warning("visualize: graphviz dot is not on PATH; using the built-in layout")
    if svg is None:
        svg = render_svg(g)
    return svg, used

