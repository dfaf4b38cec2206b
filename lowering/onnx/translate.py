"""The translation table: ``fusediff::`` ops -> standard ONNX operators, written with onnxscript.

Every ``fusediff::`` op is translated into default-domain ONNX operators, so any ONNX runtime
runs the file without a plugin (a custom-domain node would export, but onnxruntime cannot run
it). The mapping depends on the opset:

=========================  ======================================================================
fusediff op                ONNX
=========================  ======================================================================
group_norm_silu            opset >= 21: ``GroupNormalization`` (+ ``Mul``/``Add`` FiLM
                           ``y*(1+scale)+shift``, + ``x*Sigmoid(x)`` SiLU); opset 18-20:
                           ``Reshape`` + ``ReduceMean`` mean/variance math + affine ``Mul``/``Add``
flash_attention            opset >= 23 and ``attention="auto"|"onnx"``: ``Attention``;
                           otherwise ``MatMul`` -> ``Mul(scale)`` (+ mask) -> ``Softmax`` -> ``MatMul``
gelu                       opset >= 20: ``Gelu``; below: ``0.5*x*(1+Erf(x/sqrt2))`` (or tanh form)
geglu                      ``Split`` -> value ``*`` gelu(gate) (as above)
linear_geglu               ``MatMul(x, W^T)`` (+ ``Add`` bias) -> GEGLU as above
winograd_conv2d            ``Conv`` with the 3x3 weight recovered from U = G g G^T by the
                           pseudo-inverse of G (exact up to fp32 rounding)
softmax_stats              ``ReduceMax`` / ``Exp`` / ``ReduceSum`` -> ``Concat``
softmax_matmul             ``Exp(s - max) * 1/sum`` -> ``MatMul``
=========================  ======================================================================

All translations compute in float32 (like the kernels and their references) and cast back to the
input dtype. Opsets 18..25 are accepted (torch.onnx builds at opset 18 and up-converts; nodes
emitted here carry the version of the schema they use, so ``GroupNormalization`` keeps its
opset-21 meaning). A ``fusediff::`` op without a translation raises :class:`UnsupportedOpError`
naming the op before anything is exported.

Also here: :func:`fused_ops_in` and :func:`check_translatable` (the fusediff ops a graph calls, and
the check against the table).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from .common import ATTENTION_MODES, DEFAULT_OPSET, UnsupportedOpError, _check_opset


# The functions below run under torch.onnx's tracing evaluator: every ``opNN.X(...)`` call records
# one ONNX node; Python control flow picks the nodes at export time. Arguments arrive as
# onnx_ir Values (tensors) or Python scalars, named like the op's schema.
def _onnx():
    """onnxscript modules, imported lazily so ``import lowering.onnx`` stays cheap."""
    import onnxscript
    from onnxscript import ir, opset18, opset20, opset21, opset23

    return onnxscript, ir, opset18, opset20, opset21, opset23


# Winograd F(4x4, 3x3) filter transform G (kernels/winograd.py) and its pseudo-inverse: G has full
# column rank, so g = G^+ (G g G^T) G^+T recovers the 3x3 filter exactly (up to rounding).
_WINOGRAD_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64)
_WINOGRAD_G_PINV = np.linalg.pinv(_WINOGRAD_G)  # (3, 6)


@dataclass(frozen=True)
class _Ctx:
    opset: int
    attention: str


def _rank(op_name: str, x) -> int:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise UnsupportedOpError(op_name, "input rank unknown at export time")
    return len(shape)


def _dim(x, i: int):
    shape = getattr(x, "shape", None)
    if shape is None:
        return None
    d = shape[i]
    return d if isinstance(d, int) else None


def _to_float(x):
    _, ir, op, *_ = _onnx()
    if x is None:
        return None
    return x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)


def _back(y, like):
    _, ir, op, *_ = _onnx()
    return y if like.dtype == ir.DataType.FLOAT else op.Cast(y, to=like.dtype)


def _const(arr: np.ndarray):
    _, ir, op, *_ = _onnx()
    return op.Constant(value=ir.tensor(np.ascontiguousarray(arr)))


def _gelu_f32(x, approximate: str, opset: int):
    """GELU of a float32 value: ``Gelu`` (opset >= 20) or the erf/tanh formula."""
    _, _, op, op20, *_ = _onnx()
    if approximate not in ("none", "tanh"):
        raise UnsupportedOpError("fusediff::gelu", f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if opset >= 20:
        return op20.Gelu(x, approximate=approximate)
    if approximate == "tanh":
        inner = op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, x), x), 0.044715)), math.sqrt(2.0 / math.pi))
        return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(inner), 1.0))
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Mul(x, 1.0 / math.sqrt(2.0))), 1.0))


def _geglu_f32(x, approximate: str, opset: int):
    _, _, op, *_ = _onnx()
    h, g = op.Split(x, axis=-1, num_outputs=2)
    return op.Mul(h, _gelu_f32(g, approximate, opset))


def _make_group_norm_silu(ctx: _Ctx) -> Callable:
    def group_norm_silu(x, weight=None, bias=None, scale=None, shift=None, num_groups: int = 32,
                        eps: float = 1e-5, apply_silu: bool = True):
        _, _, op, _, op21, _ = _onnx()
        name = "fusediff::group_norm_silu"
        rank = _rank(name, x)
        if rank < 3:
            raise UnsupportedOpError(name, f"x must be (N, C, ...), got rank {rank}")
        xf = _to_float(x)
        C = _dim(x, 1)
        bshape = [-1] + [1] * (rank - 2)  # (C,) -> (C, 1, ..) broadcast over (N, C, ...)
        if ctx.opset >= 21:
            if C is None:
                raise UnsupportedOpError(name, "the channel count must be static for GroupNormalization")
            w = _to_float(weight) if weight is not None else _const(np.ones(C, np.float32))
            b = _to_float(bias) if bias is not None else _const(np.zeros(C, np.float32))
            y = op21.GroupNormalization(xf, w, b, num_groups=int(num_groups), epsilon=float(eps), stash_type=1)
        else:
            # GroupNorm = per-(sample, group) standardization of the flattened group.
            xg = op.Reshape(xf, _const(np.array([0, int(num_groups), -1], np.int64)))
            axes = _const(np.array([2], np.int64))
            mean = op.ReduceMean(xg, axes, keepdims=1)
            d = op.Sub(xg, mean)
            var = op.ReduceMean(op.Mul(d, d), axes, keepdims=1)
            y = op.Reshape(op.Div(d, op.Sqrt(op.Add(var, float(eps)))), op.Shape(xf))
            if weight is not None:
                y = op.Mul(y, op.Reshape(_to_float(weight), _const(np.array(bshape, np.int64))))
            if bias is not None:
                y = op.Add(y, op.Reshape(_to_float(bias), _const(np.array(bshape, np.int64))))
        film_axes = _const(np.arange(2, rank, dtype=np.int64))  # (N, C) -> (N, C, 1, ..)
        if scale is not None:  # FiLM: y * (1 + scale)
            y = op.Mul(y, op.Add(op.Unsqueeze(_to_float(scale), film_axes), 1.0))
        if shift is not None:
            y = op.Add(y, op.Unsqueeze(_to_float(shift), film_axes))
        if apply_silu:
            y = op.Mul(y, op.Sigmoid(y))
        return _back(y, x)

    return group_norm_silu


def _make_flash_attention(ctx: _Ctx) -> Callable:
    def flash_attention(q, k, v, attn_mask=None, scale=None):
        _, ir, op, _, _, op23 = _onnx()
        name = "fusediff::flash_attention"
        if _rank(name, q) != 4:
            raise UnsupportedOpError(name, "q, k, v must be (B, H, L, D)")
        D = _dim(q, 3)
        if scale is None:
            if D is None:
                raise UnsupportedOpError(name, "head dim must be static when scale is None")
            scale = 1.0 / math.sqrt(D)
        qf, kf, vf = _to_float(q), _to_float(k), _to_float(v)
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dtype == ir.DataType.BOOL else _to_float(attn_mask)
        use_onnx = ctx.attention == "onnx" or (ctx.attention == "auto" and ctx.opset >= 23)
        if use_onnx:
            if ctx.opset < 23:
                raise UnsupportedOpError(name, f"attention='onnx' needs opset >= 23 (Attention), got {ctx.opset}")
            outs = op23.Attention(qf, kf, vf, mask, scale=float(scale)) if mask is not None \
                else op23.Attention(qf, kf, vf, scale=float(scale))
            # Y plus the optional present_key/present_value/qk outputs; the unused ones are
            # dropped after export (_trim_unused_outputs).
            y = outs[0] if isinstance(outs, (tuple, list)) else outs
            return _back(y, q)
        s = op.Mul(op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])), float(scale))
        if mask is not None:
            if attn_mask.dtype == ir.DataType.BOOL:
                s = op.Where(mask, s, float("-inf"))
            else:
                s = op.Add(s, mask)
        p = op.Softmax(s, axis=-1)
        if mask is not None:
            # Rows with every logit -inf (fully masked) give 0 like SDPA, not Softmax's NaN.
            ninf = op.Cast(op.IsInf(s, detect_negative=1, detect_positive=0), to=ir.DataType.INT32)
            full = op.Cast(op.ReduceMin(ninf, _const(np.array([-1], np.int64)), keepdims=1), to=ir.DataType.BOOL)
            p = op.Where(full, 0.0, p)
        return _back(op.MatMul(p, vf), q)

    return flash_attention


def _make_gelu(ctx: _Ctx) -> Callable:
    def gelu(x, approximate: str = "none"):
        return _back(_gelu_f32(_to_float(x), approximate, ctx.opset), x)

    return gelu


def _make_geglu(ctx: _Ctx) -> Callable:
    def geglu(x, approximate: str = "none"):
        return _back(_geglu_f32(_to_float(x), approximate, ctx.opset), x)

    return geglu


def _make_linear_geglu(ctx: _Ctx) -> Callable:
    def linear_geglu(x, weight, bias=None, approximate: str = "none"):
        _, _, op, *_ = _onnx()
        p = op.MatMul(_to_float(x), op.Transpose(_to_float(weight), perm=[1, 0]))
        if bias is not None:
            p = op.Add(p, _to_float(bias))
        return _back(_geglu_f32(p, approximate, ctx.opset), x)

    return linear_geglu


def _make_winograd_conv2d(ctx: _Ctx) -> Callable:
    def winograd_conv2d(x, u, bias=None, padding: int = 1):
        _, _, op, *_ = _onnx()
        name = "fusediff::winograd_conv2d"
        if _rank(name, u) != 3 or _dim(u, 0) != 36:
            raise UnsupportedOpError(name, "u must be (36, Cin, Cout) from winograd_weight_transform")
        const = getattr(u, "const_value", None)
        if const is not None:  # a weight initializer: recover the 3x3 filter once, here
            uu = np.asarray(const.numpy(), dtype=np.float64)
            cin, cout = uu.shape[1:]
            uu = uu.reshape(6, 6, cin, cout).transpose(3, 2, 0, 1)  # (Cout, Cin, 6, 6)
            w = _const((_WINOGRAD_G_PINV @ uu @ _WINOGRAD_G_PINV.T).astype(np.float32))
        else:  # computed at run time: the same math in ONNX ops
            cin, cout = _dim(u, 1), _dim(u, 2)
            if cin is None or cout is None:
                raise UnsupportedOpError(name, "u must have static channel counts")
            uu = op.Transpose(op.Reshape(_to_float(u), _const(np.array([6, 6, cin, cout], np.int64))), perm=[3, 2, 0, 1])
            gp = _const(_WINOGRAD_G_PINV.astype(np.float32))
            w = op.MatMul(op.MatMul(gp, uu), _const(_WINOGRAD_G_PINV.T.astype(np.float32)))
        p = int(padding)
        y = op.Conv(_to_float(x), w, _to_float(bias), kernel_shape=[3, 3], pads=[p, p, p, p]) if bias is not None \
            else op.Conv(_to_float(x), w, kernel_shape=[3, 3], pads=[p, p, p, p])
        return _back(y, x)

    return winograd_conv2d


def _make_softmax_stats(ctx: _Ctx) -> Callable:
    def softmax_stats(s):
        _, _, op, *_ = _onnx()
        sf = _to_float(s)
        axes = _const(np.array([1], np.int64))
        m = op.ReduceMax(sf, axes, keepdims=1)  # (N, 1)
        m_use = op.Where(op.IsInf(m, detect_negative=1, detect_positive=0), 0.0, m)
        total = op.ReduceSum(op.Exp(op.Sub(sf, m_use)), axes, keepdims=1)
        return op.Concat(m, total, axis=1)

    return softmax_stats


def _make_softmax_matmul(ctx: _Ctx) -> Callable:
    def softmax_matmul(s, stats, v):
        _, _, op, *_ = _onnx()
        shape = op.Concat(op.Shape(s, start=0, end=2), _const(np.array([1], np.int64)), axis=0)  # (B, Lq, 1)
        m = op.Reshape(op.Slice(stats, _const(np.array([0], np.int64)), _const(np.array([1], np.int64)),
                                _const(np.array([1], np.int64))), shape)
        total = op.Reshape(op.Slice(stats, _const(np.array([1], np.int64)), _const(np.array([2], np.int64)),
                                    _const(np.array([1], np.int64))), shape)
        m = op.Where(op.IsInf(m, detect_negative=1, detect_positive=0), 0.0, m)
        zero = op.Equal(total, 0.0)
        inv = op.Where(zero, 0.0, op.Reciprocal(op.Where(zero, 1.0, total)))
        p = op.Mul(op.Exp(op.Sub(_to_float(s), m)), inv)
        return _back(op.MatMul(p, _to_float(v)), v)

    return softmax_matmul


# ---------------------------------------------------------------------------- quantized ops
# Low-bit ops (kernels/quantize.py, conv_int8.py, linear_int8.py). The integer GEMMs become
# ConvInteger / MatMulInteger (int8 x int8 -> int32, exact); the dequantization s_a[n] * s_w[c]
# (+ bias) follows in float32, in the reference's order. Only the pure ops are translated. The
# in-place MoDiff ops mutate module buffers; a quantized model is exported as
# fxpasses.modiff.ExplicitStateModel, whose caches are graph inputs/outputs and whose layers call
# the pure ops (export_onnx does that), so these never reach the exporter from export_onnx.
_INPLACE_WHY = ("it updates the MoDiff caches in place; export_onnx exports a quantized model with its caches as "
                "graph inputs/outputs (fxpasses.modiff.ExplicitStateModel), whose layers call the pure ops")
_WHY_UNTRANSLATED = {name: _INPLACE_WHY for name in ("fusediff::modiff_quantize", "fusediff::group_norm_quantize",
                                                     "fusediff::int8_conv2d", "fusediff::int8_linear")}


def _weight_levels(w_q, w_bits: int, k: int):
    """int8 weight levels (F, K) from ``w_q``: int8 as is, or INT4 unpacked in the graph.

    INT4 packing (kernels/quantize.pack_int4): element 2i in the low nibble of byte i, 2i+1 in the
    high nibble, two's complement; sign extension is ``(v xor 8) - 8``.
    """
    _, ir, op, *_ = _onnx()
    if int(w_bits) == 8:
        return w_q
    lo = op.Cast(op.BitwiseAnd(w_q, _const(np.array(15, np.uint8))), to=ir.DataType.INT32)
    hi = op.Cast(op.BitShift(w_q, _const(np.array(4, np.uint8)), direction="RIGHT"), to=ir.DataType.INT32)
    eight = _const(np.array(8, np.int32))
    lo, hi = (op.Sub(op.BitwiseXor(v, eight), eight) for v in (lo, hi))
    ax = _const(np.array([2], np.int64))
    pairs = op.Concat(op.Unsqueeze(lo, ax), op.Unsqueeze(hi, ax), axis=2)  # (F, ceil(K/2), 2)
    flat = op.Reshape(pairs, _const(np.array([0, -1], np.int64)))  # (F, 2*ceil(K/2)), K order kept
    w = op.Slice(flat, _const(np.array([0], np.int64)), _const(np.array([int(k)], np.int64)),
                 _const(np.array([1], np.int64)))
    return op.Cast(w, to=ir.DataType.INT8)


def _make_quantize_act(ctx: _Ctx) -> Callable:
    def quantize_act(a, bits: int = 8, per_sample: bool = True):
        _, ir, op, *_ = _onnx()
        name = "fusediff::quantize_act"
        rank = _rank(name, a)
        if int(bits) not in (4, 8):
            raise UnsupportedOpError(name, f"bits must be 4 or 8, got {bits!r}")
        qmax = float((1 << (int(bits) - 1)) - 1)
        af = _to_float(a)
        flat = op.Reshape(af, _const(np.array([0, -1] if per_sample else [1, -1], np.int64)))  # (N|1, rest)
        axes = _const(np.array([1], np.int64))
        # absmax per sample; + sum(x * 0) makes it NaN when the sample holds a NaN/Inf, as torch's
        # amax does (ReduceMax may skip NaN), so the sample dequantizes to NaN like the reference.
        amax = op.Add(op.ReduceMax(op.Abs(flat), axes, keepdims=0), op.ReduceSum(op.Mul(flat, 0.0), axes, keepdims=0))
        scale = op.Where(op.Equal(amax, 0.0), 1.0, op.Div(amax, qmax))  # (N,) or (1,)
        v = op.Div(af, op.Reshape(scale, _const(np.array([-1] + [1] * (rank - 1), np.int64))))
        lv = op.Round(op.Clip(v, _const(np.array(-qmax, np.float32)), _const(np.array(qmax, np.float32))))
        lv = op.Where(op.IsNaN(v), 0.0, lv)  # Q(NaN) = 0 (the scale carries the NaN)
        return op.Cast(lv, to=ir.DataType.INT8), scale

    return quantize_act


def _make_int8_conv2d(ctx: _Ctx) -> Callable:
    def int8_conv2d_baseline(q, act_scale, w_q, w_scale, bias=None, stride: int = 1, padding: int = 0,
                             w_bits: int = 8, k_size: int = 3):
        _, ir, op, *_ = _onnx()
        name = "fusediff::int8_conv2d_baseline"
        cin, cout, k = _dim(q, 1), _dim(w_q, 0), int(k_size)
        if cin is None or cout is None:
            raise UnsupportedOpError(name, "the channel counts must be static")
        w = _weight_levels(w_q, w_bits, k * k * cin)  # (Cout, K) in (r, s, cin) order
        w4 = op.Transpose(op.Reshape(w, _const(np.array([cout, k, k, cin], np.int64))), perm=[0, 3, 1, 2])
        p, st = int(padding), int(stride)
        acc = op.ConvInteger(q, w4, kernel_shape=[k, k], pads=[p, p, p, p], strides=[st, st])  # W_int ⊗ q, int32
        o = op.Mul(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Reshape(act_scale, _const(np.array([-1, 1, 1, 1], np.int64)))),
                   op.Reshape(w_scale, _const(np.array([1, -1, 1, 1], np.int64))))
        if bias is not None:
            o = op.Add(o, op.Reshape(_to_float(bias), _const(np.array([1, -1, 1, 1], np.int64))))
        return o

    return int8_conv2d_baseline


def _make_int8_linear(ctx: _Ctx) -> Callable:
    def int8_linear_baseline(q, act_scale, w_q, w_scale, bias=None, w_bits: int = 8, geglu: bool = False):
        _, ir, op, *_ = _onnx()
        name = "fusediff::int8_linear_baseline"
        k, f = _dim(q, _rank(name, q) - 1), _dim(w_q, 0)
        if k is None or f is None:
            raise UnsupportedOpError(name, "the feature dims must be static")
        w = _weight_levels(w_q, w_bits, k)  # (F, K)
        acc = op.MatMulInteger(q, op.Transpose(w, perm=[1, 0]))  # q @ W_intᵀ, int32 (..., F)
        # act_scale has T (per token), N (per sample) or 1 entries; each covers a block of rows.
        rows = op.Reshape(op.Cast(acc, to=ir.DataType.FLOAT),
                          op.Concat(op.Shape(act_scale), _const(np.array([-1, f], np.int64)), axis=0))
        pre = op.Mul(op.Mul(rows, op.Reshape(act_scale, _const(np.array([-1, 1, 1], np.int64)))), w_scale)
        pre = op.Reshape(pre, op.Shape(acc))
        if bias is not None:
            pre = op.Add(pre, _to_float(bias))
        return _geglu_f32(pre, "none", ctx.opset) if geglu else pre

    return int8_linear_baseline


_MAKERS: dict[str, Callable[[_Ctx], Callable]] = {
    "group_norm_silu": _make_group_norm_silu,
    "flash_attention": _make_flash_attention,
    "gelu": _make_gelu,
    "geglu": _make_geglu,
    "linear_geglu": _make_linear_geglu,
    "winograd_conv2d": _make_winograd_conv2d,
    "softmax_stats": _make_softmax_stats,
    "softmax_matmul": _make_softmax_matmul,
    "quantize_act": _make_quantize_act,
    "int8_conv2d_baseline": _make_int8_conv2d,
    "int8_linear_baseline": _make_int8_linear,
}


def translation_table(opset: int = DEFAULT_OPSET, *, attention: str = "auto") -> dict[Any, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: every fusediff op -> standard ONNX.

    Args:
        opset: target ONNX opset (18..25); picks GroupNormalization (>= 21), Gelu (>= 20) and
            Attention (>= 23).
        attention: ``"auto"`` (``Attention`` at opset >= 23, else MatMul/Softmax), ``"onnx"``
            (always ``Attention``; needs opset >= 23) or ``"matmul"`` (always MatMul/Softmax).
    Returns:
        ``{torch.ops.fusediff.<op>.default: translation function}`` for the ops registered now.
    """
    _check_opset(opset)
    if attention not in ATTENTION_MODES:
        raise ValueError(f"translation_table: attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if attention == "onnx" and opset < 23:
        raise ValueError(f"translation_table: attention='onnx' needs opset >= 23 (ONNX Attention), got {opset}")
    ctx = _Ctx(opset=opset, attention=attention)
    table = {}
    for name, make in _MAKERS.items():
        packet = getattr(torch.ops.fusediff, name, None)
        if packet is not None:
            table[packet.default] = make(ctx)
    return table


def fused_ops_in(gm: fx.GraphModule) -> list[str]:
    """Names (``"fusediff::<op>"``) of the fusediff ops called in ``gm``, first-use order, unique.

    Looks into ``torch.cond`` branch graphs and through ``auto_functionalized`` wrappers (the form
    torch.export gives an op that mutates its arguments).
    """
    out: dict[str, None] = {}
    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        for n in sub.graph.nodes:
            if n.op != "call_function":
                continue
            t = n.target
            if isinstance(t, torch._ops.HigherOrderOperator) and "auto_functionalized" in t.name() and n.args:
                t = n.args[0]
            if isinstance(t, torch._ops.OpOverload) and t.namespace == "fusediff":
                out[t._schema.name] = None
    return list(out)


def check_translatable(gm: fx.GraphModule, table: dict[Any, Callable] | None = None) -> None:
    """Raise :class:`UnsupportedOpError` naming the first fusediff op of ``gm`` without a translation."""
    table = translation_table() if table is None else table
    known = {t._schema.name for t in table}
    for name in fused_ops_in(gm):
        if name not in known:
            raise UnsupportedOpError(name, _WHY_UNTRANSLATED.get(name, ""))
