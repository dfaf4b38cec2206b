"""The INT8 / INT4-weight GEMM core shared by ``kernels/conv_int8.py`` and ``kernels/linear_int8.py``.

Both ops are one GEMM ``acc[m, f] = sum_k q[m, k] · W_int[f, k]`` over int8 levels with an exact
int32 accumulator (``tl.dot(int8, int8) -> int32``: IMMA on the GPU, exact int32 in the Triton 3.9
interpreter), followed by the MoDiff dequant epilogue. Only the A tile differs: the conv gathers
it from the input image (implicit GEMM, K order (r, s, cin)), the linear reads rows of q. This
module holds everything else, once.

MoDiff ("Real-Time On-Device Diffusion: Practical Acceleration via Fused Low-Bit Kernels",
eq. 6-7; ``⊗`` is the integer conv or matmul):

    eq. 6 (quantizer, kernels/quantize.py):  Δ = a_t - â_{t+1};  q = Q(Δ);  â_t = deQ(q) + â_{t+1}
    eq. 7 (this epilogue):                   ô_t = deQ(W ⊗ Δ) + ô_{t+1}
                                                 = s_a[row] · s_w[f] · acc[row, f] + ô_{t+1}
    baseline (no caches):                    o   = s_a[row] · s_w[f] · acc[row, f] + bias[f]

The bias lives in ô (first step: ô_T = deQ(W) * â_T + bias, a float op on the host side), so the
primed epilogue adds no bias.

Device helpers (``@triton.jit``):

* :func:`_tile_offsets`: the GROUP_M program-id swizzle (``_common._grouped_pid``) and the row /
  column offsets of a program's ``[BLOCK_M, BLOCK_N]`` output tile.
* :func:`_load_w_tile` / :func:`_w_dot`: the weight tile ``[BLOCK_K, BLOCK_N]`` of the
  ``(F, K)`` weight, INT4 nibbles unpacked and sign-extended in registers (Hopper has no INT4
  MMA: INT4 halves the weight bytes, not the math), and its int32 dot with the A tile.
* :func:`_dequant`, :func:`_epilogue_store`: the epilogue, chosen by ``tl.constexpr`` flags with
  one store per output: ``ACC_ONLY`` (raw int32 accumulator, debug entry), else
  ``s_a · s_w · acc`` plus ô_{t+1} (``HAS_OHAT``: read, add, write ô_t in place) or the bias
  (``HAS_BIAS``), then the GEGLU gate (``GEGLU``: ``h · gelu(g)`` of the value and gate
  accumulators, after the cache add, since ô holds the pre-gate projection).

Host helpers: argument checks shared by the ops, fakes and references; the dispatch (Triton,
reference, or the float first step); the launch grid, dummy pointers and epilogue flags; the
autotune pruning; the pure-torch epilogue of the references.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _common

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import _grouped_pid, _store_cast


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------

if _common.HAS_TRITON:

    @triton.jit
    def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's output tile of the (M, N) GEMM, in grouped order: ``(offs_m, offs_n, m_ok, n_ok)``."""
        pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_m, offs_n, offs_m < M, offs_n < N

    @triton.jit
    def _load_w_tile(
        w_ptr,  # (F, K) int8, or (F, ceil(K/2)) uint8 when W_BITS == 4 (byte k // 2, low nibble = even k)
        offs_n, kk, k_ok, n_ok, stride_wn, W_BITS: tl.constexpr,
    ):
        """B tile [BLOCK_K, BLOCK_N] int8 of the (F, K) weight: rows ``offs_n``, flat K indices ``kk``."""
        mask = k_ok[:, None] & n_ok[None, :]
        if W_BITS == 8:
            return tl.load(w_ptr + offs_n[None, :] * stride_wn + kk[:, None], mask=mask, other=0)
        # INT4: byte k // 2, low nibble for even k; sign-extend the nibble in registers.
        byte = tl.load(w_ptr + offs_n[None, :] * stride_wn + (kk >> 1)[:, None], mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((kk & 1) * 4)[:, None]) & 0xF
        return (nib - ((nib >> 3) << 4)).to(tl.int8)

    @triton.jit
    def _w_dot(
        acc,  # [BLOCK_M, BLOCK_N] int32
        a,  # [BLOCK_M, BLOCK_K] int8: the A tile (q levels)
        w_ptr,  # (F, K) int8, or (F, ceil(K/2)) uint8 when W_BITS == 4
        offs_n, kk, k_ok, n_ok, stride_wn, W_BITS: tl.constexpr,
    ):
        """acc + a @ W_int[offs_n, kk]ᵀ, exact in int32."""
        b = _load_w_tile(w_ptr, offs_n, kk, k_ok, n_ok, stride_wn, W_BITS)
        return tl.dot(a, b, acc, out_dtype=tl.int32)

    @triton.jit
    def _dequant(
        acc,  # [BLOCK_M, BLOCK_N] int32
        s_a,  # [BLOCK_M] fp32: the activation scale of each row
        cols, n_ok, mask,
        w_scale_ptr,  # (F,) fp32
        bias_ptr,  # (F,) float (HAS_BIAS)
        h_ptrs,  # [BLOCK_M, BLOCK_N] pointers into ô (HAS_OHAT): ô_{t+1} in, ô_t out
        HAS_BIAS: tl.constexpr, HAS_OHAT: tl.constexpr,
    ):
        """fp32 ``s_a · s_w · acc`` (deQ(W ⊗ Δ)), plus ô_{t+1} (then stored as ô_t, eq. 7) or the bias."""
        s_w = tl.load(w_scale_ptr + cols, mask=n_ok, other=0.0)
        o = acc.to(tl.float32) * s_a[:, None] * s_w[None, :]
        if HAS_OHAT:
            o += tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)  # MoDiff eq. (7)
            tl.store(h_ptrs, _store_cast(o, h_ptrs), mask=mask)
        elif HAS_BIAS:
            o += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        return o

    @triton.jit
    def _epilogue_store(
        acc,  # [BLOCK_M, BLOCK_N] int32: value columns
        acc_g,  # [BLOCK_M, BLOCK_N] int32: gate columns (GEGLU), else unused
        sa_ptrs,  # [BLOCK_M] pointers to each row's fp32 activation scale (not ACC_ONLY)
        m_ok, offs_n, n_ok,
        w_scale_ptr,  # (F_total,) fp32
        bias_ptr,  # (F_total,) float (HAS_BIAS)
        h_ptrs,  # [BLOCK_M, BLOCK_N] pointers into ô at the value columns (HAS_OHAT)
        gate_col,  # GEGLU: gate column = value column + gate_col
        gate_h,  # GEGLU: gate ô pointer = value ô pointer + gate_h
        out_ptrs,  # [BLOCK_M, BLOCK_N] pointers into the output: float, or int32 when ACC_ONLY
        HAS_BIAS: tl.constexpr, HAS_OHAT: tl.constexpr, GEGLU: tl.constexpr, ACC_ONLY: tl.constexpr,
    ):
        """The epilogue of both GEMMs: int32 acc (ACC_ONLY) or dequant (+ô | +bias) (+GEGLU); one store."""
        mask = m_ok[:, None] & n_ok[None, :]
        if ACC_ONLY:
            res = acc
        else:
            s_a = tl.load(sa_ptrs, mask=m_ok, other=0.0)
            o = _dequant(acc, s_a, offs_n, n_ok, mask, w_scale_ptr, bias_ptr, h_ptrs, HAS_BIAS, HAS_OHAT)
            if GEGLU:
                g = _dequant(acc_g, s_a, offs_n + gate_col, n_ok, mask, w_scale_ptr, bias_ptr, h_ptrs + gate_h,
                             HAS_BIAS, HAS_OHAT)
                # The gate acts after the cache add: ô holds the pre-gate projection.
                o = o * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))
            res = _store_cast(o, out_ptrs)
        tl.store(out_ptrs, res, mask=mask)


