"""GroupNorm -> [FiLM] -> [SiLU] -> [dropout] -> [resample] -> Conv/Linear.

Rewrites (each guarded by a metadata-only constraint check, counted in the site list):

    # group_norm(x) -> silu                         -> fusediff.group_norm_silu(x, w, b, -, -, G, eps, True)
    # group_norm(x) * (1 + scale) + shift -> silu   -> fusediff.group_norm_silu(x, w, b, scale, shift, G, eps, True)
    # group_norm(x) * s + shift -> silu             -> fusediff.group_norm_silu(x, w, b, s - 1, shift, G, eps, True)
    # group_norm(x.float()).to(x.dtype) -> silu     -> fusediff.group_norm_silu(x, ...)   (GroupNorm32 upcast)
    # group_norm(x)  (no SiLU: attention / proj_in) -> fusediff.group_norm_silu(x, w, b, -, -, G, eps, False)

SiLU and FiLM are matched by their canonical readings (canonicalize.read_spellings), so
``x * sigmoid(x)``, ``sigmoid(x) * x``, ``addcmul(shift, x, 1 + scale)`` and ``x * scale + shift``
fuse like ``silu(x)`` and ``x * (1 + scale) + shift``.

The convolution (or linear proj_in) that consumes the result is recorded as the site's
``consumer`` (conv3x3, conv1x1, conv3x3/s2, resample+conv3x3, linear, other, multi) for the
report and for the MoDiff pass, which also replaces that consumer.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..canonicalize import canon, forward_chain, is_op, make_call, reading, spanned, tensor_meta, through
from ..config import RewriteConfig
from ..sites import Plan, Site


@dataclass
class GroupNormPlan(Plan):
    """The nodes a GroupNorm rewrite reads: kernel input, the group_norm, the region's last node,
    FiLM scale/shift (``plus_one``: the graph computes ``1 + scale``; else ``scale`` already has the
    one folded in) and eps (a number, or a graph input under ``dynamic=True``)."""

    input: fx.Node
    gn: fx.Node
    out: fx.Node
    scale: fx.Node | None
    shift: fx.Node | None
    plus_one: bool
    eps: Any

_VIEWS = ("view", "permute", "transpose", "contiguous", "cast")


def _const(x) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Number):
        return float(x)
    return None


def _film(cur: fx.Node, x_meta: torch.Tensor | None):
    """The FiLM reading that takes ``cur`` as its input (any spelling): (region, scale, shift, plus_one) or None."""
    if len(cur.users) != 1 or x_meta is None:
        return None
    u = next(iter(cur.users))
    for n in [u] + ([next(iter(u.users))] if len(u.users) == 1 else []):
        r = reading(n, "film")
        if r is None or r.arg("input") is not cur:
            continue
        scale, shift = r.arg("scale"), r.arg("shift")
        # Kernel takes (N, C) scale/shift: they must be (N, C, 1, ...) with x's N and C.
        want = (x_meta.shape[0], x_meta.shape[1]) + (1,) * (x_meta.dim() - 2)
        for t in (scale, shift):
            m = tensor_meta(t)
            if m is None or tuple(m.shape) != tuple(want):
                return None
        return spanned(n, "film"), scale, shift, bool(r.arg("plus_one"))
    return None


def _silu_of(cur: fx.Node) -> tuple[fx.Node, list[fx.Node], int] | None:
    """The node reading as ``silu(cur)`` (any spelling): (node, its region, other users of cur) or None."""
    for u in cur.users:
        for n in [u] + list(u.users):
            r = reading(n, "silu")
            if r is not None and r.arg("input") is cur:
                region = spanned(n, "silu")
                return n, region, len(set(cur.users) - set(region))
    return None


def _consumer(n: fx.Node) -> str:
    users = list(n.users)
    if len(users) != 1:
        return f"multi({len(users)})" if users else "none"
    u = users[0]
    hops = 0
    resample = ""
    while is_op(u, *_VIEWS, "interpolate", "avg_pool2d") and len(u.users) == 1 and hops < 6:
        if is_op(u, "interpolate", "avg_pool2d"):
            resample = "resample+"
        u = next(iter(u.users))
        hops += 1
    if is_op(u, "conv"):
        w = tensor_meta(canon(u).arg("weight"))
        stride = canon(u).arg("stride")
        s = stride if isinstance(stride, int) else (stride[0] if stride else 1)
        k = "x".join(str(d) for d in w.shape[2:]) if w is not None else "?"
        return f"{resample}conv{k}" + (f"/s{s}" if s != 1 else "")
    if is_op(u, "linear"):
        return resample + "linear"
    return resample + "other"


def find(gm: fx.GraphModule, cfg: RewriteConfig) -> list[Site]:
    """Every GroupNorm in ``gm`` becomes a site (matched, or rejected with a reason)."""
    from ...kernels import groupnorm as kgn

    sites: list[Site] = []
    for gn in gm.graph.nodes:
        if not is_op(gn, "group_norm"):
            continue
        c = canon(gn)
        x = c.arg("input")
        x0 = through(x)
        xm, x0m = tensor_meta(x), tensor_meta(x0)
        region = [gn]
        reasons: list[str] = []
        attrs: dict = {"silu": False, "film": False, "upcast": False}
        # GroupNorm32: .float() -> group_norm -> .type(x.dtype)
        post = forward_chain(gn)
        region += post
        cur = post[-1] if post else gn
        film = _film(cur, xm) if cfg.fuse_film else None
        scale = shift = None
        plus_one = True
        if film is not None:
            film_region, scale, shift, plus_one = film
            region += film_region
            cur = film_region[-1]
            attrs["film"] = True
            post = forward_chain(cur)
            region += post
            cur = post[-1] if post else cur
        silu = _silu_of(cur)
        if cfg.fuse_silu and silu is not None and silu[2] == 0:
            s, silu_region, _ = silu
            region += silu_region
            attrs["silu"] = True
            post = forward_chain(s)
            region += post
            cur = post[-1] if post else s
        elif silu is not None:
            reasons.append(f"output has {silu[2] + 1} users: SiLU left unfused, GroupNorm fused alone")
        out_meta = tensor_meta(cur)
        # Absorb the upcast only when the region ends in x's own dtype again.
        kin = x
        if cfg.absorb_upcast and x0 is not x and x0m is not None and out_meta is not None \
                and x0m.dtype == out_meta.dtype:
            kin = x0
            attrs["upcast"] = True
        kin_m = tensor_meta(kin)
        attrs["consumer"] = _consumer(cur)
        attrs["num_groups"] = c.arg("num_groups")
        site = Site(
            pattern="groupnorm_silu" if attrs["silu"] else "groupnorm",
            nodes=[n.name for n in region],
            anchor=gn.name,
            module_path=gn.meta.get("fusediff_module", ""),
            shapes={"x": tuple(kin_m.shape) if kin_m is not None else ()},
            dtype=str(kin_m.dtype) if kin_m is not None else "",
            attrs=attrs,
        )
        # ---- constraint checks (tensor metadata only)
        eps, G = c.arg("eps"), c.arg("num_groups")
        why = "no shape metadata for the input" if kin_m is None else \
            cfg.rejects("groupnorm", kin_m.dtype, site.module_path)
        if why is None:
            if not isinstance(G, int):
                why = "num_groups is not a constant"
            elif not isinstance(eps, fx.Node) and _const(eps) is None:
                why = f"eps {eps!r} is not a number"
            elif out_meta is None or out_meta.dtype != kin_m.dtype:
                why = "region output dtype differs from the kernel's input dtype"
            else:
                why = next((f"{p} is not a tensor" for p in ("weight", "bias")
                            if c.arg(p) is not None and not isinstance(c.arg(p), fx.Node)), None)
        if why is None:
            ok, r = kgn.group_norm_silu_kernel_supported(tuple(kin_m.shape), kin_m.dtype, G)
            why = None if ok else r
        if why is not None:
            site.matched = False
            site.reason = why
        else:
            site.reason = "; ".join(reasons)
        # eps may be a graph input under dynamic=True (dynamo lifts float attributes): pass it through.
        site.plan = GroupNormPlan(kin, gn, cur, scale, shift, plus_one, eps if isinstance(eps, fx.Node) else _const(eps))
        sites.append(site)
    return sites


def rewrite(gm: fx.GraphModule, site: Site) -> None:
    """Apply one matched site: insert the fused op, reroute users, leave dead nodes to DCE."""
    from ...kernels import groupnorm  # noqa: F401  (registers fusediff::group_norm_silu)

    p = site.plan
    assert isinstance(p, GroupNormPlan), site
    gn, out = p.gn, p.out
    c = canon(gn)
    g = gm.graph
    with g.inserting_before(out):
        scale = shift = None
        if p.scale is not None:
            scale = make_call(g, torch.flatten, (p.scale, 1), like=gn)
            shift = make_call(g, torch.flatten, (p.shift, 1), like=gn)
            if not p.plus_one:  # x * s + shift == x * (1 + (s - 1)) + shift: the kernel's FiLM form
                scale = make_call(g, torch.sub, (scale, 1.0), like=gn)
        # group_norm(x)[*(1+scale)+shift][->silu] -> fusediff.group_norm_silu(x, w, b, scale, shift, G, eps, silu)
        new = make_call(
            g, torch.ops.fusediff.group_norm_silu.default,
            (p.input, c.arg("weight"), c.arg("bias"), scale, shift, int(c.arg("num_groups")),
             p.eps if isinstance(p.eps, fx.Node) else float(p.eps), bool(site.attrs["silu"])),
            like=gn, val_=out.meta.get("val"),
        )
    out.replace_all_uses_with(new)
    site.rewritten = True
