"""ONNX export of fusediff-rewritten models, onto standard ONNX operators only.

Pipeline::

    torch.export (dynamic batch)  ->  fxpasses.match.run_passes (rewrite into fusediff:: ops)
        ->  torch.onnx.export(dynamo=True, custom_translation_table=translation_table(opset))
        ->  onnx.checker  ->  model.onnx            (run it with run_onnx / onnxruntime)

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

Example:
    >>> from lowering.onnx_export import export_onnx, run_onnx
    >>> path = export_onnx(unet.eval(), (latents, t), "unet.onnx", example_kwargs={"encoder_hidden_states": ctx})
    >>> (eps,) = run_onnx(path, latents, t, ctx)
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree


log = logging.getLogger("fusediff.lowering")

MIN_OPSET = 18
MAX_OPSET = 25
DEFAULT_OPSET = 21
ATTENTION_MODES = ("auto", "onnx", "matmul")
#: Above this many parameter bytes the weights go to an external ``<path>.data`` file (ONNX protobuf
#: files are limited to 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


class OnnxExportError(RuntimeError):
    """The model could not be exported or the exported file failed ``onnx.checker``."""


class UnsupportedOpError(OnnxExportError):
    """A ``fusediff::`` op (or an argument combination) has no ONNX translation.

    Attributes:
        op: the op name, e.g. ``"fusediff::int8_linear"``.
    """

    def __init__(self, op: str, why: str = "") -> None:
        self.op = op
        msg = f"fusediff ONNX export: no translation for {op}"
        super().__init__(msg + (f": {why}" if why else "") + f". Translated ops: {', '.join(sorted(TRANSLATED_OPS))}. "
                         "Rewrite without this op (export_onnx(..., rewrite=False) or a RewriteConfig that "
                         "leaves its family out) or add a translation to lowering/onnx_export.py.")


# ============================================================================ translations
# The functions below run under torch.onnx's tracing evaluator: every ``opNN.X(...)`` call records
# one ONNX node; Python control flow picks the nodes at export time. Arguments arrive as
# onnx_ir Values (tensors) or Python scalars, named like the op's schema.
def _onnx():
    """onnxscript modules, imported lazily so ``import lowering.onnx_export`` stays cheap."""
    import onnxscript
    from onnxscript import ir, opset18, opset20, opset21, opset23

    return onnxscript, ir, opset18, opset20, opset21, opset23


TRANSLATED_OPS = ("fusediff::group_norm_silu", "fusediff::flash_attention", "fusediff::gelu", "fusediff::geglu",
                  "fusediff::linear_geglu", "fusediff::winograd_conv2d", "fusediff::softmax_stats",
                  "fusediff::softmax_matmul", "fusediff::quantize_act", "fusediff::int8_conv2d_baseline",
                  "fusediff::int8_linear_baseline")

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


def _check_opset(opset: int) -> None:
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"export_onnx: opset must be an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r} "
                         "(torch.onnx's dynamo exporter builds at opset 18 and only converts upwards)")


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


# ============================================================================ capture + rewrite
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


def _dynamic_shapes(fn: Any, args: tuple, kwargs: dict, batch: bool, spatial: bool, caches: tuple = ()):
    """``Dim.AUTO`` on dim 0 of every tensor input (batch) and dims 2.. of rank-4 inputs (spatial).

    AUTO lets torch.export keep a dim static when the model needs it (no error), so the result
    says which dims really are dynamic. ``caches`` (MoDiff state inputs) get AUTO on every dim
    but the channel dim when ``spatial`` (a linear's (N, L, K) cache follows H*W), else on dim 0.
    """
    if not (batch or spatial):
        return None
    from torch.export import Dim, ShapesCollection

    sc = ShapesCollection()
    seen = False
    cache_ids = {id(c) for c in caches}
    for t in pytree.tree_leaves((args, kwargs)):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            continue
        spec: dict[int, Any] = {}
        if batch:
            spec[0] = Dim.AUTO
        if spatial and id(t) in cache_ids:
            channel = 1 if t.dim() == 4 else t.dim() - 1
            spec.update({i: Dim.AUTO for i in range(1, t.dim()) if i != channel})
        elif spatial and t.dim() == 4:
            spec[2] = Dim.AUTO
            spec[3] = Dim.AUTO
        if spec:
            sc[t] = spec
            seen = True
    return sc.dynamic_shapes(fn, args, kwargs) if seen else None


@dataclass
class Prepared:
    """A captured (and maybe rewritten) graph ready for :func:`export_graph`.

    Attributes:
        gm: the graph (``ep.module()`` of the dynamic-shape export, rewritten in place).
        args, kwargs: the example inputs it was captured with.
        result: the :class:`fxpasses.match.PassResult` (None when ``rewrite=False``).
        dynamic_batch, dynamic_spatial: what was requested.
    """

    gm: fx.GraphModule
    args: tuple
    kwargs: dict
    result: Any = None
    dynamic_batch: bool = True
    dynamic_spatial: bool = False
    fused_ops: list[str] = field(default_factory=list)
    exported: Any = None
    #: MoDiff state (:class:`fxpasses.modiff.StateSlot` list) when the model carries caches: then
    #: ``gm`` captures the integer step (:class:`fxpasses.modiff.ExplicitStateModel`, ``args`` =
    #: ``(model_args, model_kwargs, caches)``) and ``first`` the float first step (``args`` =
    #: ``(model_args, model_kwargs)``); :func:`export_graph` joins them under one ``If``.
    state: list = field(default_factory=list)
    first: "Prepared | None" = None
    model_inputs: int = 0
    quant: str = ""

    def _cache_examples(self) -> tuple:
        return tuple(self.args[2]) if self.state and self.first is not None else ()


def _unwrap(model_or_optimized: torch.nn.Module, rewrite_config):
    from .transform import OptimizedModule

    if isinstance(model_or_optimized, OptimizedModule):
        cfg = rewrite_config or model_or_optimized._fd_config.rewrite
        return model_or_optimized.original, cfg
    if not isinstance(model_or_optimized, torch.nn.Module):
        raise TypeError(f"export_onnx: expected an nn.Module or OptimizedModule, got {type(model_or_optimized).__name__}")
    return model_or_optimized, rewrite_config


def prepare(model_or_optimized: torch.nn.Module, example_args: tuple, *, example_kwargs: dict | None = None,
            dynamic_batch: bool = True, dynamic_spatial: bool = False, rewrite: bool = True,
            rewrite_config=None) -> Prepared:
    """Capture ``model`` with ``torch.export`` (dynamic dims as requested) and run the rewrite passes.

    The first half of :func:`export_onnx`; use it to export one capture at several opsets. A
    MoDiff-quantized model (:func:`fxpasses.modiff.quantize`) is captured twice, as
    :class:`fxpasses.modiff.ExplicitStateModel` for its float first step and for its integer
    step, with the caches as inputs/outputs (sized by one first step on the example inputs; the
    model's own state is left as it was).
    """
    from ..fxpasses import modiff
    from .transform import first_device

    model, cfg = _unwrap(model_or_optimized, rewrite_config)
    args, kwargs = tuple(example_args), dict(example_kwargs or {})
    was_training = model.training
    model.eval()
    try:
        layers = modiff.quant_layers(model, graphs=False)
        n_in = sum(1 for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        if not any(m.state_kinds() for m in layers):
            prep = _capture(model, args, kwargs, (), dynamic_batch, dynamic_spatial, rewrite, cfg)
        else:
            state = modiff.state_slots(model, args, kwargs)
            dev = first_device(args, kwargs)
            caches = tuple(torch.zeros(sl.shape, dtype=sl.dtype, device=dev) for sl in state)
            prep = _capture(modiff.ExplicitStateModel(model, state, first=False).eval(), (args, kwargs, caches), {},
                            caches, dynamic_batch, dynamic_spatial, rewrite, cfg)
            prep.first = _capture(modiff.ExplicitStateModel(model, state, first=True).eval(), (args, kwargs), {}, (),
                                  dynamic_batch, dynamic_spatial, rewrite, cfg)
            prep.state = state
    finally:
        model.train(was_training)
    prep.model_inputs = n_in
    if layers:
        rep = getattr(model, "_fusediff_quant_report", None)
        prep.quant = rep.config.label if rep is not None else layers[0].mode
    return prep


def _capture(fn: torch.nn.Module, args: tuple, kwargs: dict, caches: tuple, dynamic_batch: bool,
             dynamic_spatial: bool, rewrite: bool, cfg) -> Prepared:
    from ..fxpasses.match import run_passes

    dyn = None
    try:
        dyn = _dynamic_shapes(fn, args, kwargs, dynamic_batch, dynamic_spatial, caches)
        with torch.no_grad():
            ep = torch.export.export(fn, args, kwargs, dynamic_shapes=dyn)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        hint = " (try dynamic_batch=False / dynamic_spatial=False)" if dyn is not None else ""
        name = type(getattr(fn, "model", fn)).__name__
        raise OnnxExportError(f"export_onnx: torch.export failed on {name}{hint}: {e}") from e
    gm = ep.module()
    res = run_passes(gm, cfg) if rewrite else None
    if res is not None:
        log.info("export_onnx: rewritten %s", res.rewritten)
    return Prepared(gm=gm, args=args, kwargs=kwargs, result=res, dynamic_batch=dynamic_batch,
                    dynamic_spatial=dynamic_spatial, fused_ops=fused_ops_in(gm))


# ============================================================================ export
def _param_bytes(gm: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _exported_program(prep: Prepared):
    """``torch.export`` of the rewritten graph (cached on ``prep``: one re-export for every opset)."""
    if prep.exported is None:
        dyn = _dynamic_shapes(prep.gm, prep.args, prep.kwargs, prep.dynamic_batch, prep.dynamic_spatial,
                              prep._cache_examples())
        try:
            with torch.no_grad():
                prep.exported = torch.export.export(prep.gm, prep.args, prep.kwargs, dynamic_shapes=dyn)
        except Exception as e:  # noqa: BLE001
            raise OnnxExportError(f"export_onnx: torch.export of the rewritten graph failed: {e}") from e
    return prep.exported


def _optimize(model) -> None:
    """onnxscript's optimizer without its pattern-rewrite rules (those cost ~2/3 of the export time
    on a U-Net and onnxruntime fuses at load anyway): constant folding, dead-node removal,
    constants lifted to initializers, deduplication, CSE."""
    import onnx_ir.passes.common as common
    import onnxscript.optimizer as opt
    from onnxscript import ir

    ir.passes.Sequential(
        common.InlinePass(),
        common.RemoveUnusedNodesPass(),
    )(model)
    opt.fold_constants_ir(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _to_onnx(prep: Prepared, opset: int, table: dict, optimize: bool, external: bool):
    """torch.onnx export of one capture (translatability checked by the caller); returns the
    (optimized) ``torch.onnx.ONNXProgram``."""
    ep = _exported_program(prep)
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    old_level = reg_log.level
    reg_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" x4
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*training mode.*")
            prog = torch.onnx.export(ep, prep.args, kwargs=prep.kwargs, dynamo=True, opset_version=opset,
                                     custom_translation_table=table, optimize=False, external_data=external,
                                     verbose=False)
    except Exception as e:  # noqa: BLE001
        raise OnnxExportError(f"export_onnx: torch.onnx.export failed: {e}") from e
    finally:
        reg_log.setLevel(old_level)
    if optimize:
        _optimize(prog.model)
    _trim_unused_outputs(prog.model)
    return prog


def export_graph(prep: Prepared, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                 attention: str = "auto", check: bool = True, optimize: bool = True) -> str:
    """Export a :class:`Prepared` graph to ``path`` at ``opset``; returns the path.

    Raises :class:`UnsupportedOpError` (op named) before exporting when a fusediff op has no
    translation, :class:`OnnxExportError` when torch.onnx fails or ``onnx.checker`` rejects
    the file. A stateful (MoDiff) capture becomes one model whose ``If`` on ``first_step`` runs
    the float first step or the integer step (see :func:`_join_first_step`).
    """
    import onnx

    _check_opset(opset)
    table = translation_table(opset, attention=attention)
    for p in (prep, prep.first):
        if p is not None:
            check_translatable(p.gm, table)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    external = _param_bytes(prep.gm) > EXTERNAL_DATA_BYTES
    prog = _to_onnx(prep, opset, table, optimize, external)
    if prep.first is None:
        prog.save(path, external_data=external)
        model = onnx.load(path, load_external_data=False)
    else:
        first = _to_onnx(prep.first, opset, table, optimize, external)
        model = _join_first_step(first.model_proto, prog.model_proto, prep)
        onnx.save_model(model, path, save_as_external_data=external, location=os.path.basename(path) + ".data")
        model = onnx.load(path, load_external_data=False)
    if _name_dynamic_dims(model):
        onnx.save(model, path)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in _all_nodes(model.graph) if n.domain not in ("", "ai.onnx")})
    if custom:
        raise OnnxExportError(f"export_onnx: {path} contains non-standard nodes {custom}")
    if check:
        try:
            onnx.checker.check_model(path if external else model, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise OnnxExportError(f"export_onnx: onnx.checker rejected {path}: {e}") from e
    log.info("export_onnx: wrote %s (opset %d, %d nodes)", path, opset, len(model.graph.node))
    return path


def _name_dynamic_dims(model) -> dict[str, str]:
    """Rename torch's symbols (``s53``) to ``batch`` / ``height`` / ``width`` everywhere in ``model``.

    Dim 0 of the inputs gives ``batch`` (a second, independent batch symbol ``batch_<input>``);
    dims 2 and 3 of rank-4 inputs give ``height``/``width`` (``<input>_height`` for others).
    Expressions such as ``2*s53`` are rewritten too. Returns the renaming.
    """
    import re

    ren: dict[str, str] = {}
    taken: set[str] = set()

    def claim(sym: str, want: str) -> None:
        if not sym or sym in ren or not re.fullmatch(r"[A-Za-z_]\w*", sym):
            return
        name = want
        while name in taken:
            name += "_"
        ren[sym] = name
        taken.add(name)

    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 1 and dims[0].dim_param:
            claim(dims[0].dim_param, "batch" if "batch" not in taken else f"batch_{vi.name}")
        if len(dims) == 4:
            for i, what in ((2, "height"), (3, "width")):
                if dims[i].dim_param:
                    claim(dims[i].dim_param, what if what not in taken else f"{vi.name}_{what}")
    if not ren:
        return ren
    rx = re.compile(r"\b(" + "|".join(map(re.escape, sorted(ren, key=len, reverse=True))) + r")\b")
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = rx.sub(lambda m: ren[m.group(1)], d.dim_param)
    return ren


STATE_KEY = "fusediff.state"
FIRST_STEP = "first_step"


def _join_first_step(first, step, prep: Prepared):
    """One ModelProto from the first-step and integer-step exports of a MoDiff model.

    Inputs: the model's own, then ``first_step`` (bool scalar), then ``past.<layer>.<a_hat|o_hat>``
    (read by the integer step only); outputs: the model's own, then ``present.<layer>.<kind>``
    in the same order, like an LLM's KV cache. One ``If(first_step)`` holds the two graphs as its
    branches; every name inside a branch gets the branch's prefix, the weights move to the main
    graph (shared by both branches, deduplicated), and the layout goes to the model's metadata
    (``fusediff.state``, JSON) for :class:`StatefulSession`.
    """
    import json

    import onnx
    from onnx import helper

    n_in, n_state = prep.model_inputs, len(prep.state)
    fg, sg = first.graph, step.graph
    if len(fg.input) != n_in or len(sg.input) != n_in + n_state or len(sg.output) != len(fg.output) \
            or len(sg.output) <= n_state:
        raise OnnxExportError(f"export_onnx: expected {n_in} model inputs (+ {n_state} caches), got "
                              f"{len(fg.input)}/{len(sg.input)} inputs and {len(fg.output)}/{len(sg.output)} outputs")
    n_out = len(sg.output) - n_state
    step_in = [i.name for i in sg.input]
    inits: list = []

    def branch(g, prefix: str, outer: dict[str, str]):  # outer: the branch's input names -> main names
        names: dict[str, str] = dict(outer)

        def ren(n: str) -> str:
            if not n:
                return n
            if n not in names:
                names[n] = prefix + n
            return names[n]

        for t in g.initializer:
            t.name = ren(t.name)
            inits.append(t)
        for node in g.node:
            for a in node.attribute:
                if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise OnnxExportError("export_onnx: nested subgraphs in a MoDiff step graph are not supported")
            node.input[:] = [ren(n) for n in node.input]
            node.output[:] = [ren(n) for n in node.output]
            node.name = prefix + node.name if node.name else node.name
        outs, nodes, used = [], list(g.node), set()
        for i, (o, so) in enumerate(zip(g.output, sg.output)):
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(so)  # the step graph's types/shapes (the same values in both branches)
            vi.name = ren(o.name)
            if vi.name in outer.values() or vi.name in used:  # an input or a value leaving twice: copy it
                fresh = f"{prefix}output_{i}"
                nodes.append(helper.make_node("Identity", [vi.name], [fresh], name=f"{prefix}identity_{i}"))
                vi.name = fresh
            used.add(vi.name)
            outs.append(vi)
        return helper.make_graph(nodes, prefix.rstrip("/"), [], outs)

    then_g = branch(fg, "first_step/", {fi.name: si for fi, si in zip(fg.input, step_in[:n_in])})
    else_g = branch(sg, "step/", {n: n for n in step_in})
    out_names = [o.name for o in sg.output[:n_out]] + [f"past.{sl.key}".replace("past.", "present.", 1)
                                                        for sl in prep.state]
    first_vi = helper.make_tensor_value_info(FIRST_STEP, onnx.TensorProto.BOOL, [])
    inputs = list(sg.input[:n_in]) + [first_vi] + list(sg.input[n_in:])
    for vi, sl in zip(inputs[n_in + 1:], prep.state):
        vi.name = f"past.{sl.key}"
    ren_in = {old: vi.name for old, vi in zip(step_in[n_in:], inputs[n_in + 1:])}
    for node in else_g.node:  # the step branch reads the caches under their new names
        node.input[:] = [ren_in.get(n, n) for n in node.input]
    outputs = []
    for name, so in zip(out_names, sg.output):
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(so)
        vi.name = name
        outputs.append(vi)
    node = helper.make_node("If", [FIRST_STEP], out_names, name="first_step_if", then_branch=then_g,
                            else_branch=else_g)
    graph = helper.make_graph([node], step.graph.name or "fusediff", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(step.opset_import), producer_name=step.producer_name,
                              producer_version=step.producer_version, ir_version=step.ir_version)
    for p in step.metadata_props:
        model.metadata_props.add(key=p.key, value=p.value)
    model.metadata_props.add(key=STATE_KEY, value=json.dumps({
        "first_step": FIRST_STEP, "model_inputs": n_in, "model_outputs": n_out, "quant": prep.quant,
        "caches": [{"layer": sl.layer, "kind": sl.kind, "input": f"past.{sl.key}", "output": f"present.{sl.key}",
                    "dtype": str(sl.dtype).replace("torch.", "")} for sl in prep.state],
    }))
    return _dedup_initializers(model)


def _dedup_initializers(model):
    """Weights shared by both branches (same bytes under two prefixes) stored once."""
    import hashlib

    from onnx import numpy_helper

    keep: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    kept = []
    for t in model.graph.initializer:
        raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
        key = (t.data_type, tuple(t.dims), hashlib.sha1(raw).hexdigest())
        if key in keep:
            alias[t.name] = keep[key]
        else:
            keep[key] = t.name
            kept.append(t)
    if alias:
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        for g in (a.g for n in model.graph.node for a in n.attribute if a.type == a.GRAPH):
            for n in g.node:
                n.input[:] = [alias.get(i, i) for i in n.input]
    return model


def _trim_unused_outputs(model) -> None:
    """Drop trailing optional outputs nobody reads (Attention's present_key/value, qk) so the
    runtime does not compute them."""
    graph_outs = {v.name for v in model.graph.outputs}
    for node in model.graph:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        keep = len(node.outputs)
        while keep > 1 and not node.outputs[keep - 1].uses() and node.outputs[keep - 1].name not in graph_outs:
            keep -= 1
        if keep < len(node.outputs):
            node.resize_outputs(keep)


def _all_nodes(graph) -> list:
    """Nodes of a GraphProto including those inside If/Loop/Scan subgraphs."""
    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            if a.g is not None and a.g.node:
                out.extend(_all_nodes(a.g))
            for g in a.graphs:
                out.extend(_all_nodes(g))
    return out


def export_onnx(model_or_optimized: torch.nn.Module, example_args: tuple, path: str | os.PathLike, *,
                example_kwargs: dict | None = None, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                dynamic_spatial: bool = False, rewrite: bool = True, attention: str = "auto",
                rewrite_config=None) -> str:
    """Export a model, rewritten into fusediff ops and translated to standard ONNX, to ``path``.

    Args:
        model_or_optimized: an ``nn.Module`` or a :class:`lowering.transform.OptimizedModule`
            (its original model and rewrite config are used).
        example_args / example_kwargs: example inputs (the traced signature; non-tensor inputs
            such as ``return_dict=False`` are baked in).
        path: the ``.onnx`` file to write (parent folders are created).
        opset: ONNX opset, 18..25 (21: GroupNormalization; 23: Attention).
        dynamic_batch: make dim 0 of every tensor input dynamic where the model allows it.
        dynamic_spatial: also dims 2 and 3 of rank-4 inputs (H, W), where the model allows it.
        rewrite: run the fusediff rewrite passes first (False: export the model as captured).
        attention: ``"auto"``, ``"onnx"`` or ``"matmul"`` (see :func:`translation_table`).
        rewrite_config: a :class:`fxpasses.config.RewriteConfig` (default: the OptimizedModule's
            or the default config).
    Returns:
        ``path``.
    Raises:
        UnsupportedOpError: a fusediff op has no translation (the message names it).
        OnnxExportError: capture, export or ``onnx.checker`` failed.
    Example:
        >>> export_onnx(unet, (x, t), "unet.onnx", example_kwargs={"encoder_hidden_states": ctx}, opset=23)
    """
    _check_opset(opset)
    if attention not in ATTENTION_MODES:
        raise ValueError(f"export_onnx: attention must be one of {ATTENTION_MODES}, got {attention!r}")
    prep = prepare(model_or_optimized, example_args, example_kwargs=example_kwargs, dynamic_batch=dynamic_batch,
                   dynamic_spatial=dynamic_spatial, rewrite=rewrite, rewrite_config=rewrite_config)
    return export_graph(prep, path, opset=opset, attention=attention)


# ============================================================================ run
def onnx_inputs(args: tuple, kwargs: dict | None = None) -> list[np.ndarray]:
    """The tensors of ``(args, kwargs)`` in the order the exported model takes them (numpy)."""
    out = []
    for t in pytree.tree_leaves((tuple(args), dict(kwargs or {}))):
        if isinstance(t, torch.Tensor):
            out.append(t.detach().cpu().numpy())
    return out


def make_session(path: str | os.PathLike, *, threads: int | None = None):
    """An onnxruntime ``InferenceSession`` on the CPU execution provider."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), sess_options=so, providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike, *inputs: Any, session=None) -> list[np.ndarray]:
    """Run an exported model with onnxruntime (CPU EP); returns every output as numpy.

    ``inputs`` are tensors or arrays in the model's input order (:func:`onnx_inputs` flattens
    ``(args, kwargs)`` the way the exporter did). Pass ``session`` (:func:`make_session`) to
    reuse one across calls.
    """
    sess = session or make_session(path)
    names = [i.name for i in sess.get_inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"run_onnx: the model takes {len(names)} inputs {names}, got {len(inputs)}")
    feed = {}
    for name, x in zip(names, inputs):
        feed[name] = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return list(sess.run(None, feed))


def state_spec(path_or_model) -> dict | None:
    """The MoDiff state layout of an exported model (see :func:`_join_first_step`), or None (stateless)."""
    import json

    import onnx

    m = onnx.load(os.fspath(path_or_model), load_external_data=False) if isinstance(path_or_model, (str, os.PathLike)) \
        else path_or_model
    for p in m.metadata_props:
        if p.key == STATE_KEY:
            return json.loads(p.value)
    return None


def _resolve_dim(d, env: dict[str, int]) -> int | None:
    """A cache dim from the session's input metadata: an int, a symbol or an expression of the
    model inputs' symbols; None when the inputs do not determine it."""
    import re

    if isinstance(d, int):
        return d
    expr = str(d)
    if expr in env:
        return env[expr]
    funcs = {"floor": math.floor, "ceil": math.ceil, "min": min, "max": max}
    unknown = set(re.findall(r"[A-Za-z_]\w*", expr)) - env.keys() - funcs.keys()
    if unknown or not re.fullmatch(r"[\w+\-*/%(), ]+", expr):
        return None
    return int(eval(expr, {"__builtins__": {}}, {**funcs, **env}))  # noqa: S307 - names and chars checked above


class StatefulSession:
    """Run a MoDiff-quantized ONNX export over a sampling trajectory with onnxruntime.

    Holds the caches between calls: the first call after construction or :meth:`reset` feeds
    ``first_step = True`` (float step; â/ô seeded), every later call the integer path with the
    caches the previous call returned. Like the PyTorch model, a batch or shape change in the
    middle of a trajectory raises (``on_shape_change="error"``) or starts a new trajectory
    (``"reseed"``); caches are never broadcast.

    Example:
        >>> sess = StatefulSession("unet_w8a8.onnx")
        >>> with sess.trajectory():
        ...     for t in timesteps:
        ...         (eps,) = sess(x_t, t)
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, on_shape_change: str = "error",
                 session=None) -> None:
        if on_shape_change not in ("error", "reseed"):
            raise ValueError(f"StatefulSession: on_shape_change must be 'error' or 'reseed', got {on_shape_change!r}")
        spec = state_spec(path)
        if spec is None:
            raise ValueError(f"StatefulSession: {os.fspath(path)} carries no MoDiff state (export a quantized model, "
                             "or run the file with run_onnx)")
        self.path, self.spec, self.on_shape_change = os.fspath(path), spec, on_shape_change
        self.session = session or make_session(path, threads=threads)
        ins = self.session.get_inputs()
        self._model_in = ins[:spec["model_inputs"]]
        by_name = {i.name: i for i in ins}
        self._cache_in = [by_name[c["input"]] for c in spec["caches"]]
        self._out_names = [o.name for o in self.session.get_outputs()]
        self.reset()

    @property
    def first_step(self) -> bool:
        """True when the next call starts a trajectory."""
        return self._caches is None

    def reset(self) -> None:
        """Start a new trajectory: the next call is a first step; nothing of the last one is kept."""
        self._caches: list[np.ndarray] | None = None
        self._shapes: list[tuple] | None = None

    @contextlib.contextmanager
    def trajectory(self):
        """``with sess.trajectory():`` resets on entry."""
        self.reset()
        yield self

    def _initial_caches(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        env: dict[str, int] = {}
        for meta, x in zip(self._model_in, feeds):
            for d, n in zip(meta.shape, x.shape):
                if isinstance(d, str):
                    env.setdefault(d, int(n))
        out = []
        for meta, c in zip(self._cache_in, self.spec["caches"]):
            # The first step does not read the caches (the If's float branch): a dim the inputs do
            # not determine (a downsampled size under dynamic_spatial) is fed as 1; the first
            # step's outputs carry the real shapes.
            shape = [_resolve_dim(d, env) or 1 for d in meta.shape]
            out.append(np.zeros(shape, dtype=np.dtype(c["dtype"]) if c["dtype"] != "bfloat16" else np.float32))
        return out

    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        """One denoiser call; returns the model's outputs (the caches stay inside the session)."""
        n = self.spec["model_inputs"]
        if len(inputs) != n:
            raise ValueError(f"StatefulSession: the model takes {n} inputs {[i.name for i in self._model_in]}, "
                             f"got {len(inputs)}")
        feeds = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in inputs]
        shapes = [f.shape for f in feeds]
        if self._caches is not None and shapes != self._shapes:
            if self.on_shape_change == "error":
                raise ValueError(f"StatefulSession: input shapes {shapes} differ from {self._shapes} in the middle of a "
                                 "trajectory; MoDiff caches are never broadcast. Call reset() (or use `with "
                                 "sess.trajectory():`) before a new batch/shape, or on_shape_change='reseed'.")
            log.warning("StatefulSession: input shapes %s -> %s mid-trajectory; starting a new trajectory", self._shapes,
                        shapes)
            self.reset()
        first = self._caches is None
        caches = self._initial_caches(feeds) if first else self._caches
        feed = {m.name: f for m, f in zip(self._model_in, feeds)}
        feed[self.spec["first_step"]] = np.array(first)
        feed.update({m.name: c for m, c in zip(self._cache_in, caches)})
        outs = self.session.run(None, feed)
        m = self.spec["model_outputs"]
        self._caches, self._shapes = list(outs[m:]), shapes
        return list(outs[:m])


def time_ms(fn: Callable[[], Any], *, warmup: int = 3, reps: int = 20) -> list[float]:
    """Wall times of ``reps`` calls of ``fn`` in ms (``time.perf_counter``), after ``warmup`` calls."""
    import time

    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def compare_latency(model: torch.nn.Module, args: tuple, kwargs: dict | None, path: str | os.PathLike, *,
                    threads: int | None = None, warmup: int = 3, reps: int = 20) -> dict[str, float]:
    """CPU latency of PyTorch eager ``model(*args, **kwargs)`` vs onnxruntime on ``path``.

    Both run with the same intra-op thread count (``threads``; default: torch's current one),
    under ``torch.no_grad()``, ``warmup`` untimed calls then ``reps`` timed ones
    (``time.perf_counter``). Returns ``{"threads", "eager_ms", "eager_min_ms", "ort_ms",
    "ort_min_ms", "speedup"}`` (medians unless ``_min``; speedup = eager median / ORT median).
    """
    import statistics

    kwargs = dict(kwargs or {})
    threads = threads or torch.get_num_threads()
    timed = lambda fn: time_ms(fn, warmup=warmup, reps=reps)  # noqa: E731
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            te = timed(lambda: model(*args, **kwargs))
    finally:
        torch.set_num_threads(old)
    sess = make_session(path, threads=threads)
    feeds = onnx_inputs(args, kwargs)
    to = timed(lambda: run_onnx(path, *feeds, session=sess))
    e, o = statistics.median(te), statistics.median(to)
    return {"threads": threads, "eager_ms": e, "eager_min_ms": min(te), "ort_ms": o, "ort_min_ms": min(to),
            "speedup": e / o}


# ============================================================================ visualization
_ONNX_FAMILY = {"GroupNormalization": "groupnorm", "InstanceNormalization": "groupnorm", "Attention": "attention",
                "Gelu": "gelu"}
_ONNX_VIEWS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Slice", "Gather",
               "Concat", "Split", "Expand", "Cast", "Constant", "ConstantOfShape"}
