"""MoDiff low-bit activation quantizers: dynamic ``Q(a)``, MoDiff's ``Q(a - â)``, and GroupNorm fused with Q.

Quantizer (symmetric, zero point 0; the paper's eq. 4-5 with z = 0 and round-to-nearest-even):

    qmax   = 2**(b-1) - 1                    # INT8: 127, INT4: 7 (symmetric: -128 / -8 never used)
    Q(x)   = clamp(round(x / s), -qmax, qmax)
    deQ(q) = s * q

Weights (per output channel, static, MSE clipping search; INT4 packing) are quantized offline in
``kernels/_weights.py``; ``qmax_for_bits``, ``quantize_weight``, ``pack_int4`` and ``unpack_int4``
are re-exported here. The device and host building blocks of the kernels below (Q, the absmax
atomics, the â update, the (N, C, S) view) live in ``kernels/_quant.py``; the GroupNorm affine/FiLM
epilogue in ``kernels/_norm.py``, shared with ``fusediff::group_norm_silu``.

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

Layout: q is returned channels_last (NHWC strides) for 4-D inputs, so the implicit-GEMM conv reads
its K (= channel) axis contiguously; contiguous otherwise. Inputs may be NCHW or channels_last.

Passes (per-sample absmax needs the whole sample before any element can be quantized):

* ``quantize_act`` / ``modiff_quantize``: kernel 1 reads a (and â), reduces |Δ| per tile and
  ``atomic_max``-es it into a per-sample int32 buffer (non-negative fp32 order like their bit
  patterns, NaN above +Inf, so the max is exact and order-independent); kernel 2 re-reads a (and
  â), quantizes, writes q, s and the new â. Traffic: 2 reads of a and â, 1 write of q and â.
* ``group_norm_quantize`` (Fig. 1 left): kernel 1, one program per (sample, group): GroupNorm
  statistics (chunked Welford/Chan combination, fp32, one read of x), then a second sweep that
  normalizes (+FiLM, +SiLU; the affine/FiLM epilogue is ``group_norm_silu``'s, ``kernels/_norm.py``),
  forms Δ = a - â and ``atomic_max``-es |Δ| per sample (second read of x, one read of â; skipped
  when not primed); the mean/rstd go to a tiny (N, G, 2) buffer.
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

from . import _common
from ._norm import group_norm_act_ref
from ._quant import (absmax_scale_ref, check_act, check_cache, check_per_sample, check_primed, ncs_dims, ncs_strides,
                     ncs_view, new_q, new_scale, primed_on, quantize_levels_ref, tile_blocks)
from ._weights import check_bits, pack_int4, qmax_for_bits, quantize_weight, unpack_int4

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

    from ._norm import _gn_affine, _gn_params
    from ._quant import _modiff_update, _quantize_levels, _scale_from_amax_bits, _store_scale, _tile_absmax_bits
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


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------

if _common.HAS_TRITON:

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
        _store_scale(scale_ptr, n, scale, pid == 0, PER_SAMPLE)
        offs_c = (pid // tiles_s) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_s = (pid % tiles_s) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (offs_c < C)[:, None] & (offs_s < S)[None, :]
        n64 = n.to(tl.int64)
        a = tl.load(
            a_ptr + n64 * stride_an + offs_c[:, None] * stride_ac + offs_s[None, :] * stride_as, mask=mask, other=0.0
        ).to(tl.float32)
        if HAS_AHAT:
            # MoDiff eq. (6): q = Q(a_t - â_{t+1}), â_t = deQ(q) + â_{t+1}; first step: â_T = a_T.
            ah_ptrs = ahat_ptr + n64 * stride_hn + offs_c[:, None] * stride_hc + offs_s[None, :] * stride_hs
            v = _modiff_update(a, ah_ptrs, mask, primed, scale, QMAX)
        else:
            v = _quantize_levels(a, scale, QMAX)
        tl.store(
            q_ptr + n64 * stride_qn + offs_c[:, None] * stride_qc + offs_s[None, :] * stride_qs,
            v.to(tl.int8),
            mask=mask,
        )

    @triton.jit
    def _gn_silu(y, APPLY_SILU: tl.constexpr):
        """SiLU as ``y / (1 + exp(-y))`` (torch's formula; group_norm_silu's ``y * sigmoid(y)`` rounds differently)."""
        if APPLY_SILU:
            y = y / (1.0 + tl.exp(-y))
        return y

    @triton.jit
    def _gn_stats_absmax_kernel(
        x_ptr,  # (N, C, S) float
        w_ptr,  # (C,) float  GroupNorm weight (ones for affine=False)
        b_ptr,  # (C,) float  GroupNorm bias (zeros for affine=False)
        film_scale_ptr,  # (N, C) float  FiLM scale (HAS_SCALE)
        film_shift_ptr,  # (N, C) float  FiLM shift (HAS_SHIFT)
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
        stride_scn, stride_scc, stride_shn, stride_shc,
        stride_hn, stride_hc, stride_hs,
        HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
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
            w, b, sc, sh = _gn_params(offs_c, n64, c_ok, w_ptr, b_ptr, film_scale_ptr, film_shift_ptr,
                                      stride_scn, stride_scc, stride_shn, stride_shc, True, True, HAS_SCALE, HAS_SHIFT)
            h_base = ahat_ptr + n64 * stride_hn + offs_c[:, None] * stride_hc
            amax_bits = 0
            for s0 in range(0, S, BLOCK_S):
                offs_s = s0 + tl.arange(0, BLOCK_S)
                mask = c_ok[:, None] & (offs_s < S)[None, :]
                x = tl.load(x_base + offs_s[None, :] * stride_xs, mask=mask, other=0.0).to(tl.float32)
                a = _gn_affine(x, mean, rstd, w[:, None], b[:, None], sc[:, None], sh[:, None],
                               True, True, HAS_SCALE, HAS_SHIFT)
                a = _gn_silu(a, APPLY_SILU)
                ah = tl.load(h_base + offs_s[None, :] * stride_hs, mask=mask, other=0.0).to(tl.float32)
                # Bits of non-negative floats (and NaN above them) order like int32: max of bits.
                amax_bits = tl.maximum(amax_bits, _tile_absmax_bits(a - ah, mask))
            tl.atomic_max(amax_ptr + n * PER_SAMPLE, amax_bits)

    @triton.jit
    def _gn_quantize_kernel(
        x_ptr,  # (N, C, S) float
        w_ptr,  # (C,) float (ones for affine=False)
        b_ptr,  # (C,) float (zeros for affine=False)
        film_scale_ptr,  # (N, C) float (HAS_SCALE)
        film_shift_ptr,  # (N, C) float (HAS_SHIFT)
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
        stride_scn, stride_scc, stride_shn, stride_shc,
        stride_hn, stride_hc, stride_hs,
        stride_qn, stride_qc, stride_qs,
        QMAX: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
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
        _store_scale(scale_ptr, n, scale, (pid_s == 0) & (g == 0), PER_SAMPLE)
        mean = tl.load(stats_ptr + (n * G + g) * 2)
        rstd = tl.load(stats_ptr + (n * G + g) * 2 + 1)
        offs_cg = tl.arange(0, BLOCK_CG)
        c_ok = offs_cg < CG
        offs_c = g * CG + offs_cg
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (offs_s < S)[None, :]
        w, b, sc, sh = _gn_params(offs_c, n64, c_ok, w_ptr, b_ptr, film_scale_ptr, film_shift_ptr,
                                  stride_scn, stride_scc, stride_shn, stride_shc, True, True, HAS_SCALE, HAS_SHIFT)
        x = tl.load(
            x_ptr + n64 * stride_xn + offs_c[:, None] * stride_xc + offs_s[None, :] * stride_xs, mask=mask, other=0.0
        ).to(tl.float32)
        a = _gn_affine(x, mean, rstd, w[:, None], b[:, None], sc[:, None], sh[:, None], True, True, HAS_SCALE, HAS_SHIFT)
        a = _gn_silu(a, APPLY_SILU)
        # MoDiff eq. (6); first step â_T = a_T (the normalized activation; the float conv reads it).
        ah_ptrs = ahat_ptr + n64 * stride_hn + offs_c[:, None] * stride_hc + offs_s[None, :] * stride_hs
        v = _modiff_update(a, ah_ptrs, mask, primed, scale, QMAX)
        tl.store(
            q_ptr + n64 * stride_qn + offs_c[:, None] * stride_qc + offs_s[None, :] * stride_qs,
            v.to(tl.int8),
            mask=mask,
        )


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _launch_act_quantize(
    a: torch.Tensor, a_hat: Optional[torch.Tensor], primed: Optional[torch.Tensor], bits: int, per_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q = new_q(a)
    scale = new_scale(a, per_sample)
    if a.numel() == 0:
        scale.fill_(1.0)
        return q, scale
    a, sa, sh = ncs_view(a, a_hat)
    sq = ncs_strides(q)
    N, C, S = ncs_dims(a)
    block_c, block_s, num_warps = tile_blocks(C, S)
    tiles_s = triton.cdiv(S, block_s)
    grid = (triton.cdiv(C, block_c) * tiles_s, N)
    amax = torch.zeros((N if per_sample else 1,), dtype=torch.int32, device=a.device)
    has_ahat = a_hat is not None
    ahat_arg = a_hat if has_ahat else a
    primed_t = primed_on(primed, a.device)
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


def _launch_group_norm_quantize(x, weight, bias, film_scale, film_shift, num_groups, eps, apply_silu, a_hat, primed,
                                bits, per_sample):
    q = new_q(x)
    scale = new_scale(x, per_sample)
    if x.numel() == 0:
        scale.fill_(1.0)
        return q, scale
    if weight is None:  # GroupNorm(affine=False)
        weight = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    if bias is None:
        bias = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    x, sx, sh = ncs_view(x, a_hat)
    sq = ncs_strides(q)
    N, C, S = ncs_dims(x)
    G = num_groups
    CG = C // G
    film = [None if t is None else t.reshape(N, C) for t in (film_scale, film_shift)]
    film_strides = [s for t in film for s in ((0, 0) if t is None else t.stride())]
    film_ptrs = [weight if t is None else t for t in film]  # weight: a dummy pointer, never read
    block_cg, block_s, num_warps = tile_blocks(CG, S, None)
    stats = torch.empty((N, G, 2), dtype=torch.float32, device=x.device)
    amax = torch.zeros((N if per_sample else 1,), dtype=torch.int32, device=x.device)
    primed_t = primed_on(primed, x.device)
    flags = dict(HAS_SCALE=film[0] is not None, HAS_SHIFT=film[1] is not None, APPLY_SILU=bool(apply_silu),
                 PER_SAMPLE=bool(per_sample), BLOCK_CG=block_cg, BLOCK_S=block_s)
    _gn_stats_absmax_kernel[(G, N)](
        x, weight, bias, *film_ptrs, a_hat, primed_t, stats, amax, C, S, G, CG, float(eps), *sx, *film_strides, *sh,
        num_warps=num_warps, **flags,
    )
    _gn_quantize_kernel[(triton.cdiv(S, block_s), G, N)](
        x, weight, bias, *film_ptrs, a_hat, primed_t, stats, amax, q, scale, C, S, G, CG, *sx, *film_strides, *sh, *sq,
        QMAX=qmax_for_bits(bits), num_warps=num_warps, **flags,
    )
    return q, scale


# ------------------------------------------------------------------------------------------------
# Validation shared by ops, fakes and references
# ------------------------------------------------------------------------------------------------


def _validate_act(a, bits, per_sample, a_hat=None, primed=None) -> None:
    check_act("a", a)
    check_bits("bits", bits)
    check_per_sample(per_sample)
    if a_hat is not None:
        check_cache(a, a_hat)
        check_primed(primed)


def _validate_gn(x, weight, bias, film_scale, film_shift, num_groups, eps, a_hat, primed, bits, per_sample) -> None:
    _common.check_float("x", x)
    if x.dim() not in (3, 4):
        raise ValueError(f"fusediff: x must be (N, C, H, W) or (N, C, L), got {tuple(x.shape)}")
    N, C = x.shape[0], x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"fusediff: num_groups={num_groups!r} must be a positive divisor of C={C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _common.check_float(name, t)
        if tuple(t.shape) != (C,):
            raise ValueError(f"fusediff: {name} must have shape ({C},), got {tuple(t.shape)}")
    for name, t in (("film_scale", film_scale), ("film_shift", film_shift)):
        if t is not None:
            _common.check_float(name, t)
            if t.numel() != N * C or t.shape[0] != N:
                raise ValueError(f"fusediff: {name} must have shape ({N}, {C}) or ({N}, {C}, 1, 1), got {tuple(t.shape)}")
    if not isinstance(eps, float) or not eps >= 0:
        raise ValueError(f"fusediff: eps must be a float >= 0, got {eps!r}")
    check_bits("bits", bits)
    check_per_sample(per_sample)
    check_cache(x, a_hat, "x")
    check_primed(primed)


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
    return _common.dispatch("quantize_act", (a,), lambda: _launch_act_quantize(a, None, None, bits, per_sample),
                            lambda: quantize_act_ref(a, bits, per_sample))


@quantize_act.register_fake
def _quantize_act_fake(a, bits, per_sample):
    _validate_act(a, bits, per_sample)
    return new_q(a), new_scale(a, per_sample)


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
    return _common.dispatch("modiff_quantize", (a, a_hat),
                            lambda: _launch_act_quantize(a, a_hat, primed, bits, per_sample),
                            lambda: modiff_quantize_ref(a, a_hat, primed, bits, per_sample))


@modiff_quantize.register_fake
def _modiff_quantize_fake(a, a_hat, primed, bits, per_sample):
    _validate_act(a, bits, per_sample, a_hat, primed)
    return new_q(a), new_scale(a, per_sample)


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
    args = (x, weight, bias, film_scale, film_shift, num_groups, eps, apply_silu, a_hat, primed, bits, per_sample)
    return _common.dispatch("group_norm_quantize", (x, a_hat, weight, bias, film_scale, film_shift),
                            lambda: _launch_group_norm_quantize(*args), lambda: group_norm_quantize_ref(*args))


@group_norm_quantize.register_fake
def _group_norm_quantize_fake(x, weight, bias, film_scale, film_shift, num_groups, eps, apply_silu, a_hat, primed,
                              bits, per_sample):
    _validate_gn(x, weight, bias, film_scale, film_shift, num_groups, eps, a_hat, primed, bits, per_sample)
    return new_q(x), new_scale(x, per_sample)


# ------------------------------------------------------------------------------------------------
# Pure-torch references (tests and benchmarks import these; the CPU fallback runs them)
# ------------------------------------------------------------------------------------------------


def quantize_act_ref(a: torch.Tensor, bits: int, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``fusediff::quantize_act``."""
    _validate_act(a, bits, per_sample)
    qmax = qmax_for_bits(bits)
    d = a.float()
    scale = absmax_scale_ref(d, qmax, per_sample)
    q = new_q(a)
    q.copy_(quantize_levels_ref(d, scale, qmax).to(torch.int8))
    return q, scale


def modiff_quantize_ref(
    a: torch.Tensor, a_hat: torch.Tensor, primed: torch.Tensor, bits: int, per_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``fusediff::modiff_quantize`` (mutates ``a_hat`` like the op)."""
    _validate_act(a, bits, per_sample, a_hat, primed)
    q = new_q(a)
    if not bool(primed):
        a_hat.copy_(a)
        q.zero_()
        return q, torch.ones((a.shape[0] if per_sample else 1,), dtype=torch.float32, device=a.device)
    qmax = qmax_for_bits(bits)
    ah = a_hat.float()
    d = a.float() - ah  # eq. (6): Δ = a_t - â_{t+1}
    scale = absmax_scale_ref(d, qmax, per_sample)
    v = quantize_levels_ref(d, scale, qmax)
    a_hat.copy_(ah + scale.reshape((-1,) + (1,) * (a.dim() - 1)) * v)  # â_t = deQ(Q(Δ)) + â_{t+1}
    q.copy_(v.to(torch.int8))
    return q, scale


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
