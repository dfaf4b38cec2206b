"""MoDiff quantization of a dynamo graph: ``torch.compile(unet, backend=fusediff.backend(quant=...))``.

A dynamo backend never sees the module, only a graph whose parameters are placeholders (and their
real tensors among the example inputs). :func:`quantize_graph` does at graph level what
:func:`fxpasses.modiff.quantize` does to modules:

    conv2d / 1x1 conv1d (x, W, b, ...) / linear(x, W, b)   ->   call_module(QuantConv2d / QuantLinear)(x)
    conv_q(group_norm_silu(x, ...))                        ->   conv_q(x, norm=(...))   (MoDiff, Fig. 1)

Each replaced call gets its own :class:`~fxpasses.modiff.QuantConv2d`/``QuantLinear``, built from
the real weight and registered as a submodule of the graph module, so the MoDiff caches â/ô and
``primed`` are module buffers there, and inductor compiles their in-place updates as buffer
mutations. The layer policy is :func:`fxpasses.modiff.plan` itself, run on a shadow module tree
rebuilt from the nodes' ``nn_module_stack`` (paths and class names, in execution order: the first
and last conv are the first and last conv calls of the graph); linears whose input is a graph input
other than the sample (the text context) get the context K/V role. Each layer is registered under
its weight tensor (:func:`fxpasses.modiff.register_graph_layers`), so ``fusediff.reset(unet)`` and
``with fusediff.trajectory(compiled):`` reach the compiled graph's caches through the model's
parameters. The caches are sized at compile time from the nodes' shapes: static shapes only (a
recompile for a new batch or resolution builds new layers, like a fresh trajectory).

Weights are quantized when the graph is compiled: an in-place weight change afterwards (a LoRA
merge) needs a recompile (``torch._dynamo.reset()``), unlike ``fusediff.optimize``.
"""
from __future__ import annotations

import logging
import torch
import torch.fx as fx
import torch.nn as nn

from fxpasses.canonicalize import canon, clean_module_path, module_path, tensor_meta, through
from fxpasses.modiff import (QuantConfig, QuantConv2d, QuantLinear, QuantReport, group_norm_args, is_group_norm_silu,
                             plan, register_graph_layers)

log = logging.getLogger("fusediff.fxpasses")

__all__ = ["quantize_graph", "QuantGraphError"]


class QuantGraphError(ValueError):
    """The graph cannot be quantized as asked (dynamic shapes, a module called twice...)."""


def _standard(node: fx.Node, kind: str, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    """An ``nn.Conv2d``/``nn.Linear`` holding the call's real weight (shared, not copied)."""
    c = canon(node)
    if kind == "linear":
        std = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    elif kind == "conv1d":
        std = nn.Conv1d(w.shape[1] * c.arg("groups", 1), w.shape[0], tuple(w.shape[2:]), stride=c.arg("stride", 1),
                        padding=c.arg("padding", 0), dilation=c.arg("dilation", 1), groups=c.arg("groups", 1),
                        bias=b is not None, device="meta")
    else:
        groups = c.arg("groups", 1)
        padding = c.arg("padding", 0)
        std = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=c.arg("stride", 1),
                        padding=padding if isinstance(padding, str) else padding, dilation=c.arg("dilation", 1),
                        groups=groups, bias=b is not None, device="meta")
    std.weight = nn.Parameter(w.detach(), requires_grad=False)
    if b is not None:
        std.bias = nn.Parameter(b.detach(), requires_grad=False)
    return std.eval()


def _shadow(entries: list[tuple[str, fx.Node, nn.Module]]) -> nn.Module:
    """A module tree with the graph's layers at their paths (in call order) and containers named
    like the originals (``Attention``, ``FeedForward``, ... for the policy's class checks)."""
    root = nn.Module()
    for path, node, std in entries:
        types = {}
        for p, t in (node.meta.get("nn_module_stack") or {}).values():
            types[clean_module_path(p)] = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        parts = path.split(".")
        cur = root
        for i, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[: i + 1])
            if part not in cur._modules:
                name = str(types.get(prefix, "Module")).rsplit(".", 1)[-1]
                cur.add_module(part, type(name, (nn.Module,), {})())
            cur = cur._modules[part]
        cur.add_module(parts[-1], std)
    return root


def _fuse_norm(g: fx.Graph, call: fx.Node, layer: nn.Module) -> bool:
    """Paper Fig. 1 (left) at graph level, the twin of :func:`fxpasses.modiff.fuse_group_norm_quantize`:

        conv_q(group_norm_silu(x, ...))   ->   conv_q(x, norm=(...))   # GN runs inside the quantizer

    Only for a MoDiff conv reading the norm's output alone (a second reader, e.g. a resample between
    SiLU and conv, keeps them apart) and without SmoothQuant (its factor sits between the two).
    """
    gn = call.args[0]
    if not (isinstance(layer, QuantConv2d) and layer.mode == "modiff" and layer.smooth_inv is None
            and is_group_norm_silu(gn) and len(gn.users) == 1):
        return False
    args = group_norm_args(gn)
    call.args = (args.pop("x"),)
    call.kwargs = {"norm": tuple(args.values())}
    g.erase_node(gn)
    return True