_ONNX_CLASS = {"Conv": "conv", "ConvTranspose": "conv", "MatMul": "matmul", "Gemm": "matmul", "Attention": "attention",
               "GroupNormalization": "norm", "InstanceNormalization": "norm", "LayerNormalization": "norm",
               "Softmax": "softmax", "ReduceMean": "reduce", "ReduceSum": "reduce", "ReduceMax": "reduce"}


def _meta(n) -> dict[str, str]:
    return {p.key: p.value for p in n.metadata_props}


def _value_info(model) -> dict[str, tuple[tuple, str]]:
    import onnx

    out: dict[str, tuple[tuple, str]] = {}
    vis = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    for vi in vis:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        # Static shapes as int tuples (drawn "2x64x16x16"); symbolic ones as that string already.
        shape = dims if all(isinstance(x, int) for x in dims) else "x".join(map(str, dims))
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else ""
        out[vi.name] = (shape, dt)
    return out


def _scope_stack(meta: dict[str, str]) -> list[tuple[str, str, str]]:
    """Module stack ``[(path, type, qualified type), ...]`` from torch.onnx's node metadata.

    ``pkg.torch.onnx.name_scopes`` holds the full module path of every enclosing module (root
    ``""`` first) and then the FX node's own name; ``class_hierarchy`` the matching types.
    """
    import ast

    from ..fxpasses.canonicalize import clean_module_path

    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
    except (ValueError, SyntaxError):
        return []
    out = []
    for scope, cls in list(zip(scopes, classes))[:-1]:  # the last entry is the FX node itself
        path = clean_module_path(str(scope))
        if not path or path.startswith("_empty_nn_module_stack"):
            continue  # the root module, or torch.export's placeholder for "no module"
        qual = str(cls)
        out.append((path, qual.rsplit(".", 1)[-1], qual))
    return out


