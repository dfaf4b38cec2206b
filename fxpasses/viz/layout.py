"""The built-in layered layout behind :func:`~fxpasses.viz.svg.render_svg`, and hub stubs.

Layers are networkx ``topological_generations`` (each node pulled down next to its first
consumer), long edges get dummy nodes, layers are ordered by barycenters and x is placed by a
priority method. :func:`with_stubs` replaces long edges out of hub nodes (time embedding, text
context) by small stub nodes next to each consumer; the DOT writer uses it too.
"""
from __future__ import annotations

from typing import Any

import networkx as nx

from .style import _label_lines, _style


_CHAR_W = {True: 6.3, False: 5.9}  # average glyph width at the block / full view font size
_LINE_H = {True: 14.0, False: 13.0}
_FONT_PX = {True: 11, False: 10}


def _node_size(lines: list[str], blocks: bool, shape: str) -> tuple[float, float]:
    w = max((len(s) for s in lines), default=1) * _CHAR_W[blocks] + (26 if shape == "ellipse" else 16)
    h = len(lines) * _LINE_H[blocks] + 10
    return max(w, 40.0), h


def _layering(g: nx.DiGraph) -> tuple[dict[Any, int], nx.DiGraph, set[tuple[Any, Any]]]:
    """Layer of every node: edges against the ``order`` attribute are reversed to get a DAG,
    layers are networkx topological generations, then each node is pulled down to just above
    its first consumer (generations place everything as early as possible, which stretches
    side branches such as a text context's K/V projections over the whole picture)."""
    order = {n: g.nodes[n].get("order", i) for i, n in enumerate(g.nodes)}
    dag = nx.DiGraph()
    dag.add_nodes_from(g.nodes)
    reversed_edges = set()
    for u, v in g.edges:
        if order[u] < order[v]:
            dag.add_edge(u, v)
        elif u != v:
            dag.add_edge(v, u)
            reversed_edges.add((u, v))
    layer: dict[Any, int] = {}
    topo: list[Any] = []
    for i, gen in enumerate(nx.topological_generations(dag)):
        for n in gen:
            layer[n] = i
            topo.append(n)
    for n in reversed(topo):
        succ = list(dag.successors(n))
        if succ:
            layer[n] = max(layer[n], min(layer[m] for m in succ) - 1)
    return layer, dag, reversed_edges


#: A node feeding at least this many consumers is a hub (time embedding, text context).
HUB_FANOUT = 4
#: Edges from a hub spanning more than this many layers are drawn as a stub next to the consumer.
HUB_MAX_SPAN = 2
#: Edges longer than this many layers get no dummy nodes in the built-in layout (drawn as curves).
MAX_DUMMY_SPAN = 40


def with_stubs(g: nx.DiGraph, *, fanout: int = HUB_FANOUT, max_span: int = HUB_MAX_SPAN) -> nx.DiGraph:
    """A copy of ``g`` where long edges out of hub nodes are replaced by small stub nodes
    placed next to each consumer (``"↪ temb"``), as circuit diagrams label a shared net.

    Hubs are nodes with at least ``fanout`` consumers; an edge is replaced when it spans more
    than ``max_span`` layers. Without this, a time embedding feeding every ResNet block or a text
    context feeding every cross-attention draws dozens of edges across the whole picture (and
    makes Graphviz's layout take minutes).
    """
    h = g.copy()
    layer, _, _ = _layering(g)
    for u in list(g.nodes):
        if g.out_degree(u) < fanout:
            continue
        src = g.nodes[u]
        src_label = src.get("label") if src.get("kind") else src.get("name", u)
        if src.get("kind") is None and src.get("op") not in ("placeholder",):
            src_label = f"{src.get('target', '')} ({u})"
        for v in list(g.successors(u)):
            if layer[v] - layer[u] <= max_span:
                continue
            stub = f"stub:{u}->{v}"
            h.add_node(stub, kind="stub", op="stub", label=f"↪ {src_label}", stub_of=u,
                       order=g.nodes[v].get("order", 0) - 0.5, shape=src.get("shape"))
            data = dict(g.edges[u, v])
            h.remove_edge(u, v)
            h.add_edge(stub, v, **data)
    return h


