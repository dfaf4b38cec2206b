"""MoDiff low-bit quantizers: weights (offline), activations (dynamic), and GroupNorm fused with Q.

Quantizer (symmetric, zero point 0; the paper's eq. 4-5 with z = 0 and round-to-nearest-even):

    qmax   = 2**(b-1) - 1                    # INT8: 127, INT4: 7 (symmetric: -128 / -8 never used)
    Q(x)   = clamp(round(x / s), -qmax, qmax)
    deQ(q) = s * q

Weights: per output channel (dim 0), static, scale chosen by an MSE grid search over clipping ratios
``r`` in [0.5, 1.0] of the row's absmax (``s = r * absmax / qmax``; ``r = 1`` is min-max, so the
search is never worse than min-max in MSE).

Activations: dynamic absmax, recomputed on every call (one-step-stale scales are ~5x worse), per
sample by default (``s`` has shape ``(N,)``: classifier-free-guidance halves do not share a grid)
or per tensor (``(1,)``). ``s = absmax / qmax``; a sample whose absmax is 0 gets ``s = 1`` (q = 0).
Per-token scales for linear layers: flatten ``(..., K)`` to ``(T, K)`` and call with
``per_sample=True`` (every row is then a "sample").

MoDiff (eq. 6), per quantized layer, ``primed`` a 0-d bool tensor:

    primed:      Δ = a_t - â_{t+1};  q = Q(Δ);  â_t = deQ(q) + â_{t+1}     (â updated in place)
    not primed:  â_T = a_T (copied in â's dtype), q = 0, s = 1             (first step: float path)

â is kept in its own float dtype (fp32/fp16/bf16; an int8 â multiplies the error ~6x); the update
is computed in fp32 and stored in â's dtype. ``primed`` is read inside the kernels (no host sync).

Non-finite inputs: a NaN/Inf anywhere in a sample makes that sample's scale NaN/Inf; its q are 0,
so deQ(q) = 0 * s is NaN for the whole sample (the integer grid cannot hold a NaN; the scale does).

INT4 packing (weights): a tensor is flattened to ``(Cout, K)`` (K = everything after dim 0, in
memory order of the flattened view; the conv/linear kernels document their K order), and two int4
values share one uint8 byte along K: element ``2i`` in the LOW nibble, ``2i+1`` in the HIGH nibble,
each nibble in two's complement (-8..7). Odd K is padded with a 0 nibble. Packed shape:
``(Cout, ceil(K / 2))`` uint8.

Layout: q is returned channels_last (NHWC strides) for 4-D inputs, so the implicit-GEMM conv reads
its K (= channel) axis contiguously; contiguous otherwise. Inputs may be NCHW or channels_last.

Passes (per-sample absmax needs the whole sample before any element can be quantized):

* ``quantize_act`` / ``modiff_quantize``: kernel 1 reads a (and â), reduces |Δ| per tile and
  ``atomic_max``-es it into a per-sample int32 buffer (non-negative fp32 order like their bit
  patterns, NaN above +Inf, so the max is exact and order-independent); kernel 2 re-reads a (and
  â), quantizes, writes q, s and the new â. Traffic: 2 reads of a and â, 1 write of q and â.
* ``group_norm_quantize`` (Fig. 1 left): kernel 1, one program per (sample, group): GroupNorm
  statistics (chunked Welford/Chan combination, fp32, one read of x), then a second sweep that
  normalizes (+FiLM, +SiLU), forms Δ = a - â and ``atomic_max``-es |Δ| per sample (second read of
  x, one read of â; skipped when not primed); the mean/rstd go to a tiny (N, G, 2) buffer.
  Kernel 2, one program per tile: re-normalizes x with the stored statistics, quantizes with the
  sample's final scale, writes q and the updated â. Traffic: 3 reads of x, 2 reads of â, 1 write
  of q and â. The paper's Fig. 1 draws one GroupNorm kernel (which itself needs two sweeps of x:
  statistics, then normalize) emitting q and â; with a *dynamic per-sample* scale one more sweep
  is unavoidable, because no element can be quantized before the sample's absmax is known
  (a static/calibrated scale would remove kernel 1's second sweep). No intermediate (a or Δ) is
  ever written to memory.

FiLM (diffusers ``time_embedding_norm="scale_shift"``): ``y = GN(x) * (1 + film_scale) +
film_shift`` with ``film_scale``/``film_shift`` of shape (N, C) (or (N, C, 1, 1)), applied
before SiLU.

Triton paths: both kernels are memory-bound elementwise/reduction kernels; tile sizes come from a
heuristic (no autotuning: kernel 2 mutates â, and a benchmark rerun would corrupt it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _common

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import _round_to_bf16
else:  # pragma: no cover
    triton = None
    tl = None

__all__ = [
    "qmax_for_bits",
    "quantize_weight",
    "pack_int4",
    "unpack_int4",
    "quantize_act",
    "modiff_quantize",
    "group_norm_quantize",
    "quantize_act_ref",
    "modiff_quantize_ref",
    "group_norm_quantize_ref",
]

_BITS = (4, 8)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def qmax_for_bits(bits: int) -> int:
    """Largest symmetric level: 127 for INT8, 7 for INT4."""
    _check_bits("bits", bits)
    return (1 << (bits - 1)) - 1


def _check_bits(name: str, bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _BITS:
        raise ValueError(f"fusediff: {name} must be 4 or 8, got {bits!r}")


# ------------------------------------------------------------------------------------------------
# Offline weight quantization (plain torch)
# ------------------------------------------------------------------------------------------------


def quantize_weight(
    w: torch.Tensor, bits: int, search: str = "mse", n_grid: int = 100, min_ratio: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric weight quantization (static, offline).

    Args:
        w: float weight, dim 0 = output channels (conv ``(Cout, Cin, kh, kw)``, linear ``(F, K)``).
        bits: 4 or 8.
        search: ``"mse"`` (grid search over ``n_grid`` clipping ratios in ``[min_ratio, 1]`` of the
            row absmax, minimizing the row's squared error) or ``"minmax"`` (ratio 1).
    Returns:
        ``(w_int, scale)``: ``w_int`` int8 with ``w``'s shape and values in ``[-qmax, qmax]``,
        ``scale`` fp32 ``(Cout,)`` with ``w ≈ scale[:, None, ...] * w_int``.
    Example:
        >>> w_int, s = quantize_weight(conv.weight, 8)
    """
    _check_bits("bits", bits)
    if search not in ("mse", "minmax"):
        raise ValueError(f"fusediff: search must be 'mse' or 'minmax', got {search!r}")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"fusediff: w must be a float tensor, got {getattr(w, 'dtype', type(w))}")
    if w.dim() < 2:
        raise ValueError(f"fusediff: w must have an output-channel dim and at least one more, got shape {tuple(w.shape)}")
    if n_grid < 1 or not (0.0 < min_ratio <= 1.0):
        raise ValueError(f"fusediff: need n_grid >= 1 and 0 < min_ratio <= 1, got {n_grid}, {min_ratio}")
    qmax = float(qmax_for_bits(bits))
    w2 = w.detach().reshape(w.shape[0], -1).float()
    if not torch.isfinite(w2).all():
        raise ValueError("fusediff: w contains NaN/Inf; cannot quantize")
    absmax = w2.abs().amax(dim=1)
    base = torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / qmax  # zero rows: s = 1/qmax, q = 0

    def _err(s: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w2 / s[:, None]), -qmax, qmax)
        return (q * s[:, None] - w2).double().pow(2).sum(dim=1)

    if search == "minmax" or n_grid == 1:
        best = base
    else:
        ratios = [min_ratio + (1.0 - min_ratio) * i / (n_grid - 1) for i in range(n_grid)]
        ratios[-1] = 1.0  # min-max is always a candidate
        best, best_err = base, _err(base)
        for r in ratios[:-1]:
            s = base * r
            e = _err(s)
            better = e < best_err
            best = torch.where(better, s, best)
            best_err = torch.where(better, e, best_err)
    w_int = torch.clamp(torch.round(w2 / best[:, None]), -qmax, qmax).to(torch.int8).reshape(w.shape)
    return w_int, best.float().contiguous()


