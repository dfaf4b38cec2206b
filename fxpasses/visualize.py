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
"""
from __future__ import annotations

import html
import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from typing import Any, Sequence

import networkx as nx
import torch.fx as fx

from . import costs
from .canonicalize import clean_module_path
from .sites import PATTERNS, Site

log = logging.getLogger("fusediff.fxpasses")

# fill, border
FAMILY_COLORS: dict[str, tuple[str, str]] = {
    "groupnorm": ("#d6e6f7", "#2f6fb0"),
    "attention": ("#fde1c2", "#d2700c"),
    "gelu": ("#d6efd0", "#3b8c3b"),
    "quant": ("#e8dbf4", "#7b4ea3"),
    "conv": ("#f6d9e4", "#b0416a"),
}
_EXTRA_COLORS = [("#f3efc9", "#9c8a1c"), ("#d3efee", "#2a8a86"), ("#eedcd0", "#8a5a3a")]
REJECTED_COLORS = ("#eeeeee", "#9a9a9a")
PLAIN_COLORS = ("#ffffff", "#b0b0b0")
IO_COLORS = ("#f4f4f4", "#555555")
FONT = "Helvetica,Arial,sans-serif"


def family_colors(family: str) -> tuple[str, str]:
    """(fill, border) of a pattern family; families without an entry get a stable extra color."""
    if family in FAMILY_COLORS:
        return FAMILY_COLORS[family]
    return _EXTRA_COLORS[sum(map(ord, family)) % len(_EXTRA_COLORS)]


def fused_op_family(name: str) -> str:
    """Family of a ``fusediff::`` op name (``"fusediff::group_norm_silu"`` -> ``"groupnorm"``)."""
    short = name.split("::", 1)[-1]
    if any(k in short for k in ("int8", "int4", "quant", "modiff")):
        return "quant"
    if "norm" in short:
        return "groupnorm"
    if "attention" in short or "attn" in short:
        return "attention"
    if "gelu" in short or "geglu" in short:
        return "gelu"
    if "conv" in short:
        return "conv"
    return "fused"


# --------------------------------------------------------------------------- networkx graph
def _stack(n: fx.Node) -> list[tuple[str, str, str]]:
    """``(clean path, type name, qualified type name)`` of every module enclosing ``n``."""
    out = []
    for v in (n.meta.get("nn_module_stack") or {}).values():
        if isinstance(v, tuple) and len(v) == 2:
            path, typ = v
            if isinstance(typ, type):
                qual = f"{typ.__module__}.{typ.__qualname__}"
            else:
                qual = str(typ)
                if qual.startswith("<class '"):
                    qual = qual[8:].rstrip("'>")
            out.append((clean_module_path(str(path)), qual.rsplit(".", 1)[-1], qual))
    return out


def _site_summary(i: int, s: Site) -> dict[str, Any]:
    from .report import format_shapes, site_status

    return {"index": i, "pattern": s.pattern, "family": PATTERNS.get(s.pattern, ""),
            "module": s.module_path, "matched": bool(s.matched), "rewritten": bool(s.rewritten),
            "status": site_status(s), "shapes": format_shapes(s.shapes),
            "dtype": s.dtype.replace("torch.", ""), "nodes": list(s.nodes)}


def to_networkx(gm: fx.GraphModule, sites: Sequence[Site] = (), *, params: bool = False,
                title: str = "") -> nx.DiGraph:
    """One networkx node per FX node (keyed by node name), edges along data flow.

    Node attributes: ``op`` (FX op), ``target`` (vocabulary-independent name, see
    :func:`fxpasses.costs.target_name`), ``module`` (owning module path), ``stack`` (module path
    and type of every enclosing module), ``shape``, ``dtype``, ``flops``, ``op_class``,
    ``order`` (topological index), ``fused`` (a ``fusediff::`` op), and when the node belongs
    to a site: ``site`` (index into ``sites``), ``pattern``, ``family``, ``matched``, ``reason``.
    Graph attributes: ``view="full"``, ``title``, ``sites`` (summaries).

    Args:
        gm: the graph.
        sites: sites found in it (names of missing nodes are ignored).
        params: keep parameter nodes (get_attr and parameter placeholders); hidden by default.
        title: picture title.
    """
    g = nx.DiGraph(view="full", title=title, sites=[_site_summary(i, s) for i, s in enumerate(sites)])
    # A node in several sites shows the first matched one (else the first rejected one).
    site_of: dict[str, int] = {}
    for i, s in enumerate(sites):
        for name in s.nodes:
            j = site_of.get(name)
            if j is None or (s.matched and not sites[j].matched):
                site_of[name] = i
    kept: set[fx.Node] = set()
    for order, n in enumerate(gm.graph.nodes):
        if not params and (n.op == "get_attr" or (n.op == "placeholder" and costs.is_weight(n))):
            continue
        if n.op in ("call_function", "call_method", "call_module", "placeholder") and not n.users \
                and not costs.tensors_of(costs.value(n)):
            continue  # bookkeeping calls (export's _guards_fn, asserts), unused flags (return_dict)
        kept.add(n)
        name = costs.target_name(n)
        shape = costs.shape_of(n)
        dt = costs.dtype_of(n)
        attrs: dict[str, Any] = {
            "op": n.op, "target": name, "module": costs.node_module_path(n), "stack": _stack(n),
            "shape": shape, "dtype": str(dt).replace("torch.", "") if dt is not None else "",
            "flops": costs.node_flops(n), "op_class": costs.node_class(n) if costs.is_compute(n) else "",
            "order": order, "fused": name.startswith("fusediff::"), "view_op": costs.is_view(n),
            "name": n.name, "param": n.op == "get_attr" or (n.op == "placeholder" and costs.is_weight(n)),
        }
        if attrs["fused"]:
            attrs.update(family=fused_op_family(name), matched=True)
        if n.name in site_of:
            i = site_of[n.name]
            s = sites[i]
            attrs.update(site=i, pattern=s.pattern, family=PATTERNS.get(s.pattern, s.pattern),
                         matched=bool(s.matched), reason=s.reason)
        g.add_node(n.name, **attrs)
    for n in kept:
        for i in n.all_input_nodes:
            if i in kept:
                g.add_edge(i.name, n.name, shape=costs.shape_of(i))
    return g


# --------------------------------------------------------------------------- collapse
def _levels(path: str) -> list[str]:
    """``"down_blocks.0.resnets.1.norm1"`` -> ``["down_blocks.0", "resnets.1", "norm1"]``:
    a list index belongs to the name before it."""
    out: list[str] = []
    for tok in path.split(".") if path else []:
        if (tok.isdigit() or tok.startswith("slice(")) and out:  # seq[1:] -> "seq.slice(1, None, None)"
            out[-1] += "." + tok
        else:
            out.append(tok)
    return out


def group_key(path: str, depth: int) -> str:
    """Module path cut to ``depth`` levels (a list index counts with its name)."""
    return ".".join(_levels(path)[:depth])


TOP_LEVEL = "(top level)"


def collapse(g: nx.DiGraph, depth: int = 2) -> nx.DiGraph:
    """Block-level view: one node per module-path prefix of ``depth`` levels.

    Levels count a list index with its name, so depth 2 gives ``down_blocks.0.resnets.1`` (one
    ResnetBlock2D) and ``mid_block.attentions.0``. A layer (a module without sub-modules such as
    Conv2d, Linear, GroupNorm32, or a torch.nn container of layers) below the first level joins
    its parent block, so a block is not split into its own ops and its layers
    (``mid_block.norm1`` -> ``mid_block``, ``input_blocks.1.0.in_layers`` -> ``input_blocks.1.0``,
    ``time_embedding.linear_1`` -> ``time_embedding``), while sub-blocks stay apart (an up
    block's ResNets, though the up block runs a ``cat`` of its own). Graph inputs and the output
    keep their own nodes; ops outside every module form one ``"(top level)"`` node per contiguous
    run (so they do not tie distant blocks into cycles).

    Group attributes: ``label``, ``kind`` (group/input/output), ``module``, ``module_type``,
    ``n_nodes``, ``ops`` (target -> count of compute ops), ``flops``, ``patterns`` (pattern ->
    {"matched", "rejected"} site counts), ``families`` (matched families), ``fused_ops``,
    ``matched`` (True: a matched site or fused op inside; False: only rejected sites; None:
    no site), ``shape`` (of the group's last value), ``order``, ``members`` (FX node names).
    Edges between groups carry ``count`` (FX edges merged) and ``shape``.
    """
    if depth < 1:
        raise ValueError(f"collapse: depth must be >= 1, got {depth}")
    b = nx.DiGraph(view="blocks", depth=depth, title=g.graph.get("title", ""),
                   sites=g.graph.get("sites", []))
    qual: dict[str, str] = {}
    short: dict[str, str] = {}
    for _, a in g.nodes(data=True):
        for path, typ, q in a.get("stack", []):
            qual.setdefault(path, q)
            short.setdefault(path, typ)

    # A layer joins its parent when the parent is itself a block. A *layer* is a module with no
    # sub-modules in the graph (Linear, GroupNorm32, QKVAttention) or a torch.nn container of
    # layers (a Sequential in_layers). A *block* has compute ops of its own (a ResBlock's residual
    # add) or only layers below it. So ResBlock.in_layers and mid_block.norm1 fold into their
    # block, while an up block's ResNets stay apart even though the up block has a cat of its own.
    direct: set[str] = set()
    children: dict[str, set[str]] = {}
    for _, a in g.nodes(data=True):
        if a["op"] not in ("placeholder", "output", "get_attr") and not a.get("view_op"):
            direct.add(a.get("module", ""))
        for path, _, _ in a.get("stack", []):
            lv = _levels(path)
            if len(lv) >= 2:
                children.setdefault(".".join(lv[:-1]), set()).add(".".join(lv))
    layer_memo: dict[str, bool] = {}

    def is_layer(path: str) -> bool:
        if path not in layer_memo:
            kids = children.get(path, set())
            q = qual.get(path)  # None: a path never called itself (a ModuleList, a slice's parent)
            container = q is None or q.startswith("torch.nn.modules.container.")
            layer_memo[path] = not kids or (container and all(is_layer(c) for c in kids))
        return layer_memo[path]

    def is_block(path: str) -> bool:
        return path in direct or all(is_layer(c) for c in children.get(path, ()))

    def block_of(path: str) -> str:
        lv = _levels(path)
        # the deepest enclosing layer (within depth + its layers) that is not part of a block
        cut = lv[:depth]
        while len(cut) >= 2 and is_layer(".".join(cut)) and is_block(".".join(cut[:-1])):
            cut = cut[:-1]
        return ".".join(cut)

    # Each group is a contiguous run of execution: when a module's own ops resume after one of
    # its sub-blocks ran (a Transformer's proj_out after its transformer_blocks, the cat before
    # each ResNet of an up block), they start a new run "path#2" instead of drawing an edge back
    # into the first run. Top-level ops form one run per stretch between blocks.
    key_of: dict[str, str] = {}
    base_of: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    runs: dict[str, int] = {}
    last: str | None = None
    deferred: list[str] = []
    for n, a in sorted(g.nodes(data=True), key=lambda na: na[1]["order"]):
        if a["op"] == "placeholder" and not a.get("param"):
            k = f"input:{n}"
        elif a["op"] == "output":
            k = "output"
        elif a["op"] == "get_attr" or a.get("param"):
            deferred.append(n)  # parameters join the block of their first consumer
            continue
        elif a.get("view_op") and not block_of(a.get("module", "")) and list(g.successors(n)):
            deferred.append(n)  # so do top-level reshapes (no one-node "view" blocks)
            continue
        else:
            base = block_of(a.get("module", ""))
            if base not in runs:
                runs[base] = 1
            elif last is not None and last != base and (base == "" or last.startswith(base + ".")):
                runs[base] += 1
            last = base
            if base == "":
                k = f"{TOP_LEVEL}#{runs[base]}"
            else:
                k = base if runs[base] == 1 else f"{base}#{runs[base]}"
            base_of[k] = base
        key_of[n] = k
        members.setdefault(k, []).append(n)
    for n in reversed(deferred):  # reversed: a chain of views resolves from its consumer end
        users = sorted(g.successors(n), key=lambda u: g.nodes[u]["order"])
        k = key_of.get(users[0]) if users else None
        if k is None:
            k = f"{TOP_LEVEL}#0"
            base_of[k] = ""
        key_of[n] = k
        members.setdefault(k, []).append(n)
    for k, ns in members.items():
        ns.sort(key=lambda x: g.nodes[x]["order"])
        attrs = [g.nodes[x] for x in ns]
        ops = Counter(a["target"] for a in attrs if a["op"] not in ("placeholder", "output") and not a.get("view_op"))
        pats: dict[str, dict[str, int]] = {}
        seen_sites: set[int] = set()
        for a in attrs:
            i = a.get("site")
            if i is None or i in seen_sites:
                continue
            seen_sites.add(i)
            d = pats.setdefault(a["pattern"], {"matched": 0, "rejected": 0})
            d["matched" if a["matched"] else "rejected"] += 1
        families = sorted({a["family"] for a in attrs if a.get("family") and a.get("matched")})
        fused = Counter(a["target"] for a in attrs if a.get("fused"))
        matched: bool | None = True if families else (False if pats else None)
        mtype = short.get(k, "")
        if k.startswith("input:"):
            kind, label = "input", k.split(":", 1)[1]
        elif k == "output":
            kind, label = "output", "output"
        elif k.startswith(TOP_LEVEL):
            kind, mtype = "group", TOP_LEVEL
            label = ", ".join(dict.fromkeys(a["target"] for a in attrs if not a.get("view_op"))) or "view"
            label = label if len(label) <= 40 else label[:37] + "..."
        else:
            kind, label = "group", k.replace("#", " (") + ")" if "#" in k else k
            mtype = short.get(base_of[k], "")
        last_shape = next((a["shape"] for a in reversed(attrs) if a.get("shape")), None)
        b.add_node(k, label=label, kind=kind, op=attrs[0]["op"] if kind != "group" else "group",
                   module=base_of.get(k, ""), module_type=mtype, n_nodes=len(ns), ops=dict(ops),
                   flops=sum(a.get("flops", 0) for a in attrs), patterns=pats, families=families,
                   fused_ops=dict(fused), matched=matched, shape=last_shape,
                   order=min(a["order"] for a in attrs), members=ns)
    for u, v, a in g.edges(data=True):
        ku, kv = key_of[u], key_of[v]
        if ku == kv:
            continue
        if b.has_edge(ku, kv):
            b.edges[ku, kv]["count"] += 1
        else:
            b.add_edge(ku, kv, count=1, shape=a.get("shape"))
    return b


# --------------------------------------------------------------------------- styling shared by DOT and SVG
def _fmt_flops(f: int) -> str:
    if f >= 1e9:
        return f"{f / 1e9:.2f} GFLOP"
    if f >= 1e6:
        return f"{f / 1e6:.1f} MFLOP"
    if f >= 1e3:
        return f"{f / 1e3:.0f} kFLOP"
    return f"{f} FLOP"


def _shape_str(shape: Any) -> str:
    from .report import format_shape

    return format_shape(shape) if shape is not None else ""


def _style(a: dict[str, Any]) -> dict[str, Any]:
    """fill, border, dashed, bold, shape for a node of either view."""
    kind = a.get("kind") or ("input" if a["op"] == "placeholder" else "output" if a["op"] == "output" else "node")
    if kind == "stub":
        return {"fill": "#ffffff", "border": "#a0a0a0", "dashed": True, "bold": False, "shape": "box", "stub": True}
    if kind in ("input", "output"):
        return {"fill": IO_COLORS[0], "border": IO_COLORS[1], "dashed": False, "bold": False, "shape": "ellipse"}
    matched = a.get("matched")
    if matched:
        fam = a.get("family") or (a.get("families") or ["fused"])[0]
        fill, border = family_colors(fam)
        return {"fill": fill, "border": border, "dashed": False,
                "bold": bool(a.get("fused") or a.get("fused_ops")), "shape": "box"}
    if matched is False:
        return {"fill": REJECTED_COLORS[0], "border": REJECTED_COLORS[1], "dashed": True, "bold": False, "shape": "box"}
    return {"fill": PLAIN_COLORS[0], "border": PLAIN_COLORS[1], "dashed": False, "bold": False, "shape": "box"}


def _label_lines(a: dict[str, Any]) -> list[str]:
    if a.get("kind") == "stub":
        return [a["label"]]
    if a.get("kind") in ("group", "input", "output"):
        if a["kind"] != "group":
            return [a["label"], _shape_str(a.get("shape"))] if a.get("shape") else [a["label"]]
        lines = [a["label"]]
        meta = []
        if a.get("module_type"):
            meta.append(a["module_type"])
        ops = a.get("ops", {})
        n_ops = sum(ops.values())
        if 0 < len(ops) <= 2 and n_ops <= 3 and a.get("module_type") != TOP_LEVEL:
            meta.append(", ".join(f"{k}" if c == 1 else f"{k} ×{c}" for k, c in ops.items()))
        else:
            meta.append(f"{n_ops} op" + ("" if n_ops == 1 else "s"))
        if a.get("flops"):
            meta.append(_fmt_flops(a["flops"]))
        lines.append(" · ".join(meta))
        for p, d in sorted(a.get("patterns", {}).items()):
            if d["matched"] and d["rejected"]:
                lines.append(f"{p} ×{d['matched']} (+{d['rejected']} rejected)")
            elif d["matched"]:
                lines.append(f"{p} ×{d['matched']}")
            else:
                lines.append(f"{p} ×{d['rejected']} rejected")
        for op, c in sorted(a.get("fused_ops", {}).items()):
            lines.append(f"{op.split('::')[-1]} ×{c}")
        if a.get("shape"):
            lines.append(_shape_str(a["shape"]))
        return lines
    if a["op"] in ("placeholder", "output"):
        return [a.get("name", a["op"]), _shape_str(a.get("shape"))] if a.get("shape") else [a.get("name", a["op"])]
    lines = [a["target"]]
    if a.get("shape"):
        lines.append(_shape_str(a["shape"]))
    return lines


def _tooltip(n: str, a: dict[str, Any]) -> str:
    if a.get("kind") == "stub":
        return f"value of {a['stub_of']} (edge drawn as a stub)" + (
            f": {_shape_str(a['shape'])}" if a.get("shape") else "")
    if a.get("kind") == "group":
        parts = [a["label"]]
        if a.get("module_type"):
            parts.append(f"type: {a['module_type']}")
        ops = ", ".join(f"{k} ×{v}" for k, v in sorted(a.get("ops", {}).items(), key=lambda kv: -kv[1])[:8])
        parts.append(f"ops: {ops}")
        if a.get("shape"):
            parts.append(f"out: {_shape_str(a['shape'])}")
        return "\n".join(parts)
    parts = [f"{n}: {a.get('target', '')}", f"module: {a.get('module') or TOP_LEVEL}"]
    if a.get("shape"):
        parts.append(f"shape: {_shape_str(a['shape'])} {a.get('dtype', '')}")
    if a.get("flops"):
        parts.append(_fmt_flops(a["flops"]))
    if a.get("pattern"):
        status = "matched" if a.get("matched") else f"rejected: {a.get('reason', '')}"
        parts.append(f"site #{a.get('site')} {a['pattern']}: {status}")
    return "\n".join(parts)


def _clusters(g: nx.DiGraph) -> list[dict[str, Any]]:
    """Clusters to draw: one per site (full view), or one per module that holds at least two
    blocks (block view; nested, ``parent`` names the enclosing cluster's id). Each cluster has
    ``id``, ``label``, ``members`` (every node inside, nested clusters' too), ``parent``,
    ``height`` (levels of clusters nested inside), ``fill``, ``border``, ``dashed``."""
    out: list[dict[str, Any]] = []
    if g.graph.get("view") == "blocks":
        inside: dict[str, list[str]] = {}
        for n, a in g.nodes(data=True):
            if a.get("kind") != "group" or not a.get("module"):
                continue
            lv = _levels(a["module"])
            for k in range(1, len(lv) + 1):
                inside.setdefault(".".join(lv[:k]), []).append(n)
        # a module is a cluster when it holds two blocks and is not just one block's own runs
        paths = [p for p, ns in inside.items()
                 if len(ns) >= 2 and any(g.nodes[m]["module"] != p for m in ns)]
        paths.sort(key=lambda p: (min(g.nodes[m]["order"] for m in inside[p]), len(_levels(p))))
        ids = {p: f"cluster_mod_{i}" for i, p in enumerate(paths)}
        for p in paths:
            lv = _levels(p)
            parent = next((".".join(lv[:k]) for k in range(len(lv) - 1, 0, -1) if ".".join(lv[:k]) in ids), None)
            out.append({"id": ids[p], "label": p, "members": inside[p], "parent": ids.get(parent) if parent else None,
                        "fill": "#fafafa", "border": "#c8c8c8", "dashed": False})
        heights = {c["id"]: 0 for c in out}
        for c in sorted(out, key=lambda c: -len(_levels(c["label"]))):
            if c["parent"]:
                heights[c["parent"]] = max(heights[c["parent"]], heights[c["id"]] + 1)
        for c in out:
            c["height"] = heights[c["id"]]
        return out
    by_site: dict[int, list[str]] = {}
    for n, a in g.nodes(data=True):
        if a.get("site") is not None:
            by_site.setdefault(a["site"], []).append(n)
    sites = g.graph.get("sites", [])
    for i, ns in sorted(by_site.items()):
        s = sites[i] if i < len(sites) else {"pattern": g.nodes[ns[0]].get("pattern", ""), "matched": True}
        if s["matched"]:
            fill, border = family_colors(s.get("family") or PATTERNS.get(s["pattern"], ""))
            label = f"#{i} {s['pattern']}"
        else:
            fill, border = "#f7f7f7", REJECTED_COLORS[1]
            label = f"#{i} {s['pattern']} (rejected)"
        out.append({"id": f"cluster_site_{i}", "label": label, "members": ns, "fill": _lighten(fill),
                    "border": border, "dashed": not s["matched"], "parent": None, "height": 0})
    return out


def _lighten(hex_color: str, f: float = 0.55) -> str:
    r, g_, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    r, g_, b = (int(c + (255 - c) * f) for c in (r, g_, b))
    return f"#{r:02x}{g_:02x}{b:02x}"


# --------------------------------------------------------------------------- DOT
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


# --------------------------------------------------------------------------- built-in SVG layout
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


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


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


# --------------------------------------------------------------------------- HTML
_SVG_STRIP = [
    (re.compile(r"<\?xml[^>]*\?>\s*"), ""),
    (re.compile(r"<!DOCTYPE[^>]*>\s*", re.S), ""),
    (re.compile(r"<!--.*?-->\s*", re.S), ""),
    (re.compile(r'\s+xmlns(:\w+)?="[^"]*"'), ""),
]


def _inline_svg(svg: str) -> str:
    """SVG text fit for inlining into HTML5: no XML prolog, doctype, comments or namespace URLs
    (the HTML parser puts ``<svg>`` in the SVG namespace by itself)."""
    for rx, rep in _SVG_STRIP:
        svg = rx.sub(rep, svg)
    return svg.strip()


_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 6px} h2{font-size:16px;margin:18px 0 6px}
.summary{color:#555;margin-bottom:8px}
.legend span.sw{display:inline-block;width:14px;height:12px;border:1px solid #888;border-radius:3px;
 vertical-align:middle;margin:0 4px 0 12px}
.graph{border:1px solid #ddd;overflow:auto;max-height:80vh;background:#fff}
.graph svg{display:block}
.tools button{margin-right:4px}
table{border-collapse:collapse;font-size:12px;margin-bottom:8px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left} th{background:#f3f3f3}
tr.rejected td{color:#777}
"""

_JS = """
(function(){
  var box=document.getElementById('graph'); var svg=box.querySelector('svg'); if(!svg) return;
  var w0=svg.getAttribute('width'), h0=svg.getAttribute('height');
  var W=parseFloat(w0)||svg.getBBox().width, H=parseFloat(h0)||svg.getBBox().height, s=1;
  function apply(){svg.setAttribute('width', W*s); svg.setAttribute('height', H*s);}
  document.getElementById('zin').onclick=function(){s*=1.25;apply();};
  document.getElementById('zout').onclick=function(){s/=1.25;apply();};
  document.getElementById('zfit').onclick=function(){s=Math.min(1,(box.clientWidth-4)/W);apply();};
  var f=document.getElementById('filter');
  if(f){f.oninput=function(){var q=f.value.toLowerCase();
    document.querySelectorAll('#sites tbody tr').forEach(function(r){
      r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});};}
})();
"""


def _legend(g: nx.DiGraph) -> str:
    fams = set()
    for _, a in g.nodes(data=True):
        if a.get("family") and a.get("matched"):
            fams.add(a["family"])
        fams.update(a.get("families", []))
    fams.update(PATTERNS.values())
    items = []
    for f in sorted(fams):
        fill, border = family_colors(f)
        items.append(f'<span class="sw" style="background:{fill};border-color:{border}"></span>{_e(f)} (matched)')
    items.append(f'<span class="sw" style="background:{REJECTED_COLORS[0]};border:1px dashed {REJECTED_COLORS[1]}">'
                 '</span>rejected site')
    items.append(f'<span class="sw" style="background:{PLAIN_COLORS[0]}"></span>not in a site')
    items.append('<span class="sw" style="background:#fff;border:2px solid #444"></span>fusediff op (bold border)')
    return '<div class="legend">Legend:' + "".join(items) + "</div>"


def _sites_html(g: nx.DiGraph, report: Any) -> str:
    if report is not None:
        headers, rows = report.sites_rows()
    else:
        headers = ["#", "module", "pattern", "shapes", "dtype", "status"]
        rows = [[s["index"], s["module"] or TOP_LEVEL, s["pattern"], s["shapes"], s["dtype"], s["status"]]
                for s in g.graph.get("sites", [])]
    if not rows:
        return "<p>(no sites)</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cls = ' class="rejected"' if str(r[-1]).startswith("rejected") else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    return (f'<p>Filter: <input id="filter" type="text" size="30" placeholder="module, pattern, reason"></p>'
            f'<table id="sites"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def write_html(g: nx.DiGraph, path: str | os.PathLike, report: Any = None, *, renderer: str = "auto",
               svg: str | None = None) -> str:
    """One self-contained HTML file: the SVG inline, a legend, the site table (and the report's
    pattern, cost and traffic tables when ``report`` is given). No external URLs.

    Args:
        svg: SVG text of ``g`` already rendered (e.g. read back from :func:`write_svg`'s file);
            rendered with ``renderer`` when None.

    Returns the renderer that drew the SVG (``"graphviz"`` or ``"builtin"``).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if svg is None:
        svg, used = _svg_text(g, renderer)
    else:
        used = "graphviz" if "Generated by graphviz" in svg[:2000] else "builtin"
    svg = _inline_svg(svg)
    blocks = g.graph.get("view") == "blocks"
    title = g.graph.get("title") or ("fusediff block view" if blocks else "fusediff graph")
    sites = g.graph.get("sites", [])
    matched = sum(1 for s in sites if s["matched"])
    summary = (f"{g.number_of_nodes()} {'blocks' if blocks else 'nodes'}, {g.number_of_edges()} edges; "
               f"{len(sites)} sites ({matched} matched, {len(sites) - matched} rejected); rendered with {used}")
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f'<div class="summary">{_e(summary)}</div>', _legend(g),
             '<p class="tools"><button id="zin">zoom +</button><button id="zout">zoom −</button>'
             '<button id="zfit">fit width</button> (hover a box for details)</p>',
             f'<div class="graph" id="graph">{svg}</div>']
    if report is not None:
        parts.append("<h2>Patterns</h2>" + report.counts_table("html"))
        parts.append("<h2>Cost per evaluation</h2>" + report.cost_table("html"))
        parts.append("<h2>DRAM traffic per evaluation (estimate, MB)</h2>" + report.traffic_table("html"))
    parts.append("<h2>Sites</h2>" + _sites_html(g, report))
    parts.append(f"<script>{_JS}</script></body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    log.info("visualize: wrote %s", path)
    return used


# --------------------------------------------------------------------------- one call
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
