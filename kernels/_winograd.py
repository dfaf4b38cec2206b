"""Winograd F(4x4, 3x3) transform helpers (``@triton.jit``) for kernels/winograd.py.

Lavin & Gray, *Fast Algorithms for Convolutional Neural Networks* (CVPR 2016): the input transform
``B^T d B`` and output transform ``A^T m A`` factored to share sums (``_bt6``/``_at6`` on six
values, row/column passes with strided loads and stores), the optional fp32 -> bf16
round-to-nearest-even emulation the interpreter needs (``_rtne``), and the per-(Cout, tile) GEMM
tile of the 36 element-wise products (``_gemm_tile``). Shared by the separate and the fused
(GEMM + output transform) kernels; no op of its own.
"""
from __future__ import annotations

from . import _common

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import _round_to_bf16

    @triton.jit
    def _bt6(d0, d1, d2, d3, d4, d5):
        # B^T (Lavin & Gray F(4x4,3x3)) applied to 6 values, factored to share sums.
        t0 = 4.0 * d0 - 5.0 * d2 + d4
        t1 = (d3 + d4) - 4.0 * (d1 + d2)
        t2 = (d4 - d3) + 4.0 * (d1 - d2)
        t3 = (d4 - d2) + 2.0 * (d3 - d1)
        t4 = (d4 - d2) - 2.0 * (d3 - d1)
        t5 = 4.0 * d1 - 5.0 * d3 + d5
        return t0, t1, t2, t3, t4, t5


    @triton.jit
    def _at6(m0, m1, m2, m3, m4, m5):
        # A^T (Lavin & Gray F(4x4,3x3)) applied to 6 values.
        s12 = m1 + m2
        d12 = m1 - m2
        s34 = m3 + m4
        d34 = m3 - m4
        return m0 + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + m5


    @triton.jit
    def _at_accum(o0, o1, o2, o3, m, IDX: tl.constexpr):
        # o_r += A^T[r, IDX] * m: one column of A^T, chosen at compile time (zeros skipped).
        if IDX == 0:
            o0 += m
        elif IDX == 1:
            o0 += m
            o1 += m
            o2 += m
            o3 += m
        elif IDX == 2:
            o0 += m
            o1 -= m
            o2 += m
            o3 -= m
        elif IDX == 3:
            o0 += m
            o1 += 2.0 * m
            o2 += 4.0 * m
            o3 += 8.0 * m
        elif IDX == 4:
            o0 += m
            o1 -= 2.0 * m
            o2 += 4.0 * m
            o3 -= 8.0 * m
        else:
            o3 += m
        return o0, o1, o2, o3


    @triton.jit
    def _rtne(v, EMULATE_RTNE: tl.constexpr):
        # The Triton 3.9 interpreter truncates fp32 -> bf16; GPUs round to nearest even. Under the
        # interpreter, pre-round in fp32 so the later .to(bf16) is exact and matches torch.
        if EMULATE_RTNE:
            v = _round_to_bf16(v)
        return v


    @triton.jit
    def _row_bt(base, h, w0, H, W, stride_xh, stride_xw, mask):
        # One row of a 6x6 patch (taps outside the image read 0 = zero padding), times B on the right.
        row_ok = mask & (h >= 0) & (h < H)
        ptr = base + h * stride_xh
        w = w0 + 0
        d0 = tl.load(ptr + w * stride_xw, mask=row_ok & (w >= 0) & (w < W), other=0.0).to(tl.float32)
        w = w0 + 1
        d1 = tl.load(ptr + w * stride_xw, mask=row_ok & (w >= 0) & (w < W), other=0.0).to(tl.float32)
        w = w0 + 2
        d2 = tl.load(ptr + w * stride_xw, mask=row_ok & (w >= 0) & (w < W), other=0.0).to(tl.float32)
        w = w0 + 3
        d3 = tl.load(ptr + w * stride_xw, mask=row_ok & (w >= 0) & (w < W), other=0.0).to(tl.float32)
        w = w0 + 4
        d4 = tl.load(ptr + w * stride_xw, mask=row_ok & (w >= 0) & (w < W), other=0.0).to(tl.float32)
        w = w0 + 5
        d5 = tl.load(ptr + w * stride_xw, mask=row_ok & (w >= 0) & (w < W), other=0.0).to(tl.float32)
        return _bt6(d0, d1, d2, d3, d4, d5)


    @triton.jit
    def _col_bt_store(ptr, stride_row, mask, r0, r1, r2, r3, r4, r5, EMULATE_RTNE: tl.constexpr):
        # B^T on the left for one column b of the row-transformed patch; stores V[6a + b], a = 0..5.
        v0, v1, v2, v3, v4, v5 = _bt6(r0, r1, r2, r3, r4, r5)
        ty = ptr.dtype.element_ty
        tl.store(ptr, _rtne(v0, EMULATE_RTNE).to(ty), mask=mask)
        tl.store(ptr + stride_row, _rtne(v1, EMULATE_RTNE).to(ty), mask=mask)
        tl.store(ptr + 2 * stride_row, _rtne(v2, EMULATE_RTNE).to(ty), mask=mask)
        tl.store(ptr + 3 * stride_row, _rtne(v3, EMULATE_RTNE).to(ty), mask=mask)
        tl.store(ptr + 4 * stride_row, _rtne(v4, EMULATE_RTNE).to(ty), mask=mask)
        tl.store(ptr + 5 * stride_row, _rtne(v5, EMULATE_RTNE).to(ty), mask=mask)


    @triton.jit
    def _row_at(ptr, stride_me, mask):
        # Loads M[6a + b], b = 0..5, for one row a and applies A on the right.
        m0 = tl.load(ptr, mask=mask, other=0.0)
        m1 = tl.load(ptr + stride_me, mask=mask, other=0.0)
        m2 = tl.load(ptr + 2 * stride_me, mask=mask, other=0.0)
        m3 = tl.load(ptr + 3 * stride_me, mask=mask, other=0.0)
        m4 = tl.load(ptr + 4 * stride_me, mask=mask, other=0.0)
        m5 = tl.load(ptr + 5 * stride_me, mask=mask, other=0.0)
        return _at6(m0, m1, m2, m3, m4, m5)


    @triton.jit
    def _store_px(base, oh, ow, HO, WO, stride_yh, stride_yw, mask, val, bias, EMULATE_RTNE: tl.constexpr):
        # Epilogue for one pixel of each 4x4 tile: + bias, round, masked store (tails of Ho, Wo).
        ok = mask & (oh < HO) & (ow < WO)
        out = _rtne(val + bias, EMULATE_RTNE)
        tl.store(base + oh * stride_yh + ow * stride_yw, out.to(base.dtype.element_ty), mask=ok)


    @triton.jit
    def _col_at_store(base, oh0, ow, HO, WO, stride_yh, stride_yw, mask, bias, t0, t1, t2, t3, t4, t5,
                      EMULATE_RTNE: tl.constexpr):
        # A^T on the left for one output column j (ow = 4 tw + j); stores rows oh0 .. oh0 + 3.
        y0, y1, y2, y3 = _at6(t0, t1, t2, t3, t4, t5)
        _store_px(base, oh0, ow, HO, WO, stride_yh, stride_yw, mask, y0, bias, EMULATE_RTNE)
        _store_px(base, oh0 + 1, ow, HO, WO, stride_yh, stride_yw, mask, y1, bias, EMULATE_RTNE)
        _store_px(base, oh0 + 2, ow, HO, WO, stride_yh, stride_yw, mask, y2, bias, EMULATE_RTNE)
        _store_px(base, oh0 + 3, ow, HO, WO, stride_yh, stride_yw, mask, y3, bias, EMULATE_RTNE)


    @triton.jit
    def _gemm_tile(u_ptr, v_ptr, offs_co, offs_p, CIN, COUT, P, stride_uc, stride_uo, stride_vc,
                   BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr, INTERPRET_BF16: tl.constexpr, EMULATE_RTNE: tl.constexpr):
        # M[e] tile (BLOCK_CO, BLOCK_P) = U[e]^T (Cout, Cin) @ V[e] (Cin, P), fp32 accumulate.
        acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        co_ok = offs_co[:, None] < COUT
        p_ok = offs_p[None, :] < P
        for k0 in range(0, CIN, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(u_ptr + kk[None, :] * stride_uc + offs_co[:, None] * stride_uo,
                        mask=co_ok & (kk[None, :] < CIN), other=0.0)  # (BLOCK_CO, BLOCK_K) fp32
            b = tl.load(v_ptr + kk[:, None] * stride_vc + offs_p[None, :],
                        mask=(kk[:, None] < CIN) & p_ok, other=0.0)  # (BLOCK_K, BLOCK_P) operand dtype
            a = _rtne(a, EMULATE_RTNE).to(b.dtype)  # U rounded to the operand dtype, as the reference
            if INTERPRET_BF16:
                # Interpreter only: its bf16 dot multiplies raw bits. bf16 products are exact in fp32,
                # so this equals a bf16 MMA with fp32 accumulation.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        return acc
