"""GELU, GEGLU and the fused Linear -> GEGLU projection.

Math (GELU, Hendrycks & Gimpel; "Speed Is All You Need" (arXiv:2304.11267), sec. 3.1, eq. (2)):

    gelu(x)      = x / 2 * (1 + erf(x / sqrt(2)))                                  approximate="none"
    gelu_tanh(x) = x / 2 * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 x^3)      approximate="tanh"
                 = x * sigmoid(2u)          (identity 1 + tanh(u) = 2 sigmoid(2u); portable: no tanh
                                             intrinsic needed, no cancellation near u = 0)
    geglu(x)     = h * gelu(g),  h, g = x.chunk(2, dim=-1)    (diffusers ``GEGLU``: the first half is
                                                               the value, the second half the gate)
    linear_geglu(x, W, b) = geglu(x @ W.T + b),  W (2F, K): rows [0, F) project the value, [F, 2F)
                                                               the gate.

The paper's point (sec. 3.1) is that GELU's handful of elementwise ops *and the split and multiply
around it* belong in one kernel: ``_geglu_kernel`` reads the (M, 2F) projection once and writes
(M, F) once, instead of eager's chunk -> gelu (read 1, write 1) -> mul (read 2, write 1).
``_linear_geglu_kernel`` goes one step further: each program of the matmul computes an output
tile's value columns n and the matching gate columns n + F (two fp32 accumulators sharing one
load of the activation tile), applies bias + gelu(gate) * value in the epilogue and stores once:
the 2F-wide projection never reaches memory.

Layout: the last dimension is the feature dimension and must have stride 1 for ``geglu`` (other
strides are copied first); any leading dims. ``geglu`` reads its input through two leading strides
(``(B, T, 2F)`` after flattening the outer dims), so a row-sliced or batch/token-transposed view of
a linear's output is consumed without a copy. Outputs are contiguous, in the input dtype. All math
is fp32; the result is rounded once.

Non-finite values: the kernels follow the formulas above, so NaN -> NaN, +inf -> +inf,
-inf -> NaN (-inf * 0), as PyTorch's CUDA kernels do. (PyTorch's *vectorized CPU* ``F.gelu``
returns NaN for +inf; the references here use the explicit formula and return +inf.)

Inference only: no autograd is registered (run under ``torch.no_grad()``/``inference_mode()``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _common

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import _dot, _grouped_pid

APPROXIMATE = ("none", "tanh")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# --------------------------------------------------------------------------------------------
# Autotune configs. Under TRITON_INTERPRET=1 a single config, so CPU tests do not autotune.
# --------------------------------------------------------------------------------------------
if _common.HAS_TRITON:
    if _common.interpret_mode():
        _GELU_CONFIGS = [triton.Config({"BLOCK": 1024})]
        # BLOCK_M = 16 leaves a row tail on the test shapes (77, 1000 rows); BLOCK_F = 64 a column tail
        # on F = 45 and several column blocks on F = 320.
        _GEGLU_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_F": 64})]
        # 32^3 tiles: K = 40/130 and F = 45 leave tails in every dimension; several programs per axis.
        _LINEAR_GEGLU_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    else:
        _GELU_CONFIGS = [
            triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))
        ]
        _GEGLU_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_F": bf}, num_warps=w)
            for bm, bf, w in (
                (1, 1024, 4),
                (1, 2048, 8),
                (2, 1024, 4),
                (4, 512, 4),
                (4, 1024, 8),
                (8, 256, 4),
                (8, 512, 8),
                (16, 256, 8),
                (32, 128, 8),
            )
        ]
        # Two fp32 accumulators per program (value + gate), so tiles are one notch smaller than the
        # Triton matmul tutorial's for the same register budget.
        _LINEAR_GEGLU_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in (
                (128, 128, 64, 3, 8),
                (128, 128, 32, 4, 8),
                (128, 64, 64, 4, 8),
                (128, 64, 32, 4, 4),
                (64, 128, 64, 4, 4),
                (64, 128, 32, 4, 4),
                (64, 64, 64, 4, 4),
                (64, 64, 32, 5, 4),
                (32, 64, 64, 5, 4),
                (32, 32, 64, 5, 2),
                (16, 64, 128, 4, 4),  # decode-like: few rows
            )
        ]


def _prune_geglu_configs(configs, named_args, **kwargs):
    """Drop tiles much wider/taller than the problem; always keep at least one."""
    m, f = named_args["M"], named_args["F"]
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_F"] <= max(256, _common.next_pow2(f)) and c.kwargs["BLOCK_M"] <= max(1, _common.next_pow2(m))
    ]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_F"])]


def _prune_linear_geglu_configs(configs, named_args, **kwargs):
    """Drop tiles that would be mostly padding for this (M, F, K); always keep at least one."""
    m, f, k = named_args["M"], named_args["F"], named_args["K"]
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(16, _common.next_pow2(m))
        and c.kwargs["BLOCK_N"] <= max(32, _common.next_pow2(f))
        and c.kwargs["BLOCK_K"] <= max(32, _common.next_pow2(k))
    ]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if _common.HAS_TRITON:

    @triton.jit
    def _gelu(g, APPROX_TANH: tl.constexpr):
        """GELU of an fp32 tile, eq. (2) (or its tanh form written as x * sigmoid(2u))."""
        if APPROX_TANH:
            u = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) * (x + 0.044715 x^3)
            # 0.5 * (1 + tanh(u)) == 1 / (1 + exp(-2u)); exp overflow -> inf -> 0, the right limit.
            return g / (1.0 + tl.exp(-2.0 * u))
        else:
            return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))

    @triton.autotune(configs=_GELU_CONFIGS, key=["N"])
    @triton.jit
    def _gelu_kernel(
        x_ptr,  # (N,) contiguous, fp32/fp16/bf16
        out_ptr,  # (N,) contiguous, x dtype
        N,
        APPROX_TANH: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        y = _gelu(x, APPROX_TANH)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.autotune(
        configs=_GEGLU_CONFIGS,
        key=["M", "F"],
        prune_configs_by={"early_config_prune": _prune_geglu_configs},
    )
    @triton.jit
    def _geglu_kernel(
        x_ptr,  # (B, T, 2F) fp32/fp16/bf16, last-dim stride 1; [..., :F] value, [..., F:] gate
        out_ptr,  # (B*T, F) contiguous, x dtype
        M,  # B * T rows
        T,
        F,
        stride_xb,
        stride_xt,
        APPROX_TANH: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (offs_m < M)[:, None] & (offs_f < F)[None, :]
        # Row m of the flattened (B*T) view lives at b * stride_xb + t * stride_xt: strided views of a
        # linear's output are read in place. int64: B * T * 2F can pass 2^31 at batch 32.
        row = (offs_m // T).to(tl.int64) * stride_xb + (offs_m % T).to(tl.int64) * stride_xt
        h_ptrs = x_ptr + row[:, None] + offs_f[None, :]
        h = tl.load(h_ptrs, mask=mask).to(tl.float32)
        g = tl.load(h_ptrs + F, mask=mask).to(tl.float32)
        y = h * _gelu(g, APPROX_TANH)
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * F + offs_f[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.autotune(
        configs=_LINEAR_GEGLU_CONFIGS,
        key=["M", "F", "K"],
        prune_configs_by={"early_config_prune": _prune_linear_geglu_configs},
    )
    @triton.jit
    def _linear_geglu_kernel(
        x_ptr,  # (M, K) fp32/fp16/bf16, any strides
        w_ptr,  # (2F, K) x dtype, any strides; rows [0, F) value, [F, 2F) gate
        b_ptr,  # (2F,) x dtype, contiguous (unused when HAS_BIAS is False)
        out_ptr,  # (M, F) contiguous, x dtype
        M,
        F,
        K,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        HAS_BIAS: tl.constexpr,
        APPROX_TANH: tl.constexpr,
        DOT_PRECISION: tl.constexpr,  # "ieee" | "tf32" (fp32 inputs only; ignored for fp16/bf16)
        INTERPRET_BF16: tl.constexpr,  # interpreter + bf16 only: its dot cannot multiply bf16 (see _common._dot)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Grouped program order (Triton matmul tutorial): GROUP_M row-blocks sweep the columns
        # together so their x tiles stay in L2.
        pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(F, BLOCK_N), GROUP_M)

        # Wrap-around row/column indices: loads stay in bounds without masks; the store is masked.
        # Wrapping columns modulo F keeps value rows in [0, F) and their gate partners in [F, 2F).
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % F
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        wh_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
        wg_ptrs = wh_ptrs + F * stride_wn  # the gate rows n + F

        acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            wh = tl.load(wh_ptrs, mask=k_mask[:, None], other=0.0)
            wg = tl.load(wg_ptrs, mask=k_mask[:, None], other=0.0)
            acc_h = _dot(a, wh, acc_h, DOT_PRECISION, INTERPRET_BF16)
            acc_g = _dot(a, wg, acc_g, DOT_PRECISION, INTERPRET_BF16)
            x_ptrs += BLOCK_K * stride_xk
            wh_ptrs += BLOCK_K * stride_wk
            wg_ptrs += BLOCK_K * stride_wk

        # Epilogue: bias, gelu(gate) * value in fp32, one rounding, one store.
        if HAS_BIAS:
            acc_h += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
            acc_g += tl.load(b_ptr + F + offs_n).to(tl.float32)[None, :]
        y = acc_h * _gelu(acc_g, APPROX_TANH)

        offs_om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ptrs = out_ptr + offs_om.to(tl.int64)[:, None] * F + offs_on[None, :]
        mask = (offs_om < M)[:, None] & (offs_on < F)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Argument checks (shared by the ops, their fake impls and the *_supported predicates)
# --------------------------------------------------------------------------------------------
def _check_approximate(op: str, approximate) -> None:
    if not isinstance(approximate, str) or approximate not in APPROXIMATE:
        raise ValueError(f"fusediff.{op}: approximate must be one of {list(APPROXIMATE)}, got {approximate!r}")


def _check_gelu_args(x: torch.Tensor, approximate: str) -> None:
    _check_approximate("gelu", approximate)
    _common.check_float("gelu: x", x)


def _check_geglu_args(x: torch.Tensor, approximate: str) -> None:
    _check_approximate("geglu", approximate)
    _common.check_float("geglu: x", x)
    if x.dim() < 1:
        raise ValueError("fusediff.geglu: x must have at least 1 dimension (..., 2F), got a 0-d tensor")
    if x.shape[-1] % 2 != 0:
        raise ValueError(
            f"fusediff.geglu: the last dimension of x must be even (value and gate halves), got x.shape={tuple(x.shape)}"
        )


def _check_linear_geglu_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> None:
    _check_approximate("linear_geglu", approximate)
    _common.check_float("linear_geglu: x", x)
    if weight.dtype != x.dtype:
        raise TypeError(f"fusediff.linear_geglu: weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"fusediff.linear_geglu: bias dtype {bias.dtype} must match x dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("fusediff.linear_geglu: x must have at least 1 dimension (..., K), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"fusediff.linear_geglu: weight must be 2-D (2F, K), got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fusediff.linear_geglu: x.shape[-1] ({x.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]}); "
            f"x.shape={tuple(x.shape)}, weight.shape={tuple(weight.shape)}"
        )
    if weight.shape[0] % 2 != 0 or weight.shape[0] == 0:
        raise ValueError(
            f"fusediff.linear_geglu: weight.shape[0] must be even and > 0 (value and gate rows), got {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"fusediff.linear_geglu: bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}"
        )


def geglu_supported(x_shape, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``fusediff::geglu`` takes an input of this shape and dtype (for the rewrite pass).

    Args:
        x_shape: shape of the projection output ``(..., 2F)``.
        dtype: its dtype.
    Returns:
        ``(True, "")`` or ``(False, reason)``.
    Example:
        >>> geglu_supported((2, 4096, 2560), torch.float16)
        (True, '')
    """
    if dtype not in _FLOAT_DTYPES:
        return False, f"dtype {dtype} not in fp32/fp16/bf16"
    if len(x_shape) < 1:
        return False, "0-d input"
    c = int(x_shape[-1])
    if c % 2 != 0 or c == 0:
        return False, f"last dim {c} is not even and > 0 (value/gate halves)"
    return True, ""


