"""Graphviz DOT text of a full or block view (no pydot needed)."""
from __future__ import annotations

from typing import Any

import networkx as nx

from .layout import with_stubs
from .style import FONT, _clusters, _label_lines, _shape_str, _style, _tooltip


def _q(s: Any) -> str:
    """A DOT double-quoted string."""
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


#: Above this many nodes (after stubs) ``dot``'s layout gets slow (minutes, even crashes at a few
#: thousand); ``write_svg(renderer="auto")`` then uses the built-in layout.
DOT_MAX_NODES = 1500
#: Above this many nodes the DOT text asks Graphviz for a cheaper layout and drops edge labels.
DOT_LARGE = 150


def to_dot(g: nx.DiGraph, *, stubs: bool = True) -> str:
    """Graphviz DOT text of a :func:`to_networkx` or :func:`collapse` graph (no pydot needed).

    Matched nodes are filled with their family color, rejected sites grey and dashed, fused
    ``fusediff::`` ops bold; sites (full view) or parent modules (block view) are clusters.
    With ``stubs`` long edges out of hub nodes are drawn as stubs (see :func:`with_stubs`).
    """
    if stubs:
        g = with_stubs(g)
    blocks = g.graph.get("view") == "blocks"
    large = g.number_of_nodes() > DOT_LARGE
    lines = ["digraph fusediff {"]
    title = g.graph.get("title") or ("fusediff block view" if blocks else "fusediff graph")
    # network simplex dominates dot's time on long graphs; one pass per node is plenty there
    cheap = ", nslimit=1, nslimit1=1, mclimit=0.5" if large else ""
    lines.append(f"  graph [rankdir=TB, fontname={_q(FONT)}, fontsize=12, labelloc=t, label={_q(title)}, "
                 f"nodesep=0.25, ranksep={0.45 if blocks else 0.3}, newrank=true{cheap}];")
    lines.append(f"  node [shape=box, style=\"rounded,filled\", fontname={_q(FONT)}, fontsize={10 if blocks else 9}, "
                 f"margin=\"0.12,0.04\", height=0.3];")
    lines.append(f"  edge [color=\"#8a8a8a\", arrowsize=0.6, fontname={_q(FONT)}, fontsize=8, fontcolor=\"#777777\"];")
    placed: set[str] = set()
    ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}

    def node_line(n: str, indent: str) -> str:
        a = g.nodes[n]
        st = _style(a)
        style = ["filled"]
        if st["shape"] == "box":
            style.insert(0, "rounded")
        if st["dashed"]:
            style.append("dashed")
        if st["bold"]:
            style.append("bold")
        attrs = [f"label={_q(chr(10).join(_label_lines(a)))}", f"shape={st['shape']}",
                 f"style={_q(','.join(style))}", f"fillcolor={_q(st['fill'])}", f"color={_q(st['border'])}",
                 f"tooltip={_q(_tooltip(n, a))}"]
        if st["bold"]:
            attrs.append("penwidth=2.2")
        elif a.get("matched"):
            attrs.append("penwidth=1.4")
        if st.get("stub"):
            attrs += ["fontsize=8", 'fontcolor="#666666"', "height=0.2"]
        return f"{indent}{ids[n]} [{', '.join(attrs)}];"

    clusters = _clusters(g)
    children: dict[str | None, list[dict[str, Any]]] = {}
    for c in clusters:
        children.setdefault(c["parent"], []).append(c)
    # a node belongs to the innermost cluster that contains it (sites: the first one)
    home: dict[str, str] = {}
    for c in sorted(clusters, key=lambda c: c["height"]):
        for m in c["members"]:
            home.setdefault(m, c["id"])

    def emit(c: dict[str, Any], indent: str) -> None:
        style = "rounded,filled,dashed" if c["dashed"] else "rounded,filled"
        lines.append(f"{indent}subgraph {c['id']} {{")
        lines.append(f"{indent}  label={_q(c['label'])}; labeljust=l; fontsize=9; style={_q(style)}; "
                     f"fillcolor={_q(c['fill'])}; color={_q(c['border'])};")
        for m in c["members"]:
            if home.get(m) == c["id"] and m not in placed:
                lines.append(node_line(m, indent + "  "))
                placed.add(m)
        for sub in children.get(c["id"], []):
            emit(sub, indent + "  ")
        lines.append(f"{indent}}}")

    for c in children.get(None, []):
        emit(c, "  ")
    for n in g.nodes:
        if n not in placed:
            lines.append(node_line(n, "  "))
    for u, v, a in g.edges(data=True):
        attrs = []
        if blocks and not large and a.get("shape") is not None:
            attrs.append(f"label={_q(' ' + _shape_str(a['shape']))}")
        if g.nodes[u].get("order", 0) > g.nodes[v].get("order", 0):
            attrs += ["style=dashed", "constraint=false"]  # a back edge must not drive the ranking
        lines.append(f"  {ids[u]} -> {ids[v]}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"

