"""Fused GroupNorm (+ affine, + FiLM scale/shift, + SiLU): ``fusediff::group_norm_silu``.

Math ("Speed Is All You Need" (arXiv:2304.11267) §3.1, eq. 1), for sample ``n`` and group ``g`` with
``CPG = C // G`` channels and ``S = prod(spatial)`` positions, i.e. ``GS = CPG * S`` elements:

    mu_g  = mean(x[n, g*CPG:(g+1)*CPG, :])            (fp32)
    var_g = mean((x - mu_g)^2)                         (biased, fp32)
    y     = (x - mu_g) * rsqrt(var_g + eps)            eq. (1)
    y     = y * weight[c] + bias[c]                    (GroupNorm affine, optional)
    y     = y * (1 + scale[n, c]) + shift[n, c]        (ADM/LDM use_scale_shift_norm FiLM, optional)
    y     = y * sigmoid(y)                             (SiLU, optional)

The output is cast to ``x.dtype``. As in the paper, the "reshape -> mean -> variance -> normalize"
sequence runs as one kernel without intermediate tensors: the only extra memory is, for very large
groups, a (N*G, SPLITS, 3) fp32 buffer of partial statistics.

Layout: ``x`` is viewed as (N, C, S) with strides ``(stride_xn, stride_xc, stride_xs)``; this covers
NCHW-contiguous (``stride_xs == 1``), channels_last (``stride_xc == 1``, ``stride_xs == C``) and
(N, C, L) tensors. A group is a set of ``CPG`` consecutive channels; in NCHW its elements form one
contiguous range, in channels_last they are ``S`` rows of ``CPG`` contiguous values spaced ``C``
apart. The kernels walk a group by a flat index ``i`` in memory order (``CHANNELS_INNER`` picks
``i = c*S + s`` or ``i = s*CPG + c``), so loads stay coalesced in both layouts. The output keeps
x's memory format (``torch.empty_like``).

The affine/FiLM epilogue (and the pure-torch reference math) live in ``kernels/_norm.py``, shared
with ``fusediff::group_norm_quantize``.

Variants (chosen by :func:`_plan_launch` from the group size):
* ``one_tile``: GS <= ``ONE_TILE_MAX``: one program per (n, g) holds the whole group in registers:
  exact two-pass mean/variance, then the epilogue; x is read once.
* ``loop``: one program per (n, g) streams the group twice: per-lane Welford statistics in
  BLOCK chunks (numerically stable, no E[x^2]-E[x]^2 cancellation), then normalize + epilogue.
* ``split``: GS > ``SPLIT_THRESHOLD`` (or too few programs to fill the GPU): several programs
  per group each reduce one chunk to (count, mean, M2) partials, then each program of a second
  kernel merges the partials (Chan et al. parallel variance) and normalizes its chunk.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from typing import Optional

import torch
from torch import Tensor

from . import _common
from ._norm import group_norm_act_ref

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

    from ._norm import _gn_affine, _gn_params

log = logging.getLogger("fusediff.kernels")

OP_NAME = "group_norm_silu"

#: Groups with at most this many elements run the ``one_tile`` variant (whole group in registers).
ONE_TILE_MAX = 8192
#: Groups with more elements than this use the ``split`` variant (brief: "group elements > 64K").
SPLIT_THRESHOLD = 65536
#: Target number of elements per program in the ``split`` variant.
SPLIT_CHUNK = 16384
#: Smallest chunk worth splitting into when splitting only to fill the GPU (groups below the
#: threshold but too few programs); also the alignment of chunk boundaries.
SPLIT_MIN_CHUNK = 1024
#: ``VARIANT_COUNTS[variant]`` counts launches per variant (tests prove each variant ran).
VARIANT_COUNTS: Counter[str] = Counter()

#: In-sample offsets are int32 in the kernels (the per-sample base is int64).
_MAX_SAMPLE_ELEMS = 2**31 - 1

_FLOAT_X = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_PARAM = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------
# Autotune configs
# ----------------------------------------------------------------------------------------------
def _stream_configs():
    if _common.interpret_mode():
        return [triton.Config({"BLOCK": 1024}, num_warps=4)]
    return [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block in (1024, 2048, 4096)
        for warps in (4, 8, 16)
        if block // (32 * warps) >= 4  # at least one 4-wide vector per thread
    ]


def _prune_stream_configs(configs, named_args, **kwargs):
    """Drop BLOCKs longer than the range one program walks (group, or chunk in the split kernels)."""
    span = named_args.get("CHUNK", named_args.get("GS", kwargs.get("GS")))
    if span is None:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK"] <= max(1024, _common.next_pow2(int(span)))]
    return kept or configs[:1]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if _common.HAS_TRITON:

    @triton.jit
    def _group_offsets(idx, S, stride_c, stride_s, CPG: tl.constexpr, CHANNELS_INNER: tl.constexpr,
                       CONTIG: tl.constexpr):
        """Flat in-group index -> (channel within group, element offset from the group's base)."""
        if CHANNELS_INNER:  # channels_last: i = s * CPG + c
            s = idx // CPG
            c = idx - s * CPG
        else:  # NCHW / (N, C, L): i = c * S + s
            c = idx // S
            s = idx - c * S
        if CONTIG:  # the group is one dense range in iteration order: let Triton vectorize
            offs = idx
        else:
            offs = c * stride_c + s * stride_s
        return c, offs

    @triton.jit
    def _welford_range(x_ptr, x_base, start, end, S, stride_xc, stride_xs,
                       CPG: tl.constexpr, CHANNELS_INNER: tl.constexpr, X_CONTIG: tl.constexpr,
                       BLOCK: tl.constexpr):
        """(count, mean, M2) of the group's elements [start, end), fp32, per-lane Welford."""
        cnt = tl.zeros([BLOCK], dtype=tl.float32)
        mean = tl.zeros([BLOCK], dtype=tl.float32)
        m2 = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < end
            _, offs = _group_offsets(idx, S, stride_xc, stride_xs, CPG, CHANNELS_INNER, X_CONTIG)
            x = tl.load(x_ptr + x_base + offs, mask=mask, other=0.0).to(tl.float32)
            cnt_new = cnt + tl.where(mask, 1.0, 0.0)
            delta = tl.where(mask, x - mean, 0.0)
            mean = mean + delta / tl.maximum(cnt_new, 1.0)
            m2 = m2 + tl.where(mask, delta * (x - mean), 0.0)
            cnt = cnt_new
        # Merge the lanes (Chan et al.): M2 = sum M2_l + sum n_l (mean_l - mean)^2.
        total = tl.sum(cnt, axis=0)
        g_mean = tl.sum(cnt * mean, axis=0) / total
        d = tl.where(cnt > 0, mean - g_mean, 0.0)
        g_m2 = tl.sum(m2, axis=0) + tl.sum(cnt * d * d, axis=0)
        return total, g_mean, g_m2

    @triton.jit
    def _epilogue(x, c, n, g, mean, rstd, mask,
                  w_ptr, b_ptr, scale_ptr, shift_ptr,
                  stride_scn, stride_scc, stride_shn, stride_shc,
                  CPG: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, APPLY_SILU: tl.constexpr):
        """eq. (1) + affine + FiLM + SiLU on fp32 values ``x`` of channels ``g*CPG + c`` (per element)."""
        w, b, sc, sh = _gn_params(g * CPG + c, n, mask, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                  stride_scn, stride_scc, stride_shn, stride_shc,
                                  HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        y = _gn_affine(x, mean, rstd, w, b, sc, sh, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        if APPLY_SILU:
            y = y * tl.sigmoid(y)
        return y

    @triton.jit
    def _normalize_range(x_ptr, y_ptr, x_base, y_base, start, end, n, g, mean, rstd, S,
                         stride_xc, stride_xs, stride_yc, stride_ys,
                         w_ptr, b_ptr, scale_ptr, shift_ptr,
                         stride_scn, stride_scc, stride_shn, stride_shc,
                         CPG: tl.constexpr, CHANNELS_INNER: tl.constexpr, X_CONTIG: tl.constexpr,
                         Y_CONTIG: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, APPLY_SILU: tl.constexpr,
                         BLOCK: tl.constexpr):
        """Second pass over [start, end): normalize + epilogue, one store per element."""
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < end
            c, x_offs = _group_offsets(idx, S, stride_xc, stride_xs, CPG, CHANNELS_INNER, X_CONTIG)
            _, y_offs = _group_offsets(idx, S, stride_yc, stride_ys, CPG, CHANNELS_INNER, Y_CONTIG)
            x = tl.load(x_ptr + x_base + x_offs, mask=mask, other=0.0).to(tl.float32)
            y = _epilogue(x, c, n, g, mean, rstd, mask, w_ptr, b_ptr, scale_ptr, shift_ptr,
                          stride_scn, stride_scc, stride_shn, stride_shc,
                          CPG, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, APPLY_SILU)
            tl.store(y_ptr + y_base + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_norm_silu_kernel(
        x_ptr,  # (N, C, S) fp32/fp16/bf16, strides (stride_xn, stride_xc, stride_xs)
        y_ptr,  # (N, C, S) x.dtype, strides (stride_yn, stride_yc, stride_ys)
        w_ptr,  # (C,) any float, read only if HAS_WEIGHT
        b_ptr,  # (C,) any float, read only if HAS_BIAS
        scale_ptr,  # (N, C) any float, read only if HAS_SCALE
        shift_ptr,  # (N, C) any float, read only if HAS_SHIFT
        G, S, GS, eps,
        stride_xn, stride_xc, stride_xs,
        stride_yn, stride_yc, stride_ys,
        stride_scn, stride_scc, stride_shn, stride_shc,
        CPG: tl.constexpr, CHANNELS_INNER: tl.constexpr, X_CONTIG: tl.constexpr, Y_CONTIG: tl.constexpr,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, APPLY_SILU: tl.constexpr,
        ONE_TILE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per (sample, group): statistics then normalize, no intermediate tensor."""
        pid = tl.program_id(0)
        n = pid // G
        g = pid - n * G
        x_base = n.to(tl.int64) * stride_xn + (g * CPG).to(tl.int64) * stride_xc
        y_base = n.to(tl.int64) * stride_yn + (g * CPG).to(tl.int64) * stride_yc
        if ONE_TILE:  # whole group in registers: exact two-pass statistics, x read once
            idx = tl.arange(0, BLOCK)
            mask = idx < GS
            c, x_offs = _group_offsets(idx, S, stride_xc, stride_xs, CPG, CHANNELS_INNER, X_CONTIG)
            _, y_offs = _group_offsets(idx, S, stride_yc, stride_ys, CPG, CHANNELS_INNER, Y_CONTIG)
            x = tl.load(x_ptr + x_base + x_offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / GS
            d = tl.where(mask, x - mean, 0.0)
            var = tl.sum(d * d, axis=0) / GS
            rstd = 1.0 / tl.sqrt(var + eps)
            y = _epilogue(x, c, n, g, mean, rstd, mask, w_ptr, b_ptr, scale_ptr, shift_ptr,
                          stride_scn, stride_scc, stride_shn, stride_shc,
                          CPG, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, APPLY_SILU)
            tl.store(y_ptr + y_base + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            _, mean, m2 = _welford_range(x_ptr, x_base, 0, GS, S, stride_xc, stride_xs,
                                         CPG, CHANNELS_INNER, X_CONTIG, BLOCK)
            rstd = 1.0 / tl.sqrt(tl.maximum(m2 / GS, 0.0) + eps)
            _normalize_range(x_ptr, y_ptr, x_base, y_base, 0, GS, n, g, mean, rstd, S,
                             stride_xc, stride_xs, stride_yc, stride_ys,
                             w_ptr, b_ptr, scale_ptr, shift_ptr,
                             stride_scn, stride_scc, stride_shn, stride_shc,
                             CPG, CHANNELS_INNER, X_CONTIG, Y_CONTIG,
                             HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, APPLY_SILU, BLOCK)

    @triton.jit
    def _group_norm_silu_partial_kernel(
        x_ptr,  # (N, C, S) fp32/fp16/bf16
        ws_ptr,  # (N*G, SPLITS, 3) fp32: count, mean, M2 of each chunk
        G, S, GS, CHUNK, SPLITS,
        stride_xn, stride_xc, stride_xs,
        CPG: tl.constexpr, CHANNELS_INNER: tl.constexpr, X_CONTIG: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Split variant, pass 1: grid (N*G, SPLITS); chunk statistics of one group."""
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        n = pid // G
        g = pid - n * G
        x_base = n.to(tl.int64) * stride_xn + (g * CPG).to(tl.int64) * stride_xc
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, GS)
        cnt, mean, m2 = _welford_range(x_ptr, x_base, start, end, S, stride_xc, stride_xs,
                                       CPG, CHANNELS_INNER, X_CONTIG, BLOCK)
        ws = ws_ptr + (pid.to(tl.int64) * SPLITS + sp) * 3
        tl.store(ws + 0, cnt)
        tl.store(ws + 1, mean)
        tl.store(ws + 2, m2)

    @triton.jit
    def _group_norm_silu_split_kernel(
        x_ptr,  # (N, C, S) fp32/fp16/bf16
        y_ptr,  # (N, C, S) x.dtype
        ws_ptr,  # (N*G, SPLITS, 3) fp32 partials from _group_norm_silu_partial_kernel
        w_ptr,  # (C,) any float
        b_ptr,  # (C,) any float
        scale_ptr,  # (N, C) any float
        shift_ptr,  # (N, C) any float
        G, S, GS, CHUNK, SPLITS, eps,
        stride_xn, stride_xc, stride_xs,
        stride_yn, stride_yc, stride_ys,
        stride_scn, stride_scc, stride_shn, stride_shc,
        CPG: tl.constexpr, CHANNELS_INNER: tl.constexpr, X_CONTIG: tl.constexpr, Y_CONTIG: tl.constexpr,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, APPLY_SILU: tl.constexpr,
        BLOCK_SPLITS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Split variant, pass 2: grid (N*G, SPLITS); merge partials, normalize one chunk."""
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        n = pid // G
        g = pid - n * G
        # Merge the (count, mean, M2) partials of the group (Chan et al. parallel variance).
        k = tl.arange(0, BLOCK_SPLITS)
        kmask = k < SPLITS
        ws = ws_ptr + (pid.to(tl.int64) * SPLITS + k) * 3
        p_cnt = tl.load(ws + 0, mask=kmask, other=0.0)
        p_mean = tl.load(ws + 1, mask=kmask, other=0.0)
        p_m2 = tl.load(ws + 2, mask=kmask, other=0.0)
        mean = tl.sum(p_cnt * p_mean, axis=0) / GS
        d = tl.where(kmask, p_mean - mean, 0.0)
        m2 = tl.sum(p_m2, axis=0) + tl.sum(p_cnt * d * d, axis=0)
        rstd = 1.0 / tl.sqrt(tl.maximum(m2 / GS, 0.0) + eps)
        x_base = n.to(tl.int64) * stride_xn + (g * CPG).to(tl.int64) * stride_xc
        y_base = n.to(tl.int64) * stride_yn + (g * CPG).to(tl.int64) * stride_yc
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, GS)
        _normalize_range(x_ptr, y_ptr, x_base, y_base, start, end, n, g, mean, rstd, S,
                         stride_xc, stride_xs, stride_yc, stride_ys,
                         w_ptr, b_ptr, scale_ptr, shift_ptr,
                         stride_scn, stride_scc, stride_shn, stride_shc,
                         CPG, CHANNELS_INNER, X_CONTIG, Y_CONTIG,
                         HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, APPLY_SILU, BLOCK)

    _STREAM_KEY = ["GS", "CPG", "CHANNELS_INNER", "X_CONTIG", "Y_CONTIG"]
    _PRUNE = {"early_config_prune": _prune_stream_configs}
    _group_norm_silu_loop_tuned = triton.autotune(
        configs=_stream_configs(), key=_STREAM_KEY, prune_configs_by=_PRUNE
    )(_group_norm_silu_kernel)
    _group_norm_silu_partial_tuned = triton.autotune(
        configs=_stream_configs(), key=_STREAM_KEY[:-1] + ["CHUNK"], prune_configs_by=_PRUNE
    )(_group_norm_silu_partial_kernel)
    _group_norm_silu_split_tuned = triton.autotune(
        configs=_stream_configs(), key=_STREAM_KEY + ["CHUNK"], prune_configs_by=_PRUNE
    )(_group_norm_silu_split_kernel)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def _collapse_spatial(t: Tensor) -> Optional[tuple[int, int, int]]:
    """Strides (n, c, s) of ``t`` viewed as (N, C, S), or None if the spatial dims do not merge."""
    dims = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    for (_, outer), (size_in, inner) in zip(dims, dims[1:]):
        if outer != inner * size_in:
            return None
    return t.stride(0), t.stride(1), (dims[-1][1] if dims else 1)


def _is_dense_range(inner_size: int, inner_stride: int, outer_size: int, outer_stride: int) -> bool:
    """True when offsets ``o * outer_stride + i * inner_stride`` enumerate 0..outer*inner-1 in order."""
    return (inner_size == 1 or inner_stride == 1) and (outer_size == 1 or outer_stride == inner_size)


def _plan_launch(num_groups_total: int, group_size: int, sm_count: Optional[int] = None) -> tuple[str, int, int]:
    """Pick (variant, splits, chunk) for ``num_groups_total = N*G`` groups of ``group_size`` elements.

    ``sm_count`` (CUDA only) lets medium groups split when N*G programs alone cannot fill the GPU.
    """
    if group_size <= ONE_TILE_MAX:
        return "one_tile", 1, group_size
    splits = 1
    if group_size > SPLIT_THRESHOLD:
        splits = math.ceil(group_size / SPLIT_CHUNK)
    if sm_count and num_groups_total * splits < 2 * sm_count:
        want = math.ceil(2 * sm_count / num_groups_total)
        splits = max(splits, min(want, group_size // SPLIT_MIN_CHUNK))
    if splits <= 1:
        return "loop", 1, group_size
    align = min(SPLIT_MIN_CHUNK, 1024)
    chunk = math.ceil(math.ceil(group_size / splits) / align) * align
    splits = math.ceil(group_size / chunk)
    if splits <= 1:
        return "loop", 1, group_size
    return "split", splits, chunk


def _sm_count(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _group_norm_silu_launch(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            scale: Optional[Tensor], shift: Optional[Tensor], num_groups: int,
                            eps: float, apply_silu: bool) -> Tensor:
    y = torch.empty_like(x)  # keeps x's memory format; must match the fake impl
    if x.numel() == 0:
        return y
    N, C = x.shape[0], x.shape[1]
    G = num_groups
    CPG = C // G
    S = math.prod(x.shape[2:])
    GS = CPG * S

    xs = _collapse_spatial(x)
    if xs is None:  # e.g. a transposed spatial view: fall back to a dense copy
        x = x.contiguous()
        xs = _collapse_spatial(x)
    ys = _collapse_spatial(y)
    y_k = y if ys is not None else torch.empty_like(x)
    ys = ys if ys is not None else _collapse_spatial(y_k)

    channels_inner = xs[1] < xs[2] and CPG > 1 and S > 1
    if channels_inner:  # i = s * CPG + c
        x_contig = _is_dense_range(CPG, xs[1], S, xs[2])
        y_contig = _is_dense_range(CPG, ys[1], S, ys[2])
    else:  # i = c * S + s
        x_contig = _is_dense_range(S, xs[2], CPG, xs[1])
        y_contig = _is_dense_range(S, ys[2], CPG, ys[1])

    def prep(t: Optional[Tensor]) -> Tensor:
        return x if t is None else t
    w = prep(None if weight is None else weight.contiguous())
    b = prep(None if bias is None else bias.contiguous())
    sc = None if scale is None else scale.reshape(N, C)
    sh = None if shift is None else shift.reshape(N, C)
    sc_strides = (0, 0) if sc is None else sc.stride()
    sh_strides = (0, 0) if sh is None else sh.stride()
    sc, sh = prep(sc), prep(sh)

    flags = dict(
        CPG=CPG, CHANNELS_INNER=channels_inner, X_CONTIG=x_contig, Y_CONTIG=y_contig,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, APPLY_SILU=bool(apply_silu),
    )
    variant, splits, chunk = _plan_launch(N * G, GS, _sm_count(x.device))
    VARIANT_COUNTS[variant] += 1
    eps = float(eps)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        if variant == "one_tile":
            block = _common.next_pow2(GS)
            warps = 1 if _common.interpret_mode() else min(16, max(2, block // 512))
            _group_norm_silu_kernel[(N * G,)](
                x, y_k, w, b, sc, sh, G, S, GS, eps, *xs, *ys, *sc_strides, *sh_strides,
                **flags, ONE_TILE=True, BLOCK=block, num_warps=warps,
            )
        elif variant == "loop":
            _group_norm_silu_loop_tuned[(N * G,)](
                x, y_k, w, b, sc, sh, G, S, GS, eps, *xs, *ys, *sc_strides, *sh_strides,
                **flags, ONE_TILE=False,
            )
        else:
            ws = torch.empty((N * G, splits, 3), device=x.device, dtype=torch.float32)
            _group_norm_silu_partial_tuned[(N * G, splits)](
                x, ws, G, S, GS, chunk, splits, *xs,
                CPG=CPG, CHANNELS_INNER=channels_inner, X_CONTIG=x_contig,
            )
            _group_norm_silu_split_tuned[(N * G, splits)](
                x, y_k, ws, w, b, sc, sh, G, S, GS, chunk, splits, eps,
                *xs, *ys, *sc_strides, *sh_strides,
                **flags, BLOCK_SPLITS=_common.next_pow2(splits),
            )
    if y_k is not y:
        y.copy_(y_k)
    return y


# ----------------------------------------------------------------------------------------------
# Validation and support query
# ----------------------------------------------------------------------------------------------
def group_norm_silu_kernel_supported(x_shape, dtype: torch.dtype, num_groups: int) -> tuple[bool, str]:
    """Whether the fused kernel accepts an input of ``x_shape``/``dtype`` with ``num_groups``.

    Returns:
        ``(True, "")`` or ``(False, reason)``; the rewrite pass logs the reason.

    Example:
        >>> group_norm_silu_kernel_supported((2, 320, 64, 64), torch.float16, 32)
        (True, '')
    """
    shape = tuple(int(s) for s in x_shape)
    if len(shape) not in (3, 4):
        return False, f"x must be (N, C, L) or (N, C, H, W); got {len(shape)}-D shape {shape}"
    if dtype not in _FLOAT_X:
        return False, f"x dtype must be one of float32/float16/bfloat16, got {dtype}"
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0:
        return False, f"num_groups must be a positive int, got {num_groups!r}"
    if shape[1] % num_groups != 0:
        return False, f"channels C={shape[1]} not divisible by num_groups={num_groups}"
    if math.prod(shape[1:]) > _MAX_SAMPLE_ELEMS:
        return False, f"one sample has {math.prod(shape[1:])} elements; the kernel indexes a sample with int32"
    if not _common.HAS_TRITON:
        return False, "triton is not installed (the reference path would run instead)"
    return True, ""


def _check_args(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                shift: Optional[Tensor], num_groups: int, eps: float) -> None:
    if x.dim() not in (3, 4):
        raise ValueError(f"fusediff::group_norm_silu: x must be 3-D (N, C, L) or 4-D (N, C, H, W), "
                         f"got shape {tuple(x.shape)}")
    _common.check_float("x", x, _FLOAT_X)
    N, C = x.shape[0], x.shape[1]
    if num_groups <= 0:
        raise ValueError(f"fusediff::group_norm_silu: num_groups must be positive, got {num_groups}")
    if C % num_groups != 0:
        raise ValueError(f"fusediff::group_norm_silu: channels C={C} must be divisible by "
                         f"num_groups={num_groups}")
    if eps < 0:
        raise ValueError(f"fusediff::group_norm_silu: eps must be >= 0, got {eps}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _common.check_float(name, t, _FLOAT_PARAM)
        if tuple(t.shape) != (C,):
            raise ValueError(f"fusediff::group_norm_silu: {name} must have shape ({C},), got {tuple(t.shape)}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        _common.check_float(name, t, _FLOAT_PARAM)
        ok = t.dim() >= 2 and tuple(t.shape[:2]) == (N, C) and all(s == 1 for s in t.shape[2:])
        if not ok or t.dim() > x.dim():
            raise ValueError(f"fusediff::group_norm_silu: {name} must have shape ({N}, {C}) "
                             f"(or ({N}, {C}) + trailing 1s), got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------
# Custom op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fusediff::group_norm_silu", mutates_args=())
def group_norm_silu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                    shift: Optional[Tensor], num_groups: int, eps: float, apply_silu: bool) -> Tensor:
    """Fused GroupNorm (+affine, +FiLM ``y*(1+scale)+shift``, +SiLU); output in x's dtype and layout.

    Args:
        x: (N, C, H, W) or (N, C, L), fp32/fp16/bf16, NCHW-contiguous or channels_last.
        weight, bias: (C,) GroupNorm affine or None (any float dtype; used in fp32).
        scale, shift: (N, C) FiLM parameters (use_scale_shift_norm) or None.
        num_groups: G, must divide C.
        eps: added to the variance.
        apply_silu: apply SiLU after normalization/affine/FiLM.

    Returns:
        Tensor like ``x`` (same shape, dtype, memory format).

    Example:
        >>> y = torch.ops.fusediff.group_norm_silu(x, w, b, None, None, 32, 1e-5, True)
    """
    _check_args(x, weight, bias, scale, shift, num_groups, eps)
    path = _common.choose_path(x, weight, bias, scale, shift)
    if path == "triton" and math.prod(x.shape[1:]) > _MAX_SAMPLE_ELEMS:
        log.warning("fusediff::group_norm_silu: sample of %d elements exceeds int32 indexing; "
                    "running the reference", math.prod(x.shape[1:]))
        path = "reference"
    _common.record(OP_NAME, path)
    if path == "triton":
        return _group_norm_silu_launch(x, weight, bias, scale, shift, num_groups, eps, apply_silu)
    return group_norm_silu_ref(x, weight, bias, scale, shift, num_groups, eps, apply_silu)


@group_norm_silu.register_fake
def _group_norm_silu_fake(x, weight, bias, scale, shift, num_groups, eps, apply_silu):
    _check_args(x, weight, bias, scale, shift, num_groups, eps)
    return torch.empty_like(x)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def group_norm_silu_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                        shift: Optional[Tensor], num_groups: int, eps: float, apply_silu: bool) -> Tensor:
    """Pure-torch reference: fp32 GroupNorm, FiLM, SiLU, cast to x.dtype, x's memory format."""
    _check_args(x, weight, bias, scale, shift, num_groups, eps)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    out.copy_(group_norm_act_ref(x, weight, bias, scale, shift, num_groups, eps, apply_silu))
    return out
