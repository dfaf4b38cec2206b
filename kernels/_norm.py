"""The GroupNorm epilogue shared by ``fusediff::group_norm_silu`` (``kernels/groupnorm.py``) and
``fusediff::group_norm_quantize`` (``kernels/quantize.py``), and its pure-torch reference.

Math ("Speed Is All You Need" (arXiv:2304.11267) §3.1, eq. 1), for sample ``n`` and group ``g``
with ``CPG = C // G`` channels and ``S`` positions:

    mu_g  = mean(x[n, g*CPG:(g+1)*CPG, :])            (fp32)
    var_g = mean((x - mu_g)^2)                         (biased, fp32)
    y     = (x - mu_g) * rsqrt(var_g + eps)            eq. (1)
    y     = y * weight[c] + bias[c]                    (GroupNorm affine, optional)
    y     = y * (1 + scale[n, c]) + shift[n, c]        (FiLM, use_scale_shift_norm, optional)
    y     = silu(y)                                    (optional)

Device helpers: :func:`_gn_params` loads the per-channel parameters (fp32) at any channel index
tensor (per element for group_norm_silu's flat walk, per channel row for group_norm_quantize's
``[channels, positions]`` tiles); :func:`_gn_affine` applies eq. (1) + affine + FiLM to fp32
values, each term chosen by a ``tl.constexpr`` flag. The statistics and the SiLU stay with each
kernel: the two ops compute them with different (equally accurate) fp32 formulas -- group_norm_silu
per-lane Welford and ``y * sigmoid(y)``, group_norm_quantize chunked two-pass + Chan merge and
``y / (1 + exp(-y))`` -- and one shared formula would move one op's outputs by an ulp (enough to
flip a rounding-boundary q level in ``tests/kernels/test_quantize.py``).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from . import _common

if _common.HAS_TRITON:
    import triton
    import triton.language as tl


if _common.HAS_TRITON:

    @triton.jit
    def _gn_params(
        ch, n, mask,
        w_ptr,  # (C,) float GroupNorm weight (HAS_WEIGHT)
        b_ptr,  # (C,) float GroupNorm bias (HAS_BIAS)
        scale_ptr,  # (N, C) float FiLM scale (HAS_SCALE), strides (stride_scn, stride_scc)
        shift_ptr,  # (N, C) float FiLM shift (HAS_SHIFT), strides (stride_shn, stride_shc)
        stride_scn, stride_scc, stride_shn, stride_shc,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ):
        """fp32 (weight, bias, FiLM scale, FiLM shift) at channels ``ch`` of sample ``n``, shaped like
        ``ch``; an absent one is zeros (never read by :func:`_gn_affine`)."""
        zero = tl.zeros_like(ch).to(tl.float32)
        w = zero
        b = zero
        sc = zero
        sh = zero
        if HAS_WEIGHT:
            w = tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + n * stride_scn + ch * stride_scc, mask=mask, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            sh = tl.load(shift_ptr + n * stride_shn + ch * stride_shc, mask=mask, other=0.0).to(tl.float32)
        return w, b, sc, sh

    @triton.jit
    def _gn_affine(x, mean, rstd, w, b, sc, sh, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """eq. (1) + affine + FiLM on fp32 values ``x`` (SiLU: the caller's); parameters broadcastable to ``x``."""
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            y = y * w
        if HAS_BIAS:
            y = y + b
        if HAS_SCALE:  # FiLM (use_scale_shift_norm): h * (1 + scale) + shift
            y = y * (1.0 + sc)
        if HAS_SHIFT:
            y = y + sh
        return y


def group_norm_act_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], film_scale: Optional[Tensor],
                       film_shift: Optional[Tensor], num_groups: int, eps: float, apply_silu: bool) -> Tensor:
    """Pure-torch reference of the math above, in fp32: [silu](GN(x)·w + b [·(1 + scale) + shift]).

    The reference of ``fusediff::group_norm_silu`` (cast to x's dtype) and the activation that
    ``fusediff::group_norm_quantize`` quantizes. FiLM tensors are (N, C) or (N, C) + trailing 1s.
    """
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
