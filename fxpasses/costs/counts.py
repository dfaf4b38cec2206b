"""Per-node and per-graph counts: which values are weights, the parameters of one evaluation,
each node's op class and FLOPs, and FLOPs per op class over a graph.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from .flops import OP_CLASSES, _einsum_operands
from .meta import _fetch_attr, _is_tensor_like, _numel, _submodule, target_name, value
from .ops import is_view, op_cost

log = logging.getLogger("fusediff.fxpasses")


_WEIGHT_ROLES: dict[str, tuple[int, ...]] = {  # positional indices of weight-like arguments
    "conv1d": (1, 2), "conv2d": (1, 2), "conv3d": (1, 2), "convolution": (1, 2),
    "conv_transpose2d": (1, 2), "linear": (1, 2), "addmm": (0, 2), "group_norm": (2, 3),
    "layer_norm": (2, 3), "native_group_norm": (1, 2), "native_layer_norm": (2, 3),
}


def _base(n: Any) -> Any:
    """Follow a node back through views to the node that owns the memory."""
    seen = 0
    while isinstance(n, fx.Node) and is_view(n) and n.args and seen < 10_000:
        src = n.args[0]
        if isinstance(src, (list, tuple)) and src and isinstance(src[0], fx.Node):
            src = src[0]
        if not isinstance(src, fx.Node):
            break
        n = src
        seen += 1
    return n


def _placeholder_is_param(n: fx.Node) -> bool:
    v = value(n)
    if isinstance(v, torch.nn.Parameter):
        return True
    name = str(n.target)
    low = name.lower()
    if name.startswith(("p_", "b_", "c_")) or "_parameters_" in low or "_buffers_" in low:
        return True
    # hand-built graphs: a placeholder used as the weight/bias of a conv/linear/norm
    for u in n.users:
        roles = _WEIGHT_ROLES.get(target_name(u), ())
        if any(i < len(u.args) and u.args[i] is n for i in roles):
            return True
        if any(u.kwargs.get(k) is n for k in ("weight", "bias")):
            return True
    return False


def is_weight(n: Any) -> bool:
    """True when node ``n`` (looking through views) is a parameter, buffer or constant."""
    b = _base(n)
    if not isinstance(b, fx.Node):
        return False
    if b.op == "get_attr":
        return True
    if b.op == "placeholder":
        return _placeholder_is_param(b)
    return False


def graph_params(gm: fx.GraphModule, model: torch.nn.Module | None = None) -> int:
    """Number of parameters of one U-Net evaluation.

    From ``model.parameters()`` when ``model`` is given; otherwise from the graph: ``get_attr``
    nodes that hold an ``nn.Parameter``, placeholders that are parameters (dynamo's
    ``L_self_..._parameters_...``, export's ``p_...``, FakeTensor parameters, or weight/bias
    arguments of conv/linear/norm) and the parameters of ``call_module`` leaves. Each parameter
    is counted once.
    """
    if model is not None:
        return sum(p.numel() for p in model.parameters())
    total = 0
    seen: set[int] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                attr = _fetch_attr(n)
            except AttributeError:
                attr = None
            if isinstance(attr, torch.nn.Parameter):
                if id(attr) not in seen:
                    seen.add(id(attr))
                    total += attr.numel()
            elif attr is None and isinstance(value(n), torch.nn.Parameter):
                total += _numel(value(n))
        elif n.op == "placeholder" and _placeholder_is_param(n):
            v = value(n)
            name = str(n.target)
            if v is not None and _is_tensor_like(v) and not name.startswith(("b_", "c_")) and "_buffers_" not in name.lower():
                total += _numel(v)
        elif n.op == "call_module":
            mod = _submodule(n)
            if mod is not None:
                for p in mod.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel()
    return total


# --------------------------------------------------------------------------- per-node counts
def node_class(node: fx.Node) -> str:
    """The op class of a node for the cost breakdown: one of :data:`OP_CLASSES`."""
    c = op_cost(node)
    if c is None:
        return "other"
    if c.op_class != "matmul":
        return c.op_class
    if target_name(node) == "einsum":
        _, ops = _einsum_operands(node)
    else:
        ops = [a for a in node.args if isinstance(a, fx.Node)]
    return "linear" if any(is_weight(o) for o in ops if isinstance(o, fx.Node)) else "attention"


def node_flops(node: fx.Node) -> int:
    """FLOPs of one call of ``node`` (see the module docstring for the conventions)."""
    override = node.meta.get("fusediff_flops")
    if override is not None:
        return int(override)
    c = op_cost(node)
    if c is None or c.view:
        return 0
    try:
        return int(c.flops(node))
    except Exception as e:  # metadata we cannot read: count nothing, say why
        log.debug("costs: FLOPs of %s (%s) not counted: %s", node.name, target_name(node), e)
        return 0


def flops_by_class(gm: fx.GraphModule) -> dict[str, int]:
    """FLOPs per op class (:data:`OP_CLASSES`) summed over the graph."""
    out = {c: 0 for c in OP_CLASSES}
    for n in gm.graph.nodes:
        f = node_flops(n)
        if f:
            out[node_class(n)] += f
    return out


def graph_flops(gm: fx.GraphModule) -> int:
    return sum(flops_by_class(gm).values())
