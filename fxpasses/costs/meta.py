"""What an FX node produces and calls: tensor metadata, vocabulary-independent target names,
argument access (positional, keyword, bound to an op schema).

Every cost module reads nodes through these helpers, so dynamo, canonical, ``torch.export`` and
``symbolic_trace`` graphs are read alike. Nodes without ``meta["val"]`` have no tensor (and cost
nothing).
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from ..canonicalize import module_path as node_module_path  # noqa: F401  (re-exported)


def _int(s: Any) -> int:
    """A concrete int for a size (SymInts give their hint, so no guard is added)."""
    if isinstance(s, int):
        return s
    node = getattr(s, "node", None)
    hint = getattr(node, "hint", None) if node is not None else None
    if hint is not None:
        return int(hint)
    try:
        return int(s)
    except Exception:  # unbacked symbol: unknown size
        return 0


def _is_tensor_like(v: Any) -> bool:
    return hasattr(v, "shape") and isinstance(getattr(v, "dtype", None), torch.dtype)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(_int(s) for s in t.shape)


def _numel(t: Any) -> int:
    return math.prod(_shape(t))


def _itemsize(dtype: torch.dtype) -> int:
    size = getattr(dtype, "itemsize", None)
    if size is None:  # pragma: no cover - torch < 2.1
        size = torch.empty((), dtype=dtype).element_size()
    return int(size)


def _nbytes(t: Any) -> int:
    return _numel(t) * _itemsize(t.dtype)


def value(n: Any) -> Any:
    """What node ``n`` produces: ``meta["val"]``/``["example_value"]``, ShapeProp's
    ``tensor_meta``, or for a ``get_attr`` the attribute itself. Non-nodes are returned as is."""
    if not isinstance(n, fx.Node):
        return n
    for key in ("val", "example_value", "tensor_meta"):
        v = n.meta.get(key)
        if v is not None:
            return v
    if n.op == "get_attr":
        try:
            return _fetch_attr(n)
        except AttributeError:
            return None
    return None


def _fetch_attr(n: fx.Node) -> Any:
    obj: Any = n.graph.owning_module
    if obj is None:
        raise AttributeError(n.target)
    for part in str(n.target).split("."):
        obj = getattr(obj, part)
    return obj


def tensors_of(v: Any) -> list[Any]:
    """Flatten a value (tensor, TensorMetadata, tuple/list/dict of them) into its tensors."""
    if _is_tensor_like(v):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in tensors_of(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in tensors_of(x)]
    return []


def _tensor(n: Any) -> Any:
    """The single tensor a node (or constant) stands for, or None."""
    ts = tensors_of(value(n))
    return ts[0] if ts else None


def shape_of(n: Any) -> tuple[int, ...] | None:
    t = _tensor(n)
    return _shape(t) if t is not None else None


def dtype_of(n: Any) -> torch.dtype | None:
    t = _tensor(n)
    return t.dtype if t is not None else None


def output_bytes(n: fx.Node) -> int:
    return sum(_nbytes(t) for t in tensors_of(value(n)))


# --------------------------------------------------------------------------- target names
_OPERATOR_NAMES: dict[Any, str] = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.floordiv: "floor_divide", operator.mod: "remainder", operator.pow: "pow",
    operator.neg: "neg", operator.matmul: "matmul", operator.getitem: "getitem",
}


def target_name(node: fx.Node) -> str:
    """A vocabulary-independent name for what a node calls.

    ``aten.conv2d.default``, ``torch.conv2d``, ``F.conv2d`` -> ``"conv2d"``;
    ``x.softmax(-1)`` -> ``"softmax"``; ``torch.ops.fusediff.geglu.default`` -> ``"fusediff::geglu"``;
    an ``nn.Conv2d`` call_module -> ``"module:Conv2d"``; placeholders etc. -> their ``op``.
    """
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module":
        mod = _submodule(node)
        return f"module:{type(mod).__name__}" if mod is not None else "module:?"
    if node.op != "call_function":
        return node.op
    tgt = node.target
    if isinstance(tgt, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        ns = getattr(tgt, "namespace", None)
        if ns is None:  # pragma: no cover - older torch
            ns = tgt.name().split("::")[0]
        opname = getattr(tgt, "_opname", None) or tgt.name().split("::")[-1].split(".")[0]
        return opname if ns in ("aten", "prims") else f"{ns}::{opname}"
    if tgt in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[tgt]
    return getattr(tgt, "__name__", str(tgt))


def _submodule(node: fx.Node) -> torch.nn.Module | None:
    root = node.graph.owning_module
    if root is None:
        return None
    try:
        return root.get_submodule(str(node.target))
    except AttributeError:
        return None


# --------------------------------------------------------------------------- argument access
def _arg(node: fx.Node, i: int, name: str | None = None, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    return default


def _tensor_args(node: fx.Node) -> list[Any]:
    """Tensors among the positional arguments (then keyword arguments), in order."""
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            t = _tensor(a)
            if t is not None:
                out.append(t)
        elif isinstance(a, (list, tuple)):
            out.extend(t for x in a if isinstance(x, fx.Node) for t in [_tensor(x)] if t is not None)
    return out


def _out(node: fx.Node) -> Any:
    return _tensor(node)


def _out_numel(node: fx.Node) -> int:
    return sum(_numel(t) for t in tensors_of(value(node)))


def bound_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an OpOverload call bound to their schema names (``{}`` for other targets)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
    return out


def _b(node: fx.Node, name: str, default: Any = None) -> Any:
    return bound_args(node).get(name, default)