def _fx_node_name(meta: dict[str, str]) -> str:
    import ast

    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    return str(scopes[-1]) if scopes else ""


def _fx_source(meta: dict[str, str]) -> str:
    """The FX target an ONNX node came from (``fusediff::geglu``, ``aten::conv2d``, ...), or ``""``."""
    src = meta.get("pkg.torch.onnx.fx_node", "")
    # e.g. "%geglu : [num_users=1] = call_function[target=torch.ops.fusediff.geglu.default](args = ...)"
    i = src.find("target=")
    if i < 0:
        return ""
    tgt = src[i + 7:].split("]", 1)[0].split("(", 1)[0]
    if tgt.startswith("torch.ops."):
        parts = tgt[len("torch.ops."):].split(".")
        if len(parts) >= 2:
            return f"{parts[0]}::{parts[1]}"
    return tgt


def _branch_view(model, branch: str):
    """A MoDiff export (one ``If`` on ``first_step``) seen as the plain graph of one of its branches:
    ``"step"`` (the integer step, what runs on all but the first call) or ``"first_step"``."""
    import onnx

    if branch not in ("step", "first_step"):
        raise ValueError(f"onnx_to_networkx: branch must be 'step' or 'first_step', got {branch!r}")
    g = model.graph
    if len(g.node) != 1 or g.node[0].op_type != "If" or g.node[0].input[0] != FIRST_STEP:
        return model
    attr = "else_branch" if branch == "step" else "then_branch"
    sub = next(a.g for a in g.node[0].attribute if a.name == attr)
    view = onnx.ModelProto()
    view.CopyFrom(model)
    del view.graph.node[:]
    view.graph.node.extend(sub.node)
    del view.graph.output[:]
    for so, mo in zip(sub.output, g.output):  # the branch's values under the model's output names
        view.graph.node.append(onnx.helper.make_node("Identity", [so.name], [mo.name], name=f"output_{mo.name}"))
    view.graph.output.extend(g.output)
    view.graph.value_info.extend(sub.value_info)
    return view


