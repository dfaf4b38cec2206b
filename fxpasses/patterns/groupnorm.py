"""GroupNorm -> [FiLM] -> [SiLU] -> [dropout] -> [resample] -> Conv/Linear.

Rewrites (each guarded by a metadata-only constraint check, counted in the site list):

    # group_norm(x) -> silu                         -> fusediff.group_norm_silu(x, w, b, -, -, G, eps, True)
    # group_norm(x) * (1 + scale) + shift -> silu   -> fusediff.group_norm_silu(x, w, b, scale, shift, G, eps, True)
    # group_norm(x.float()).to(x.dtype) -> silu     -> fusediff.group_norm_silu(x, ...)   (GroupNorm32 upcast)
    # group_norm(x)  (no SiLU: attention / proj_in) -> fusediff.group_norm_silu(x, w, b, -, -, G, eps, False)

The convolution (or linear proj_in) that consumes the result is recorded as the site's
``consumer`` (conv3x3, conv1x1, conv3x3/s2, resample+conv3x3, linear, other, multi) for the
report and for the MoDiff pass, which also replaces that consumer.
"""
from __future__ import annotations

import numbers

import torch
import torch.fx as fx

from ..canonicalize import canon, forward_chain, is_op, make_call, tensor_meta, through
from ..config import RewriteConfig
from ..sites import Site

_VIEWS = ("view", "permute", "transpose", "contiguous", "cast")


def _const(x) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Number):
        return float(x)
    return None


def _film(cur: fx.Node, x_meta: torch.Tensor | None):
    """Match ``cur * (1 + scale) + shift``; return (mul, one_plus, add, scale, shift) or None."""
    if len(cur.users) != 1:
        return None
    mul = next(iter(cur.users))
    if not is_op(mul, "mul"):
        return None
    c = canon(mul)
    other = c.arg("other") if c.arg("input") is cur else c.arg("input")
    if not is_op(other, "add"):
        return None
    oc = canon(other)
    a, b = oc.arg("input"), oc.arg("other")
    if _const(a) == 1.0 and isinstance(b, fx.Node):
        scale = b
    elif _const(b) == 1.0 and isinstance(a, fx.Node):
        scale = a
    else:
        return None
    if len(mul.users) != 1:
        return None
    add = next(iter(mul.users))
    if not is_op(add, "add"):
        return None
    ac = canon(add)
    shift = ac.arg("other") if ac.arg("input") is mul else ac.arg("input")
    if not isinstance(shift, fx.Node):
        return None
    # Kernel takes (N, C) scale/shift: they must be (N, C, 1, ...) with x's N and C.
    for t in (scale, shift):
        m = tensor_meta(t)
        if m is None or x_meta is None:
            return None
        want = (x_meta.shape[0], x_meta.shape[1]) + (1,) * (x_meta.dim() - 2)
        if tuple(m.shape) != tuple(want):
            return None
    return mul, other, add, scale, shift


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
        if film is not None:
            mul, one_plus, add, scale, shift = film
            region += [mul, add]
            cur = add
            attrs["film"] = True
            post = forward_chain(cur)
            region += post
            cur = post[-1] if post else cur
        silu_users = [u for u in cur.users if is_op(u, "silu")]
        if cfg.fuse_silu and len(cur.users) == 1 and silu_users:
            s = silu_users[0]
            region.append(s)
            attrs["silu"] = True
            post = forward_chain(s)
            region += post
            cur = post[-1] if post else s
        elif silu_users:
            reasons.append(f"output has {len(cur.users)} users: SiLU left unfused, GroupNorm fused alone")
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
        why = None
        if kin_m is None:
            why = "no shape metadata for the input"
        elif not isinstance(G, int):
            why = "num_groups is not a constant"
        elif not isinstance(eps, fx.Node) and _const(eps) is None:
            why = f"eps {eps!r} is not a number"
        elif not cfg.allows_dtype(kin_m.dtype):
            why = f"dtype {kin_m.dtype} not enabled in config"
        elif out_meta is None or out_meta.dtype != kin_m.dtype:
            why = "region output dtype differs from the kernel's input dtype"
        elif cfg.excluded(site.module_path):
            why = "module excluded by config"
        elif "groupnorm" not in cfg.patterns:
            why = "pattern family disabled in config"
        else:
            for p in ("weight", "bias"):
                v = c.arg(p)
                if v is not None and not isinstance(v, fx.Node):
                    why = f"{p} is not a tensor"
            if why is None:
                ok, r = kgn.group_norm_silu_kernel_supported(tuple(kin_m.shape), kin_m.dtype, G)
                if not ok:
                    why = r
        if why is not None:
            site.matched = False
            site.reason = why
        else:
            site.reason = "; ".join(reasons)
        # eps may be a graph input under dynamic=True (dynamo lifts float attributes): pass it through.
        site.attrs["_plan"] = {"input": kin, "gn": gn, "out": cur, "scale": scale, "shift": shift,
                               "eps": eps if isinstance(eps, fx.Node) else _const(eps)}
        sites.append(site)
    return sites


def rewrite(gm: fx.GraphModule, site: Site) -> None:
    """Apply one matched site: insert the fused op, reroute users, leave dead nodes to DCE."""
    from ...kernels import groupnorm  # noqa: F401  (registers fusediff::group_norm_silu)

    p = site.attrs["_plan"]
    gn, out = p["gn"], p["out"]
    c = canon(gn)
    g = gm.graph
    with g.inserting_before(out):
        scale = shift = None
        if p["scale"] is not None:
            scale = make_call(g, torch.flatten, (p["scale"], 1), like=gn)
            shift = make_call(g, torch.flatten, (p["shift"], 1), like=gn)
        # group_norm(x)[*(1+scale)+shift][->silu] -> fusediff.group_norm_silu(x, w, b, scale, shift, G, eps, silu)
        new = make_call(
            g, torch.ops.fusediff.group_norm_silu.default,
            (p["input"], c.arg("weight"), c.arg("bias"), scale, shift, int(c.arg("num_groups")),
             p["eps"] if isinstance(p["eps"], fx.Node) else float(p["eps"]), bool(site.attrs["silu"])),
            like=gn, val_=out.meta.get("val"),
        )
    out.replace_all_uses_with(new)
    site.rewritten = True
