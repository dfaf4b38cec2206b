"""FLOP, byte and parameter counting on FX graphs, and the fused-vs-unfused DRAM traffic model.

Works on every vocabulary a graph can arrive in: dynamo/canonical torch functions
(``F.conv2d``, ``torch.conv2d``, ``F.scaled_dot_product_attention``), ``call_method`` nodes
(``x.softmax(-1)``), ``torch.export`` aten overloads (``aten.conv2d.default``,
``aten.convolution.default``, ``aten.addmm.default``), ``call_module`` leaves from
``torch.fx.symbolic_trace`` (``nn.Conv2d``, ``nn.Linear``, ...) and the ``fusediff::`` custom ops.
Every target is reduced to a *name* (``"conv2d"``, ``"linear"``, ``"fusediff::geglu"``) and looked
up in one table of :class:`OpCost` entries; :func:`register_op_cost` adds entries for new ops.

Counting conventions (the papers' scaling tables, e.g. EDM2+ Tables 1-3, count the same way):

* FLOPs = 2 x multiply-accumulates for contractions; bias adds and the softmax inside an
  attention kernel are not counted.

  - conv: ``2 * N * Cout * Hout * Wout * (Cin / groups) * kh * kw`` (= ``2 * out.numel() *
    weight[0].numel()``); transposed conv: ``2 * in.numel() * weight[0].numel()``.
  - linear / addmm: ``2 * out.numel() * K``; matmul / bmm / baddbmm / mm: ``2 * out.numel() * K``.
  - einsum: contracted pairwise left to right, ``2 * prod(sizes of the indices involved)`` per pair.
  - scaled_dot_product_attention: ``2*B*H*Lq*Lk*D + 2*B*H*Lq*Lk*Dv`` (= ``4*B*H*Lq*Lk*D``).
* Norms and pointwise ops are counted per output element so the per-class breakdown shows them
  (they are small next to the contractions): GroupNorm/LayerNorm ``NORM_FLOPS_PER_ELEMENT`` (7:
  sum, sum of squares, subtract-and-scale, affine), softmax ``SOFTMAX_FLOPS_PER_ELEMENT`` (5: max,
  subtract, exp, sum, divide), other pointwise ops (add, mul, silu, gelu, ...) 1.
  Data movement (views, cat, interpolate, pad, copies) costs 0 FLOPs. Unknown ops cost 0 FLOPs.
* A ``fusediff::`` op costs the FLOPs of the ops it replaces (``group_norm_silu`` = group_norm +
  silu, ``linear_geglu`` = linear + geglu, ``winograd_conv2d`` = the direct 3x3 conv, ...).
* Bytes: a node reads each distinct tensor input once (weights included) and writes its outputs;
  views (reshape, permute, chunk, getitem, ...) read and write nothing. A ``node.meta`` entry
  ``"fusediff_flops"`` (int) overrides the FLOP model. Cache traffic (MoDiff's â/ô caches, the
  cache columns) comes from ``node.meta["fusediff_cache_bytes"] = (read, write)`` when set, else
  from the op schema: a tensor argument the op mutates (``Tensor(a!) o_hat``) is read and written
  once per call; a read-only ``*_hat`` argument (first step only) is not counted.

DRAM traffic model (:func:`traffic`, the MoDiff paper's Table 1 columns: weight, activation,
output, cache read, cache write): every compute node reads its inputs from DRAM and writes its
outputs to DRAM. In the *fused* estimate, inside a matched :class:`~fxpasses.sites.Site` an
intermediate produced and consumed by the site's own nodes is neither written nor read again
(a value that also leaves the site is still written). No cache reuse between nodes is modelled.
For a graph that already holds ``fusediff::`` ops the *unfused* column adds back what each fused
op keeps on chip (:func:`fused_away_bytes`: ``node.meta["fusediff_fused_away"] = (read, write)``
when the rewrite set it, else the op entry's ``fused_away``), so the comparison also works after
rewriting. Nodes without ``meta["val"]`` (e.g. inserted by a rewrite that did not set it) count
0 FLOPs and 0 bytes.
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from .canonicalize import module_path as node_module_path  # noqa: F401  (re-exported)

log = logging.getLogger("fusediff.fxpasses")

#: Op classes of the cost breakdown, in table order.
OP_CLASSES: tuple[str, ...] = ("conv", "linear", "attention", "norm", "other")

NORM_FLOPS_PER_ELEMENT = 7
SOFTMAX_FLOPS_PER_ELEMENT = 5
POINTWISE_FLOPS_PER_ELEMENT = 1


# --------------------------------------------------------------------------- tensor metadata
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


# --------------------------------------------------------------------------- FLOP formulas
def _conv_flops(node: fx.Node) -> int:
    out, w = _out(node), _tensor(_arg(node, 1, "weight"))
    if out is None or w is None:
        return 0
    ws = _shape(w)
    transposed = target_name(node) in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d") or (
        target_name(node) == "convolution" and bool(_arg(node, 6, "transposed", False)))
    if transposed:  # weight (Cin, Cout/groups, k...): every input pixel scatters into Cout/groups*k
        x = _tensor(_arg(node, 0, "input"))
        return 2 * (_numel(x) if x is not None else 0) * math.prod(ws[1:])
    return 2 * _numel(out) * math.prod(ws[1:])


def _linear_flops(node: fx.Node) -> int:
    out, x = _out(node), _tensor(_arg(node, 0, "input"))
    if out is None or x is None or not _shape(x):
        return 0
    return 2 * _numel(out) * _shape(x)[-1]


def _addmm_flops(node: fx.Node) -> int:  # addmm(bias, mat1, mat2)
    out, a = _out(node), _tensor(_arg(node, 1, "mat1"))
    if out is None or a is None:
        return 0
    return 2 * _numel(out) * _shape(a)[-1]


def _matmul_flops(node: fx.Node) -> int:  # matmul/mm/bmm(a, b); out (..., M, N), K = a[-1]
    out, a = _out(node), _tensor(_arg(node, 0, "input"))
    if out is None or a is None or not _shape(a):
        return 0
    return 2 * _numel(out) * _shape(a)[-1]


def _baddbmm_flops(node: fx.Node) -> int:  # baddbmm(input, batch1, batch2, beta, alpha)
    out, b1 = _out(node), _tensor(_arg(node, 1, "batch1"))
    if out is None or b1 is None:
        return 0
    return 2 * _numel(out) * _shape(b1)[-1]


def einsum_flops(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """FLOPs of ``torch.einsum(equation, *operands)`` for operands of the given shapes.

    Operands are contracted pairwise from the left; each pair costs ``2 * prod(sizes of every
    index in either operand)``. A single operand (transpose, trace, reduction) costs 0.
    """
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum_flops: equation {equation!r} has {len(terms)} operands, got {len(shapes)} shapes")
    sizes: dict[str, int] = {}
    expanded: list[str] = []
    ell_rank = 0
    for term, shape in zip(terms, shapes):
        if "..." in term:
            ell_rank = max(ell_rank, len(shape) - (len(term) - 3))
    ell_chars = "".join(chr(0x100 + i) for i in range(ell_rank))  # never a letter of the equation
    for term, shape in zip(terms, shapes):
        if "..." in term:
            n = len(shape) - (len(term) - 3)
            term = term.replace("...", ell_chars[ell_rank - n:])
        if len(term) != len(shape):
            raise ValueError(f"einsum_flops: term {term!r} does not match shape {tuple(shape)}")
        for c, s in zip(term, shape):
            sizes[c] = max(sizes.get(c, 1), int(s))
        expanded.append(term)
    if "->" in eq:
        out = rhs.replace("...", ell_chars)
    else:
        counts: dict[str, int] = {}
        for t in expanded:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        out = ell_chars + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell_chars))
    if len(expanded) < 2:
        return 0
    flops = 0
    cur = set(expanded[0])
    for j in range(1, len(expanded)):
        both = cur | set(expanded[j])
        flops += 2 * math.prod(sizes[c] for c in both)
        needed = set(out).union(*[set(t) for t in expanded[j + 1:]])
        cur = both & needed
    return flops


def _einsum_operands(node: fx.Node) -> tuple[str | None, list[Any]]:
    eq = _arg(node, 0, "equation")
    ops = list(node.args[1:]) if len(node.args) > 1 else list(node.kwargs.get("tensors", node.kwargs.get("operands", [])))
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    return (eq if isinstance(eq, str) else None), ops


def _einsum_node_flops(node: fx.Node) -> int:
    eq, ops = _einsum_operands(node)
    ts = [_tensor(o) for o in ops]
    if eq is None or any(t is None for t in ts):
        return 0
    try:
        return einsum_flops(eq, [_shape(t) for t in ts])
    except ValueError as e:
        log.debug("costs: %s: %s", node.name, e)
        return 0


def sdpa_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int],
               out_shape: Sequence[int] | None = None) -> int:
    """``2*B*H*Lq*Lk*D`` (scores) + ``2*B*H*Lq*Lk*Dv`` (P @ V) for (..., L, D) layouts.

    The batch/head count is taken from the output (or q) leading dims, so GQA and broadcast
    masks count the query heads.
    """
    lead = out_shape[:-2] if out_shape is not None else q_shape[:-2]
    bh = math.prod(lead)
    lq, d = q_shape[-2], q_shape[-1]
    lk, dv = k_shape[-2], v_shape[-1]
    return 2 * bh * lq * lk * d + 2 * bh * lq * lk * dv


def _sdpa_node_flops(node: fx.Node) -> int:
    ts = _tensor_args(node)
    out = _out(node)
    if len(ts) < 3:
        return 0
    q, k, v = (_shape(t) for t in ts[:3])
    if min(len(q), len(k), len(v)) < 2:
        return 0
    return sdpa_flops(q, k, v, _shape(out) if out is not None else None)


def _per_element(k: int) -> Callable[[fx.Node], int]:
    return lambda node: k * _out_numel(node)


def _zero(node: fx.Node) -> int:
    return 0


def _reduction_flops(node: fx.Node) -> int:  # sum/mean/var over the input
    ts = _tensor_args(node)
    return _numel(ts[0]) if ts else 0


# fusediff ops: the FLOPs of what they replace, layout-agnostic where the weight may be packed.
def _fd_linear_like(node: fx.Node, out_features: Callable[[Any], int]) -> int:
    ts, out = _tensor_args(node), _out(node)
    if not ts or out is None or not _shape(ts[0]):
        return 0
    x = _shape(ts[0])
    rows, k = math.prod(x[:-1]), x[-1]
    return 2 * rows * k * out_features(out)


def _fd_conv(node: fx.Node, default_k: int = 9) -> int:
    ts, out = _tensor_args(node), _out(node)
    if len(ts) < 1 or out is None:
        return 0
    os_ = _shape(out)
    if len(ts) >= 2 and len(_shape(ts[1])) == len(os_) and _shape(ts[1])[0] == os_[1]:
        return 2 * _numel(out) * math.prod(_shape(ts[1])[1:])  # weight in (Cout, Cin/g, kh, kw)
    return 2 * _numel(out) * _shape(ts[0])[1] * default_k  # packed/transformed weight: 3x3 dense


# --------------------------------------------------------------------------- the op table
@dataclass(frozen=True)
class OpCost:
    """Cost model of one op.

    Attributes:
        op_class: one of :data:`OP_CLASSES`, or ``"matmul"`` (linear when an operand is a
            weight, attention otherwise).
        flops: FLOPs of one call, from the node's metadata.
        view: True for ops that only re-describe memory (cost no FLOPs and no bytes).
        fused_away: ``(read, write)`` bytes the unfused equivalent of a fused op would add
            (intermediates the fused kernel keeps on chip); None for ordinary ops.
    """

    op_class: str
    flops: Callable[[fx.Node], int] = _zero
    view: bool = False
    fused_away: Callable[[fx.Node], tuple[int, int]] | None = None


_VIEW = OpCost("other", view=True)
_POINTWISE = OpCost("other", _per_element(POINTWISE_FLOPS_PER_ELEMENT))
_MOVE = OpCost("other")
_NORM = OpCost("norm", _per_element(NORM_FLOPS_PER_ELEMENT))
_SOFTMAX = OpCost("attention", _per_element(SOFTMAX_FLOPS_PER_ELEMENT))
_CONV = OpCost("conv", _conv_flops)
_MATMUL = OpCost("matmul", _matmul_flops)
_SDPA = OpCost("attention", _sdpa_node_flops)

OP_COSTS: dict[str, OpCost] = {}
for _n in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
           "conv_transpose2d", "conv_transpose3d", "cudnn_convolution"):
    OP_COSTS[_n] = _CONV
OP_COSTS["linear"] = OpCost("linear", _linear_flops)
OP_COSTS["addmm"] = OpCost("linear", _addmm_flops)
for _n in ("matmul", "mm", "bmm"):
    OP_COSTS[_n] = _MATMUL
OP_COSTS["baddbmm"] = OpCost("matmul", _baddbmm_flops)
OP_COSTS["einsum"] = OpCost("matmul", _einsum_node_flops)
for _n in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math"):
    OP_COSTS[_n] = _SDPA
for _n in ("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"):
    OP_COSTS[_n] = _SOFTMAX
for _n in ("group_norm", "native_group_norm", "layer_norm", "native_layer_norm", "batch_norm",
           "instance_norm", "rms_norm", "_native_batch_norm_legit_no_training", "normalize"):
    OP_COSTS[_n] = _NORM
for _n in ("add", "add_", "sub", "rsub", "mul", "mul_", "div", "div_", "neg", "pow", "exp", "log",
           "sqrt", "rsqrt", "sigmoid", "tanh", "sin", "cos", "abs", "square", "clamp", "clamp_min",
           "clamp_max", "where", "silu", "silu_", "gelu", "relu", "relu_", "leaky_relu", "elu",
           "mish", "hardswish", "softplus", "floor_divide", "remainder", "maximum", "minimum", "erf",
           "reciprocal", "addcmul", "lerp", "true_divide", "dropout", "native_dropout", "fill",
           "masked_fill", "square_", "exp_", "sigmoid_", "gelu_", "tanh_", "sub_", "neg_"):
    OP_COSTS[_n] = _POINTWISE
for _n in ("sum", "mean", "var", "var_mean", "std", "amax", "amin", "max", "min", "norm",
           "linalg_vector_norm", "logsumexp", "cumsum"):
    OP_COSTS[_n] = OpCost("other", _reduction_flops)
for _n in ("view", "_unsafe_view", "reshape", "view_as", "permute", "transpose", "t", "expand",
           "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "slice", "select", "split",
           "split_with_sizes", "tensor_split", "chunk", "unbind", "alias", "detach", "getitem",
           "as_strided", "narrow", "movedim", "swapaxes", "swapdims", "diagonal", "real", "imag",
           "view_as_real", "view_as_complex", "squeeze_", "unsqueeze_", "size", "dim", "numel",
           "stride", "sym_size", "sym_numel", "sym_stride", "lift_fresh_copy", "_assert_tensor_metadata",
           # allocations: nothing is written until a consumer writes into them
           "empty", "empty_like", "new_empty", "empty_strided", "empty_permuted"):
    OP_COSTS[_n] = _VIEW
for _n in ("cat", "stack", "interpolate", "upsample_nearest2d", "upsample_bilinear2d", "pad",
           "constant_pad_nd", "clone", "contiguous", "to", "_to_copy", "type", "float", "half",
           "bfloat16", "copy_", "repeat", "repeat_interleave", "index_select", "gather",
           "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d"):
    OP_COSTS[_n] = _MOVE
OP_COSTS["avg_pool2d"] = OpCost("other", _reduction_flops)
OP_COSTS["adaptive_avg_pool2d"] = OpCost("other", _reduction_flops)

# call_module leaves (symbolic_trace without leaf-module tracing)
OP_COSTS["module:Conv1d"] = OP_COSTS["module:Conv2d"] = OP_COSTS["module:Conv3d"] = OpCost("conv", lambda n: _module_conv_flops(n))
OP_COSTS["module:ConvTranspose2d"] = OpCost("conv", lambda n: _module_conv_flops(n, transposed=True))
OP_COSTS["module:Linear"] = OpCost("linear", _linear_flops)
for _n in ("GroupNorm", "LayerNorm", "BatchNorm2d", "InstanceNorm2d", "RMSNorm"):
    OP_COSTS[f"module:{_n}"] = _NORM
for _n in ("SiLU", "GELU", "ReLU", "Sigmoid", "Tanh", "Mish", "Dropout", "Identity"):
    OP_COSTS[f"module:{_n}"] = _POINTWISE
OP_COSTS["module:Softmax"] = _SOFTMAX
OP_COSTS["module:Upsample"] = _MOVE


def _module_conv_flops(node: fx.Node, transposed: bool = False) -> int:
    mod, out = _submodule(node), _out(node)
    if mod is None or out is None:
        return 0
    k = math.prod(tuple(mod.weight.shape)[1:])
    if transposed:
        x = _tensor(_arg(node, 0))
        return 2 * (_numel(x) if x is not None else 0) * k
    return 2 * _numel(out) * k


def _fa_out_multiple(m: int) -> Callable[[fx.Node], tuple[int, int]]:
    """``fused_away`` of m*out bytes read and m*out bytes written."""
    def fn(node: fx.Node) -> tuple[int, int]:
        b = output_bytes(node)
        return m * b, m * b
    return fn


# --------------------------------------------------------------------------- fusediff:: ops
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


def _film_silu_steps(node: fx.Node) -> int:
    """Pointwise steps a fused GroupNorm folds in: FiLM scale-shift (2) and SiLU (1)."""
    b = bound_args(node)
    film = 2 if (b.get("scale") is not None or b.get("shift") is not None
                 or b.get("film_scale") is not None or b.get("film_shift") is not None) else 0
    return film + (1 if b.get("apply_silu", True) else 0)


def _input_nbytes(node: fx.Node, name: str) -> int:
    v = _tensor(_b(node, name))
    return _nbytes(v) if v is not None else 0


def _gn_silu_flops(node: fx.Node) -> int:
    return (NORM_FLOPS_PER_ELEMENT + _film_silu_steps(node) * POINTWISE_FLOPS_PER_ELEMENT) * _out_numel(node)


def _gn_silu_away(node: fx.Node) -> tuple[int, int]:
    # unfused, every folded pointwise step writes an out-sized tensor that the next step reads
    b = output_bytes(node) * _film_silu_steps(node)
    return b, b


def _gn_quant_flops(node: fx.Node) -> int:
    x = _tensor(_b(node, "x"))
    n = _numel(x) if x is not None else 0
    return (NORM_FLOPS_PER_ELEMENT + _film_silu_steps(node) + 4) * n  # + delta, absmax, scale, round


def _gn_quant_away(node: fx.Node) -> tuple[int, int]:
    # unfused: GroupNorm (+FiLM/SiLU) writes a float tensor that the quantizer reads back
    b = _input_nbytes(node, "x") * (_film_silu_steps(node) + 1)
    return b, b


def _int8_conv_flops(node: fx.Node) -> int:
    q, out = _tensor(_b(node, "q")), _out(node)
    k = _b(node, "k_size", 3)
    if q is None or out is None or not isinstance(k, int):
        return 0
    return 2 * _numel(out) * _shape(q)[1] * k * k


def _int8_linear_flops(node: fx.Node) -> int:
    q, out = _tensor(_b(node, "q")), _out(node)
    if q is None or out is None or not _shape(q):
        return 0
    geglu = bool(_b(node, "geglu", False))
    rows, k = _numel(q) // max(_shape(q)[-1], 1), _shape(q)[-1]
    n_total = _shape(out)[-1] * (2 if geglu else 1)
    return 2 * rows * k * n_total + (2 * _numel(out) if geglu else 0)


def _int8_linear_away(node: fx.Node) -> tuple[int, int]:
    if not _b(node, "geglu", False):
        return 0, 0
    b = 3 * output_bytes(node)  # the 2F projection and gelu(gate), written and read back
    return b, b


def _winograd_flops(node: fx.Node) -> int:
    # counted as the direct 3x3 convolution it replaces (the transform saves multiplies, not FLOPs
    # in the papers' convention); u is the transformed (36, Cin, Cout) weight
    x, out = _tensor(_b(node, "x", _arg(node, 0))), _out(node)
    if x is None or out is None:
        return 0
    return 2 * _numel(out) * _shape(x)[1] * 9


def _softmax_matmul_flops(node: fx.Node) -> int:  # softmax_matmul(s, stats, v) = softmax(s) @ v
    sv, out = _tensor(_b(node, "s", _arg(node, 0))), _out(node)
    if sv is None or out is None:
        return 0
    return 2 * _numel(out) * _shape(sv)[-1] + 2 * _numel(sv)


def _softmax_matmul_away(node: fx.Node) -> tuple[int, int]:
    # unfused: softmax writes P (s-sized) and the matmul reads it; fused reads s twice (stats pass)
    return 0, _input_nbytes(node, "s")


def _input_elements(k: int, name: str) -> Callable[[fx.Node], int]:
    def fn(node: fx.Node) -> int:
        t = _tensor(_b(node, name, _arg(node, 0)))
        return k * _numel(t) if t is not None else 0
    return fn


# group_norm_silu: unfused GN writes y and SiLU (and FiLM) read it back. geglu: unfused gelu(gate)
# writes and mul reads an out-sized tensor. linear_geglu: also the 2F-wide projection (2 outs) is
# written and read. flash_attention: the baseline is PyTorch's SDPA, itself a fused kernel, so
# nothing is added (an explicit matmul-softmax-matmul site's savings show in the fused estimate
# of the canonical graph instead). MoDiff caches (o_hat, a_hat) are counted from the schema (see
# node_cache_bytes), not here.
OP_COSTS["fusediff::group_norm_silu"] = OpCost("norm", _gn_silu_flops, fused_away=_gn_silu_away)
OP_COSTS["fusediff::group_norm"] = OpCost("norm", _per_element(NORM_FLOPS_PER_ELEMENT))
OP_COSTS["fusediff::group_norm_quantize"] = OpCost("norm", _gn_quant_flops, fused_away=_gn_quant_away)
OP_COSTS["fusediff::flash_attention"] = OpCost("attention", _sdpa_node_flops, fused_away=lambda n: (0, 0))
OP_COSTS["fusediff::softmax_stats"] = OpCost("attention", _input_elements(3, "s"))
OP_COSTS["fusediff::softmax_matmul"] = OpCost("attention", _softmax_matmul_flops, fused_away=_softmax_matmul_away)
OP_COSTS["fusediff::geglu"] = OpCost("other", _per_element(2 * POINTWISE_FLOPS_PER_ELEMENT), fused_away=_fa_out_multiple(1))
OP_COSTS["fusediff::gelu"] = OpCost("other", _per_element(POINTWISE_FLOPS_PER_ELEMENT))
OP_COSTS["fusediff::linear_geglu"] = OpCost(
    "linear", lambda n: _fd_linear_like(n, lambda o: 2 * _shape(o)[-1]) + 2 * _out_numel(n),
    fused_away=_fa_out_multiple(3))
OP_COSTS["fusediff::winograd_conv2d"] = OpCost("conv", _winograd_flops)
OP_COSTS["fusediff::int8_conv2d"] = OpCost("conv", _int8_conv_flops)
OP_COSTS["fusediff::int8_linear"] = OpCost("linear", _int8_linear_flops, fused_away=_int8_linear_away)
OP_COSTS["fusediff::int8_conv2d_baseline"] = OP_COSTS["fusediff::int8_conv2d"]
OP_COSTS["fusediff::int8_linear_baseline"] = OP_COSTS["fusediff::int8_linear"]
OP_COSTS["fusediff::quantize_act"] = OpCost("other", _input_elements(3, "a"))
OP_COSTS["fusediff::modiff_quantize"] = OpCost("other", _input_elements(4, "a"))


def register_op_cost(name: str, cost: OpCost) -> None:
    """Add or replace the cost model of an op, keyed by :func:`target_name`
    (``"fusediff::conv2d_int8"``, ``"my_op"``, ``"module:MyConv"``)."""
    if cost.op_class not in OP_CLASSES + ("matmul",):
        raise ValueError(f"register_op_cost: op_class {cost.op_class!r} not in {OP_CLASSES + ('matmul',)}")
    OP_COSTS[name] = cost


_warned: set[str] = set()


def _heuristic_fusediff(name: str) -> OpCost:
    """Cost model for a fusediff op without a table entry, guessed from its name."""
    if name not in _warned:
        _warned.add(name)
        log.debug("costs: no cost entry for %s; guessing from its name (register_op_cost adds one)", name)
    short = name.split("::", 1)[-1]
    if "conv" in short:
        return OpCost("conv", _fd_conv)
    if "attention" in short or "attn" in short:
        return OpCost("attention", _sdpa_node_flops)
    if "linear" in short or "matmul" in short or "gemm" in short:
        return OpCost("linear", lambda n: _fd_linear_like(n, lambda o: _shape(o)[-1]))
    if "norm" in short:
        return _NORM
    return _POINTWISE


_MAYBE_NOOP = ("to", "type", "float", "half", "bfloat16", "contiguous")


def _returns_input(node: fx.Node, name: str) -> bool:
    """``x.to(x.dtype)``, ``x.float()`` on fp32, ``x.contiguous()`` on a contiguous ``x`` and a
    one-operand einsum that only permutes return (a view of) their input: no copy."""
    if name == "einsum":
        eq, ops = _einsum_operands(node)
        if eq is None or len(ops) != 1 or "->" not in eq:
            return False
        lhs, rhs = (t.replace(" ", "") for t in eq.split("->"))
        return len(set(lhs)) == len(lhs) and sorted(lhs) == sorted(rhs)
    src = node.args[0] if node.args else None
    a, b = _tensor(src), _out(node)
    if a is None or b is None or a.dtype != b.dtype or _shape(a) != _shape(b):
        return False
    if getattr(a, "device", None) != getattr(b, "device", None):
        return False
    if name == "contiguous":
        try:
            return bool(a.is_contiguous())
        except Exception:  # TensorMetadata and friends
            return bool(getattr(a, "is_contiguous", False))
    return True


def op_cost(node: fx.Node) -> OpCost | None:
    """The :class:`OpCost` of a compute node, or None (placeholders, outputs, unknown ops)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    name = target_name(node)
    if (name in _MAYBE_NOOP or name == "einsum") and _returns_input(node, name):
        return _VIEW
    cost = OP_COSTS.get(name)
    if cost is None and name.startswith("fusediff::"):
        cost = _heuristic_fusediff(name)
    return cost


def is_view(node: fx.Node) -> bool:
    """True for nodes that only re-describe memory (reshape, permute, chunk, getitem, ...)."""
    c = op_cost(node)
    return c is not None and c.view


def is_compute(node: fx.Node) -> bool:
    """True for nodes that move data or compute (not placeholders/get_attr/output/views)."""
    return node.op in ("call_function", "call_method", "call_module") and not is_view(node)


# --------------------------------------------------------------------------- weights / params
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


# --------------------------------------------------------------------------- graph totals
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