def onnx_to_networkx(model, *, title: str = "", initializers: bool = False, branch: str = "step"):
    """An exported ONNX model as the networkx graph :mod:`fxpasses.viz` draws.

    One node per ONNX node (plus graph inputs and outputs), edges along tensors. Node attributes
    follow :func:`fxpasses.viz.to_networkx`: ``op`` (``placeholder``/``call_function``/
    ``output``), ``target`` (``onnx::<OpType>``), ``module`` and ``stack`` (from torch.onnx's
    scope metadata, so :func:`fxpasses.viz.collapse` gives the block view), ``shape``,
    ``dtype``, ``flops`` (0: not modelled), ``op_class``, ``order``, ``view_op``, ``name``,
    and ``fused``/``family``/``matched``/``site``/``pattern`` for nodes that a fusediff op was
    translated into (or a standard GroupNormalization/Attention/Gelu node): each source fusediff
    call forms one site cluster.

    Args:
        model: an ``onnx.ModelProto`` or a path to one.
        title: picture title.
        initializers: keep weight initializers as input nodes (hidden by default).
        branch: for a MoDiff export (one ``If`` on ``first_step``), which branch to draw:
            ``"step"`` (integer step, default) or ``"first_step"``.
    """
    import networkx as nx
    import onnx

    from ..fxpasses.viz import fused_op_family

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    model = _branch_view(model, branch)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes are decoration only
        pass
    info = _value_info(model)
    g = nx.DiGraph(view="full", title=title, sites=[])
    producer: dict[str, str] = {}
    inits = {i.name for i in model.graph.initializer}
    order = 0
    for vi in model.graph.input:
        if vi.name in inits and not initializers:
            continue
        shape, dt = info.get(vi.name, (None, ""))
        g.add_node(vi.name, op="placeholder", target="input", module="", stack=[], shape=shape, dtype=dt, flops=0,
                   op_class="", order=order, fused=False, view_op=False, name=vi.name)
        producer[vi.name] = vi.name
        order += 1
    if initializers:
        for t in model.graph.initializer:
            g.add_node(t.name, op="placeholder", target="initializer", module="", stack=[], shape=tuple(t.dims),
                       dtype="", flops=0, op_class="", order=order, fused=False, view_op=False, name=t.name)
            producer[t.name] = t.name
            order += 1
    sites: list[dict[str, Any]] = []
    site_of_src: dict[str, int] = {}
    names: set[str] = set(g.nodes)
    for i, n in enumerate(model.graph.node):
        key = n.name or f"{n.op_type}_{i}"
        while key in names:
            key += "_"
        names.add(key)
        meta = _meta(n)
        stack = _scope_stack(meta)
        out0 = n.output[0] if n.output else ""
        shape, dt = info.get(out0, (None, ""))
        src = _fx_source(meta)
        attrs: dict[str, Any] = {
            "op": "call_function", "target": f"onnx::{n.op_type}", "module": stack[-1][0] if stack else "",
            "stack": stack, "shape": shape, "dtype": dt, "flops": 0, "op_class": _ONNX_CLASS.get(n.op_type, "elementwise"),
            "order": order, "fused": False, "view_op": n.op_type in _ONNX_VIEWS, "name": key, "source": src,
        }
        if src.startswith("fusediff::"):
            fam = fused_op_family(src)
            # One site per source FX node (its name is the first token of the fx_node metadata).
            fx_name = _fx_node_name(meta) or src
            idx = site_of_src.get(fx_name)
            if idx is None:
                idx = len(sites)
                site_of_src[fx_name] = idx
                sites.append({"index": idx, "pattern": src.split("::", 1)[1], "family": fam, "module": attrs["module"],
                              "matched": True, "rewritten": True, "status": "translated", "shapes": "",
                              "dtype": dt, "nodes": []})
            sites[idx]["nodes"].append(key)
            attrs.update(fused=n.op_type in _ONNX_FAMILY, family=fam, matched=True, site=idx,
                         pattern=sites[idx]["pattern"], reason="")
        elif n.op_type in _ONNX_FAMILY:
            attrs.update(family=_ONNX_FAMILY[n.op_type], matched=True)
        g.add_node(key, **attrs)
        order += 1
        for inp in n.input:
            if inp and inp in producer:
                g.add_edge(producer[inp], key, shape=info.get(inp, (None, ""))[0])
        for o in n.output:
            if o:
                producer[o] = key
    for vi in model.graph.output:
        key = f"output:{vi.name}"
        shape, dt = info.get(vi.name, (None, ""))
        g.add_node(key, op="output", target="output", module="", stack=[], shape=shape, dtype=dt, flops=0,
                   op_class="", order=order, fused=False, view_op=False, name=vi.name)
        order += 1
        if vi.name in producer:
            g.add_edge(producer[vi.name], key, shape=shape)
    g.graph["sites"] = sites
    return g