# ------------------------------------------------------------------------------------------------
# Autotune pruning and launch
# ------------------------------------------------------------------------------------------------


def prune_tiles(configs, m: int, n: int, k: int, min_m: int = 32) -> list:
    """Drop tiles much larger than the (m, n, k) problem (small F / K / M); keeps the last if none fit."""
    keep = [
        c for c in configs
        if c.kwargs["BLOCK_N"] <= max(32, _common.next_pow2(n))
        and c.kwargs["BLOCK_K"] <= max(32, _common.next_pow2(k))
        and c.kwargs["BLOCK_M"] <= max(min_m, _common.next_pow2(m))
    ]
    return keep or configs[-1:]


def gemm_grid(m: int, n: int) -> Callable[[dict], tuple[int]]:
    """1-D launch grid: one program per ``[BLOCK_M, BLOCK_N]`` tile of the (m, n) output."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def epilogue_args(act_scale, w_scale, bias, o_hat, dummy: torch.Tensor, acc_only: bool) -> tuple[list, dict]:
    """The epilogue's pointer arguments ``[act_scale, w_scale, bias]`` (``dummy`` for absent ones, never
    read) and its constexpr flags ``HAS_BIAS`` (baseline only: in MoDiff mode the bias lives in ô),
    ``HAS_OHAT`` and ``ACC_ONLY``."""
    ptrs = [t if t is not None else dummy for t in (act_scale, w_scale, bias)]
    has_ohat = o_hat is not None
    return ptrs, dict(HAS_BIAS=bias is not None and not has_ohat, HAS_OHAT=has_ohat, ACC_ONLY=acc_only)


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------


def run_modiff(name: str, o_hat, primed, first_step: Callable[[], torch.Tensor], tensors,
               launch: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The MoDiff op body: the float first step while not ``primed`` (read on the host; recorded as
    ``<name>_first_step``), else the integer path through :func:`_common.dispatch`."""
    if o_hat is not None and not bool(primed):
        _common.record(f"{name}_first_step", "reference")
        return first_step()
    return _common.dispatch(name, tensors, launch, reference)


