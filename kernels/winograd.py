"""Winograd F(4x4, 3x3) convolution (stride 1, dilation 1, groups 1, padding 0 or 1).

Paper: "GPU-aware optimizations of diffusion models on mobile devices", section 3.3 (Winograd
Convolution) and its Table 2: a 4x4 output tile cuts the multiplications of a 3x3 conv by 4x
(36 instead of 144 per tile and channel pair) at the price of 2.25x intermediate memory and 4x
weight memory; larger tiles lose too much precision. Matrices from Lavin & Gray, "Fast Algorithms
for Convolutional Neural Networks" (CVPR 2016), F(4x4, 3x3), interpolation points 0, +-1, +-2, inf:

    B^T = [[4,  0, -5,  0, 1, 0],      G = [[ 1/4,     0,    0],     A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4,  1, 1, 0],           [-1/6,  -1/6, -1/6],            [0, 1, -1, 2, -2, 0],
           [0,  4, -4, -1, 1, 0],           [-1/6,   1/6, -1/6],            [0, 1,  1, 4,  4, 0],
           [0, -2, -1,  2, 1, 0],           [1/24,  1/12,  1/6],            [0, 1, -1, 8, -8, 1]]
           [0,  2, -1, -2, 1, 0],           [1/24, -1/12,  1/6],
           [0,  4,  0, -5, 0, 1]]           [   0,     0,    1]]

For one 6x6 input patch d (stride 4, so neighbouring patches overlap by 2) and a 3x3 filter g,
the 4x4 output tile of the cross-correlation F.conv2d computes is (Lavin & Gray eq. 10)

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A

and summing over input channels moves inside the brackets, which turns the 36 element-wise
products into 36 independent GEMMs over Cin:

    U[e, ci, co] = (G g[co, ci] G^T)[a, b]           e = 6a + b   (once, winograd_weight_transform)
    V[e, ci, p]  = (B^T d[p, ci] B)[a, b]            p = tile index over (n, tile_h, tile_w)
    M[e, co, p]  = sum_ci U[e, ci, co] V[e, ci, p]   (36 batched GEMMs, fp32 accumulate)
    y[p, co]     = A^T M[:, co, p] A + bias[co]      (4x4 tile, tails masked)

Layout: x NCHW (any strides, channels_last works), U (36, Cin, Cout) fp32 contiguous, V
(36, Cin, P) contiguous in the GEMM operand dtype (GEMM_OPERAND_DTYPE), M (36, Cout, P) fp32, y
NCHW contiguous in x.dtype. Tiles cover ceil(Ho/4) x ceil(Wo/4); taps outside the input read 0
(that is the zero padding), outputs outside Ho x Wo are not stored.

Precision: the transforms run in fp32 registers; V and U are rounded to the GEMM operand dtype
(x.dtype: fp16/bf16 tensor cores, fp32 "ieee" for fp32), M stays fp32. A^T's entries up to 8
amplify the operand rounding: measured max error / max|y| on random data is ~2e-6 in fp32,
~8e-3 in fp16 and ~5e-2 in bf16, 15-20x the error of a direct conv in the same dtype (see
winograd_error_report in fxpasses/costs/winograd.py and docs/kernels/winograd.md). A NaN/Inf
input poisons every output tile whose 6x6 patch contains it (all output channels), more than
direct conv's 3x3 neighbourhood. fp16 V overflows when |x| > ~650 (|B^T d B| <= 100 max|d|).

Kernels: (1) _winograd_input_kernel x -> V; (2) _winograd_gemm_kernel U, V -> M;
(3) _winograd_output_kernel M -> y. _winograd_gemm_output_kernel fuses (2) and (3): each program
runs the 36 GEMMs of one (Cout block, tile block) in turn and folds each result into the 4x4
output accumulators, so M never reaches memory (FUSED_OUTPUT_TRANSFORM picks it).
Inference only: no autograd formula is registered. Whether Winograd pays for a conv
(winograd_pays, a roofline model) is the rewrite's decision: fxpasses/costs/winograd.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import _grouped_pid
    from ._winograd import (_bt6, _at6, _at_accum, _rtne, _row_bt, _col_bt_store, _row_at, _store_px, _col_at_store, _gemm_tile)  # noqa: F401
else:  # pragma: no cover - only where triton is missing; the reference path still works

    class _NoTriton:
        """Stand-in so the decorators below import; the dispatch never picks "triton" then."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_a, **_kw):
            return lambda f: f

        @staticmethod
        def Config(*_a, **_kw):
            return None

        @staticmethod
        def static_range(*a):
            return range(*a)

    triton = tl = _NoTriton()  # type: ignore[assignment]