def _layout(g: nx.DiGraph, blocks: bool) -> dict[str, Any]:
    """Layered layout: layers, dummy chains for long edges, barycenter ordering, x placement."""
    order = {n: g.nodes[n].get("order", i) for i, n in enumerate(g.nodes)}
    layer, dag, reversed_edges = _layering(g)
    # dummies: one per intermediate layer of each long edge
    chains: dict[tuple[str, str], list[Any]] = {}
    up: dict[Any, list[Any]] = {n: [] for n in dag.nodes}
    down: dict[Any, list[Any]] = {n: [] for n in dag.nodes}
    dummy_order: dict[Any, float] = {}
    for u, v in dag.edges:
        chain = [u]
        span = range(layer[u] + 1, layer[v]) if layer[v] - layer[u] <= MAX_DUMMY_SPAN else range(0)
        for k in span:
            d = ("__dummy__", u, v, k)
            layer[d] = k
            dummy_order[d] = order[u] + 0.5
            up[d], down[d] = [], []
            chain.append(d)
        chain.append(v)
        for a, b_ in zip(chain, chain[1:]):
            down[a].append(b_)
            up[b_].append(a)
        chains[(u, v)] = chain
    n_layers = max(layer.values(), default=-1) + 1
    layers: list[list[Any]] = [[] for _ in range(n_layers)]
    for n, lv in layer.items():
        layers[lv].append(n)
    key = {**order, **dummy_order}
    for lv in layers:
        lv.sort(key=lambda n: key[n])
    pos = {n: i for lv in layers for i, n in enumerate(lv)}
    for sweep in range(4):  # barycenter ordering, alternating directions
        rng = range(1, n_layers) if sweep % 2 == 0 else range(n_layers - 2, -1, -1)
        nbrs = up if sweep % 2 == 0 else down
        for li in rng:
            lv = layers[li]
            bary = {n: (sum(pos[m] for m in nbrs[n]) / len(nbrs[n])) if nbrs[n] else pos[n] for n in lv}
            lv.sort(key=lambda n: (bary[n], key[n]))
            for i, n in enumerate(lv):
                pos[n] = i
    # sizes
    size: dict[Any, tuple[float, float]] = {}
    lines: dict[Any, list[str]] = {}
    styles: dict[Any, dict[str, Any]] = {}
    for n in g.nodes:
        a = dict(g.nodes[n])
        a.setdefault("name", n)
        lines[n] = _label_lines(a)
        styles[n] = _style(a)
        if styles[n].get("stub"):
            size[n] = (max(len(lines[n][0]) * 4.7 + 12, 30.0), 16.0)
        else:
            size[n] = _node_size(lines[n], blocks, styles[n]["shape"])
    for lv in layers:
        for n in lv:
            if n not in size:
                size[n] = (6.0, 0.0)
    gap = 22.0 if blocks else 14.0
    # x placement: pull each node toward the mean x of its neighbors in the previous layer, then
    # resolve overlaps keeping the order (average of a left-to-right and a right-to-left packing).
    x: dict[Any, float] = {}
    for lv in layers:
        cur = 0.0
        for n in lv:
            x[n] = cur + size[n][0] / 2
            cur += size[n][0] + gap
        shift = cur / 2
        for n in lv:
            x[n] -= shift
    pull: dict[Any, float] = {}
    for lv in layers:
        for n in lv:
            if isinstance(n, tuple):
                pull[n] = 0.05
            elif styles[n].get("stub") or styles[n]["shape"] == "ellipse":
                pull[n] = 0.0
            else:
                pull[n] = 1.0
    for it in range(7):  # ends with a top-down pass
        rng = range(n_layers) if it % 2 == 0 else range(n_layers - 1, -1, -1)
        nbrs = up if it % 2 == 0 else down
        for li in rng:
            lv = layers[li]
            want = []
            for n in lv:
                if styles.get(n, {}).get("stub") and down[n]:  # hang above the consumer's right edge
                    c = down[n][0]
                    want.append(x[c] + size[c][0] / 2)
                    continue
                # weighted mean of the neighbors' x: stubs and graph inputs hang beside their
                # consumer and must not pull it sideways; long-edge dummies barely pull (they
                # route around the real nodes, which keeps chains straight)
                ws = [(x[m], pull[m]) for m in nbrs[n]]
                tot = sum(w_ for _, w_ in ws)
                if tot > 0:
                    want.append(sum(xm * w_ for xm, w_ in ws) / tot)
                else:
                    want.append(sum(xm for xm, _ in ws) / len(ws) if ws else x[n])
            # priority method: real nodes take their wanted x first, dummies and stubs fill in
            # around them; every node keeps its order and room for the unplaced ones between.
            k = len(lv)
            widths = [size[n][0] for n in lv]
            pre = [0.0]
            for w_ in widths:
                pre.append(pre[-1] + w_)
            prio = sorted(range(k), key=lambda j: (
                0 if isinstance(lv[j], tuple) or styles.get(lv[j], {}).get("stub") else 1,
                len(up[lv[j]]) + len(down[lv[j]])), reverse=True)
            done: dict[int, float] = {}
            for j in prio:
                lo, hi = -1e18, 1e18
                for i, xi in done.items():
                    room = (pre[max(i, j)] - pre[min(i, j) + 1]) + abs(j - i) * gap + (widths[i] + widths[j]) / 2
                    if i < j:
                        lo = max(lo, xi + room)
                    else:
                        hi = min(hi, xi - room)
                xj = min(max(want[j], lo), hi) if lo <= hi else lo
                done[j] = xj
            for j, n in enumerate(lv):
                x[n] = done[j]
    layer_h = [max((size[n][1] for n in lv), default=0.0) for lv in layers]
    vgap = 34.0 if blocks else 24.0
    y: dict[Any, float] = {}
    cur = 0.0
    for li, lv in enumerate(layers):
        for n in lv:
            y[n] = cur + layer_h[li] / 2
        cur += layer_h[li] + vgap
    return {"x": x, "y": y, "size": size, "lines": lines, "styles": styles, "chains": chains,
            "reversed": reversed_edges, "height": cur - vgap}

