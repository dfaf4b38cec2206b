"""FlashAttention forward for U-Net self/cross-attention (paper §3.2.2).

Math (paper eq. 3, with SDPA's optional additive/boolean mask M)::

    O = softmax(Q K^T * scale + M) V,     scale = 1/sqrt(D) unless given

FlashAttention (Dao et al.) never materializes the (Lq, Lk) score matrix. Each program owns
BLOCK_M query rows, walks the keys in BLOCK_N tiles and keeps an *online softmax* in fp32
registers: a running row max ``m``, a running denominator ``l`` and an unnormalized accumulator
``acc``. For each tile (base-2 domain; log2(e) is folded into the scale so the kernel calls exp2)::

    s     = (q k^T) * scale * log2(e) + M * log2(e)
    m_new = max(m, rowmax(s))
    alpha = exp2(m - m_new)                       # rescales what was accumulated so far
    p     = exp2(s - m_new)
    l     = l * alpha + rowsum(p)
    acc   = acc * alpha + p @ v
    O     = acc / l                               # once, in the epilogue

Fully masked rows (every logit -inf) give a zero output row, exactly as
``F.scaled_dot_product_attention`` does in torch >= 2.5 (its math backend uses ``_safe_softmax``;
measured on torch 2.13: bool all-False rows and additive all--inf rows both give 0, not NaN).
The kernel gets this for free: ``m`` stays -inf, the "safe" max used in exp2 is 0, so ``p = 0``,
``l = 0``, ``acc = 0`` and the epilogue divides by 1 where ``l == 0`` (``l >= 1`` for every other
row because the row max contributes ``exp2(0) = 1``). NaN/Inf inputs propagate like the reference.

Layout: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, D), any strides (the last-dim stride
must be 1 for coalesced loads; the launcher copies only when it is not). The head dim is padded
to BLOCK_D = next_pow2(max(D, 16)) with masked loads, so D in {24, 40, 48, 80, 96, 160} works;
Lq and Lk tails (e.g. the 77-token text context) are masked. The mask is broadcast to
(B, H, Lq, Lk) with zero strides, never materialized. Output (B, H, Lq, D) contiguous, dtype of q.

fp32 inputs use IEEE fp32 dots (``input_precision="ieee"``), not TF32, so fp32 results match an
fp32 reference to ~1e-5; fp16/bf16 inputs feed tensor cores and accumulate in fp32.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _common

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

_LOG2E = 1.4426950408889634
#: Largest head dim the kernel takes (BLOCK_D = 256 already needs small tiles to fit registers).
MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# MASK_KIND constexpr values.
_MASK_NONE, _MASK_ADD, _MASK_BOOL = 0, 1, 2

# ---------------------------------------------------------------------------------------------
# Autotune configs
# ---------------------------------------------------------------------------------------------
if _common.HAS_TRITON:
    if _common.interpret_mode():
        # One config so CPU tests never autotune; 32x32 tiles still exercise the multi-tile loop
        # and both tails on the small test shapes (Lq=33, Lk=77).
        _CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    else:
        _CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm in (64, 128)
            for bn in (32, 64, 128)
            for w in (4, 8)
            for s in (2, 3, 4)
        ]

    def _prune_configs(configs, named_args, **kwargs):
        """Drop tiles that cannot fit (registers/shared memory) or are far larger than the problem."""
        args = {**named_args, **kwargs}
        block_d = args["BLOCK_D"]
        lq, lk = args["LQ"], args["LK"]
        elem = args["q_ptr"].element_size()
        kept = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            # K and V tiles per pipeline stage plus the resident Q tile, in bytes.
            smem = c.num_stages * 2 * bn * block_d * elem + bm * block_d * elem
            if smem > 160 * 1024:
                continue
            # acc (BLOCK_M x BLOCK_D fp32) and s/p (BLOCK_M x BLOCK_N fp32) live in registers.
            if bm * (block_d + bn) > 128 * (128 + 64) or (block_d >= 256 and bm * bn > 64 * 64):
                continue
            if bm > max(64, triton.next_power_of_2(lq)) or bn > max(32, triton.next_power_of_2(lk)):
                continue
            kept.append(c)
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]

    # -----------------------------------------------------------------------------------------
    # Helpers
    # -----------------------------------------------------------------------------------------
    # _dot / _to_dtype (fp32-accumulating dot; RTNE cast, with the interpreter bf16 fixes) live in
    # kernels/_common.py, shared with the softmax family.
    from ._common import _dot, _to_dtype  # noqa: E402

    # -----------------------------------------------------------------------------------------
    # Kernel
    # -----------------------------------------------------------------------------------------
    @triton.autotune(
        configs=_CONFIGS,
        key=["LQ", "LK", "BLOCK_D", "MASK_KIND"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )
    @triton.jit
    def _flash_attention_kernel(
        q_ptr,  # (B, H, Lq, D) fp32/fp16/bf16
        k_ptr,  # (B, H, Lk, D) same dtype as q
        v_ptr,  # (B, H, Lk, D) same dtype as q
        mask_ptr,  # (B, H, Lq, Lk) broadcast view (zero strides); float additive or uint8 keep-flag
        o_ptr,  # (B, H, Lq, D) contiguous, dtype of q
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_ob, stride_oh, stride_om, stride_od,
        H, LQ, LK, D,
        qk_scale,  # scale * log2(e)
        MASK_KIND: tl.constexpr,  # 0 none, 1 additive float, 2 boolean keep-mask
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, "tf32" (ignored) for fp16/bf16
        INTERPRET_BF16: tl.constexpr,  # interpreter + bf16 only, see _dot and _to_dtype
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # int64 bases: a broadcast (B, H, 4096, 4096) mask has > 2^31 elements at batch 32.
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < LQ
        d_valid = offs_d < D  # head dim padded to a power of two

        q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
        k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
        v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
        mask_base = mask_ptr + off_b * stride_mb + off_h * stride_mh

        q = tl.load(
            q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=m_valid[:, None] & d_valid[None, :],
            other=0.0,
        )

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        for start_n in range(0, LK, BLOCK_N):
            cols = start_n + offs_n
            n_valid = cols < LK
            # K^T tile (BLOCK_D, BLOCK_N): padded D rows load 0 and add nothing to q k^T.
            kt = tl.load(
                k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=d_valid[:, None] & n_valid[None, :],
                other=0.0,
            )
            s = _dot(q, kt, None, DOT_PRECISION, INTERPRET_BF16) * qk_scale
            if MASK_KIND != 0:
                mvals = tl.load(
                    mask_base + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn,
                    mask=m_valid[:, None] & n_valid[None, :],
                    other=0,
                )
                if MASK_KIND == 1:
                    s += mvals.to(tl.float32) * 1.4426950408889634
                else:
                    # Same as SDPA's bool->float conversion: add -inf where masked out (so a NaN
                    # logit stays NaN, as in the reference).
                    s += tl.where(mvals != 0, 0.0, float("-inf"))
            # Keys past Lk do not exist: exclude them from max and sum.
            s = tl.where(n_valid[None, :], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            # "Safe" max: a row whose logits so far are all -inf keeps p = 0 instead of NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=n_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            acc = acc * alpha[:, None]
            acc = _dot(_to_dtype(p, v.dtype, INTERPRET_BF16), v, acc, DOT_PRECISION, INTERPRET_BF16)
            m_i = m_new

        # Epilogue: normalize once. l == 0 only for fully masked rows, whose acc is 0 (p was 0):
        # dividing by 1 there writes SDPA's 0 instead of 0/0.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_base = o_ptr + off_b * stride_ob + off_h * stride_oh
        tl.store(
            o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
            _to_dtype(out, o_ptr.dtype.element_ty, INTERPRET_BF16),
            mask=m_valid[:, None] & d_valid[None, :],
        )


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def flash_attention_supported(
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    dtype: torch.dtype,
    v_shape: Optional[Sequence[int]] = None,
) -> tuple[bool, str]:
    """Whether :func:`flash_attention` takes these inputs (metadata only; the rewrite pass calls it).

    Args:
        q_shape: (B, H, Lq, D).
        k_shape: (B, H, Lk, D).
        dtype: dtype of q/k/v.
        v_shape: (B, H, Lk, Dv), optional; checked when given (Dv must equal D).

    Returns:
        ``(True, "")`` or ``(False, reason)``.
    """
    q_shape, k_shape = tuple(q_shape), tuple(k_shape)
    if dtype not in _FLOAT_DTYPES:
        return False, f"dtype {dtype} unsupported (fp32, fp16, bf16 only)"
    if len(q_shape) != 4 or len(k_shape) != 4:
        return False, f"q and k must be rank 4 (B, H, L, D); got ranks {len(q_shape)} and {len(k_shape)}"
    if q_shape[:2] != k_shape[:2]:
        return False, f"q and k batch/head dims differ: {q_shape[:2]} vs {k_shape[:2]} (no GQA/broadcast)"
    d = q_shape[3]
    if k_shape[3] != d:
        return False, f"head dim of q ({d}) != head dim of k ({k_shape[3]})"
    if d < 1 or d > MAX_HEAD_DIM:
        return False, f"head dim {d} unsupported (1..{MAX_HEAD_DIM})"
    if v_shape is not None:
        v_shape = tuple(v_shape)
        if len(v_shape) != 4:
            return False, f"v must be rank 4 (B, H, Lk, Dv); got rank {len(v_shape)}"
        if v_shape[:3] != k_shape[:3]:
            return False, f"v shape {v_shape} does not match k shape {k_shape} in (B, H, Lk)"
        if v_shape[3] != d:
            return False, f"value head dim Dv={v_shape[3]} != D={d} (kernel needs Dv == D)"
    return True, ""


def _check_args(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: Optional[float]) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fusediff.flash_attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"fusediff.flash_attention: {name} must be rank 4 (B, H, L, D), got shape {tuple(t.shape)}"
            )
        _common.check_float(f"flash_attention: {name}", t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"fusediff.flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    ok, why = flash_attention_supported(q.shape, k.shape, q.dtype, v.shape)
    if not ok:
        raise ValueError(f"fusediff.flash_attention: {why}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(
                f"fusediff.flash_attention: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}"
            )
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(
                "fusediff.flash_attention: attn_mask must be bool (True = keep) or float (additive), "
                f"got {attn_mask.dtype}"
            )
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if attn_mask.dim() > 4:
            raise ValueError(f"fusediff.flash_attention: attn_mask rank {attn_mask.dim()} > 4")
        try:
            if torch.broadcast_shapes(attn_mask.shape, target) != torch.Size(target):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"fusediff.flash_attention: attn_mask shape {tuple(attn_mask.shape)} is not broadcastable "
                f"to (B, H, Lq, Lk) = {target}"
            ) from None
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"fusediff.flash_attention: scale must be a float or None, got {type(scale).__name__}")


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _flash_attention_launch(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: float) -> Tensor:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Lk == 0:  # softmax over no keys: SDPA returns zeros
        return out.zero_()
    # Only a non-unit last-dim stride forces a copy; every other layout is read through strides.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if attn_mask is None:
        mask_kind, mask, mask_strides = _MASK_NONE, q, (0, 0, 0, 0)  # dummy pointer, never read
    else:
        mask = attn_mask.expand(B, H, Lq, Lk)  # zero strides on broadcast dims, no copy
        if mask.dtype == torch.bool:
            mask_kind, mask = _MASK_BOOL, mask.view(torch.uint8)
        else:
            mask_kind = _MASK_ADD
        mask_strides = mask.stride()
    block_d = max(16, _common.next_pow2(D))  # tl.dot needs K >= 16
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _flash_attention_kernel[grid](
        q, k, v, mask, out,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        H, Lq, Lk, D,
        float(scale) * _LOG2E,
        MASK_KIND=mask_kind,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERPRET_BF16=_common.interpret_bf16(q.dtype),
        BLOCK_D=block_d,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fusediff::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: Optional[float]) -> Tensor:
    """softmax(q k^T * scale + attn_mask) v without materializing the scores (FlashAttention).

    Same semantics as ``F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)``
    (no dropout, not causal). Inference only: no autograd formula is registered.

    Args:
        q: (B, H, Lq, D) fp32/fp16/bf16, any strides.
        k: (B, H, Lk, D) same dtype.
        v: (B, H, Lk, D) same dtype (Dv must equal D).
        attn_mask: None, bool (True = attend) or float (added to the logits), broadcastable to
            (B, H, Lq, Lk).
        scale: logit scale; None means 1/sqrt(D).

    Returns:
        (B, H, Lq, D) contiguous tensor in q's dtype.

    Example:
        >>> out = torch.ops.fusediff.flash_attention(q, k, v, None, None)
    """
    _check_args(q, k, v, attn_mask, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    path = _common.choose_path(q, k, v, attn_mask)
    _common.record("flash_attention", path)
    if path == "triton":
        return _flash_attention_launch(q, k, v, attn_mask, scale)
    return flash_attention_ref(q, k, v, attn_mask, scale)


@flash_attention.register_fake
def _flash_attention_fake(q, k, v, attn_mask, scale):
    _check_args(q, k, v, attn_mask, scale)
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D))


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def flash_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, scale: Optional[float] = None
) -> Tensor:
    """Pure-torch reference in fp32: softmax(q k^T * scale + mask) v, cast back to q's dtype.

    Rows whose logits are all -inf (fully masked) give 0, like SDPA's ``_safe_softmax``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            # SDPA converts a bool mask to an additive one (0 / -inf).
            attn_mask = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
        logits = logits + attn_mask.float()
    p = torch.softmax(logits, dim=-1)
    fully_masked = torch.isneginf(logits).all(dim=-1, keepdim=True)
    p = p.masked_fill(fully_masked, 0.0)
    return torch.matmul(p, v.float()).to(q.dtype).contiguous()