def visualize_onnx(model, out_dir: str | os.PathLike, *, depth: int = 2, title: str = "",
                   renderer: str = "auto") -> dict[str, str]:
    """Write ``onnx_graph.{dot,svg,html}`` and ``onnx_blocks.{dot,svg,html}`` of an ONNX model."""
    from ..fxpasses import viz

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    g = onnx_to_networkx(model, title=title)
    paths: dict[str, str] = {}
    for stem, view in (("onnx_blocks", viz.collapse(g, depth)), ("onnx_graph", g)):
        p = os.path.join(out_dir, f"{stem}.dot")
        with open(p, "w", encoding="utf-8") as f:
            f.write(viz.to_dot(view))
        paths[f"{stem}.dot"] = p
        paths[f"{stem}.svg"] = os.path.join(out_dir, f"{stem}.svg")
        viz.write_svg(view, paths[f"{stem}.svg"], renderer=renderer)
        paths[f"{stem}.html"] = os.path.join(out_dir, f"{stem}.html")
        with open(paths[f"{stem}.svg"], encoding="utf-8") as f:
            viz.write_html(view, paths[f"{stem}.html"], svg=f.read())
    return paths


# ============================================================================ CLI
def _cmd_export(a: argparse.Namespace) -> int:
    from .models import resolve

    model, args, kwargs = resolve(a.model)
    model.eval()
    if a.quant:
        from ..fxpasses import modiff

        model = modiff.quantize(model, parse_quant(a.quant), example_args=args, example_kwargs=kwargs, inplace=False)
    out = a.out or f"{a.model.replace(':', '_').replace('/', '_')}.onnx"
    prep = prepare(model, args, example_kwargs=kwargs, dynamic_batch=not a.static_batch,
                   dynamic_spatial=a.dynamic_spatial, rewrite=not a.no_rewrite)
    export_graph(prep, out, opset=a.opset, attention=a.attention)
    import onnx

    m = onnx.load(out, load_external_data=False)
    counts: dict[str, int] = {}
    for n in _all_nodes(m.graph):
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    print(f"wrote {out} (opset {a.opset}, {len(_all_nodes(m.graph))} nodes)")
    if prep.state:
        print(f"MoDiff state ({prep.quant}): first_step + {len(prep.state)} caches in (past.*) and out (present.*), "
              f"{sum(math.prod(sl.shape) * sl.dtype.itemsize for sl in prep.state) / 2**20:.2f} MiB")
    if prep.result is not None:
        print(f"rewritten: {prep.result.rewritten}")
    print("inputs:  " + ", ".join(f"{i.name}{_fmt_dims(i)}" for i in m.graph.input))
    print("outputs: " + ", ".join(f"{o.name}{_fmt_dims(o)}" for o in m.graph.output))
    print("ops:     " + ", ".join(f"{k}x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    if a.check and prep.state:  # first step (float) and one integer step, from the same input
        from ..fxpasses import modiff

        sess = StatefulSession(out)
        with torch.no_grad(), modiff.preserve_state(model), modiff.trajectory(model):
            for step in ("first step", "integer step"):
                ref_t = [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
                got = sess(*onnx_inputs(args, kwargs))
                err = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref_t))
                print(f"onnxruntime vs eager ({step}): max abs error {err:.3e}")
    elif a.check:
        with torch.no_grad():
            ref = model(*args, **kwargs)
        ref_t = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
        got = run_onnx(out, *onnx_inputs(args, kwargs))
        err = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref_t))
        print(f"onnxruntime vs eager: max abs error {err:.3e}")
    if a.viz:
        for k, v in sorted(visualize_onnx(m, a.viz, title=f"{a.model} (ONNX opset {a.opset})").items()):
            print(f"  {k}: {v}")
    return 0


