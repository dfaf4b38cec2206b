"""INT8 / INT4-weight implicit-GEMM conv2d with the MoDiff dequant + ô-cache epilogue (Fig. 1 right).

Math (MoDiff eq. 7; ``⊗`` = integer conv, ``*`` = float conv):

    primed:      ô_t = s_a[n] · s_w[cout] · (W_int ⊗ q)[n, cout, :, :] + ô_{t+1}     (no bias)
    not primed:  ô_T = deQ(W) * â_T + bias      (float conv, F.conv2d, in â's dtype; â_T = a_T)
    baseline:    o   = s_a[n] · s_w[cout] · (W_int ⊗ q) + bias                        (no cache)

q holds Q(Δ) (MoDiff) or Q(a) (baseline) from ``kernels.quantize``; s_a is per sample ``(N,)`` or
per tensor ``(1,)``; s_w is per output channel. Per-pixel activation scales cannot be folded into
this epilogue (a 3x3 window mixes pixels), which is why activations are scaled per sample.

Implicit GEMM (NHWC view, no im2col buffer):

    M = N * Hout * Wout   (rows: output pixels)
    N = Cout              (columns)
    K = KH * KW * Cin     (reduction), ordered (r, s, cin): k = (r * KW + s) * Cin + cin

The A tile ``[BLOCK_M, BLOCK_K]`` gathers q at ``(n, cin, oh*stride - pad + r, ow*stride - pad + s)``
(zero outside the image) for one filter tap ``(r, s)`` and a block of input channels, so the K loop
runs over taps x ceil(Cin / BLOCK_K) channel blocks; q in channels_last makes each A row contiguous.
The B tile ``[BLOCK_K, BLOCK_N]`` comes from the prepared weight ``(Cout, K)`` (K contiguous).
``tl.dot(int8, int8) -> int32`` accumulates exactly (tensor-core IMMA on the GPU; the Triton 3.9
interpreter also computes int8 dots exactly in int32, so CPU tests exercise the same code path).

INT4 weights (``w_bits=4``): the (Cout, K) matrix above, in this (r, s, cin) K order, packed by
``kernels._weights.pack_int4`` (element k in byte k // 2, low nibble for even k, two's complement),
shape ``(Cout, ceil(K/2))`` uint8, sign-extended in registers before the same int8 dot.

The GEMM core shared with ``kernels/linear_int8.py`` lives in ``kernels/_int8_gemm.py``: the
GROUP_M swizzle, the weight tile (INT4 unpack), the epilogue and the dispatch. Epilogue
(tl.constexpr flags, one store per output): ``ACC_ONLY`` writes the raw int32 accumulator (debug
entry :func:`int8_conv2d_acc`); otherwise dequantize by ``s_a[n] * s_w[cout]`` and either add
ô_{t+1} (``HAS_OHAT``: read, add, and write the new ô into ``o_hat`` in place) or the bias
(``HAS_BIAS``). The op must return a fresh tensor (a custom op's output may not alias a mutated
input), so in MoDiff mode the same values are stored twice: into ``o_hat`` and into the output.

First step: ``primed`` is read on the host (``bool(primed)``) to pick the float path. Keep
``primed`` on the CPU (a 0-d CPU bool tensor is accepted beside CUDA operands) to avoid a device
sync per call; a CUDA ``primed`` costs one sync.
"""
from __future__ import annotations

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
    "int8_conv2d",
    "int8_conv2d_baseline",
    "int8_conv2d_acc",
    "prepare_conv_weight",
    "dequantize_conv_weight",
    "int8_conv2d_ref",
    "int8_conv2d_acc_ref",
]

# ------------------------------------------------------------------------------------------------
# Autotune configs
# ------------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_CONV_TILES = [
    (128, 128, 64, 4, 4),
    (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 2, 5),
    (32, 64, 64, 4, 4),
]