_OP = "winograd_conv2d"
_NAME = "fusediff.winograd_conv2d"

# Lavin & Gray F(4x4, 3x3) transform matrices (float64; cast where used).
_BT = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=torch.float64,
)
_G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
_AT = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
    dtype=torch.float64,
)

#: GEMM operand dtype per input dtype: V is stored in it and U is rounded to it before the MMA.
#: fp16/bf16 run on tensor cores at full rate; fp32 runs "ieee" fp32 FMAs (no TF32) so fp32 results
#: stay within TOL_WINOGRAD. Mapping bf16 -> fp16 would cut bf16's error ~8x but overflows for
#: |x| > ~650; kernel and reference both read this table.
GEMM_OPERAND_DTYPE: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.float32,
    torch.float16: torch.float16,
    torch.bfloat16: torch.bfloat16,
}

#: Run the fused GEMM + output-transform kernel instead of GEMM, M round trip, output kernel.
#: Not measured on a GPU yet: benchmarks/bench_winograd.py times both ("fusediff", "fusediff_fused").
FUSED_OUTPUT_TRANSFORM: bool = False


# ----------------------------------------------------------------------------- autotune configs
def _cfg(meta: dict, warps: int, stages: int = 1):
    return triton.Config(meta, num_warps=warps, num_stages=stages)


if _common.interpret_mode():
    # One config each: the interpreter does not autotune, and larger blocks mean fewer programs.
    _TRANSFORM_CONFIGS = [_cfg({"BLOCK_C": 16, "BLOCK_P": 32}, 4)]
    _GEMM_CONFIGS = [_cfg({"BLOCK_CO": 32, "BLOCK_P": 32, "BLOCK_K": 16, "GROUP_CO": 2}, 4)]
    _FUSED_CONFIGS = [_cfg({"BLOCK_CO": 32, "BLOCK_P": 32, "BLOCK_K": 16}, 4)]
else:
    # Transforms hold 36 fp32 values per element: keep BLOCK_C * BLOCK_P / threads <= 2-4.
    _TRANSFORM_CONFIGS = [
        _cfg({"BLOCK_C": 4, "BLOCK_P": 64}, 4),
        _cfg({"BLOCK_C": 8, "BLOCK_P": 64}, 8),
        _cfg({"BLOCK_C": 2, "BLOCK_P": 128}, 4),
        _cfg({"BLOCK_C": 8, "BLOCK_P": 32}, 4),
    ]
    _GEMM_CONFIGS = [
        _cfg({"BLOCK_CO": 128, "BLOCK_P": 128, "BLOCK_K": 32, "GROUP_CO": 8}, 8, 3),
        _cfg({"BLOCK_CO": 128, "BLOCK_P": 64, "BLOCK_K": 32, "GROUP_CO": 8}, 4, 4),
        _cfg({"BLOCK_CO": 64, "BLOCK_P": 128, "BLOCK_K": 32, "GROUP_CO": 8}, 4, 4),
        _cfg({"BLOCK_CO": 64, "BLOCK_P": 64, "BLOCK_K": 32, "GROUP_CO": 8}, 4, 4),
        _cfg({"BLOCK_CO": 128, "BLOCK_P": 128, "BLOCK_K": 64, "GROUP_CO": 8}, 8, 3),
        _cfg({"BLOCK_CO": 64, "BLOCK_P": 64, "BLOCK_K": 64, "GROUP_CO": 8}, 4, 3),
        _cfg({"BLOCK_CO": 32, "BLOCK_P": 64, "BLOCK_K": 32, "GROUP_CO": 8}, 4, 4),
    ]
    # The fused kernel keeps 16 output + 4 row + 1 GEMM accumulators live: small tiles only.
    _FUSED_CONFIGS = [
        _cfg({"BLOCK_CO": 32, "BLOCK_P": 32, "BLOCK_K": 32}, 4, 3),
        _cfg({"BLOCK_CO": 64, "BLOCK_P": 32, "BLOCK_K": 32}, 8, 3),
        _cfg({"BLOCK_CO": 32, "BLOCK_P": 64, "BLOCK_K": 32}, 8, 3),
        _cfg({"BLOCK_CO": 64, "BLOCK_P": 16, "BLOCK_K": 64}, 4, 2),
    ]


