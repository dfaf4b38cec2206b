"""Styling shared by the DOT and SVG writers: family colors, node styles, labels, tooltips, clusters.

Matched sites are filled with their family's color (GroupNorm blue, attention orange, GELU
green, Winograd conv pink, quantized ops purple), rejected sites are grey and dashed,
``fusediff::`` ops have a bold border. Clusters are the sites (full view) or the modules that
hold two or more blocks (block view).
"""
from __future__ import annotations

import html
from typing import Any

import networkx as nx

from ..sites import PATTERNS
from .blocks import TOP_LEVEL, _levels


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


def _fmt_flops(f: int) -> str:
    if f >= 1e9:
        return f"{f / 1e9:.2f} GFLOP"
    if f >= 1e6:
        return f"{f / 1e6:.1f} MFLOP"
    if f >= 1e3:
        return f"{f / 1e3:.0f} kFLOP"
    return f"{f} FLOP"


def _shape_str(shape: Any) -> str:
    from ..report import format_shape

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


def _e(s: Any) -> str:
    """``s`` escaped for SVG/HTML text and attributes."""
    return html.escape(str(s), quote=True)