def pack_int4(w_int: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 tensor, values in [-8, 7]) two per byte along the flattened K axis.

    ``w_int`` is viewed as ``(Cout, K)``; element ``2i`` goes to the low nibble, ``2i+1`` to the
    high nibble (two's complement); odd K is padded with 0. Returns uint8 ``(Cout, ceil(K/2))``.
    """
    if not isinstance(w_int, torch.Tensor) or w_int.dtype != torch.int8:
        raise TypeError(f"fusediff: w_int must be an int8 tensor, got {getattr(w_int, 'dtype', type(w_int))}")
    if w_int.dim() < 1:
        raise ValueError("fusediff: w_int must have at least one dim")
    w2 = w_int.reshape(w_int.shape[0], -1).to(torch.int32)
    if w2.numel() and (w2.min() < -8 or w2.max() > 7):
        raise ValueError(f"fusediff: int4 values must lie in [-8, 7], got [{int(w2.min())}, {int(w2.max())}]")
    if w2.shape[1] % 2:
        w2 = F.pad(w2, (0, 1))
    lo = w2[:, 0::2] & 0xF
    hi = w2[:, 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(Cout, ceil(k/2))`` -> int8 ``(Cout, k)`` in [-8, 7]."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"fusediff: packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if packed.dim() != 2:
        raise ValueError(f"fusediff: packed must be 2-D (Cout, ceil(K/2)), got shape {tuple(packed.shape)}")
    if not isinstance(k, int) or (k + 1) // 2 != packed.shape[1]:
        raise ValueError(f"fusediff: k={k!r} does not match packed width {packed.shape[1]} (need ceil(k/2))")
    b = packed.to(torch.int32)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    both = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :k]
    return (both - ((both >> 3) << 4)).to(torch.int8)  # sign-extend the nibble


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------

if _common.HAS_TRITON:

    @triton.jit
    def _store_cast(x, ptr):
        """fp32 -> the pointee dtype of ``ptr``, round-to-nearest-even for every target.

        bf16 is rounded in integer bits first: the Triton interpreter truncates fp32 -> bf16 while
        the GPU rounds to nearest even; pre-rounding makes both (and torch) agree bit for bit.
        """
        if ptr.dtype.element_ty == tl.bfloat16:
            x = _round_to_bf16(x)
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _round_half_even(x):
        # x is already clamped to [-qmax, qmax] (|x| <= 127), where x + 0.5 is exact in fp32, so
        # floor(x + 0.5) is exact and ties are fixed up to even: matches torch.round bit for bit.
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _quantize_levels(d, scale, QMAX: tl.constexpr):
        """Q(d) as fp32 integer levels: clamp(round(d / s), -QMAX, QMAX); NaN -> 0."""
        v = tl.math.div_rn(d, scale)  # IEEE division, like torch (Triton's '/' is approximate on GPU)
        is_nan = v != v
        v = tl.minimum(tl.maximum(v, -QMAX * 1.0), QMAX * 1.0)
        v = _round_half_even(v)
        return tl.where(is_nan, 0.0, v)

    @triton.jit
    def _scale_from_amax_bits(amax_ptr, idx, QMAX: tl.constexpr):
        """s = absmax / qmax from the atomic buffer (bits of a non-negative fp32); absmax 0 -> 1."""
        absmax = tl.load(amax_ptr + idx).to(tl.float32, bitcast=True)
        return tl.where(absmax == 0.0, 1.0, tl.math.div_rn(absmax, QMAX * 1.0))

    @triton.jit
    def _tile_absmax_bits(d, valid):
        """Bits of max|d| over valid entries, NaN if any valid entry is NaN (tl.max may drop NaN)."""
        ad = tl.where(valid, tl.abs(d), 0.0)
        amax = tl.max(tl.max(ad, axis=1), axis=0)
        n_nan = tl.sum(tl.sum((valid & (d != d)).to(tl.int32), axis=1), axis=0)
        amax = tl.where(n_nan > 0, float("nan"), amax)
        return amax.to(tl.int32, bitcast=True)

    @triton.jit
    def _act_absmax_kernel(
        a_ptr,  # (N, C, S) float: the activation (S = H*W merged, or the last dim)
        ahat_ptr,  # (N, C, S) float: â_{t+1} (HAS_AHAT), else unused
        primed_ptr,  # () bool (HAS_AHAT)
        amax_ptr,  # (N,) or (1,) int32, zero-initialized: running absmax bits
        C,
        S,
        tiles_s,
        stride_an, stride_ac, stride_as,
        stride_hn, stride_hc, stride_hs,
        HAS_AHAT: tl.constexpr,
        PER_SAMPLE: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = tl.program_id(1)
        offs_c = (pid // tiles_s) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_s = (pid % tiles_s) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (offs_c < C)[:, None] & (offs_s < S)[None, :]
        if HAS_AHAT:
            # First step of a trajectory: nothing to reduce (q = 0, s = 1), so read nothing.
            # (tl.where, not '&': the interpreter mis-types a bool tensor & a loaded bool scalar)
            mask = tl.where(tl.load(primed_ptr) != 0, mask, False)
        n64 = n.to(tl.int64)
        a = tl.load(
            a_ptr + n64 * stride_an + offs_c[:, None] * stride_ac + offs_s[None, :] * stride_as, mask=mask, other=0.0
        ).to(tl.float32)
        if HAS_AHAT:
            ah = tl.load(
                ahat_ptr + n64 * stride_hn + offs_c[:, None] * stride_hc + offs_s[None, :] * stride_hs,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            d = a - ah  # MoDiff eq. (6): Δ = a_t - â_{t+1}
        else:
            d = a
        tl.atomic_max(amax_ptr + n * PER_SAMPLE, _tile_absmax_bits(d, mask))

    @triton.jit
    def _act_quantize_kernel(
        a_ptr,  # (N, C, S) float
        ahat_ptr,  # (N, C, S) float (HAS_AHAT): read â_{t+1}, overwritten with â_t
        primed_ptr,  # () bool (HAS_AHAT)
        amax_ptr,  # (N,) or (1,) int32: absmax bits from _act_absmax_kernel
        q_ptr,  # (N, C, S) int8 out
        scale_ptr,  # (N,) or (1,) fp32 out
        C,
        S,
        tiles_s,
        stride_an, stride_ac, stride_as,
        stride_hn, stride_hc, stride_hs,
        stride_qn, stride_qc, stride_qs,
        QMAX: tl.constexpr,
        HAS_AHAT: tl.constexpr,
        PER_SAMPLE: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = tl.program_id(1)
        scale = _scale_from_amax_bits(amax_ptr, n * PER_SAMPLE, QMAX)
        if HAS_AHAT:
            primed = tl.load(primed_ptr) != 0
            scale = tl.where(primed, scale, 1.0)
        if PER_SAMPLE:
            if pid == 0:
                tl.store(scale_ptr + n, scale)
        else:
            if (pid == 0) & (n == 0):
                tl.store(scale_ptr, scale)
        offs_c = (pid // tiles_s) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_s = (pid % tiles_s) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (offs_c < C)[:, None] & (offs_s < S)[None, :]
        n64 = n.to(tl.int64)
        a = tl.load(
            a_ptr + n64 * stride_an + offs_c[:, None] * stride_ac + offs_s[None, :] * stride_as, mask=mask, other=0.0
        ).to(tl.float32)
        if HAS_AHAT:
            ah_ptrs = ahat_ptr + n64 * stride_hn + offs_c[:, None] * stride_hc + offs_s[None, :] * stride_hs
            ah = tl.load(ah_ptrs, mask=tl.where(primed, mask, False), other=0.0).to(tl.float32)
            v = _quantize_levels(a - ah, scale, QMAX)
            v = tl.where(primed, v, 0.0)
            # MoDiff eq. (6): â_t = deQ(Q(Δ)) + â_{t+1}; first step: â_T = a_T.
            ah_new = tl.where(primed, ah + scale * v, a)
            tl.store(ah_ptrs, _store_cast(ah_new, ahat_ptr), mask=mask)
        else:
            v = _quantize_levels(a, scale, QMAX)
        tl.store(
            q_ptr + n64 * stride_qn + offs_c[:, None] * stride_qc + offs_s[None, :] * stride_qs,
            v.to(tl.int8),
            mask=mask,
        )

    @triton.jit
    def _gn_affine_act(x, mean, rstd, gamma, beta, fs, fsh, HAS_FILM_SCALE: tl.constexpr,
                       HAS_FILM_SHIFT: tl.constexpr, APPLY_SILU: tl.constexpr):
        """GroupNorm affine (+FiLM) (+SiLU) on a [BLOCK_CG, BLOCK_S] tile; per-channel vectors."""
        y = (x - mean) * rstd * gamma[:, None] + beta[:, None]
        if HAS_FILM_SCALE:
            y = y * (1.0 + fs[:, None])
        if HAS_FILM_SHIFT:
            y = y + fsh[:, None]
        if APPLY_SILU:
            y = y / (1.0 + tl.exp(-y))
        return y

    @triton.jit
    def _gn_stats_absmax_kernel(
        x_ptr,  # (N, C, S) float
        w_ptr,  # (C,) float  GroupNorm weight
        b_ptr,  # (C,) float  GroupNorm bias
        fs_ptr,  # (N, C) float  FiLM scale (HAS_FILM_SCALE)
        fsh_ptr,  # (N, C) float  FiLM shift (HAS_FILM_SHIFT)
        ahat_ptr,  # (N, C, S) float  â_{t+1}
        primed_ptr,  # () bool
        stats_ptr,  # (N, G, 2) fp32 out: mean, rstd
        amax_ptr,  # (N,) or (1,) int32, zero-initialized
        C,
        S,
        G,
        CG,
        eps,
        stride_xn, stride_xc, stride_xs,
        stride_fn, stride_fc,
        stride_gn, stride_gc,
        stride_hn, stride_hc, stride_hs,
        HAS_FILM_SCALE: tl.constexpr,
        HAS_FILM_SHIFT: tl.constexpr,
        APPLY_SILU: tl.constexpr,
        PER_SAMPLE: tl.constexpr,
        BLOCK_CG: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        g = tl.program_id(0)
        n = tl.program_id(1)
        n64 = n.to(tl.int64)
        offs_cg = tl.arange(0, BLOCK_CG)
        c_ok = offs_cg < CG
        offs_c = g * CG + offs_cg
        x_base = x_ptr + n64 * stride_xn + offs_c[:, None] * stride_xc
        # Sweep 1: GroupNorm statistics, chunk-wise Chan/Welford combination in fp32 (stable for
        # large means, one read of x).
        mean = 0.0
        m2 = 0.0
        count = 0.0
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = c_ok[:, None] & (offs_s < S)[None, :]
            x = tl.load(x_base + offs_s[None, :] * stride_xs, mask=mask, other=0.0).to(tl.float32)
            n_b = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
            mean_b = tl.sum(tl.sum(x, axis=1), axis=0) / n_b
            dx = tl.where(mask, x - mean_b, 0.0)
            m2_b = tl.sum(tl.sum(dx * dx, axis=1), axis=0)
            tot = count + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / tot)
            m2 = m2 + m2_b + delta * delta * (count * n_b / tot)
            count = tot
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        tl.store(stats_ptr + (n * G + g) * 2, mean)
        tl.store(stats_ptr + (n * G + g) * 2 + 1, rstd)

        # Sweep 2: normalized a, Δ = a - â, per-sample absmax (skipped on the first step).
        primed = tl.load(primed_ptr) != 0
        if primed:
            gamma = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
            beta = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
            fs = gamma
            fsh = gamma
            if HAS_FILM_SCALE:
                fs = tl.load(fs_ptr + n64 * stride_fn + offs_c * stride_fc, mask=c_ok, other=0.0).to(tl.float32)
            if HAS_FILM_SHIFT:
                fsh = tl.load(fsh_ptr + n64 * stride_gn + offs_c * stride_gc, mask=c_ok, other=0.0).to(tl.float32)
            h_base = ahat_ptr + n64 * stride_hn + offs_c[:, None] * stride_hc
            amax_bits = 0
            for s0 in range(0, S, BLOCK_S):
                offs_s = s0 + tl.arange(0, BLOCK_S)
                mask = c_ok[:, None] & (offs_s < S)[None, :]
                x = tl.load(x_base + offs_s[None, :] * stride_xs, mask=mask, other=0.0).to(tl.float32)
                a = _gn_affine_act(x, mean, rstd, gamma, beta, fs, fsh, HAS_FILM_SCALE, HAS_FILM_SHIFT, APPLY_SILU)
                ah = tl.load(h_base + offs_s[None, :] * stride_hs, mask=mask, other=0.0).to(tl.float32)
                # Bits of non-negative floats (and NaN above them) order like int32: max of bits.
                amax_bits = tl.maximum(amax_bits, _tile_absmax_bits(a - ah, mask))
            tl.atomic_max(amax_ptr + n * PER_SAMPLE, amax_bits)

    @triton.jit
    def _gn_quantize_kernel(
        x_ptr,  # (N, C, S) float
        w_ptr,  # (C,) float
        b_ptr,  # (C,) float
        fs_ptr,  # (N, C) float (HAS_FILM_SCALE)
        fsh_ptr,  # (N, C) float (HAS_FILM_SHIFT)
        ahat_ptr,  # (N, C, S) float: read â_{t+1}, overwritten with â_t
        primed_ptr,  # () bool
        stats_ptr,  # (N, G, 2) fp32: mean, rstd
        amax_ptr,  # (N,) or (1,) int32 absmax bits
        q_ptr,  # (N, C, S) int8 out
        scale_ptr,  # (N,) or (1,) fp32 out
        C,
        S,
        G,
        CG,
        stride_xn, stride_xc, stride_xs,
        stride_fn, stride_fc,
        stride_gn, stride_gc,
        stride_hn, stride_hc, stride_hs,
        stride_qn, stride_qc, stride_qs,
        QMAX: tl.constexpr,
        HAS_FILM_SCALE: tl.constexpr,
        HAS_FILM_SHIFT: tl.constexpr,
        APPLY_SILU: tl.constexpr,
        PER_SAMPLE: tl.constexpr,
        BLOCK_CG: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        g = tl.program_id(1)
        n = tl.program_id(2)
        n64 = n.to(tl.int64)
        primed = tl.load(primed_ptr) != 0
        scale = tl.where(primed, _scale_from_amax_bits(amax_ptr, n * PER_SAMPLE, QMAX), 1.0)
        if PER_SAMPLE:
            if (pid_s == 0) & (g == 0):
                tl.store(scale_ptr + n, scale)
        else:
            if (pid_s == 0) & (g == 0) & (n == 0):
                tl.store(scale_ptr, scale)
        mean = tl.load(stats_ptr + (n * G + g) * 2)
        rstd = tl.load(stats_ptr + (n * G + g) * 2 + 1)
        offs_cg = tl.arange(0, BLOCK_CG)
        c_ok = offs_cg < CG
        offs_c = g * CG + offs_cg
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (offs_s < S)[None, :]
        gamma = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        fs = gamma
        fsh = gamma
        if HAS_FILM_SCALE:
            fs = tl.load(fs_ptr + n64 * stride_fn + offs_c * stride_fc, mask=c_ok, other=0.0).to(tl.float32)
        if HAS_FILM_SHIFT:
            fsh = tl.load(fsh_ptr + n64 * stride_gn + offs_c * stride_gc, mask=c_ok, other=0.0).to(tl.float32)
        x = tl.load(
            x_ptr + n64 * stride_xn + offs_c[:, None] * stride_xc + offs_s[None, :] * stride_xs, mask=mask, other=0.0
        ).to(tl.float32)
        a = _gn_affine_act(x, mean, rstd, gamma, beta, fs, fsh, HAS_FILM_SCALE, HAS_FILM_SHIFT, APPLY_SILU)
        ah_ptrs = ahat_ptr + n64 * stride_hn + offs_c[:, None] * stride_hc + offs_s[None, :] * stride_hs
        ah = tl.load(ah_ptrs, mask=tl.where(primed, mask, False), other=0.0).to(tl.float32)
        v = tl.where(primed, _quantize_levels(a - ah, scale, QMAX), 0.0)
        # MoDiff eq. (6); first step â_T = a_T (the normalized activation; the float conv reads it).
        ah_new = tl.where(primed, ah + scale * v, a)
        tl.store(ah_ptrs, _store_cast(ah_new, ahat_ptr), mask=mask)
        tl.store(
            q_ptr + n64 * stride_qn + offs_c[:, None] * stride_qc + offs_s[None, :] * stride_qs,
            v.to(tl.int8),
            mask=mask,
        )


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _ncs_strides(t: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """Strides of ``t`` viewed as (N, C, S): 4-D merges H and W into S when memory allows."""
    if t.dim() == 2:  # (N, K): C = 1
        return t.stride(0), 0, t.stride(1)
    if t.dim() == 3:  # (N, L, K)
        return t.stride(0), t.stride(1), t.stride(2)
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if w == 1:
        return sn, sc, sh
    if h == 1 or sh == w * sw:
        return sn, sc, sw
    return None


def _ncs_dims(t: torch.Tensor) -> tuple[int, int, int]:
    if t.dim() == 2:
        return t.shape[0], 1, t.shape[1]
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.shape[2]
    return t.shape[0], t.shape[1], t.shape[2] * t.shape[3]


def _new_q(a: torch.Tensor) -> torch.Tensor:
    """The q output: int8, a's shape, channels_last when 4-D (the conv reads channels contiguously)."""
    if a.dim() == 4:
        return torch.empty(a.shape, dtype=torch.int8, device=a.device, memory_format=torch.channels_last)
    return torch.empty(a.shape, dtype=torch.int8, device=a.device)


def _new_scale(a: torch.Tensor, per_sample: bool) -> torch.Tensor:
    return torch.empty((a.shape[0] if per_sample else 1,), dtype=torch.float32, device=a.device)


def _tile_blocks(C: int, S: int) -> tuple[int, int, int]:
    block_c = min(_common.next_pow2(C), 32)
    budget = 8192 if _common.interpret_mode() else 4096
    block_s = max(16, min(_common.next_pow2(S), budget // block_c))
    num_warps = 8 if block_c * block_s >= 4096 else 4
    return block_c, block_s, num_warps


_PRIMED_TRUE: dict[torch.device, torch.Tensor] = {}


def _primed_on(primed: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``primed`` on the data's device (kernels read it in-kernel, no host sync)."""
    if primed is None:
        if device not in _PRIMED_TRUE:
            _PRIMED_TRUE[device] = torch.ones((), dtype=torch.bool, device=device)
        return _PRIMED_TRUE[device]
    return primed if primed.device == device else primed.to(device)


def _launch_act_quantize(
    a: torch.Tensor, a_hat: Optional[torch.Tensor], primed: Optional[torch.Tensor], bits: int, per_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q = _new_q(a)
    scale = _new_scale(a, per_sample)
    if a.numel() == 0:
        scale.fill_(1.0)
        return q, scale
    sa = _ncs_strides(a)
    if sa is None:
        a = a.contiguous()
        sa = _ncs_strides(a)
    sh = _ncs_strides(a_hat) if a_hat is not None else (0, 0, 0)
    if sh is None:
        raise ValueError("fusediff: a_hat must be contiguous or channels_last (it is updated in place)")
    sq = _ncs_strides(q)
    N, C, S = _ncs_dims(a)
    block_c, block_s, num_warps = _tile_blocks(C, S)
    tiles_s = triton.cdiv(S, block_s)
    grid = (triton.cdiv(C, block_c) * tiles_s, N)
    amax = torch.zeros((N if per_sample else 1,), dtype=torch.int32, device=a.device)
    has_ahat = a_hat is not None
    ahat_arg = a_hat if has_ahat else a
    primed_t = _primed_on(primed, a.device)
    _act_absmax_kernel[grid](
        a, ahat_arg, primed_t, amax, C, S, tiles_s, *sa, *sh,
        HAS_AHAT=has_ahat, PER_SAMPLE=per_sample, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps,
    )
    _act_quantize_kernel[grid](
        a, ahat_arg, primed_t, amax, q, scale, C, S, tiles_s, *sa, *sh, *sq,
        QMAX=qmax_for_bits(bits), HAS_AHAT=has_ahat, PER_SAMPLE=per_sample,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps,
    )
    return q, scale


def _film_2d(t: Optional[torch.Tensor], N: int, C: int) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape(N, C)


def _launch_group_norm_quantize(x, weight, bias, film_scale, film_shift, num_groups, eps, apply_silu, a_hat, primed,
                                bits, per_sample):
    q = _new_q(x)
    scale = _new_scale(x, per_sample)
    if x.numel() == 0:
        scale.fill_(1.0)
        return q, scale
    if weight is None:  # GroupNorm(affine=False)
        weight = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    if bias is None:
        bias = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    sx = _ncs_strides(x)
    if sx is None:
        x = x.contiguous()
        sx = _ncs_strides(x)
    sh = _ncs_strides(a_hat)
    if sh is None:
        raise ValueError("fusediff: a_hat must be contiguous or channels_last (it is updated in place)")
    sq = _ncs_strides(q)
    N, C, S = _ncs_dims(x)
    G = num_groups
    CG = C // G
    fs = _film_2d(film_scale, N, C)
    fsh = _film_2d(film_shift, N, C)
    sfs = (fs.stride(0), fs.stride(1)) if fs is not None else (0, 0)
    sfsh = (fsh.stride(0), fsh.stride(1)) if fsh is not None else (0, 0)
    block_cg = _common.next_pow2(CG)
    budget = 8192 if _common.interpret_mode() else 4096
    block_s = max(16, min(_common.next_pow2(S), max(1, budget // block_cg)))
    num_warps = 8 if block_cg * block_s >= 4096 else 4
    stats = torch.empty((N, G, 2), dtype=torch.float32, device=x.device)
    amax = torch.zeros((N if per_sample else 1,), dtype=torch.int32, device=x.device)
    primed_t = _primed_on(primed, x.device)
    flags = dict(HAS_FILM_SCALE=fs is not None, HAS_FILM_SHIFT=fsh is not None, APPLY_SILU=bool(apply_silu),
                 PER_SAMPLE=bool(per_sample), BLOCK_CG=block_cg, BLOCK_S=block_s)
    _gn_stats_absmax_kernel[(G, N)](
        x, weight, bias, fs if fs is not None else weight, fsh if fsh is not None else weight, a_hat, primed_t,
        stats, amax, C, S, G, CG, float(eps), *sx, *sfs, *sfsh, *sh, num_warps=num_warps, **flags,
    )
    _gn_quantize_kernel[(triton.cdiv(S, block_s), G, N)](
        x, weight, bias, fs if fs is not None else weight, fsh if fsh is not None else weight, a_hat, primed_t,
        stats, amax, q, scale, C, S, G, CG, *sx, *sfs, *sfsh, *sh, *sq,
        QMAX=qmax_for_bits(bits), num_warps=num_warps, **flags,
    )
    return q, scale


# ------------------------------------------------------------------------------------------------
# Validation shared by ops, fakes and references
# ------------------------------------------------------------------------------------------------


def _check_act(name: str, a: torch.Tensor) -> None:
    _common.check_float(name, a, _FLOATS)
    if a.dim() not in (2, 3, 4):
        raise ValueError(f"fusediff: {name} must be 2-D (N, K), 3-D (N, L, K) or 4-D (N, C, H, W), got {tuple(a.shape)}")


def _check_per_sample(per_sample) -> None:
    if not isinstance(per_sample, bool):
        raise TypeError(f"fusediff: per_sample must be a bool, got {type(per_sample).__name__}")


def _check_primed(primed: torch.Tensor) -> None:
    if not isinstance(primed, torch.Tensor) or primed.dtype != torch.bool or primed.dim() != 0:
        raise TypeError(
            "fusediff: primed must be a 0-d bool tensor (False on the first step of a trajectory), got "
            f"{getattr(primed, 'dtype', type(primed))} with shape {tuple(getattr(primed, 'shape', ()))}"
        )


def _check_cache(a: torch.Tensor, a_hat: torch.Tensor, what: str = "a") -> None:
    _common.check_float("a_hat", a_hat, _FLOATS)
    if tuple(a_hat.shape) != tuple(a.shape):
        raise ValueError(
            f"fusediff: a_hat shape {tuple(a_hat.shape)} != {what} shape {tuple(a.shape)}; the MoDiff cache is per "
            "sample and never broadcast: re-seed the trajectory (reset the caches) after a batch/shape change"
        )
    if a_hat.device != a.device:
        raise ValueError(f"fusediff: a_hat is on {a_hat.device} but {what} is on {a.device}")


def _validate_act(a, bits, per_sample, a_hat=None, primed=None) -> None:
    _check_act("a", a)
    _check_bits("bits", bits)
    _check_per_sample(per_sample)
    if a_hat is not None:
        _check_cache(a, a_hat)
        _check_primed(primed)


def _validate_gn(x, weight, bias, film_scale, film_shift, num_groups, eps, a_hat, primed, bits, per_sample) -> None:
    _common.check_float("x", x, _FLOATS)
    if x.dim() not in (3, 4):
        raise ValueError(f"fusediff: x must be (N, C, H, W) or (N, C, L), got {tuple(x.shape)}")
    N, C = x.shape[0], x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"fusediff: num_groups={num_groups!r} must be a positive divisor of C={C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _common.check_float(name, t, _FLOATS)
        if tuple(t.shape) != (C,):
            raise ValueError(f"fusediff: {name} must have shape ({C},), got {tuple(t.shape)}")
    for name, t in (("film_scale", film_scale), ("film_shift", film_shift)):
        if t is not None:
            _common.check_float(name, t, _FLOATS)
            if t.numel() != N * C or t.shape[0] != N:
                raise ValueError(f"fusediff: {name} must have shape ({N}, {C}) or ({N}, {C}, 1, 1), got {tuple(t.shape)}")
    if not isinstance(eps, float) or not eps >= 0:
        raise ValueError(f"fusediff: eps must be a float >= 0, got {eps!r}")
    _check_bits("bits", bits)
    _check_per_sample(per_sample)
    _check_cache(x, a_hat, "x")
    _check_primed(primed)


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fusediff::quantize_act", mutates_args=())
def quantize_act(a: torch.Tensor, bits: int, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline dynamic activation quantization: ``q = Q(a)`` with a fresh absmax scale.

    Args:
        a: float activation, (N, C, H, W), (N, L, K) or (N, K).
        bits: 4 or 8 (q is int8 either way; INT4 values lie in [-7, 7]).
        per_sample: one scale per sample (shape (N,)) or one for the tensor ((1,)).
    Returns:
        ``(q, scale)``: int8 q (channels_last when 4-D) and fp32 scale with ``a ≈ scale * q``.
    """
    _validate_act(a, bits, per_sample)
    path = _common.choose_path(a)
    _common.record("quantize_act", path)
    if path == "triton":
        return _launch_act_quantize(a, None, None, bits, per_sample)
    return quantize_act_ref(a, bits, per_sample)


@quantize_act.register_fake
def _quantize_act_fake(a, bits, per_sample):
    _validate_act(a, bits, per_sample)
    return _new_q(a), _new_scale(a, per_sample)


@torch.library.custom_op("fusediff::modiff_quantize", mutates_args=("a_hat",))
def modiff_quantize(
    a: torch.Tensor, a_hat: torch.Tensor, primed: torch.Tensor, bits: int, per_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoDiff eq. (6): ``q = Q(a - â)`` and ``â <- â + deQ(q)`` in place; first step ``â <- a``.

    Args:
        a: float activation a_t.
        a_hat: float cache â_{t+1}, same shape as ``a`` (updated in place to â_t).
        primed: 0-d bool tensor; False on the first step (then q = 0, scale = 1, â = a).
        bits, per_sample: as in :func:`quantize_act`.
    Returns:
        ``(q, scale)`` of Δ.
    """
    _validate_act(a, bits, per_sample, a_hat, primed)
    path = _common.choose_path(a, a_hat)
    _common.record("modiff_quantize", path)
    if path == "triton":
        return _launch_act_quantize(a, a_hat, primed, bits, per_sample)
    return modiff_quantize_ref(a, a_hat, primed, bits, per_sample)


@modiff_quantize.register_fake
def _modiff_quantize_fake(a, a_hat, primed, bits, per_sample):
    _validate_act(a, bits, per_sample, a_hat, primed)
    return _new_q(a), _new_scale(a, per_sample)


@torch.library.custom_op("fusediff::group_norm_quantize", mutates_args=("a_hat",))
def group_norm_quantize(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    film_scale: Optional[torch.Tensor],
    film_shift: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    apply_silu: bool,
    a_hat: torch.Tensor,
    primed: torch.Tensor,
    bits: int,
    per_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Fig. 1 (left): GroupNorm (+FiLM) (+SiLU) -> Δ against â -> Q -> q and the updated â.

    ``a = [silu](GN(x) * weight + bias [* (1 + film_scale) + film_shift])``, then exactly
    :func:`modiff_quantize` on ``a`` (which is never written to memory). On the first step
    (``primed`` False) â receives ``a`` itself, so the float first-step conv reads â.
    """
    _validate_gn(x, weight, bias, film_scale, film_shift, num_groups, eps, a_hat, primed, bits, per_sample)
    path = _common.choose_path(x, a_hat, *(t for t in (weight, bias, film_scale, film_shift) if t is not None))
    _common.record("group_norm_quantize", path)
    if path == "triton":
        return _launch_group_norm_quantize(x, weight, bias, film_scale, film_shift, num_groups, eps, apply_silu,
                                           a_hat, primed, bits, per_sample)
    return group_norm_quantize_ref(x, weight, bias, film_scale, film_shift, num_groups, eps, apply_silu, a_hat,
                                   primed, bits, per_sample)


@group_norm_quantize.register_fake
def _group_norm_quantize_fake(x, weight, bias, film_scale, film_shift, num_groups, eps, apply_silu, a_hat, primed,
                              bits, per_sample):
    _validate_gn(x, weight, bias, film_scale, film_shift, num_groups, eps, a_hat, primed, bits, per_sample)
    return _new_q(x), _new_scale(x, per_sample)


# ------------------------------------------------------------------------------------------------
# Pure-torch references (tests and benchmarks import these; the CPU fallback runs them)
# ------------------------------------------------------------------------------------------------


def _absmax_scale_ref(d: torch.Tensor, qmax: int, per_sample: bool) -> torch.Tensor:
    """fp32 scale (N,) or (1,): absmax / qmax (NaN propagates), 1 where absmax == 0."""
    flat = d.reshape(d.shape[0], -1) if per_sample else d.reshape(1, -1)
    absmax = flat.abs().amax(dim=1) if flat.shape[1] else torch.zeros(flat.shape[0], device=d.device)
    return torch.where(absmax == 0, torch.ones_like(absmax), absmax / qmax).float()


def _quantize_levels_ref(d: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Q(d) with a per-sample (or (1,)) scale broadcast over dims 1..; NaN -> 0. Returns fp32 levels."""
    s = scale.reshape((-1,) + (1,) * (d.dim() - 1))
    v = d / s
    is_nan = torch.isnan(v)
    v = torch.round(torch.clamp(v, -qmax, qmax))
    return torch.where(is_nan, torch.zeros_like(v), v)


def quantize_act_ref(a: torch.Tensor, bits: int, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``fusediff::quantize_act``."""
    _validate_act(a, bits, per_sample)
    qmax = qmax_for_bits(bits)
    d = a.float()
    scale = _absmax_scale_ref(d, qmax, per_sample)
    q = _new_q(a)
    q.copy_(_quantize_levels_ref(d, scale, qmax).to(torch.int8))
    return q, scale


def modiff_quantize_ref(
    a: torch.Tensor, a_hat: torch.Tensor, primed: torch.Tensor, bits: int, per_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``fusediff::modiff_quantize`` (mutates ``a_hat`` like the op)."""
    _validate_act(a, bits, per_sample, a_hat, primed)
    q = _new_q(a)
    if not bool(primed):
        a_hat.copy_(a)
        q.zero_()
        return q, torch.ones((a.shape[0] if per_sample else 1,), dtype=torch.float32, device=a.device)
    qmax = qmax_for_bits(bits)
    ah = a_hat.float()
    d = a.float() - ah  # eq. (6): Δ = a_t - â_{t+1}
    scale = _absmax_scale_ref(d, qmax, per_sample)
    v = _quantize_levels_ref(d, scale, qmax)
    a_hat.copy_(ah + scale.reshape((-1,) + (1,) * (a.dim() - 1)) * v)  # â_t = deQ(Q(Δ)) + â_{t+1}
    q.copy_(v.to(torch.int8))
    return q, scale


def group_norm_act_ref(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    film_scale: Optional[torch.Tensor],
    film_shift: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    apply_silu: bool,
) -> torch.Tensor:
    """The float activation the fused kernel quantizes: [silu](GN(x)·w + b [·(1 + scale) + shift]), fp32."""
    N, C = x.shape[0], x.shape[1]
    bshape = (N, C) + (1,) * (x.dim() - 2)
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if film_scale is not None:
        y = y * (1.0 + film_scale.float().reshape(bshape))
    if film_shift is not None:
        y = y + film_shift.float().reshape(bshape)
    if apply_silu:
        y = F.silu(y)
    return y


def group_norm_quantize_ref(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    film_scale: Optional[torch.Tensor],
    film_shift: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    apply_silu: bool,
    a_hat: torch.Tensor,
    primed: torch.Tensor,
    bits: int,
    per_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``fusediff::group_norm_quantize`` (mutates ``a_hat`` like the op)."""
    _validate_gn(x, weight, bias, film_scale, film_shift, num_groups, eps, a_hat, primed, bits, per_sample)
    a = group_norm_act_ref(x, weight, bias, film_scale, film_shift, num_groups, eps, apply_silu)
    return modiff_quantize_ref(a, a_hat, primed, bits, per_sample)
