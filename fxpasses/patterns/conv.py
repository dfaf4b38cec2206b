"""3x3 convolution -> Winograd F(4x4, 3x3) (paper §3.3), only where a per-shape check says it pays.

    # conv2d(x, W, b, stride=1, padding=p, 3x3) -> fusediff.winograd_conv2d(x, U, b, p),  U = G W G^T

``U`` is computed once at rewrite time when the weight is a constant of the graph (``get_attr``:
the ``optimize()``/export path) and stored as a buffer of the GraphModule; when the weight is a
graph input (dynamo's backend graph) a ``winograd_weight_transform`` node computes it per call.
A Winograd site snapshots its weight in the first case: re-run ``optimize()`` after swapping
weights. ``RewriteConfig.winograd``: ``"auto"`` (fxpasses.costs.winograd.winograd_pays decides; never
on CPU), ``"off"``, ``"force"`` (every eligible 3x3 conv; for tests and ablations).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..canonicalize import canon, is_op, make_call, tensor_meta
from ..config import RewriteConfig
from ..sites import Plan, Site


@dataclass
class ConvPlan(Plan):
    """The conv2d node a Winograd rewrite replaces."""

    node: fx.Node


def _ints(v, n=2):
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(a) for a in v) if v is not None else (1,) * n


def find(gm: fx.GraphModule, cfg: RewriteConfig) -> list[Site]:
    from ..costs.winograd import winograd_pays

    sites: list[Site] = []
    if cfg.winograd == "off":
        return sites
    for n in gm.graph.nodes:
        if not is_op(n, "conv"):
            continue
        c = canon(n)
        xm, wm = tensor_meta(c.arg("input")), tensor_meta(c.arg("weight"))
        if xm is None or wm is None or xm.dim() != 4 or tuple(wm.shape[2:]) != (3, 3):
            continue  # only 3x3 2-D convs are candidates
        if cfg.winograd == "auto" and xm.device.type != "cuda":
            continue  # policy, not a per-site decision: off the GPU direct conv is always used
        stride, pad, dil = _ints(c.arg("stride")), _ints(c.arg("padding")), _ints(c.arg("dilation"))
        site = Site("winograd", [n.name], anchor=n.name, module_path=n.meta.get("fusediff_module", ""),
                    shapes={"x": tuple(xm.shape), "w": tuple(wm.shape)}, dtype=str(xm.dtype),
                    attrs={"stride": stride, "padding": pad})
        why = cfg.rejects("winograd", xm.dtype, site.module_path)
        if why is None and (stride != (1, 1) or dil != (1, 1) or c.arg("groups") != 1 or pad[0] != pad[1]
                            or pad[0] not in (0, 1)):
            why = f"stride {stride}, padding {pad}, dilation {dil}, groups {c.arg('groups')}: kernel takes stride 1, padding 0/1"
        if why is None and cfg.winograd == "auto":
            ok, r = winograd_pays(tuple(xm.shape), tuple(wm.shape), xm.device.type, stride=stride,
                                  padding=pad, dilation=dil, groups=c.arg("groups"), dtype=xm.dtype)
            if not ok:
                why = r
        if why is not None:
            site.matched, site.reason = False, why
        site.plan = ConvPlan(n)
        sites.append(site)
    return sites


def rewrite(gm: fx.GraphModule, site: Site) -> None:
    from ...kernels import winograd as kw

    assert isinstance(site.plan, ConvPlan), site
    n = site.plan.node
    c = canon(n)
    g = gm.graph
    w = c.arg("weight")
    with g.inserting_before(n):
        if isinstance(w, fx.Node) and w.op == "get_attr":
            weight = gm.get_parameter(w.target) if w.target in dict(gm.named_parameters()) else gm.get_buffer(w.target)
            name = "_fusediff_winograd_" + w.target.replace(".", "_")
            gm.register_buffer(name, kw.winograd_weight_transform(weight.detach()), persistent=False)
            u = g.get_attr(name)
            site.attrs["weight_snapshot"] = True
        else:
            u = make_call(g, kw.winograd_weight_transform, (w,), like=n)
            site.attrs["weight_snapshot"] = False
        # conv2d(x, W, b, 3x3, stride 1) -> winograd_conv2d(x, G W G^T, b, padding)
        new = make_call(g, torch.ops.fusediff.winograd_conv2d.default,
                        (c.arg("input"), u, c.arg("bias"), int(site.attrs["padding"][0])),
                        like=n, val_=n.meta.get("val"))
    n.replace_all_uses_with(new)
    site.rewritten = True
