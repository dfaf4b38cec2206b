"""The matcher: find every site in a canonical graph, rewrite the matched ones, clean up.

These are the find and rewrite steps of the one pass pipeline (:mod:`fxpasses.pipeline`), which
every entry point runs; nothing else calls them.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from .config import RewriteConfig
from .patterns import attention, conv, gelu, groupnorm
from .sites import Site

FAMILIES = {"groupnorm": groupnorm, "attention": attention, "gelu": gelu, "conv": conv}


def find_sites(gm: fx.GraphModule, cfg: RewriteConfig | None = None) -> list[Site]:
    """Find every candidate site in an already canonicalized graph (no changes made)."""
    cfg = cfg or RewriteConfig()
    sites: list[Site] = []
    for mod in FAMILIES.values():
        sites.extend(mod.find(gm, cfg))
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    sites.sort(key=lambda s: order.get(s.anchor, 0))
    return sites


def _owner(site: Site):
    return {"gelu": gelu, "geglu": gelu, "winograd": conv}.get(site.pattern) or FAMILIES[site.family]


def has_side_effect(node: fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing reads its result.

    FX's own purity test misses in-place tensor methods and functions in a dynamo graph
    (``self.primed.fill_(True)``, ``buf.copy_(x)``, ``x[i] = v``): their result is unused, their effect
    is the point (MoDiff's trajectory flag and caches). Dropping them changes results silently.
    """
    if node.is_impure():
        return True
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        if node.target is operator.setitem:
            return True
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return name.endswith("_") and not name.startswith("_")


def rewrite_sites(gm: fx.GraphModule, sites: list[Site]) -> None:
    """Rewrite the matched ``sites`` (found on ``gm`` by :func:`find_sites`) and clean up the graph."""
    for s in sites:
        if s.matched and not s.rewritten:
            _owner(s).rewrite(gm, s)
    # Erase the replaced nodes explicitly: DCE keeps ops it considers impure (aten SDPA).
    by_name = {n.name: n for n in gm.graph.nodes}
    for s in sites:
        if s.rewritten:
            for name in reversed(s.nodes):
                n = by_name.get(name)
                if n is not None and not n.users:
                    gm.graph.erase_node(n)
                    del by_name[name]
    gm.graph.eliminate_dead_code(is_impure_node=has_side_effect)
    gm.graph.lint()
    gm.recompile()
    fill_meta(gm)


def fill_meta(gm: fx.GraphModule) -> int:
    """Give nodes inserted by the rewrites a ``meta["val"]`` (fake tensor) from their inputs'.

    Reports and visualization read shapes from it. Best effort: a node whose inputs have no
    metadata, or whose target fails under fake tensors, is left without. Returns nodes filled.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    mode = next((n.meta["val"].fake_mode for n in gm.graph.nodes
                 if isinstance(n.meta.get("val"), FakeTensor)), None)
    if mode is None:
        return 0
    filled = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or "val" in n.meta:
            continue
        missing = []

        def conv(a):
            if isinstance(a, fx.Node):
                v = a.meta.get("val")
                if v is None:
                    missing.append(a)
                return v
            return a

        args = fx.node.map_aggregate(n.args, conv)
        kwargs = fx.node.map_aggregate(n.kwargs, conv)
        if missing:
            continue
        try:
            with mode:
                n.meta["val"] = n.target(*args, **kwargs)
            filled += 1
        except Exception:  # noqa: BLE001 - metadata is best effort
            continue
    return filled