def _prune_conv_configs(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (small Cout / Cin / M)."""
    m = named_args["Nimg"] * named_args["Hout"] * named_args["Wout"]
    return _int8_gemm.prune_tiles(configs, m, named_args["Cout"], named_args["Cin"])


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------

if _common.HAS_TRITON:

    @triton.autotune(
        configs=_common.gemm_configs(_CONV_TILES),
        key=["Cin", "Cout", "Hout", "Wout", "Nimg", "KH", "STRIDE", "W_BITS", "HAS_OHAT", "ACC_ONLY"],
        prune_configs_by={"early_config_prune": _prune_conv_configs},
        restore_value=["ohat_ptr"],  # benchmarking reruns would otherwise add ô twice
    )
    @triton.jit
    def _int8_conv2d_kernel(
        q_ptr,  # (N, Cin, H, W) int8, any strides (channels_last: K-contiguous A rows)
        w_ptr,  # (Cout, K) int8, or (Cout, ceil(K/2)) uint8 when W_BITS == 4; K order (r, s, cin)
        act_scale_ptr,  # (N,) or (1,) fp32
        w_scale_ptr,  # (Cout,) fp32
        bias_ptr,  # (Cout,) float (HAS_BIAS)
        ohat_ptr,  # (N, Cout, Hout, Wout) float (HAS_OHAT): ô_{t+1} in, ô_t out
        out_ptr,  # (N, Cout, Hout, Wout) float out, or int32 when ACC_ONLY
        Nimg,
        Cin,
        H,
        W,
        Cout,
        Hout,
        Wout,
        stride_qn, stride_qc, stride_qh, stride_qw,
        stride_wn,
        stride_sa,  # 1 per sample, 0 per tensor
        stride_hn, stride_hc, stride_hh, stride_hw,
        stride_on, stride_oc, stride_oh, stride_ow,
        KH: tl.constexpr,
        KW: tl.constexpr,
        STRIDE: tl.constexpr,
        PAD: tl.constexpr,
        W_BITS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_OHAT: tl.constexpr,
        ACC_ONLY: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        HWo = Hout * Wout
        # Rows m = output pixels (n, oh, ow), columns = Cout; GROUP_M row tiles share weight tiles in L2.
        offs_m, offs_n, m_ok, n_ok = _tile_offsets(Nimg * HWo, Cout, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = tl.arange(0, BLOCK_K)
        img = offs_m // HWo
        rem = offs_m % HWo
        oh = rem // Wout
        ow = rem % Wout
        ih0 = oh * STRIDE - PAD
        iw0 = ow * STRIDE - PAD
        q_rows = q_ptr + img.to(tl.int64) * stride_qn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        c_blocks = tl.cdiv(Cin, BLOCK_K)
        for it in range(0, KH * KW * c_blocks):
            tap = it // c_blocks
            cin = (it - tap * c_blocks) * BLOCK_K + offs_k
            ih = ih0 + tap // KW
            iw = iw0 + tap % KW
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            k_ok = cin < Cin
            a = tl.load(
                q_rows[:, None] + (ih * stride_qh + iw * stride_qw)[:, None] + cin[None, :] * stride_qc,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0,
            )
            acc = _w_dot(acc, a, w_ptr, offs_n, tap * Cin + cin, k_ok, n_ok, stride_wn, W_BITS)  # exact: W_int ⊗ q

        # MoDiff eq. (7): ô_t = deQ(W_int ⊗ Q(Δ)) + ô_{t+1} (the bias already lives in ô), or + bias.
        img64 = img.to(tl.int64)
        h_pix = img64 * stride_hn + oh * stride_hh + ow * stride_hw
        o_pix = img64 * stride_on + oh * stride_oh + ow * stride_ow
        _epilogue_store(acc, acc, act_scale_ptr + img * stride_sa, m_ok, offs_n, n_ok, w_scale_ptr, bias_ptr,
                        ohat_ptr + h_pix[:, None] + offs_n[None, :] * stride_hc, 0, 0,
                        out_ptr + o_pix[:, None] + offs_n[None, :] * stride_oc,
                        HAS_BIAS, HAS_OHAT, False, ACC_ONLY)


# ------------------------------------------------------------------------------------------------
# Weight preparation (offline, at rewrite time)
# ------------------------------------------------------------------------------------------------


def prepare_conv_weight(weight: torch.Tensor, bits: int, search: str = "mse") -> dict:
    """Quantize (per output channel), reorder to the kernel's K order (r, s, cin) and pack INT4.

    Args:
        weight: float conv weight ``(Cout, Cin, k, k)``.
        bits: 4 or 8.
        search: ``"mse"`` or ``"minmax"`` (see :func:`kernels._weights.quantize_weight`).
    Returns:
        ``{"w_q", "w_scale", "w_bits", "k_size", "cin", "cout"}``: ``w_q`` int8 ``(Cout, K)`` or
        uint8 ``(Cout, ceil(K/2))`` (INT4), ``w_scale`` fp32 ``(Cout,)``.
    Example:
        >>> p = prepare_conv_weight(conv.weight, 8)
        >>> y = torch.ops.fusediff.int8_conv2d(q, s, p["w_q"], p["w_scale"], conv.bias, None, None, None,
        ...                                   1, 1, p["w_bits"], p["k_size"])
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"fusediff: weight must be (Cout, Cin, k, k), got {tuple(getattr(weight, 'shape', ()))}")
    w_int, w_scale = quantize_weight(weight, bits, search)
    cout, cin, k, _ = weight.shape
    w_mat = w_int.permute(0, 2, 3, 1).reshape(cout, k * k * cin).contiguous()  # K order (r, s, cin)
    w_q = pack_weight(w_mat, bits)
    return {"w_q": w_q, "w_scale": w_scale, "w_bits": bits, "k_size": k, "cin": cin, "cout": cout}