def linear_geglu_supported(x_shape, w_shape, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``fusediff::linear_geglu`` takes ``x (..., K)`` and ``weight (2F, K)`` in ``dtype``.

    Example:
        >>> linear_geglu_supported((2, 4096, 320), (2560, 320), torch.float16)
        (True, '')
    """
    if dtype not in _FLOAT_DTYPES:
        return False, f"dtype {dtype} not in fp32/fp16/bf16"
    if len(x_shape) < 1:
        return False, "0-d input"
    if len(w_shape) != 2:
        return False, f"weight is {len(w_shape)}-D, expected (2F, K)"
    if int(x_shape[-1]) != int(w_shape[1]):
        return False, f"x.shape[-1]={x_shape[-1]} != weight.shape[1]={w_shape[1]}"
    n = int(w_shape[0])
    if n % 2 != 0 or n == 0:
        return False, f"weight.shape[0]={n} is not even and > 0 (value/gate rows)"
    return True, ""


# --------------------------------------------------------------------------------------------
# Launchers (inputs already validated)
# --------------------------------------------------------------------------------------------
def _gelu_launch(x: torch.Tensor, approximate: str) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    xc = x.contiguous()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _gelu_kernel[grid](xc, out, n, APPROX_TANH=approximate == "tanh")
    return out


def _as_btc(x: torch.Tensor) -> torch.Tensor:
    """View ``x (..., C)`` as 3-D ``(B, T, C)`` with last-dim stride 1, copying only if no view exists."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.flatten(0, -3)  # a view when the outer dims collapse; else a copy


def _geglu_launch(x: torch.Tensor, approximate: str) -> torch.Tensor:
    f = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], f), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x3 = _as_btc(x)
    b, t, _ = x3.shape
    m = b * t
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(f, meta["BLOCK_F"]))  # noqa: E731
    _geglu_kernel[grid](x3, out, m, t, f, x3.stride(0), x3.stride(1), APPROX_TANH=approximate == "tanh")
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul precision setting, as F.linear does ("highest" -> exact fp32).
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _linear_geglu_launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    k = x.shape[-1]
    f = weight.shape[0] // 2
    out = torch.empty((*x.shape[:-1], f), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, k)  # a view for the usual (B, T, K) layouts; the kernel takes any strides
    b = bias.contiguous() if bias is not None else x2  # dummy pointer when HAS_BIAS is False
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(f, meta["BLOCK_N"]),)  # noqa: E731
    _linear_geglu_kernel[grid](
        x2, weight, b, out, m, f, k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None,
        APPROX_TANH=approximate == "tanh",
        DOT_PRECISION=_dot_precision(x.dtype),
        INTERPRET_BF16=_common.interpret_bf16(x.dtype),
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fusediff::gelu", mutates_args=())
def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``F.gelu(x, approximate=approximate)`` with fp32 math; output in ``x.dtype``, contiguous.

    Args:
        x: any shape, fp32/fp16/bf16.
        approximate: ``"none"`` (erf, eq. (2)) or ``"tanh"``.
    Example:
        >>> torch.ops.fusediff.gelu(torch.randn(8), "none")
    """
    _check_gelu_args(x, approximate)
    path = _common.choose_path(x)
    _common.record("gelu", path)
    if path == "triton":
        return _gelu_launch(x, approximate)
    return gelu_ref(x, approximate).contiguous()


@gelu.register_fake
def _gelu_fake(x: torch.Tensor, approximate: str) -> torch.Tensor:
    _check_gelu_args(x, approximate)
    return x.new_empty(x.shape)


@torch.library.custom_op("fusediff::geglu", mutates_args=())
def geglu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """diffusers GEGLU after the projection: ``h, g = x.chunk(2, -1); h * gelu(g)``.

    Args:
        x: ``(..., 2F)`` fp32/fp16/bf16; the last dim needs stride 1 to avoid a copy.
        approximate: ``"none"`` or ``"tanh"``.
    Returns:
        ``(..., F)`` contiguous, in ``x.dtype``.
    Example:
        >>> torch.ops.fusediff.geglu(torch.randn(2, 77, 2 * 320), "none").shape
        torch.Size([2, 77, 320])
    """
    _check_geglu_args(x, approximate)
    path = _common.choose_path(x)
    _common.record("geglu", path)
    if path == "triton":
        return _geglu_launch(x, approximate)
    return geglu_ref(x, approximate).contiguous()


@geglu.register_fake
def _geglu_fake(x: torch.Tensor, approximate: str) -> torch.Tensor:
    _check_geglu_args(x, approximate)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("fusediff::linear_geglu", mutates_args=())
def linear_geglu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    """``geglu(F.linear(x, weight, bias))`` in one matmul; the (..., 2F) projection is never stored.

    Args:
        x: ``(..., K)`` fp32/fp16/bf16.
        weight: ``(2F, K)`` in ``x.dtype`` (rows ``[0, F)`` value, ``[F, 2F)`` gate), any strides.
        bias: ``(2F,)`` or None.
        approximate: ``"none"`` or ``"tanh"``.
    Returns:
        ``(..., F)`` contiguous, in ``x.dtype``.
    Example:
        >>> torch.ops.fusediff.linear_geglu(torch.randn(2, 77, 320), torch.randn(2560, 320), None, "none").shape
        torch.Size([2, 77, 1280])
    """
    _check_linear_geglu_args(x, weight, bias, approximate)
    path = _common.choose_path(x, weight, *([bias] if bias is not None else []))
    _common.record("linear_geglu", path)
    if path == "triton":
        return _linear_geglu_launch(x, weight, bias, approximate)
    return linear_geglu_ref(x, weight, bias, approximate).contiguous()


@linear_geglu.register_fake
def _linear_geglu_fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    _check_linear_geglu_args(x, weight, bias, approximate)
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


# --------------------------------------------------------------------------------------------
# Pure-torch references (fp32 math, cast back). Tests and benchmarks import these.
# --------------------------------------------------------------------------------------------
def _gelu_fp32(x: torch.Tensor, approximate: str) -> torch.Tensor:
    # The explicit formula (not F.gelu): PyTorch's vectorized CPU gelu maps +inf to NaN.
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + torch.erf(x * _SQRT1_2))


def gelu_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Reference GELU: eq. (2) (or its tanh form) in fp32, cast back to ``x.dtype``."""
    _check_approximate("gelu_ref", approximate)
    return _gelu_fp32(x.float(), approximate).to(x.dtype)


def geglu_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Reference GEGLU: ``h, g = x.chunk(2, -1); h * gelu(g)`` in fp32, cast back."""
    _check_approximate("geglu_ref", approximate)
    h, g = x.float().chunk(2, dim=-1)
    return (h * _gelu_fp32(g, approximate)).to(x.dtype)


def linear_geglu_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, approximate: str = "none"
) -> torch.Tensor:
    """Reference: ``geglu(F.linear(x, weight, bias))`` with the linear and GEGLU in fp32, cast back."""
    proj = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return geglu_ref(proj, approximate).to(x.dtype)
