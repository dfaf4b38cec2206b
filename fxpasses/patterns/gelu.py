"""GELU (erf, tanh) and GEGLU.

    # h, g = chunk(x, 2, -1); h * gelu(g)            -> fusediff.geglu(x, approximate)
    # h, g = chunk(linear(x, W, b), 2, -1); h*gelu(g) -> fusediff.linear_geglu(x, W, b, approximate)   (opt-in)
    # gelu(x)                                        -> fusediff.gelu(x, approximate)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..canonicalize import canon, is_op, make_call, tensor_meta, through
from ..config import RewriteConfig
from ..sites import Plan, Site


@dataclass
class GeluPlan(Plan):
    """GELU/GEGLU rewrite: the input, the node whose users are rerouted, the linear fused into
    ``linear_geglu`` (None: plain ``geglu``/``gelu``) and the GELU approximation."""

    x: fx.Node
    out: fx.Node
    linear: fx.Node | None
    approx: str


def _geglu(gelu: fx.Node):
    """Return (mul, chunk, x, getitems) if ``gelu`` is the gate of a GEGLU, else None."""
    gate = through(canon(gelu).arg("input"))
    if not is_op(gate, "getitem"):
        return None
    split = canon(gate).arg("input")
    if not is_op(split, "chunk", "split"):
        return None
    sc = canon(split)
    x = sc.arg("input")
    xm = tensor_meta(x)
    if xm is None:
        return None
    dim = sc.arg("dim") % xm.dim()
    if dim != xm.dim() - 1:
        return None
    if sc.op == "chunk" and sc.arg("chunks") != 2:
        return None
    if sc.op == "split":
        ss = sc.arg("split_size")
        half = xm.shape[-1] // 2
        if not (ss == half or (isinstance(ss, (list, tuple)) and list(ss) == [half, half])):
            return None
    if canon(gate).arg("index") != 1 or len(gelu.users) != 1:
        return None
    mul = next(iter(gelu.users))
    if not is_op(mul, "mul"):
        return None
    mc = canon(mul)
    other = mc.arg("other") if mc.arg("input") is gelu else mc.arg("input")
    other = through(other)
    if not (is_op(other, "getitem") and canon(other).arg("input") is split and canon(other).arg("index") == 0):
        return None
    return mul, split, x, [other, gate]


def find(gm: fx.GraphModule, cfg: RewriteConfig) -> list[Site]:
    from ...kernels import geglu as kg

    sites: list[Site] = []
    for n in gm.graph.nodes:
        if not is_op(n, "gelu"):
            continue
        approx = canon(n).arg("approximate", "none")
        m = _geglu(n)
        if m is not None:
            mul, split, x, items = m
            xm = tensor_meta(x)
            split_users_ok = all(u in items for u in split.users) and all(len(it.users) == 1 for it in items)
            prod = x if is_op(x, "linear") and len(x.users) == 1 else None
            site = Site("geglu", [split.name] + [it.name for it in items] + [n.name, mul.name], anchor=n.name,
                        module_path=n.meta.get("fusediff_module", ""), shapes={"x": tuple(xm.shape)},
                        dtype=str(xm.dtype), attrs={"approximate": approx, "producer": "linear" if prod is not None else "other"})
            why = cfg.rejects("geglu", xm.dtype, site.module_path)
            if why is None and not split_users_ok:
                why = "the split halves are used elsewhere"
            if why is None:
                ok, r = kg.geglu_supported(tuple(xm.shape), xm.dtype)
                why = None if ok else r
            use_linear = False
            if why is None and cfg.geglu_fuse_linear and prod is not None:
                lc = canon(prod)
                wm, im = tensor_meta(lc.arg("weight")), tensor_meta(lc.arg("input"))
                if wm is not None and im is not None:
                    ok, r = kg.linear_geglu_supported(tuple(im.shape), tuple(wm.shape), im.dtype)
                    use_linear = ok
                    if not ok:
                        site.reason = f"linear not fused: {r}"
            if why is not None:
                site.matched, site.reason = False, why
            site.attrs["fused_linear"] = use_linear
            site.plan = GeluPlan(x, mul, prod if use_linear else None, approx)
            sites.append(site)
            continue
        xm = tensor_meta(canon(n).arg("input"))
        site = Site("gelu", [n.name], anchor=n.name, module_path=n.meta.get("fusediff_module", ""),
                    shapes={"x": tuple(xm.shape) if xm is not None else ()},
                    dtype=str(xm.dtype) if xm is not None else "", attrs={"approximate": approx})
        why = "no shape metadata" if xm is None else cfg.rejects("gelu", xm.dtype, site.module_path)
        if why is None and approx not in ("none", "tanh"):
            why = f"approximate={approx!r}"
        if why is not None:
            site.matched, site.reason = False, why
        site.plan = GeluPlan(canon(n).arg("input"), n, None, approx)
        sites.append(site)
    return sites


def rewrite(gm: fx.GraphModule, site: Site) -> None:
    from ...kernels import geglu  # noqa: F401  (registers fusediff::gelu / geglu / linear_geglu)

    p = site.plan
    assert isinstance(p, GeluPlan), site
    g = gm.graph
    out = p.out
    with g.inserting_before(out):
        if site.pattern == "gelu":
            # gelu(x) -> fusediff.gelu(x, approximate)
            new = make_call(g, torch.ops.fusediff.gelu.default, (p.x, p.approx), like=out, val_=out.meta.get("val"))
        elif p.linear is not None:
            lc = canon(p.linear)
            # chunk(linear(x, W, b), 2)[0] * gelu(chunk(..)[1]) -> fusediff.linear_geglu(x, W, b)
            new = make_call(g, torch.ops.fusediff.linear_geglu.default,
                            (lc.arg("input"), lc.arg("weight"), lc.arg("bias"), p.approx), like=out,
                            val_=out.meta.get("val"))
        else:
            # h, g = chunk(x, 2, -1); h * gelu(g) -> fusediff.geglu(x)
            new = make_call(g, torch.ops.fusediff.geglu.default, (p.x, p.approx), like=out, val_=out.meta.get("val"))
    out.replace_all_uses_with(new)
    site.rewritten = True
