"""FLOP formulas of the torch/aten ops and ``call_module`` leaves, and the counting conventions.

FLOPs = 2 x multiply-accumulates for contractions (conv, linear, matmul, einsum, SDPA); norms,
softmax and pointwise ops count a fixed number per output element; data movement counts 0 (see
the :mod:`fxpasses.costs` docstring). The op table (:mod:`.ops`) maps each target name to one of
these formulas.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch.fx as fx

from .meta import _arg, _numel, _out, _out_numel, _shape, _submodule, _tensor, _tensor_args, target_name

log = logging.getLogger("fusediff.fxpasses")

#: Op classes of the cost breakdown, in table order.
OP_CLASSES: tuple[str, ...] = ("conv", "linear", "attention", "norm", "other")

NORM_FLOPS_PER_ELEMENT = 7
SOFTMAX_FLOPS_PER_ELEMENT = 5
POINTWISE_FLOPS_PER_ELEMENT = 1


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


def _module_conv_flops(node: fx.Node, transposed: bool = False) -> int:
    mod, out = _submodule(node), _out(node)
    if mod is None or out is None:
        return 0
    k = math.prod(tuple(mod.weight.shape)[1:])
    if transposed:
        x = _tensor(_arg(node, 0))
        return 2 * (_numel(x) if x is not None else 0) * k
    return 2 * _numel(out) * k