def dequantize_conv_weight(w_q: torch.Tensor, w_scale: torch.Tensor, w_bits: int, k_size: int, cin: int) -> torch.Tensor:
    """deQ(W) as an fp32 ``(Cout, Cin, k, k)`` conv weight (for the float first step)."""
    cout = w_q.shape[0]
    w_int = unpack_weight(w_q, w_bits, k_size * k_size * cin)
    w4 = w_int.reshape(cout, k_size, k_size, cin).permute(0, 3, 1, 2)
    return w4.float() * w_scale.float().reshape(cout, 1, 1, 1)


# ------------------------------------------------------------------------------------------------
# Validation and launcher
# ------------------------------------------------------------------------------------------------


def _out_hw(h: int, w: int, k: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1


def _check_geometry(q, w_q, stride, padding, w_bits, k_size) -> tuple[int, int, int]:
    """Validate q/w_q/geometry; returns (Cout, Hout, Wout)."""
    _int8_gemm.check_q(q)
    if q.dim() != 4:
        raise ValueError(f"fusediff: q must be (N, Cin, H, W), got {tuple(q.shape)}")
    check_bits("w_bits", w_bits)
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("k_size", k_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"fusediff: {name} must be an int >= {lo}, got {v!r}")
    cin = q.shape[1]
    _int8_gemm.check_w_q(w_q, w_bits, k_size * k_size * cin, "Cout", f"k_size={k_size}, Cin={cin}",
                         " (see prepare_conv_weight)")
    hout, wout = _out_hw(q.shape[2], q.shape[3], k_size, stride, padding)
    if hout <= 0 or wout <= 0:
        raise ValueError(f"fusediff: empty output for input {tuple(q.shape[2:])}, k={k_size}, padding={padding}")
    return w_q.shape[0], hout, wout


def _validate(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, stride, padding, w_bits, k_size):
    cout, hout, wout = _check_geometry(q, w_q, stride, padding, w_bits, k_size)
    n = q.shape[0]
    _int8_gemm.check_scales(act_scale, w_scale, (n, 1), f"({n},) per sample or (1,) per tensor", cout)
    out_shape = (n, cout, hout, wout)
    _int8_gemm.check_modiff(q, bias, o_hat, a_hat, primed, cout, out_shape, f"output shape {out_shape}")
    return out_shape


def _new_out(out_shape, o_hat: Optional[torch.Tensor], device) -> torch.Tensor:
    """Output: like o_hat (dtype and strides) in MoDiff mode, else fp32 channels_last."""
    if o_hat is not None:
        return torch.empty_like(o_hat)
    return torch.empty(out_shape, dtype=torch.float32, device=device, memory_format=torch.channels_last)


def _launch(q, act_scale, w_q, w_scale, bias, o_hat, out, stride, padding, w_bits, k_size, acc_only):
    n, cin, h, w = q.shape
    _, cout, hout, wout = out.shape
    if out.numel() == 0:
        return out
    w_q = w_q.contiguous()
    ptrs, flags = _int8_gemm.epilogue_args(act_scale, w_scale, bias, o_hat, out, acc_only)
    sh = o_hat.stride() if o_hat is not None else (0, 0, 0, 0)
    _int8_conv2d_kernel[_int8_gemm.gemm_grid(n * hout * wout, cout)](
        q, w_q, *ptrs, o_hat if o_hat is not None else out, out,
        n, cin, h, w, cout, hout, wout,
        *q.stride(), w_q.stride(0),
        (1 if act_scale is not None and act_scale.shape[0] == n and n > 1 else 0),
        *sh, *out.stride(),
        KH=k_size, KW=k_size, STRIDE=stride, PAD=padding, W_BITS=w_bits, **flags,
    )
    return out


def _first_step(a_hat, w_q, w_scale, bias, o_hat, stride, padding, w_bits, k_size):
    """ô_T = deQ(W) * â_T + bias in â's float dtype; o_hat <- ô_T. Returns a fresh tensor."""
    w = dequantize_conv_weight(w_q, w_scale, w_bits, k_size, a_hat.shape[1]).to(a_hat.dtype)
    b = bias.to(a_hat.dtype) if bias is not None else None
    o = F.conv2d(a_hat, w, b, stride=stride, padding=padding)
    out = _new_out(o.shape, o_hat, o.device)
    out.copy_(o)
    o_hat.copy_(o)
    return out


# ------------------------------------------------------------------------------------------------
# Custom op and debug entry
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fusediff::int8_conv2d", mutates_args=["o_hat"])
def int8_conv2d(
    q: torch.Tensor,
    act_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    o_hat: Optional[torch.Tensor],
    a_hat: Optional[torch.Tensor],
    primed: Optional[torch.Tensor],
    stride: int,
    padding: int,
    w_bits: int,
    k_size: int,
) -> torch.Tensor:
    """Quantized conv2d (groups=1): baseline ``s_a s_w (W ⊗ q) + bias`` or MoDiff eq. (7).

    Args:
        q: int8 (N, Cin, H, W) activation levels (Q(a) or Q(Δ)), any layout (channels_last best).
        act_scale: fp32 (N,) or (1,). w_q, w_scale: from :func:`prepare_conv_weight`.
        bias: (Cout,) float or None (added on the baseline path and the first MoDiff step only).
        o_hat, a_hat, primed: MoDiff caches (ô updated in place) or all None for the baseline.
        stride, padding, w_bits (4/8), k_size: conv geometry and weight format.
    Returns:
        A new (N, Cout, Hout, Wout) tensor: o_hat's dtype and layout in MoDiff mode, else fp32
        channels_last.
    """
    out_shape = _validate(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, stride, padding, w_bits, k_size)
    tensors, launch, reference = _integer_path(out_shape, q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed,
                                               stride, padding, w_bits, k_size)
    first_step = lambda: _first_step(a_hat, w_q, w_scale, bias, o_hat, stride, padding, w_bits, k_size)  # noqa: E731
    return _int8_gemm.run_modiff("int8_conv2d", o_hat, primed, first_step, tensors, launch, reference)


def _integer_path(out_shape, q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, stride, padding, w_bits, k_size):
    """``(tensors, launch, reference)`` of the integer path for :func:`_common.dispatch`."""
    def launch():
        out = _new_out(out_shape, o_hat, q.device)
        return _launch(q, act_scale, w_q, w_scale, bias, o_hat, out, stride, padding, w_bits, k_size, False)

    def reference():
        return int8_conv2d_ref(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, stride, padding, w_bits, k_size)

    return (q, act_scale, w_q, w_scale, bias, o_hat), launch, reference


@int8_conv2d.register_fake
def _int8_conv2d_fake(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, stride, padding, w_bits, k_size):
    out_shape = _validate(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, stride, padding, w_bits, k_size)
    return _new_out(out_shape, o_hat, q.device)


@torch.library.custom_op("fusediff::int8_conv2d_baseline", mutates_args=())
def int8_conv2d_baseline(
    q: torch.Tensor,
    act_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: int,
    padding: int,
    w_bits: int,
    k_size: int,
) -> torch.Tensor:
    """The cache-free form of :func:`int8_conv2d`: ``s_a s_w (W ⊗ q) + bias``, same kernel.

    A pure op (no mutable argument), so it functionalizes without an ``auto_functionalized``
    wrapper: baseline layers call it, and so does MoDiff's integer term when the caches are
    explicit inputs/outputs (``torch.cond`` branches, ONNX export). Returns fp32 channels_last.
    """
    out_shape = _validate(q, act_scale, w_q, w_scale, bias, None, None, None, stride, padding, w_bits, k_size)
    return _common.dispatch("int8_conv2d_baseline", *_integer_path(
        out_shape, q, act_scale, w_q, w_scale, bias, None, None, None, stride, padding, w_bits, k_size))


@int8_conv2d_baseline.register_fake
def _int8_conv2d_baseline_fake(q, act_scale, w_q, w_scale, bias, stride, padding, w_bits, k_size):
    out_shape = _validate(q, act_scale, w_q, w_scale, bias, None, None, None, stride, padding, w_bits, k_size)
    return _new_out(out_shape, None, q.device)


def int8_conv2d_acc(q: torch.Tensor, w_q: torch.Tensor, stride: int, padding: int, w_bits: int, k_size: int) -> torch.Tensor:
    """Debug entry: the kernel's raw int32 accumulator ``W_int ⊗ q``, (N, Cout, Hout, Wout) contiguous.

    Runs the same kernel as :func:`int8_conv2d` with the ACC_ONLY epilogue, so tests can compare
    the integer result exactly.
    """
    cout, hout, wout = _check_geometry(q, w_q, stride, padding, w_bits, k_size)

    def launch():
        out = torch.empty((q.shape[0], cout, hout, wout), dtype=torch.int32, device=q.device)
        return _launch(q, None, w_q, None, None, None, out, stride, padding, w_bits, k_size, True)

    return _common.dispatch("int8_conv2d_acc", (q, w_q), launch,
                            lambda: int8_conv2d_acc_ref(q, w_q, stride, padding, w_bits, k_size))


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------


def int8_conv2d_acc_ref(q: torch.Tensor, w_q: torch.Tensor, stride: int, padding: int, w_bits: int, k_size: int) -> torch.Tensor:
    """Integer reference for the accumulator: float64 conv of the integer values (exact below 2^53)."""
    cout, _, _ = _check_geometry(q, w_q, stride, padding, w_bits, k_size)
    cin = q.shape[1]
    w_int = unpack_weight(w_q, w_bits, k_size * k_size * cin).reshape(cout, k_size, k_size, cin).permute(0, 3, 1, 2)
    acc = F.conv2d(q.double(), w_int.double(), stride=stride, padding=padding)
    return acc.round().to(torch.int32).contiguous()


def int8_conv2d_ref(
    q: torch.Tensor,
    act_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    o_hat: Optional[torch.Tensor],
    a_hat: Optional[torch.Tensor],
    primed: Optional[torch.Tensor],
    stride: int,
    padding: int,
    w_bits: int,
    k_size: int,
) -> torch.Tensor:
    """Reference for ``fusediff::int8_conv2d`` (mutates ``o_hat`` like the op)."""
    out_shape = _validate(q, act_scale, w_q, w_scale, bias, o_hat, a_hat, primed, stride, padding, w_bits, k_size)
    if o_hat is not None and not bool(primed):
        return _first_step(a_hat, w_q, w_scale, bias, o_hat, stride, padding, w_bits, k_size)
    acc = int8_conv2d_acc_ref(q, w_q, stride, padding, w_bits, k_size)
    o = _int8_gemm.dequant_ref(acc, act_scale.reshape(-1, 1, 1, 1), w_scale.reshape(1, -1, 1, 1),
                               None if bias is None else bias.reshape(1, -1, 1, 1), o_hat)
    out = _new_out(out_shape, o_hat, q.device)
    out.copy_(o)
    return out