def _prune_gemm(configs, named_args, **_kw):
    """Drop configs whose tiles are far larger than the problem (keep at least one)."""
    cout, p = named_args["COUT"], named_args["P"]
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_CO"] <= max(32, _common.next_pow2(cout))
        and c.kwargs["BLOCK_P"] <= max(32, _common.next_pow2(p))
    ]
    return keep or configs[-1:]


# ----------------------------------------------------------------------------- kernels
@triton.autotune(configs=_TRANSFORM_CONFIGS, key=["C", "P"])
@triton.jit
def _winograd_input_kernel(
    x_ptr,  # (N, C, H, W) fp32/fp16/bf16, any strides
    v_ptr,  # (36, C, P) GEMM operand dtype, contiguous
    C, H, W, TILES_H, TILES_W, P,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_ve, stride_vc,
    PAD: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # V = B^T d B for every (channel, 6x6 patch); patch p starts at (4 th - PAD, 4 tw - PAD).
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    tiles = TILES_H * TILES_W
    n = offs_p // tiles
    rem = offs_p % tiles
    h0 = (rem // TILES_W)[None, :] * 4 - PAD
    w0 = (rem % TILES_W)[None, :] * 4 - PAD
    mask = (offs_c[:, None] < C) & (offs_p[None, :] < P)
    base = x_ptr + n.to(tl.int64)[None, :] * stride_xn + offs_c.to(tl.int64)[:, None] * stride_xc

    # Rows first (d B), then columns (B^T (d B)): r_ab = row a of the patch, transformed column b.
    r00, r01, r02, r03, r04, r05 = _row_bt(base, h0 + 0, w0, H, W, stride_xh, stride_xw, mask)
    r10, r11, r12, r13, r14, r15 = _row_bt(base, h0 + 1, w0, H, W, stride_xh, stride_xw, mask)
    r20, r21, r22, r23, r24, r25 = _row_bt(base, h0 + 2, w0, H, W, stride_xh, stride_xw, mask)
    r30, r31, r32, r33, r34, r35 = _row_bt(base, h0 + 3, w0, H, W, stride_xh, stride_xw, mask)
    r40, r41, r42, r43, r44, r45 = _row_bt(base, h0 + 4, w0, H, W, stride_xh, stride_xw, mask)
    r50, r51, r52, r53, r54, r55 = _row_bt(base, h0 + 5, w0, H, W, stride_xh, stride_xw, mask)

    vbase = v_ptr + offs_c[:, None] * stride_vc + offs_p[None, :]
    row = 6 * stride_ve
    _col_bt_store(vbase + 0 * stride_ve, row, mask, r00, r10, r20, r30, r40, r50, EMULATE_RTNE)
    _col_bt_store(vbase + 1 * stride_ve, row, mask, r01, r11, r21, r31, r41, r51, EMULATE_RTNE)
    _col_bt_store(vbase + 2 * stride_ve, row, mask, r02, r12, r22, r32, r42, r52, EMULATE_RTNE)
    _col_bt_store(vbase + 3 * stride_ve, row, mask, r03, r13, r23, r33, r43, r53, EMULATE_RTNE)
    _col_bt_store(vbase + 4 * stride_ve, row, mask, r04, r14, r24, r34, r44, r54, EMULATE_RTNE)
    _col_bt_store(vbase + 5 * stride_ve, row, mask, r05, r15, r25, r35, r45, r55, EMULATE_RTNE)


@triton.autotune(configs=_GEMM_CONFIGS, key=["CIN", "COUT", "P"], prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _winograd_gemm_kernel(
    u_ptr,  # (36, CIN, COUT) fp32
    v_ptr,  # (36, CIN, P) operand dtype, P contiguous
    m_ptr,  # (36, COUT, P) fp32, P contiguous
    CIN, COUT, P,
    stride_ue, stride_uc, stride_uo,
    stride_ve, stride_vc,
    stride_me, stride_mo,
    IEEE: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_CO: tl.constexpr,
):
    # Batched GEMM over the 36 Winograd positions: M[e] = U[e]^T V[e] (grid axis 1 = e).
    e = tl.program_id(1)
    # Grouped ordering (Triton matmul tutorial) so programs sharing V[e] columns run together.
    pid_co, pid_p = _grouped_pid(tl.program_id(0), tl.cdiv(COUT, BLOCK_CO), tl.cdiv(P, BLOCK_P), GROUP_CO)

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    acc = _gemm_tile(u_ptr + e * stride_ue, v_ptr + e * stride_ve, offs_co, offs_p, CIN, COUT, P,
                     stride_uc, stride_uo, stride_vc, BLOCK_CO, BLOCK_P, BLOCK_K, IEEE, INTERPRET_BF16, EMULATE_RTNE)
    mask = (offs_co[:, None] < COUT) & (offs_p[None, :] < P)
    tl.store(m_ptr + e * stride_me + offs_co[:, None] * stride_mo + offs_p[None, :], acc, mask=mask)


@triton.autotune(configs=_TRANSFORM_CONFIGS, key=["COUT", "P"])
@triton.jit
def _winograd_output_kernel(
    m_ptr,  # (36, COUT, P) fp32, P contiguous
    b_ptr,  # (COUT,) any float dtype (unused when HAS_BIAS is False)
    y_ptr,  # (N, COUT, HO, WO) x.dtype
    COUT, HO, WO, TILES_H, TILES_W, P,
    stride_me, stride_mo,
    stride_yn, stride_yc, stride_yh, stride_yw,
    HAS_BIAS: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # y tile = A^T M A + bias; BLOCK_C blocks output channels here.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_c[:, None] < COUT) & (offs_p[None, :] < P)

    mbase = m_ptr + offs_c[:, None] * stride_mo + offs_p[None, :]
    row = 6 * stride_me
    # t_aj = (M A)[a, j]: rows a = 0..5 of M, A applied on the right.
    t00, t01, t02, t03 = _row_at(mbase + 0 * row, stride_me, mask)
    t10, t11, t12, t13 = _row_at(mbase + 1 * row, stride_me, mask)
    t20, t21, t22, t23 = _row_at(mbase + 2 * row, stride_me, mask)
    t30, t31, t32, t33 = _row_at(mbase + 3 * row, stride_me, mask)
    t40, t41, t42, t43 = _row_at(mbase + 4 * row, stride_me, mask)
    t50, t51, t52, t53 = _row_at(mbase + 5 * row, stride_me, mask)

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_c, mask=offs_c < COUT, other=0.0).to(tl.float32)[:, None]
    else:
        bias = tl.zeros((BLOCK_C, 1), dtype=tl.float32)
    tiles = TILES_H * TILES_W
    n = offs_p // tiles
    rem = offs_p % tiles
    oh0 = (rem // TILES_W)[None, :] * 4
    ow0 = (rem % TILES_W)[None, :] * 4
    ybase = y_ptr + n.to(tl.int64)[None, :] * stride_yn + offs_c.to(tl.int64)[:, None] * stride_yc
    _col_at_store(ybase, oh0, ow0 + 0, HO, WO, stride_yh, stride_yw, mask, bias,
                  t00, t10, t20, t30, t40, t50, EMULATE_RTNE)
    _col_at_store(ybase, oh0, ow0 + 1, HO, WO, stride_yh, stride_yw, mask, bias,
                  t01, t11, t21, t31, t41, t51, EMULATE_RTNE)
    _col_at_store(ybase, oh0, ow0 + 2, HO, WO, stride_yh, stride_yw, mask, bias,
                  t02, t12, t22, t32, t42, t52, EMULATE_RTNE)
    _col_at_store(ybase, oh0, ow0 + 3, HO, WO, stride_yh, stride_yw, mask, bias,
                  t03, t13, t23, t33, t43, t53, EMULATE_RTNE)


@triton.autotune(configs=_FUSED_CONFIGS, key=["CIN", "COUT", "P"], prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _winograd_gemm_output_kernel(
    u_ptr,  # (36, CIN, COUT) fp32
    v_ptr,  # (36, CIN, P) operand dtype, P contiguous
    b_ptr,  # (COUT,) any float dtype (unused when HAS_BIAS is False)
    y_ptr,  # (N, COUT, HO, WO) x.dtype
    CIN, COUT, P, HO, WO, TILES_H, TILES_W,
    stride_ue, stride_uc, stride_uo,
    stride_ve, stride_vc,
    stride_yn, stride_yc, stride_yh, stride_yw,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    EMULATE_RTNE_U: tl.constexpr,
    EMULATE_RTNE_Y: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Fused (2)+(3): for row a, t_j = sum_b A^T[j, b] M[6a + b]; then y_ij += A^T[i, a] t_j.
    # Y = A^T M A is linear in M, so M is folded in as soon as each GEMM finishes.
    pid = tl.program_id(0)
    num_p = tl.cdiv(P, BLOCK_P)
    pid_co = pid // num_p
    pid_p = pid % num_p
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)

    zero = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    y00 = zero; y01 = zero; y02 = zero; y03 = zero  # noqa: E702
    y10 = zero; y11 = zero; y12 = zero; y13 = zero  # noqa: E702
    y20 = zero; y21 = zero; y22 = zero; y23 = zero  # noqa: E702
    y30 = zero; y31 = zero; y32 = zero; y33 = zero  # noqa: E702
    for a in tl.static_range(6):
        t0 = zero
        t1 = zero
        t2 = zero
        t3 = zero
        for b in tl.static_range(6):
            m = _gemm_tile(u_ptr + (6 * a + b) * stride_ue, v_ptr + (6 * a + b) * stride_ve, offs_co, offs_p,
                           CIN, COUT, P, stride_uc, stride_uo, stride_vc, BLOCK_CO, BLOCK_P, BLOCK_K,
                           IEEE, INTERPRET_BF16, EMULATE_RTNE_U)
            t0, t1, t2, t3 = _at_accum(t0, t1, t2, t3, m, b)
        y00, y10, y20, y30 = _at_accum(y00, y10, y20, y30, t0, a)
        y01, y11, y21, y31 = _at_accum(y01, y11, y21, y31, t1, a)
        y02, y12, y22, y32 = _at_accum(y02, y12, y22, y32, t2, a)
        y03, y13, y23, y33 = _at_accum(y03, y13, y23, y33, t3, a)

    mask = (offs_co[:, None] < COUT) & (offs_p[None, :] < P)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_co, mask=offs_co < COUT, other=0.0).to(tl.float32)[:, None]
    else:
        bias = tl.zeros((BLOCK_CO, 1), dtype=tl.float32)
    tiles = TILES_H * TILES_W
    n = offs_p // tiles
    rem = offs_p % tiles
    oh = (rem // TILES_W)[None, :] * 4
    ow = (rem % TILES_W)[None, :] * 4
    yb = y_ptr + n.to(tl.int64)[None, :] * stride_yn + offs_co.to(tl.int64)[:, None] * stride_yc
    sh = stride_yh
    sw = stride_yw
    _store_px(yb, oh + 0, ow + 0, HO, WO, sh, sw, mask, y00, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 0, ow + 1, HO, WO, sh, sw, mask, y01, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 0, ow + 2, HO, WO, sh, sw, mask, y02, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 0, ow + 3, HO, WO, sh, sw, mask, y03, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 1, ow + 0, HO, WO, sh, sw, mask, y10, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 1, ow + 1, HO, WO, sh, sw, mask, y11, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 1, ow + 2, HO, WO, sh, sw, mask, y12, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 1, ow + 3, HO, WO, sh, sw, mask, y13, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 2, ow + 0, HO, WO, sh, sw, mask, y20, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 2, ow + 1, HO, WO, sh, sw, mask, y21, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 2, ow + 2, HO, WO, sh, sw, mask, y22, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 2, ow + 3, HO, WO, sh, sw, mask, y23, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 3, ow + 0, HO, WO, sh, sw, mask, y30, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 3, ow + 1, HO, WO, sh, sw, mask, y31, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 3, ow + 2, HO, WO, sh, sw, mask, y32, bias, EMULATE_RTNE_Y)
    _store_px(yb, oh + 3, ow + 3, HO, WO, sh, sw, mask, y33, bias, EMULATE_RTNE_Y)


# ----------------------------------------------------------------------------- launcher
def _geometry(x_shape, padding: int) -> tuple[int, int, int, int, int]:
    """(Ho, Wo, tiles_h, tiles_w, P) for an (N, C, H, W) input."""
    n, _, h, w = x_shape
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    th, tw = -(-ho // 4), -(-wo // 4)
    return ho, wo, th, tw, n * th * tw


def _check_args(x: Tensor, u: Tensor, bias: Optional[Tensor], padding: int) -> None:
    """Metadata-only validation shared by the op, its fake and the reference."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{_NAME}: x must be a 4-D (N, Cin, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    _common.check_float("x", x)
    if not isinstance(padding, int) or isinstance(padding, bool) or padding not in (0, 1):
        raise ValueError(f"{_NAME}: padding must be 0 or 1 (F(4x4,3x3) stride-1 kernel), got {padding!r}")
    cin = x.shape[1]
    if u.dim() != 3 or u.shape[0] != 36 or u.shape[1] != cin:
        raise ValueError(
            f"{_NAME}: u must have shape (36, Cin={cin}, Cout) from winograd_weight_transform, got {tuple(u.shape)}"
        )
    if u.dtype != torch.float32:
        raise TypeError(f"{_NAME}: u must be float32 (winograd_weight_transform output), got {u.dtype}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != u.shape[2]:
            raise ValueError(f"{_NAME}: bias must have shape (Cout={u.shape[2]},), got {tuple(bias.shape)}")
        _common.check_float("bias", bias)
    if x.shape[2] + 2 * padding < 3 or x.shape[3] + 2 * padding < 3:
        raise ValueError(f"{_NAME}: input {tuple(x.shape[2:])} with padding {padding} is smaller than the 3x3 kernel")


def _flags(x_dtype: torch.dtype) -> dict:
    """Precision flags shared by the launchers (see GEMM_OPERAND_DTYPE)."""
    op_dtype = GEMM_OPERAND_DTYPE[x_dtype]
    interp = _common.interpret_mode()
    return {
        "op_dtype": op_dtype,
        "IEEE": op_dtype == torch.float32 or (interp and op_dtype == torch.bfloat16),
        "INTERPRET_BF16": _common.interpret_bf16(op_dtype),
        "RTNE_OP": interp and op_dtype == torch.bfloat16,
        "RTNE_Y": interp and x_dtype == torch.bfloat16,
    }


def _launch(x: Tensor, u: Tensor, bias: Optional[Tensor], padding: int, fused: Optional[bool] = None) -> Tensor:
    """Run the Triton kernels (3-kernel pipeline, or input kernel + fused GEMM/output kernel)."""
    fused = FUSED_OUTPUT_TRANSFORM if fused is None else fused
    n, cin, h, w = x.shape
    cout = u.shape[2]
    ho, wo, th, tw, p = _geometry(x.shape, padding)
    y = torch.empty((n, cout, ho, wo), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    if 36 * max(cin, cout) * p >= 2**31:
        raise ValueError(
            f"{_NAME}: 36*max(Cin, Cout)*tiles = {36 * max(cin, cout) * p} overflows int32 indexing; split the batch"
        )
    f = _flags(x.dtype)
    v = torch.empty((36, cin, p), device=x.device, dtype=f["op_dtype"])
    grid_in = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(cin, meta["BLOCK_C"]))  # noqa: E731
    _winograd_input_kernel[grid_in](
        x, v, cin, h, w, th, tw, p,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        v.stride(0), v.stride(1),
        PAD=padding, EMULATE_RTNE=f["RTNE_OP"],
    )
    has_bias = bias is not None
    b = bias.contiguous() if has_bias else y  # dummy pointer when HAS_BIAS is False
    if fused:
        grid = lambda meta: (triton.cdiv(cout, meta["BLOCK_CO"]) * triton.cdiv(p, meta["BLOCK_P"]),)  # noqa: E731
        _winograd_gemm_output_kernel[grid](
            u, v, b, y, cin, cout, p, ho, wo, th, tw,
            u.stride(0), u.stride(1), u.stride(2),
            v.stride(0), v.stride(1),
            y.stride(0), y.stride(1), y.stride(2), y.stride(3),
            HAS_BIAS=has_bias, IEEE=f["IEEE"], INTERPRET_BF16=f["INTERPRET_BF16"],
            EMULATE_RTNE_U=f["RTNE_OP"], EMULATE_RTNE_Y=f["RTNE_Y"],
        )
        return y
    m = torch.empty((36, cout, p), device=x.device, dtype=torch.float32)
    grid_mm = lambda meta: (triton.cdiv(cout, meta["BLOCK_CO"]) * triton.cdiv(p, meta["BLOCK_P"]), 36)  # noqa: E731
    _winograd_gemm_kernel[grid_mm](
        u, v, m, cin, cout, p,
        u.stride(0), u.stride(1), u.stride(2),
        v.stride(0), v.stride(1),
        m.stride(0), m.stride(1),
        IEEE=f["IEEE"], INTERPRET_BF16=f["INTERPRET_BF16"], EMULATE_RTNE=f["RTNE_OP"],
    )
    grid_out = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(cout, meta["BLOCK_C"]))  # noqa: E731
    _winograd_output_kernel[grid_out](
        m, b, y, cout, ho, wo, th, tw, p,
        m.stride(0), m.stride(1),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3),
        HAS_BIAS=has_bias, EMULATE_RTNE=f["RTNE_Y"],
    )
    return y


# ----------------------------------------------------------------------------- public API
def winograd_weight_transform(weight: Tensor) -> Tensor:
    """U = G g G^T for every (cout, cin) filter, laid out for the 36 batched GEMMs.

    Run once when a conv is rewritten (not per call). Computed in float64, stored as float32.

    Args:
        weight: (Cout, Cin, 3, 3) float conv weight.
    Returns:
        U: (36, Cin, Cout) float32, contiguous, ``U[6a + b, ci, co] = (G g[co, ci] G^T)[a, b]``.
    Example:
        >>> u = winograd_weight_transform(conv.weight)
        >>> y = winograd_conv2d(x, u, conv.bias, 1)  # == conv(x)
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(
            f"fusediff.winograd_weight_transform: weight must be (Cout, Cin, 3, 3) (F(4x4,3x3) only), "
            f"got {tuple(getattr(weight, 'shape', ()))}"
        )
    _common.check_float("weight", weight)
    wide = torch.float32 if weight.device.type == "mps" else torch.float64
    g = weight.detach().to(wide)
    gm = _G.to(device=weight.device, dtype=wide)
    u = gm @ g @ gm.T  # (Cout, Cin, 6, 6)
    cout, cin = weight.shape[:2]
    return u.permute(2, 3, 1, 0).reshape(36, cin, cout).to(torch.float32).contiguous()


@torch.library.custom_op("fusediff::winograd_conv2d", mutates_args=())
def winograd_conv2d(x: Tensor, u: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    """F.conv2d(x, weight, bias, padding=padding) for a 3x3 stride-1 weight, by Winograd F(4x4,3x3).

    Args:
        x: (N, Cin, H, W) fp32/fp16/bf16.
        u: (36, Cin, Cout) fp32 from :func:`winograd_weight_transform`.
        bias: (Cout,) or None.
        padding: 0 or 1.
    Returns:
        (N, Cout, H + 2 padding - 2, W + 2 padding - 2) in x.dtype.
    """
    _check_args(x, u, bias, padding)
    path = _common.choose_path(x, u, bias)
    _common.record(_OP, path)
    if path == "triton":
        return _launch(x, u, bias, padding)
    return winograd_conv2d_ref(x, u, bias, padding)


@winograd_conv2d.register_fake
def _winograd_conv2d_fake(x, u, bias, padding):
    _check_args(x, u, bias, padding)
    ho, wo, _, _, _ = _geometry(x.shape, padding)
    return x.new_empty((x.shape[0], u.shape[2], ho, wo))


def winograd_conv2d_ref(x: Tensor, u: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    """Pure-torch Winograd with the kernel's transforms and precision policy.

    V = B^T d B (fp32, rounded to the GEMM operand dtype), M = U^T V batched over the 36 positions
    (fp32 accumulate), y = A^T M A + bias in fp32, cast to x.dtype. Differs from the kernel only
    in summation order, so it isolates Winograd's own error from the kernel's.
    """
    _check_args(x, u, bias, padding)
    n, cin, h, w = x.shape
    cout = u.shape[2]
    ho, wo, th, tw, p = _geometry(x.shape, padding)
    op_dtype = GEMM_OPERAND_DTYPE[x.dtype]
    bt = _BT.to(device=x.device, dtype=torch.float32)
    at = _AT.to(device=x.device, dtype=torch.float32)
    # Zero padding: `padding` on the top/left, enough on the bottom/right to fill the last tile.
    xp = F.pad(x.float(), (padding, tw * 4 + 2 - w - padding, padding, th * 4 + 2 - h - padding))
    d = xp.unfold(2, 6, 4).unfold(3, 6, 4)  # (N, Cin, th, tw, 6, 6) overlapping patches
    v = (bt @ d @ bt.T).permute(4, 5, 1, 0, 2, 3).reshape(36, cin, p)
    v = v.to(op_dtype).float()
    uq = u.to(op_dtype).float()
    m = torch.bmm(uq.transpose(1, 2), v)  # (36, Cout, P): M[e] = U[e]^T V[e]
    m = m.reshape(6, 6, cout, n, th, tw).permute(3, 2, 4, 5, 0, 1)  # (N, Cout, th, tw, 6, 6)
    y = at @ m @ at.T  # (N, Cout, th, tw, 4, 4)
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(n, cout, th * 4, tw * 4)[:, :, :ho, :wo]
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    return y.to(x.dtype).contiguous()
