"""INT8 / INT4-weight linear layer with the MoDiff dequant + ô-cache epilogue, optional fused GEGLU.

Math (MoDiff eq. 7 for a linear operator; rows t = tokens of x viewed as (T, K)):

    primed:      ô_t = s_a[row] · s_w[f] · (q @ W_intᵀ)[row, f] + ô_{t+1}          (no bias)
    not primed:  ô_T = â_T @ deQ(W)ᵀ + bias     (float F.linear in â's dtype; â_T = a_T)
    baseline:    o   = s_a[row] · s_w[f] · (q @ W_intᵀ) + bias

Activation scales: ``act_scale`` of shape (T,) (per token: quantize x.reshape(T, K) with
``per_sample=True``), (N,) (per sample, N = x.shape[0]: every sample owns T / N consecutive rows)
or (1,) (per tensor). Row t uses ``act_scale[t // (T // act_scale.numel())]``.

GEGLU (``geglu=True``, diffusers ``GEGLU``: ``h, g = proj(x).chunk(2, -1); out = h * gelu(g)``,
exact erf GELU): the weight is the full ``(2F, K)`` projection; a program computes the same column
block of both halves (two accumulators, rows f and F + f of W) and applies the gate in the
epilogue, so the (T, 2F) projection never reaches memory on the baseline path. With MoDiff the
cache must hold what is linear in the input: ``o_hat`` is the PRE-gate (T, 2F) projection
(eq. 7 holds for it, not for the gated output). The epilogue adds ô_{t+1} to both halves, stores
the new pre-gate ô_t into ``o_hat``, then applies the gate and stores the (T, F) output. The
first step stores ``â @ deQ(W)ᵀ + bias`` (2F) into ``o_hat`` and returns its gated value.

GEMM: M = T, N = F (or F per half), K; ``tl.dot(int8, int8) -> int32`` exact (IMMA on the GPU,
exact int32 in the Triton 3.9 interpreter). INT4 weights: ``(F_total, ceil(K/2))`` uint8 packed by
``kernels._weights.pack_int4`` along K (low nibble = even k), sign-extended in registers (Hopper
has no INT4 MMA). ``primed`` is read on the host (keep it on the CPU to avoid a device sync).
The GEMM core shared with ``kernels/conv_int8.py`` (GROUP_M swizzle, weight tile and INT4 unpack,
dequant / ô / GEGLU epilogue with one store, dispatch) lives in ``kernels/_int8_gemm.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _common, _int8_gemm
from ._weights import check_bits, pack_weight, quantize_weight, unpack_weight

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

    from ._int8_gemm import _epilogue_store, _tile_offsets, _w_dot
else:  # pragma: no cover
    triton = None
    tl = None

__all__ = [
    "int8_linear",
    "int8_linear_baseline",
    "int8_linear_acc",
    "prepare_linear_weight",
    "dequantize_linear_weight",
    "int8_linear_ref",
    "int8_linear_acc_ref",
]

# ------------------------------------------------------------------------------------------------
# Autotune configs
# ------------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_LINEAR_TILES = [
    (128, 128, 64, 4, 4),
    (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 128, 4, 4),
    (16, 64, 128, 4, 4),
]


def _prune_linear_configs(configs, named_args, **kwargs):
    return _int8_gemm.prune_tiles(configs, named_args["T"], named_args["F"], named_args["K"], min_m=16)


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------

if _common.HAS_TRITON:

    @triton.autotune(
        configs=_common.gemm_configs(_LINEAR_TILES),
        key=["T", "F", "K", "W_BITS", "HAS_OHAT", "GEGLU", "ACC_ONLY"],
        prune_configs_by={"early_config_prune": _prune_linear_configs},
        restore_value=["ohat_ptr"],  # benchmarking reruns would otherwise add ô twice
    )
    @triton.jit
    def _int8_linear_kernel(
        q_ptr,  # (T, K) int8
        w_ptr,  # (F_total, K) int8, or (F_total, ceil(K/2)) uint8 when W_BITS == 4
        act_scale_ptr,  # (T // ROWS_PER_SCALE,) fp32
        w_scale_ptr,  # (F_total,) fp32
        bias_ptr,  # (F_total,) float (HAS_BIAS)
        ohat_ptr,  # (T, F_total) float (HAS_OHAT): ô_{t+1} in, ô_t out (pre-gate when GEGLU)
        out_ptr,  # (T, F) float out (int32 when ACC_ONLY)
        T,
        K,
        F,  # output columns; with GEGLU the weight has 2F rows: h = rows [0, F), gate = [F, 2F)
        rows_per_scale,
        stride_qt, stride_qk,
        stride_wn,
        stride_ht, stride_hf,
        stride_ot, stride_of,
        W_BITS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_OHAT: tl.constexpr,
        GEGLU: tl.constexpr,
        ACC_ONLY: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        offs_m, offs_n, m_ok, n_ok = _tile_offsets(T, F, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = tl.arange(0, BLOCK_K)
        rows = offs_m.to(tl.int64)[:, None]
        q_rows = q_ptr + rows * stride_qt

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            a = tl.load(q_rows + kk[None, :] * stride_qk, mask=m_ok[:, None] & k_ok[None, :], other=0)
            acc = _w_dot(acc, a, w_ptr, offs_n, kk, k_ok, n_ok, stride_wn, W_BITS)
            if GEGLU:  # the gate half: rows F + f of the weight
                acc_g = _w_dot(acc_g, a, w_ptr, offs_n + F, kk, k_ok, n_ok, stride_wn, W_BITS)

        # MoDiff eq. (7) on the (pre-gate) projection, then the GEGLU gate; gate columns sit F further.
        _epilogue_store(acc, acc_g, act_scale_ptr + offs_m // rows_per_scale, m_ok, offs_n, n_ok, w_scale_ptr,
                        bias_ptr, ohat_ptr + rows * stride_ht + offs_n[None, :] * stride_hf, F, F * stride_hf,
                        out_ptr + rows * stride_ot + offs_n[None, :] * stride_of,
                        HAS_BIAS, HAS_OHAT, GEGLU, ACC_ONLY)


# ------------------------------------------------------------------------------------------------
# Weight preparation
# ------------------------------------------------------------------------------------------------


def prepare_linear_weight(weight: torch.Tensor, bits: int, search: str = "mse") -> dict:
    """Quantize a linear weight ``(F_total, K)`` per output feature and pack INT4 along K.

    Returns ``{"w_q", "w_scale", "w_bits", "in_features", "out_features"}`` (``w_q`` int8
    ``(F_total, K)`` or uint8 ``(F_total, ceil(K/2))``). For GEGLU pass the full (2F, K) projection.
    Example:
        >>> p = prepare_linear_weight(lin.weight, 8)
        >>> q, s = torch.ops.fusediff.quantize_act(x.reshape(-1, x.shape[-1]), 8, True)   # per token
        >>> y = torch.ops.fusediff.int8_linear(q.view_as(x), s, p["w_q"], p["w_scale"], lin.bias,
        ...                                   None, None, None, p["w_bits"], False)
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"fusediff: weight must be (out_features, in_features), got {tuple(getattr(weight, 'shape', ()))}")
    w_int, w_scale = quantize_weight(weight, bits, search)
    w_q = pack_weight(w_int, bits)
    return {"w_q": w_q, "w_scale": w_scale, "w_bits": bits, "in_features": weight.shape[1], "out_features": weight.shape[0]}


