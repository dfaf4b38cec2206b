"""FX graph -> networkx graph: one node per FX node with its target, module, shape, cost and site.

:func:`to_networkx` is the first step of every picture; :func:`fused_op_family` names the family
of a ``fusediff::`` op (also used for exported ONNX graphs).
"""
from __future__ import annotations

from typing import Any, Sequence

import networkx as nx
import torch.fx as fx

from .. import costs
from ..canonicalize import clean_module_path
from ..sites import PATTERNS, Site


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
    from ..report import format_shapes, site_status

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