def _fmt_dims(vi) -> str:
    dims = [d.dim_param or str(d.dim_value) for d in vi.type.tensor_type.shape.dim]
    return "[" + ",".join(dims) + "]"


def parse_quant(spec: str):
    """``"modiff-w8a4"`` -> ``QuantConfig(mode="modiff", w_bits=8, a_bits=4)`` (CLI ``--quant``)."""
    import re

    from ..fxpasses.modiff import QuantConfig

    m = re.fullmatch(r"(baseline|modiff)[-_:]w(\d+)a(\d+)", spec.strip().lower())
    if m is None:
        raise ValueError(f"--quant: expected MODE-WxAy such as 'modiff-w8a8' or 'baseline-w8a4', got {spec!r}")
    return QuantConfig(mode=m.group(1), w_bits=int(m.group(2)), a_bits=int(m.group(3)))


def add_cli(subparsers) -> None:
    """Add the ``export-onnx`` subcommand to the ``fusediff`` CLI's subparsers."""
    p = subparsers.add_parser("export-onnx", help="export a (rewritten) model to standard ONNX")
    p.add_argument("model", help="zoo:<name> | digits | package.module:function")
    p.add_argument("--out", default=None, help="the .onnx file (default: <model>.onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset {MIN_OPSET}..{MAX_OPSET} (21: GroupNormalization, 23: Attention)")
    p.add_argument("--no-rewrite", action="store_true", help="export the model as captured (no fusediff ops)")
    p.add_argument("--attention", choices=ATTENTION_MODES, default="auto",
                   help="ONNX Attention (opset >= 23) or MatMul/Softmax")
    p.add_argument("--static-batch", action="store_true", help="do not make the batch dim dynamic")
    p.add_argument("--dynamic-spatial", action="store_true", help="make H, W dynamic where the model allows")
    p.add_argument("--quant", default=None, metavar="MODE-WxAy",
                   help="quantize first (fxpasses.modiff): modiff-w8a8, baseline-w8a4, modiff-w4a8, ...")
    p.add_argument("--check", action="store_true", help="run with onnxruntime and compare with eager")
    p.add_argument("--viz", default=None, metavar="DIR", help="also write pictures of the ONNX graph to DIR")
    p.set_defaults(fn=_cmd_export)