def dequantize_linear_weight(w_q: torch.Tensor, w_scale: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
    """deQ(W) as fp32 ``(F_total, K)``."""
    w_int = unpack_weight(w_q, w_bits, k)
    # .to(), not .float(): this runs inside torch.cond branches, where dynamo refuses the
    # FunctionalTensor conversion-method wrappers
    return w_int.to(torch.float32) * w_scale.to(torch.float32)[:, None]


# ------------------------------------------------------------------------------------------------
# Validation and launcher
# ------------------------------------------------------------------------------------------------


def _check_gemm(q, w_q, w_bits) -> tuple[int, int]:
    """Returns (T, F_total)."""
    _int8_gemm.check_q(q)
    if q.dim() < 2:
        raise ValueError(f"fusediff: q must be (..., K) with at least one leading dim, got {tuple(q.shape)}")
    check_bits("w_bits", w_bits)
    k = q.shape[-1]
    if k < 1:
        raise ValueError(f"fusediff: q must have K >= 1 features, got shape {tuple(q.shape)}")
    _int8_gemm.check_w_q(w_q, w_bits, k, "F", f"K={k}")
    return math.prod(q.shape[:-1]), w_q.shape[0]


def _validate(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, w_bits, geglu):
    t, f_total = _check_gemm(q, w_q, w_bits)
    if not isinstance(geglu, bool):
        raise TypeError(f"fusediff: geglu must be a bool, got {type(geglu).__name__}")
    if geglu and f_total % 2:
        raise ValueError(f"fusediff: geglu needs an even number of weight rows (2F), got {f_total}")
    n = q.shape[0]
    _int8_gemm.check_scales(act_scale, w_scale, (t, n, 1), f"({t},) per token, ({n},) per sample or (1,) per tensor",
                            f_total)
    want = tuple(q.shape[:-1]) + (f_total,)
    _int8_gemm.check_modiff(q, bias, o_hat, a_hat, primed, f_total, want,
                            f"{want} (the pre-gate projection when geglu)")
    f_out = f_total // 2 if geglu else f_total
    return tuple(q.shape[:-1]) + (f_out,)


def _new_out(out_shape, o_hat: Optional[torch.Tensor], device) -> torch.Tensor:
    dtype = o_hat.dtype if o_hat is not None else torch.float32
    return torch.empty(out_shape, dtype=dtype, device=device)


def _launch(q, act_scale, w_q, w_scale, bias, o_hat, out, w_bits, geglu, acc_only):
    k = q.shape[-1]
    t = math.prod(q.shape[:-1])
    f_out = out.shape[-1]
    if out.numel() == 0:
        return out
    q2 = q.reshape(t, k)
    out2 = out.view(t, f_out)
    oh2 = out2
    if o_hat is not None:
        try:
            oh2 = o_hat.view(t, o_hat.shape[-1])
        except RuntimeError:
            raise ValueError("fusediff: o_hat must be viewable as (T, F) (contiguous rows); it is updated in place")
    w_q = w_q.contiguous()
    rows_per_scale = t // act_scale.shape[0] if act_scale is not None else 1
    ptrs, flags = _int8_gemm.epilogue_args(act_scale, w_scale, bias, o_hat, out2, acc_only)
    _int8_linear_kernel[_int8_gemm.gemm_grid(t, f_out)](
        q2, w_q, *ptrs, oh2, out2,
        t, k, f_out, max(rows_per_scale, 1),
        q2.stride(0), q2.stride(1), w_q.stride(0),
        oh2.stride(0), oh2.stride(1), out2.stride(0), out2.stride(1),
        W_BITS=w_bits, GEGLU=geglu, **flags,
    )
    return out


def _geglu_ref(pre: torch.Tensor) -> torch.Tensor:
    h, g = pre.chunk(2, dim=-1)
    return h * F.gelu(g)


def _first_step(a_hat, w_q, w_scale, bias, o_hat, w_bits, geglu):
    """ô_T = â_T @ deQ(W)ᵀ + bias (pre-gate) into o_hat; returns the (gated) output, a fresh tensor."""
    w = dequantize_linear_weight(w_q, w_scale, w_bits, a_hat.shape[-1]).to(a_hat.dtype)
    b = bias.to(a_hat.dtype) if bias is not None else None
    pre = F.linear(a_hat, w, b)
    o_hat.copy_(pre)
    res = _geglu_ref(pre.float()) if geglu else pre
    out = torch.empty(res.shape, dtype=o_hat.dtype, device=res.device)
    out.copy_(res)
    return out


# ------------------------------------------------------------------------------------------------
# Custom op and debug entry
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fusediff::int8_linear", mutates_args=["o_hat"])
def int8_linear(
    q: torch.Tensor,
    act_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    o_hat: Optional[torch.Tensor],
    a_hat: Optional[torch.Tensor],
    primed: Optional[torch.Tensor],
    w_bits: int,
    geglu: bool,
) -> torch.Tensor:
    """Quantized linear: baseline ``s_a s_w (q @ W_intᵀ) + bias`` or MoDiff eq. (7); optional GEGLU.

    Args:
        q: int8 (..., K). act_scale: fp32 (T,) per token, (N,) per sample or (1,).
        w_q, w_scale: from :func:`prepare_linear_weight` ((2F, K) when ``geglu``).
        bias: (F_total,) or None. o_hat (..., F_total), a_hat (..., K), primed: MoDiff caches or None.
    Returns:
        A new (..., F) tensor (F = F_total / 2 with ``geglu``), o_hat's dtype or fp32.
    """
    out_shape = _validate(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, w_bits, geglu)
    tensors, launch, reference = _integer_path(out_shape, q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed,
                                               w_bits, geglu)
    first_step = lambda: _first_step(a_hat, w_q, w_scale, bias, o_hat, w_bits, geglu)  # noqa: E731
    return _int8_gemm.run_modiff("int8_linear", o_hat, primed, first_step, tensors, launch, reference)


def _integer_path(out_shape, q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, w_bits, geglu):
    """``(tensors, launch, reference)`` of the integer path for :func:`_common.dispatch`."""
    def launch():
        out = _new_out(out_shape, o_hat, q.device)
        return _launch(q, act_scale, w_q, w_scale, bias, o_hat, out, w_bits, geglu, False)

    def reference():
        return int8_linear_ref(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, w_bits, geglu)

    return (q, act_scale, w_q, w_scale, bias, o_hat), launch, reference


@int8_linear.register_fake
def _int8_linear_fake(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, w_bits, geglu):
    out_shape = _validate(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, w_bits, geglu)
    return _new_out(out_shape, o_hat, q.device)


@torch.library.custom_op("fusediff::int8_linear_baseline", mutates_args=())
def int8_linear_baseline(
    q: torch.Tensor,
    act_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    w_bits: int,
    geglu: bool,
) -> torch.Tensor:
    """The cache-free form of :func:`int8_linear`: ``s_a s_w (q @ W_intᵀ) + bias`` (+ GEGLU), same kernel.

    A pure op (no mutable argument): baseline layers call it, and so does MoDiff's integer term
    when the caches are explicit inputs/outputs (``torch.cond`` branches, ONNX export). fp32 output.
    """
    out_shape = _validate(q, act_scale, w_q, w_scale, bias, None, None, None, w_bits, geglu)
    return _common.dispatch("int8_linear_baseline", *_integer_path(
        out_shape, q, act_scale, w_q, w_scale, bias, None, None, None, w_bits, geglu))


@int8_linear_baseline.register_fake
def _int8_linear_baseline_fake(q, act_scale, w_q, w_scale, bias, w_bits, geglu):
    out_shape = _validate(q, act_scale, w_q, w_scale, bias, None, None, None, w_bits, geglu)
    return _new_out(out_shape, None, q.device)


def int8_linear_acc(q: torch.Tensor, w_q: torch.Tensor, w_bits: int) -> torch.Tensor:
    """Debug entry: the kernel's raw int32 accumulator ``q @ W_intᵀ`` (..., F_total), ACC_ONLY epilogue."""
    _, f_total = _check_gemm(q, w_q, w_bits)

    def launch():
        out = torch.empty(tuple(q.shape[:-1]) + (f_total,), dtype=torch.int32, device=q.device)
        return _launch(q, None, w_q, None, None, None, out, w_bits, False, True)

    return _common.dispatch("int8_linear_acc", (q, w_q), launch, lambda: int8_linear_acc_ref(q, w_q, w_bits))


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------


def int8_linear_acc_ref(q: torch.Tensor, w_q: torch.Tensor, w_bits: int) -> torch.Tensor:
    """Integer reference: float64 matmul of the integer values (exact below 2^53)."""
    _check_gemm(q, w_q, w_bits)
    w_int = unpack_weight(w_q, w_bits, q.shape[-1])
    return (q.double() @ w_int.double().t()).round().to(torch.int32)


def int8_linear_ref(
    q: torch.Tensor,
    act_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    o_hat: Optional[torch.Tensor],
    a_hat: Optional[torch.Tensor],
    primed: Optional[torch.Tensor],
    w_bits: int,
    geglu: bool,
) -> torch.Tensor:
    """Reference for ``fusediff::int8_linear`` (mutates ``o_hat`` like the op)."""
    out_shape = _validate(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, w_bits, geglu)
    if o_hat is not None and not bool(primed):
        return _first_step(a_hat, w_q, w_scale, bias, o_hat, w_bits, geglu)
    t = math.prod(q.shape[:-1])
    acc = int8_linear_acc_ref(q, w_q, w_bits).reshape(t, -1)
    s_a = act_scale.repeat_interleave(t // act_scale.shape[0]) if t else act_scale[:0]
    pre = _int8_gemm.dequant_ref(acc, s_a[:, None], w_scale[None, :], None if bias is None else bias[None, :], o_hat)
    res = _geglu_ref(pre) if geglu else pre
    out = _new_out(out_shape, o_hat, q.device)
    out.copy_(res.reshape(out_shape))
    return out
