"""The op table: one :class:`OpCost` (op class, FLOP formula, view flag, fused-away bytes) per
target name, the ``fusediff::`` ops included, and the lookups built on it.

:func:`op_cost` resolves a node (a no-op ``.to()``/``.contiguous()`` or a permuting one-operand
einsum is a view; a ``fusediff::`` op without an entry gets one guessed from its name);
:func:`register_op_cost` adds entries for new ops.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from .flops import (NORM_FLOPS_PER_ELEMENT, OP_CLASSES, POINTWISE_FLOPS_PER_ELEMENT, SOFTMAX_FLOPS_PER_ELEMENT,
                    _addmm_flops, _baddbmm_flops, _conv_flops, _einsum_node_flops, _einsum_operands, _fd_conv,
                    _fd_linear_like, _linear_flops, _matmul_flops, _module_conv_flops, _per_element,
                    _reduction_flops, _sdpa_node_flops, _zero)
from .meta import _arg, _b, _nbytes, _numel, _out, _out_numel, _shape, _tensor, bound_args, output_bytes, target_name

log = logging.getLogger("fusediff.fxpasses")


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


def _fa_out_multiple(m: int) -> Callable[[fx.Node], tuple[int, int]]:
    """``fused_away`` of m*out bytes read and m*out bytes written."""
    def fn(node: fx.Node) -> tuple[int, int]:
        b = output_bytes(node)
        return m * b, m * b
    return fn


# --------------------------------------------------------------------------- fusediff:: ops
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