def quantize_graph(gm: fx.GraphModule, example_inputs: list, config: QuantConfig) -> QuantReport:
    """Replace ``gm``'s conv2d/linear calls on parameter weights by quantized layers (in place).

    Run it on a canonicalized dynamo graph (``lowering.transform.rewrite_graph`` first). Returns
    the :class:`~fxpasses.modiff.QuantReport` (one row per conv/linear call found).

    Raises:
        QuantGraphError: a quantized layer's shapes are symbolic (``dynamic=True``).
    """
    g = gm.graph
    done = {"quantize_act", "modiff_quantize", "group_norm_quantize", "int8_conv2d", "int8_linear",
            "int8_conv2d_baseline", "int8_linear_baseline"}
    names = {str(n.target).split("fusediff.", 1)[-1].split(".")[0] for n in g.nodes
             if n.op == "call_function" and "fusediff." in str(n.target)}  # OpOverload or packet
    if names & done:
        log.warning("MoDiff (graph): the model is quantized already (fusediff.quantize); backend(quant=...) leaves it")
        return QuantReport(config=config)
    phs = [n for n in g.nodes if n.op == "placeholder"]
    real = {n: x for n, x in zip(phs, example_inputs)}
    params = {n for n, x in real.items() if isinstance(x, nn.Parameter)}
    user = [n for n in phs if n not in params and isinstance(real.get(n), torch.Tensor)]  # sample first
    entries: list[tuple[str, fx.Node, nn.Module]] = []
    seen: dict[str, int] = {}
    for node in g.nodes:
        c = canon(node)
        if c is None or c.op not in ("conv", "linear") or node.op != "call_function":
            continue
        w, b = c.arg("weight"), c.arg("bias")
        wt = real.get(w) if isinstance(w, fx.Node) else None
        if wt is None or (b is not None and real.get(b) is None):
            continue  # weight computed in the graph (EDM2's MPConv): not a plain layer at graph level
        kind = "linear" if c.op == "linear" else {4: "conv2d", 3: "conv1d"}.get(wt.dim())
        if kind is None:
            continue
        path = module_path(node) or node.name
        seen[path] = seen.get(path, 0) + 1
        if seen[path] > 1:
            path = f"{path}#{seen[path]}"  # a module called twice: its calls cannot share one state
        entries.append((path, node, _standard(node, kind, wt, real.get(b) if b is not None else None)))
    shadow = _shadow([(p.replace("#", "_call"), n, s) for p, n, s in entries])
    report = plan(shadow, config)
    by_path = {d.path: d for d in report.layers}
    layers = []
    fused = 0
    for i, (path, node, std) in enumerate(entries):
        d = by_path[path.replace("#", "_call")]
        d.path = path
        x = node.args[0] if node.args else node.kwargs.get("input")  # live arg (canon's binding predates rewrites)
        if "#" in path and d.quantized:
            d.quantized, d.reason, d.role = False, "module called more than once in the graph (kept float)", ""
        if d.quantized and d.kind == "linear":
            src = through(x)
            ctx = src in user[1:] and tensor_meta(src) is not None and tensor_meta(src).dim() >= 3
            if ctx and config.context_kv_once:
                d.role, d.reason = "context", "quantized; context K/V computed once per trajectory"
            else:
                d.role, d.reason = "act", "quantized"
        if not d.quantized:
            continue
        xv, ov = tensor_meta(x), tensor_meta(node)
        if xv is None or ov is None or not all(isinstance(s, int) for s in (*xv.shape, *ov.shape)):
            raise QuantGraphError(f"fusediff quant backend: layer {path!r} has symbolic shapes; MoDiff caches need "
                                  "static shapes (compile without dynamic=True)")
        layer = (QuantLinear if d.kind == "linear" else QuantConv2d)(std, config, path, d.role)
        with torch.no_grad():  # size the caches for this graph's shapes, then start un-primed
            layer(torch.zeros(tuple(xv.shape), dtype=xv.dtype, device=std.weight.device))
        layer.primed.fill_(False)
        name = f"fusediff_quant_{i}"
        gm.add_submodule(name, layer)
        with g.inserting_before(node):
            new = g.call_module(name, (x,))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", "nn_module_stack",
                                                                        "stack_trace")})
        new.meta["fusediff_module"] = path
        node.replace_all_uses_with(new)
        g.erase_node(node)
        if _fuse_norm(g, new, layer):
            d.reason += "; GroupNorm fused into the quantizer"
            fused += 1
        register_graph_layers(real[canon(node).arg("weight")], [layer])  # the model's own Parameter
        layers.append(layer)
    if layers:
        g.lint()
        gm.recompile()
        # aot_autograd looks up every parameter/buffer of a dynamo graph in dynamo's source table;
        # the new layers' buffers have no dynamo source, so compile it as a plain graph module.
        gm.meta.pop("dynamo_compile_id", None)
    log.info("MoDiff (graph): quantized %d of %d conv/linear calls (%s); %d GroupNorm -> quantizer fusions",
             len(layers), len(report.layers), config.label, fused)
    return report