# ------------------------------------------------------------------------------------------------
# Validation shared by the ops, fakes and references
# ------------------------------------------------------------------------------------------------


def check_q(q) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise TypeError(f"fusediff: q must be an int8 tensor, got {getattr(q, 'dtype', type(q))}")


def check_w_q(w_q: torch.Tensor, w_bits: int, k: int, rows: str, what: str, hint: str = "") -> None:
    """``w_q`` must be int8 ``(F, k)`` (w_bits 8) or packed uint8 ``(F, ceil(k/2))`` (w_bits 4)."""
    want_dtype, width = (torch.int8, k) if w_bits == 8 else (torch.uint8, (k + 1) // 2)
    if w_q.dtype != want_dtype:
        raise TypeError(f"fusediff: w_q must be {want_dtype} for w_bits={w_bits}, got {w_q.dtype}")
    if w_q.dim() != 2 or w_q.shape[1] != width:
        raise ValueError(f"fusediff: w_q must be ({rows}, {width}) for {what}, w_bits={w_bits}{hint}, "
                         f"got {tuple(w_q.shape)}")


def check_scales(act_scale, w_scale, rows: tuple[int, ...], allowed: str, f_total: int) -> None:
    """fp32 scales: ``act_scale`` 1-D with a length in ``rows`` (described by ``allowed``), ``w_scale`` (F,)."""
    for name, t in (("act_scale", act_scale), ("w_scale", w_scale)):
        if t.dtype != torch.float32:
            raise TypeError(f"fusediff: {name} must be float32, got {t.dtype}")
    if act_scale.dim() != 1 or act_scale.shape[0] not in rows:
        raise ValueError(f"fusediff: act_scale must be {allowed}, got {tuple(act_scale.shape)}")
    if tuple(w_scale.shape) != (f_total,):
        raise ValueError(f"fusediff: w_scale must be ({f_total},), got {tuple(w_scale.shape)}")


def check_modiff(q, bias, o_hat, a_hat, primed, f_total: int, ohat_shape: tuple, ohat_desc: str) -> None:
    """Bias (F,); MoDiff caches all given or all None; ô of ``ohat_shape`` (described by
    ``ohat_desc``) and â of q's shape, never broadcast; ``primed`` a 0-d bool tensor."""
    if bias is not None:
        _common.check_float("bias", bias)
        if tuple(bias.shape) != (f_total,):
            raise ValueError(f"fusediff: bias must be ({f_total},), got {tuple(bias.shape)}")
    given = [t is not None for t in (o_hat, a_hat, primed)]
    if any(given) and not all(given):
        raise ValueError("fusediff: MoDiff mode needs o_hat, a_hat and primed together (baseline: all None)")
    if o_hat is None:
        return
    _common.check_float("o_hat", o_hat)
    _common.check_float("a_hat", a_hat)
    if tuple(o_hat.shape) != tuple(ohat_shape):
        raise ValueError(
            f"fusediff: o_hat shape {tuple(o_hat.shape)} != {ohat_desc}; the MoDiff cache is never broadcast: "
            "reset the caches after a batch/shape change"
        )
    if tuple(a_hat.shape) != tuple(q.shape):
        raise ValueError(
            f"fusediff: a_hat shape {tuple(a_hat.shape)} != q shape {tuple(q.shape)}; the MoDiff cache is never "
            "broadcast: reset the caches after a batch/shape change"
        )
    if not isinstance(primed, torch.Tensor) or primed.dtype != torch.bool or primed.dim() != 0:
        raise TypeError(f"fusediff: primed must be a 0-d bool tensor, got {getattr(primed, 'dtype', type(primed))}")


# ------------------------------------------------------------------------------------------------
# Reference epilogue
# ------------------------------------------------------------------------------------------------


def dequant_ref(acc: torch.Tensor, s_a: torch.Tensor, s_w: torch.Tensor, bias: Optional[torch.Tensor],
                o_hat: Optional[torch.Tensor]) -> torch.Tensor:
    """Pure-torch epilogue (mutates ``o_hat`` like the kernel): fp32 ``acc · s_a · s_w`` plus ô_{t+1}
    (eq. 7; ô_t written back) or the bias. ``s_a``, ``s_w`` and ``bias`` come shaped to broadcast
    against ``acc``; ``o_hat`` holds ``acc.numel()`` values in ``acc``'s row-major order."""
    o = acc.float() * s_a * s_w
    if o_hat is not None:
        o = o + o_hat.reshape(o.shape).float()  # eq. (7)
        o_hat.copy_(o.reshape(o_hat.shape))
    elif bias is not None:
        o = o + bias.float()
    return o
