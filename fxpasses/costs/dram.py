"""DRAM traffic: bytes each node reads and writes, cache traffic, and the unfused-vs-fused model.

:func:`traffic` gives the MoDiff paper's Table 1 columns (weights, activations, outputs, cache
read, cache write) for one evaluation, unfused and fused by the matched sites (see the
:mod:`fxpasses.costs` docstring for the model and its limits).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import torch.fx as fx

from .counts import _base, is_weight
from .meta import _arg, _submodule, output_bytes, target_name, tensors_of, value
from .ops import is_compute, is_view, op_cost

log = logging.getLogger("fusediff.fxpasses")


def _input_bytes(i: fx.Node) -> int:
    """Bytes a consumer reads from input node ``i`` (a view reads at most its base)."""
    b = output_bytes(i)
    base = _base(i)
    if base is not i and isinstance(base, fx.Node):
        bb = output_bytes(base)
        if bb:
            b = min(b, bb)
    return b


def _module_param_bytes(node: fx.Node) -> int:
    mod = _submodule(node)
    if mod is None:
        return 0
    return sum(p.numel() * p.element_size() for p in mod.parameters())


def _cache_args(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """``(mutated, unread)`` cache arguments of a custom op: arguments the schema marks as
    written (MoDiff's ``o_hat``/``a_hat``: read and written every step) and read-only ``*_hat``
    arguments (used only on a trajectory's first step, so not read in the steady state)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or getattr(node.target, "namespace", "aten") in ("aten", "prims"):
        return [], []  # in-place aten ops (add_, copy_) are ordinary reads and writes
    mutated, unread = [], []
    for i, a in enumerate(schema.arguments):
        v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
        if not isinstance(v, fx.Node):
            continue
        if a.alias_info is not None and a.alias_info.is_write:
            mutated.append(v)
        elif a.name.endswith("_hat"):
            unread.append(v)
    return mutated, unread


def node_cache_bytes(node: fx.Node) -> tuple[int, int]:
    """``(read, write)`` bytes of cache traffic (MoDiff's â / ô caches) of one call.

    ``node.meta["fusediff_cache_bytes"]`` when set; otherwise every tensor argument the op's
    schema marks as mutated is read and written once.
    """
    meta = node.meta.get("fusediff_cache_bytes")
    if meta is not None:
        return int(meta[0]), int(meta[1])
    mutated, _ = _cache_args(node)
    b = sum(output_bytes(m) for m in dict.fromkeys(mutated))
    return b, b


def _reads(node: fx.Node) -> list[tuple[fx.Node, int]]:
    """``(input node, bytes)`` for each distinct tensor a compute node reads (cache arguments
    excluded, see :func:`node_cache_bytes`). Several views of one tensor
    (``q = k = v = x[:, None]``) are read once."""
    out, seen = [], set()
    mutated, unread = _cache_args(node)
    skip = set(mutated) | set(unread)
    if target_name(node) == "baddbmm" and _arg(node, 3, "beta", 1) == 0 and isinstance(node.args[0], fx.Node):
        skip.add(node.args[0])  # beta=0: the input (diffusers passes torch.empty) is never read
    for i in node.all_input_nodes:
        if i in skip:
            continue
        b = _input_bytes(i)
        if not b:
            continue
        key = (_base(i), b)
        if key in seen:
            continue
        seen.add(key)
        out.append((i, b))
    return out


def _counts_traffic(node: fx.Node) -> bool:
    """Compute nodes that touch memory: not views, and not tensor-less bookkeeping calls
    (export's ``_guards_fn``, asserts) that no cost entry knows."""
    if not is_compute(node):
        return False
    return op_cost(node) is not None or bool(tensors_of(value(node)))


def node_bytes(node: fx.Node) -> tuple[int, int]:
    """``(read, written)`` bytes of one call: each distinct tensor input (weights included)
    read once, every output written once, plus cache traffic (:func:`node_cache_bytes`).
    Views, placeholders, get_attr and output cost 0."""
    if not _counts_traffic(node):
        return 0, 0
    read = sum(b for _, b in _reads(node))
    if node.op == "call_module":
        read += _module_param_bytes(node)
    cr, cw = node_cache_bytes(node)
    return read + cr, output_bytes(node) + cw


def fused_away_bytes(node: fx.Node) -> tuple[int, int]:
    """``(read, write)`` bytes the unfused equivalent of a fused op would add (intermediates
    the fused kernel keeps on chip): ``node.meta["fusediff_fused_away"]`` when a rewrite set it
    (it knows what it replaced, e.g. an explicit attention's score matrix), else the op's
    :attr:`OpCost.fused_away`, else ``(0, 0)``."""
    meta = node.meta.get("fusediff_fused_away")
    if meta is not None:
        return int(meta[0]), int(meta[1])
    c = op_cost(node)
    if c is None or c.fused_away is None:
        return 0, 0
    try:
        r, w = c.fused_away(node)
    except Exception as e:  # metadata we cannot read: add nothing, say why
        log.debug("costs: fused-away bytes of %s not counted: %s", node.name, e)
        return 0, 0
    return int(r), int(w)


TRAFFIC_COLUMNS: tuple[str, ...] = ("weights", "activations", "outputs", "cache_read", "cache_write")


def _real_users(n: fx.Node) -> Iterable[fx.Node]:
    """Consumers of ``n``, looking forward through views."""
    stack, seen = list(n.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if is_view(u):
            stack.extend(u.users)
        else:
            yield u


def traffic(gm: fx.GraphModule, sites: Sequence[Any] = ()) -> dict[str, Any]:
    """Estimated DRAM bytes of one evaluation of ``gm``, unfused vs fused by the matched sites.

    Args:
        gm: a graph whose nodes carry ``meta["val"]``; normally the canonical graph the sites
            were found in (site node names that are not in the graph are ignored).
        sites: :class:`~fxpasses.sites.Site` objects; only ``matched`` ones fuse.

    Returns:
        ``{"unfused": {col: bytes}, "fused": {col: bytes}, "ratio": fused/unfused,
        "saved_bytes": int, "fused_sites": int, "per_site_saved": {site index: bytes}}``
        where ``col`` is one of :data:`TRAFFIC_COLUMNS` or ``"total"``. ``per_site_saved``
        attributes each byte kept on chip to the lowest-indexed site that keeps it.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    member: dict[fx.Node, set[int]] = {}
    used_sites = 0
    for si, s in enumerate(sites):
        if not getattr(s, "matched", False):
            continue
        nodes = [by_name[x] for x in getattr(s, "nodes", ()) if x in by_name]
        if len(nodes) < len(getattr(s, "nodes", ())):
            log.debug("traffic: site %s at %r names nodes not in this graph", s.pattern, s.module_path)
        if nodes:
            used_sites += 1
        for n in nodes:
            member.setdefault(n, set()).add(si)

    unf = {c: 0 for c in TRAFFIC_COLUMNS}
    fus = {c: 0 for c in TRAFFIC_COLUMNS}
    per_site: dict[int, int] = {}
    for n in gm.graph.nodes:
        if not _counts_traffic(n):
            continue
        mine = member.get(n, set())
        for i, b in _reads(n):
            col = "weights" if is_weight(i) else "activations"
            unf[col] += b
            src = _base(i)
            shared = mine & member.get(src, set()) if mine and isinstance(src, fx.Node) else set()
            if shared:  # produced inside the same fused site: stays on chip
                k = min(shared)
                per_site[k] = per_site.get(k, 0) + b
                continue
            fus[col] += b
        if n.op == "call_module":
            wb = _module_param_bytes(n)
            unf["weights"] += wb
            fus["weights"] += wb
        ob = output_bytes(n)
        unf["outputs"] += ob
        if mine and all(mine & member.get(u, set()) for u in _real_users(n)):
            k = min(mine)
            per_site[k] = per_site.get(k, 0) + ob
        else:
            fus["outputs"] += ob
        cr, cw = node_cache_bytes(n)
        for d in (unf, fus):
            d["cache_read"] += cr
            d["cache_write"] += cw
        away = fused_away_bytes(n)
        unf["activations"] += away[0]
        unf["outputs"] += away[1]
    unf["total"] = sum(unf[c] for c in TRAFFIC_COLUMNS)
    fus["total"] = sum(fus[c] for c in TRAFFIC_COLUMNS)
    return {
        "unfused": unf,
        "fused": fus,
        "ratio": (fus["total"] / unf["total"]) if unf["total"] else 1.0,
        "saved_bytes": unf["total"] - fus["total"],
        "fused_sites": used_sites,
        "per_site_saved": per_site,
    }
