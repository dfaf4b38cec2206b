"""Partially fused softmax for attention (paper §3.2.1): row statistics + softmax fused into P·V.

Math (paper eq. 3-4). For the score matrix A = Q K^T * scale (+ mask), one row i at a time::

    L_i = max_j a_ij,        S_i = sum_j exp(a_ij - L_i)                    (eq. 4)
    O   = softmax(A) V,      softmax(A)_ij = exp(a_ij - L_i) / S_i          (eq. 3)

Two ops replace ``softmax`` + ``matmul``:

* ``fusediff::softmax_stats(s)``: the reduction step. s (N, L) -> (N, 2) fp32 ``[L_i, S_i]``.
  The paper splits each row into blocks, reduces every block to a partial (max, sum) and merges
  the partials ("multi-stage" reduction in one GPU command). Here each program owns BLOCK_M
  rows and walks them in BLOCK_N-wide blocks; each block's (max, sum) is merged into the running
  pair with the online-softmax rule ``S = S * exp(L_old - L_new) + sum exp(a - L_new)``, so the
  score matrix is read exactly once. (N = B*H*Lq is in the tens of thousands for U-Net
  attention, so rows alone give enough parallelism; no cross-program split is needed.)
* ``fusediff::softmax_matmul(s, stats, v)``: the element-wise step fused with the following
  matmul. Per (BLOCK_M x BLOCK_N) tile it computes ``p = exp(s - L) / S`` in registers and
  accumulates ``p @ v`` in fp32; the probability matrix is never written to memory.

Compared with FlashAttention (kernels/attention.py) the scores are still materialized once
(by the Q K^T GEMM, e.g. cuBLAS), but the softmax output is not, and the two kernels stay
simple and register-light -- the paper's fallback wherever FlashAttention does not pay off.

Edge cases follow ``F.scaled_dot_product_attention`` (torch >= 2.5, ``_safe_softmax``): a row
whose scores are all -inf (fully masked) has stats ``(-inf, 0)`` and a zero output row. NaN in a
row gives NaN max and sum (the max reduction propagates NaN explicitly, like ``torch.amax``), so
that row of the output is NaN.

Layout: s (N, L) / (B, Lq, Lk) any strides and any float dtype; stats (N, 2) fp32 (row-major,
``N = B*Lq``); v (B, Lk, D) any strides, D padded to a power of two with masked loads.
Output (B, Lq, D) contiguous in v's dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _common

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

    # Shared jit helpers (fp32-accumulating dot; RTNE cast), incl. the interpreter bf16 fixes.
    from ._common import _dot, _to_dtype

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

# ---------------------------------------------------------------------------------------------
# Autotune configs
# ---------------------------------------------------------------------------------------------
if _common.HAS_TRITON:
    if _common.interpret_mode():
        # Single configs; the test rows (L = 77, 2000) still span several column blocks.
        _STATS_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
        _MATMUL_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    else:
        _STATS_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
            for bm, bn in ((1, 1024), (2, 1024), (4, 512), (4, 1024), (8, 256), (16, 128), (32, 64))
            for w in (4, 8)
        ]
        _MATMUL_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm in (64, 128)
            for bn in (32, 64, 128)
            for w in (4, 8)
            for s in (2, 3)
        ]

    def _prune_stats(configs, named_args, **kwargs):
        """Drop row blocks far wider than the row (e.g. 1024 columns for a 77-token row)."""
        args = {**named_args, **kwargs}
        width = max(64, triton.next_power_of_2(args["L"]))
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= width]
        return kept or configs[:1]

    def _prune_matmul(configs, named_args, **kwargs):
        """Drop tiles whose S/V stages overflow shared memory or that dwarf the problem."""
        args = {**named_args, **kwargs}
        block_d = args["BLOCK_D"]
        lq, lk = args["LQ"], args["LK"]
        es, ev = args["s_ptr"].element_size(), args["v_ptr"].element_size()
        kept = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            smem = c.num_stages * (bm * bn * es + bn * block_d * ev)
            if smem > 160 * 1024 or (block_d >= 256 and bm * bn > 64 * 64):
                continue
            if bm > max(64, triton.next_power_of_2(lq)) or bn > max(32, triton.next_power_of_2(lk)):
                continue
            kept.append(c)
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]

    # -----------------------------------------------------------------------------------------
    # Helpers
    # -----------------------------------------------------------------------------------------
    @triton.jit
    def _rowmax_nan(a):
        """Row max that propagates NaN like torch.amax (the hardware max.f32 drops NaN).

        A NaN count is cheaper than a custom tl.reduce combine (this kernel is memory-bound) and
        keeps the Triton interpreter fast.
        """
        has_nan = tl.sum((a != a).to(tl.int32), 1) > 0
        return tl.where(has_nan, float("nan"), tl.max(a, 1))

    # -----------------------------------------------------------------------------------------
    # Kernels
    # -----------------------------------------------------------------------------------------
    @triton.autotune(configs=_STATS_CONFIGS, key=["N", "L"], prune_configs_by={"early_config_prune": _prune_stats})
    @triton.jit
    def _softmax_stats_kernel(
        s_ptr,  # (N, L) scores, fp32/fp16/bf16
        out_ptr,  # (N, 2) fp32: [row max, row sum of exp(s - max)]
        stride_sn, stride_sl,
        stride_on, stride_oc,
        N, L,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < N
        offs_n = tl.arange(0, BLOCK_N)
        base = s_ptr + rows[:, None] * stride_sn

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, L, BLOCK_N):
            cols = start + offs_n
            a = tl.load(
                base + cols[None, :] * stride_sl,
                mask=row_valid[:, None] & (cols[None, :] < L),
                other=float("-inf"),
            ).to(tl.float32)
            # Paper eq. (4), one block: partial max, then merge into the running (max, sum).
            m_new = tl.maximum(m_i, _rowmax_nan(a), propagate_nan=tl.PropagateNan.ALL)
            # "Safe" max: all -inf so far -> exp2(-inf - 0) = 0 rather than NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2((m_i - m_use) * 1.4426950408889634) + tl.sum(
                tl.exp2((a - m_use[:, None]) * 1.4426950408889634), 1
            )
            m_i = m_new
        o = out_ptr + rows * stride_on
        tl.store(o, m_i, mask=row_valid)
        tl.store(o + stride_oc, l_i, mask=row_valid)

    @triton.autotune(
        configs=_MATMUL_CONFIGS,
        key=["LQ", "LK", "BLOCK_D"],
        prune_configs_by={"early_config_prune": _prune_matmul},
    )
    @triton.jit
    def _softmax_matmul_kernel(
        s_ptr,  # (B, Lq, Lk) scores, fp32/fp16/bf16
        stats_ptr,  # (B*Lq, 2) fp32 [max, sum] from _softmax_stats_kernel
        v_ptr,  # (B, Lk, D) fp32/fp16/bf16
        o_ptr,  # (B, Lq, D) contiguous, dtype of v
        stride_sb, stride_sm, stride_sn,
        stride_tn, stride_tc,
        stride_vb, stride_vn, stride_vd,
        stride_ob, stride_om, stride_od,
        LQ, LK, D,
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 v, "tf32" (ignored) otherwise
        INTERPRET_BF16: tl.constexpr,  # interpreter + bf16 only, see attention._dot/_to_dtype
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        off_b = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < LQ
        d_valid = offs_d < D

        stat_rows = stats_ptr + (off_b * LQ + offs_m) * stride_tn
        row_max = tl.load(stat_rows, mask=m_valid, other=0.0)
        row_sum = tl.load(stat_rows + stride_tc, mask=m_valid, other=1.0)
        # Fully masked rows have stats (-inf, 0): use max 0 so p = exp(-inf) = 0, and 1/S -> 0.
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        inv_sum = tl.where(row_sum == 0.0, 0.0, 1.0 / tl.where(row_sum == 0.0, 1.0, row_sum))

        s_base = s_ptr + off_b * stride_sb + offs_m[:, None] * stride_sm
        v_base = v_ptr + off_b * stride_vb
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, LK, BLOCK_N):
            cols = start_n + offs_n
            n_valid = cols < LK
            a = tl.load(
                s_base + cols[None, :] * stride_sn, mask=m_valid[:, None] & n_valid[None, :], other=float("-inf")
            )
            # Element-wise softmax fused into the matmul: the normalized tile lives only here.
            p = tl.exp2((a.to(tl.float32) - row_max[:, None]) * 1.4426950408889634) * inv_sum[:, None]
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=n_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            acc = _dot(_to_dtype(p, v.dtype, INTERPRET_BF16), v, acc, DOT_PRECISION, INTERPRET_BF16)
        tl.store(
            o_ptr + off_b * stride_ob + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
            _to_dtype(acc, o_ptr.dtype.element_ty, INTERPRET_BF16),
            mask=m_valid[:, None] & d_valid[None, :],
        )


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _check_tensor(op: str, name: str, t, rank: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fusediff.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"fusediff.{op}: {name} must be rank {rank}, got shape {tuple(t.shape)}")
    _common.check_float(f"{op}: {name}", t)


def _check_stats_args(s: Tensor) -> None:
    _check_tensor("softmax_stats", "s", s, 2)
    if s.shape[1] == 0:
        raise ValueError(f"fusediff.softmax_stats: s must have at least one column, got shape {tuple(s.shape)}")


def _check_matmul_args(s: Tensor, stats: Tensor, v: Tensor) -> None:
    _check_tensor("softmax_matmul", "s", s, 3)
    _check_tensor("softmax_matmul", "v", v, 3)
    if not isinstance(stats, Tensor):
        raise TypeError(f"fusediff.softmax_matmul: stats must be a Tensor, got {type(stats).__name__}")
    if stats.dtype != torch.float32:
        raise TypeError(f"fusediff.softmax_matmul: stats must be float32 (from softmax_stats), got {stats.dtype}")
    B, Lq, Lk = s.shape
    if tuple(stats.shape) != (B * Lq, 2):
        raise ValueError(
            f"fusediff.softmax_matmul: stats must have shape (B*Lq, 2) = {(B * Lq, 2)}, got {tuple(stats.shape)}"
        )
    if v.shape[0] != B or v.shape[1] != Lk:
        raise ValueError(f"fusediff.softmax_matmul: v must be (B, Lk, D) = ({B}, {Lk}, D), got {tuple(v.shape)}")
    if v.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"fusediff.softmax_matmul: head dim {v.shape[2]} > {MAX_HEAD_DIM} unsupported")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _softmax_stats_launch(s: Tensor) -> Tensor:
    N, L = s.shape
    out = torch.empty((N, 2), dtype=torch.float32, device=s.device)
    if N == 0:
        return out
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),)  # noqa: E731
    _softmax_stats_kernel[grid](s, out, *s.stride(), *out.stride(), N, L)
    return out


def _softmax_matmul_launch(s: Tensor, stats: Tensor, v: Tensor) -> Tensor:
    B, Lq, Lk = s.shape
    D = v.shape[2]
    out = torch.empty((B, Lq, D), dtype=v.dtype, device=v.device)
    if out.numel() == 0:
        return out
    if Lk == 0:
        return out.zero_()
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B)  # noqa: E731
    _softmax_matmul_kernel[grid](
        s, stats, v, out,
        *s.stride(), *stats.stride(), *v.stride(), *out.stride(),
        Lq, Lk, D,
        DOT_PRECISION="ieee" if v.dtype == torch.float32 else "tf32",
        INTERPRET_BF16=_common.interpret_bf16(v.dtype),
        BLOCK_D=max(16, _common.next_pow2(D)),
    )
    return out


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fusediff::softmax_stats", mutates_args=())
def softmax_stats(s: Tensor) -> Tensor:
    """Row statistics of paper eq. (4): s (N, L) -> (N, 2) fp32 ``[max_j s_ij, sum_j exp(s_ij - max)]``.

    Args:
        s: (N, L) scores, fp32/fp16/bf16, any strides.

    Returns:
        (N, 2) float32. Rows of all -inf give ``(-inf, 0)``; rows with NaN give ``(NaN, NaN)``.

    Example:
        >>> stats = torch.ops.fusediff.softmax_stats(scores.reshape(-1, scores.shape[-1]))
    """
    _check_stats_args(s)
    path = _common.choose_path(s)
    _common.record("softmax_stats", path)
    if path == "triton":
        return _softmax_stats_launch(s)
    return softmax_stats_ref(s)


@softmax_stats.register_fake
def _softmax_stats_fake(s):
    _check_stats_args(s)
    return s.new_empty((s.shape[0], 2), dtype=torch.float32)


@torch.library.custom_op("fusediff::softmax_matmul", mutates_args=())
def softmax_matmul(s: Tensor, stats: Tensor, v: Tensor) -> Tensor:
    """softmax(s) @ v with the normalization ``exp(s - max) / sum`` fused into the matmul.

    Args:
        s: (B, Lq, Lk) scores, fp32/fp16/bf16, any strides.
        stats: (B*Lq, 2) fp32 from :func:`softmax_stats` of ``s.reshape(B*Lq, Lk)``.
        v: (B, Lk, D) fp32/fp16/bf16, any strides, D <= 256.

    Returns:
        (B, Lq, D) contiguous, dtype of v. Fully masked rows (stats ``(-inf, 0)``) give 0.

    Example:
        >>> out = torch.ops.fusediff.softmax_matmul(scores, stats, v)
    """
    _check_matmul_args(s, stats, v)
    path = _common.choose_path(s, stats, v)
    _common.record("softmax_matmul", path)
    if path == "triton":
        return _softmax_matmul_launch(s, stats, v)
    return softmax_matmul_ref(s, stats, v)


@softmax_matmul.register_fake
def _softmax_matmul_fake(s, stats, v):
    _check_matmul_args(s, stats, v)
    return v.new_empty((s.shape[0], s.shape[1], v.shape[2]))


# ---------------------------------------------------------------------------------------------
# Composite: the paper's partially fused attention
# ---------------------------------------------------------------------------------------------
def partial_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, attn_mask: Optional[Tensor] = None
) -> Tensor:
    """Attention as scores GEMM -> :func:`softmax_stats` -> :func:`softmax_matmul` (paper §3.2.1).

    Same semantics as ``F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)``.
    The scores are materialized once in q's dtype by ``torch.baddbmm`` (scale and additive mask
    applied in the GEMM's epilogue); the softmax output is never materialized.

    Args:
        q: (B, H, Lq, D); k: (B, H, Lk, D); v: (B, H, Lk, Dv); one float dtype.
        scale: logit scale, None means 1/sqrt(D).
        attn_mask: None, bool (True = keep) or float (additive), broadcastable to (B, H, Lq, Lk).

    Returns:
        (B, H, Lq, Dv) in q's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"fusediff.partial_softmax_attention: {name} must be a rank-4 Tensor (B, H, L, D)")
        _common.check_float(f"partial_softmax_attention: {name}", t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"fusediff.partial_softmax_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"fusediff.partial_softmax_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "must be (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv)"
        )
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q3 = q.reshape(B * H, Lq, D)
    kt = k.reshape(B * H, Lk, D).transpose(1, 2)
    if attn_mask is None:
        bias, beta = q.new_empty((B * H, Lq, Lk)), 0.0  # beta=0: never read
    else:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask
            attn_mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        elif not attn_mask.dtype.is_floating_point:
            raise TypeError(
                f"fusediff.partial_softmax_attention: attn_mask must be bool or float, got {attn_mask.dtype}"
            )
        bias, beta = attn_mask.to(q.dtype).expand(B, H, Lq, Lk).reshape(B * H, Lq, Lk), 1.0
    scores = torch.baddbmm(bias, q3, kt, beta=beta, alpha=scale)  # (B*H, Lq, Lk)
    stats = softmax_stats(scores.reshape(B * H * Lq, Lk))
    out = softmax_matmul(scores, stats, v.reshape(B * H, Lk, v.shape[3]))
    return out.reshape(B, H, Lq, v.shape[3])


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------
def softmax_stats_ref(s: Tensor) -> Tensor:
    """Pure-torch paper eq. (4) in fp32; all -inf rows give (-inf, 0) (SDPA's safe softmax)."""
    x = s.float()
    m = x.amax(dim=-1)
    m_use = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    total = torch.exp(x - m_use[:, None]).sum(dim=-1)
    return torch.stack([m, total], dim=-1)


def softmax_matmul_ref(s: Tensor, stats: Tensor, v: Tensor) -> Tensor:
    """Pure-torch ``(exp(s - max) / sum) @ v`` in fp32 from given stats, cast to v's dtype."""
    B, Lq, Lk = s.shape
    m = stats[:, 0].reshape(B, Lq, 1)
    total = stats[:, 1].reshape(B, Lq, 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    inv = torch.where(total == 0, torch.zeros_like(total), 1.0 / torch.where(total == 0, torch.ones_like(total), total))
    p = torch.exp(s.float() - m) * inv
    return torch.matmul(p, v.float()).to(v.dtype)
