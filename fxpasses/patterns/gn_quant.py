"""GroupNorm(+FiLM)(+SiLU) -> MoDiff quantizer in one kernel (paper Fig. 1 left).

"Real-Time On-Device Diffusion: Practical Acceleration via Fused Low-Bit Kernels" runs the norm
inside the MoDiff quantizer (eq. 6 on the normalized activation), so the normalized activation
never reaches memory. Two rewrites, one per MoDiff path, guarded by the same constraint check
(:func:`_fusable_norm`: a ``fusediff::group_norm_silu`` read by its consumer alone) and counted:

    # group_norm_silu(x, ...) -> [unsqueeze(-1)] -> modiff_quantize(., â, primed, bits, per_sample)
    #                                  -> group_norm_quantize([unsqueeze(-1)](x), ..., â, primed, bits, per_sample)
    # conv_q(group_norm_silu(x, ...))  -> conv_q(x, norm=(...))   (conv_q a MoDiff QuantConv2d call_module)

:func:`fuse_group_norm_quantize` is the first, on graphs of a model quantized by module surgery
(``fxpasses.modiff.quantize``; run after the pipeline's rewrite step turned GroupNorm(+FiLM)
(+SiLU) into ``group_norm_silu``); it returns the number of fused pairs.
:func:`fuse_into_layer` is the second, for ``backend(quant=...)``
(``fxpasses.modiff.graph.quantize_graph`` counts the fusions in its log and report). Neither
pass runs in ``fxpasses.match``'s family loop: they apply only to MoDiff-quantized graphs.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

log = logging.getLogger("fusediff.fxpasses")

__all__ = ["is_group_norm_silu", "group_norm_args", "fuse_group_norm_quantize", "fuse_into_layer"]


def _is_target(n: Any, *targets: Any) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in targets


def _is_unsqueeze_last(n: Any) -> bool:
    if not isinstance(n, torch.fx.Node):
        return False
    if n.op == "call_method" and n.target == "unsqueeze":
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    elif n.op == "call_function" and n.target in (torch.unsqueeze, torch.ops.aten.unsqueeze.default):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    else:
        return False
    return dim in (-1, 3)


def is_group_norm_silu(n: Any) -> bool:
    """Whether ``n`` calls ``fusediff::group_norm_silu`` (OpOverload or packet)."""
    return _is_target(n, torch.ops.fusediff.group_norm_silu.default, torch.ops.fusediff.group_norm_silu)


def group_norm_args(node: torch.fx.Node) -> dict[str, Any]:
    """The arguments of a ``fusediff::group_norm_silu`` call by name, in the op's order."""
    names = ("x", "weight", "bias", "scale", "shift", "num_groups", "eps", "apply_silu")
    gn = dict(zip(names, node.args))
    gn.update({k: v for k, v in node.kwargs.items() if k in names})
    return {k: gn.get(k) for k in names}


def _fusable_norm(n: Any) -> Optional[tuple[Any, tuple]]:
    """The constraint check of both rewrites: ``n`` is a ``group_norm_silu`` call whose output has a
    single user (a second reader, e.g. a resample between SiLU and conv, keeps them apart).

    Returns ``(x, norm)``: the norm's input and its other arguments in the op's order (weight, bias,
    scale, shift, num_groups, eps, apply_silu), or None when ``n`` cannot be fused.
    """
    if not is_group_norm_silu(n) or len(n.users) != 1:
        return None
    args = group_norm_args(n)
    return args.pop("x"), tuple(args.values())


def fuse_group_norm_quantize(gm: torch.fx.GraphModule) -> int:
    """Fuse ``fusediff::group_norm_silu -> [unsqueeze(-1)] -> fusediff::modiff_quantize`` into
    ``fusediff::group_norm_quantize`` (the normalized activation never reaches memory).

    Run it on a graph of a MoDiff-quantized model after the pipeline's rewrite step (which turns
    GroupNorm(+FiLM)(+SiLU) into ``group_norm_silu``); only chains whose intermediate has a single
    user are fused (a resample or a second reader between them keeps them apart). Works on export
    graphs (``.default`` overloads) and dynamo graphs. Returns the number of fused pairs.
    """
    mq = (torch.ops.fusediff.modiff_quantize.default, torch.ops.fusediff.modiff_quantize)
    g = gm.graph
    fused = 0
    for node in list(g.nodes):
        if not _is_target(node, *mq):
            continue
        a = node.args[0] if node.args else node.kwargs.get("a")
        view = None
        if _is_unsqueeze_last(a) and len(a.users) == 1:
            view, a = a, a.args[0]
        norm = _fusable_norm(a)
        if norm is None:
            continue
        x, gn = norm
        qnames = ("a", "a_hat", "primed", "bits", "per_sample")
        qa = dict(zip(qnames, node.args))
        qa.update({k: v for k, v in node.kwargs.items() if k in qnames})
        with g.inserting_before(node):
            if view is not None:
                x = g.call_function(torch.ops.aten.unsqueeze.default, (x, -1))
                if "val" in view.meta:
                    x.meta["val"] = view.meta["val"]
            # group_norm_silu(x) -> [unsqueeze] -> modiff_quantize -> group_norm_quantize([unsqueeze](x)):
            # MoDiff eq. (6) fused into the norm: q = Q([silu](GN(x)) - â), â updated in place
            new = g.call_function(torch.ops.fusediff.group_norm_quantize.default,
                                  (x, *gn, qa["a_hat"], qa["primed"], qa["bits"], qa["per_sample"]))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(new)
        g.erase_node(node)
        if view is not None:
            g.erase_node(view)
        g.erase_node(a)
        fused += 1
    if fused:
        g.lint()
        gm.recompile()
    log.info("MoDiff: fused %d GroupNorm -> quantizer pairs into fusediff::group_norm_quantize", fused)
    return fused


def fuse_into_layer(g: fx.Graph, call: fx.Node, layer: nn.Module) -> bool:
    """Paper Fig. 1 (left) at graph level, the twin of :func:`fuse_group_norm_quantize`:

        conv_q(group_norm_silu(x, ...))   ->   conv_q(x, norm=(...))   # GN runs inside the quantizer

    Only for a MoDiff conv reading the norm's output alone (a second reader, e.g. a resample between
    SiLU and conv, keeps them apart) and without SmoothQuant (its factor sits between the two).
    ``call`` is the ``call_module`` of ``layer``; returns whether it was fused.
    """
    from ..modiff.layers import QuantConv2d

    gn = call.args[0]
    if not (isinstance(layer, QuantConv2d) and layer.mode == "modiff" and layer.smooth_inv is None):
        return False
    norm = _fusable_norm(gn)
    if norm is None:
        return False
    # conv_q(group_norm_silu(x, ...)) -> conv_q(x, norm=(...))
    call.args = (norm[0],)
    call.kwargs = {"norm": norm[1]}
    g.erase_node(gn)
    return True
