"""Whether Winograd F(4x4, 3x3) pays for a conv, and how much error it adds.

The kernel family itself (Triton kernels, launcher, ``fusediff::winograd_conv2d`` and its fake,
the pure-torch reference, the weight transform) is :mod:`fusediff.kernels.winograd`; this module
holds the policy the Winograd rewrite (:mod:`fxpasses.patterns.conv`, ``RewriteConfig.winograd
="auto"``) asks, and a diagnostic:

* :func:`winograd_pays`: metadata-only rules (CUDA, 3x3, stride 1, dilation 1, groups 1, padding
  0/1, enough channels, 16-bit activations, enough well-filled tiles) and a roofline model
  (:func:`_modelled_times`) of direct conv vs Winograd, for the kernel variant
  ``kernels.winograd.FUSED_OUTPUT_TRANSFORM`` picks. The thresholds below are module-level and
  not yet calibrated on a GPU (docs/kernels/winograd.md).
* :func:`winograd_error_report`: the error of Winograd and of direct conv against a float64
  direct conv, in fp32 and in the input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...kernels import _common
from ...kernels import winograd as winograd_kernels
from ...kernels.winograd import _geometry, winograd_conv2d, winograd_weight_transform

# winograd_pays heuristics (a roofline model; not yet calibrated on a GPU, see the docs).
MIN_CHANNELS = 64  # below: GEMMs too thin for tensor cores, transforms dominate
MIN_SPATIAL = 8  # H, W below this: few tiles, large tail waste
MIN_TILE_FILL = 0.75  # useful fraction of the ceil(Ho/4) x ceil(Wo/4) tile grid
MIN_SPEEDUP = 1.25  # modelled direct/winograd time ratio needed (covers Triton vs cuDNN efficiency)
RIDGE_FLOP_PER_BYTE = 300.0  # H100 SXM: ~990 dense fp16 TFLOP/s / ~3.35 TB/s HBM3


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"fusediff.winograd_pays: {name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _modelled_times(n: int, cin: int, cout: int, h: int, w: int, padding: int, fused: bool) -> tuple[float, float]:
    """Roofline time (in bytes-equivalent) of direct conv and of this Winograd, 16-bit activations."""
    ho, wo, _, _, p = _geometry((n, cin, h, w), padding)
    direct_flops = 2.0 * n * cout * cin * 9 * ho * wo
    direct_bytes = 2.0 * (n * cin * h * w + n * cout * ho * wo + 9 * cin * cout)
    wino_flops = 2.0 * 36 * cin * cout * p
    wino_bytes = (
        2.0 * n * cin * h * w  # x
        + 2 * 2.0 * 36 * cin * p  # V written and read
        + 4.0 * 36 * cin * cout  # U (fp32)
        + 2.0 * n * cout * ho * wo  # y
        + (0.0 if fused else 2 * 4.0 * 36 * cout * p)  # M written and read
    )
    t_direct = max(direct_flops / RIDGE_FLOP_PER_BYTE, direct_bytes)
    t_wino = max(wino_flops / RIDGE_FLOP_PER_BYTE, wino_bytes)
    return t_direct, t_wino


def winograd_pays(
    x_shape, weight_shape, device_type, *, stride=1, padding=1, dilation=1, groups=1, dtype=None
) -> tuple[bool, str]:
    """Whether Winograd F(4x4,3x3) should replace this conv, and why (metadata only).

    Paper 3.3 applies Winograd "based on heuristic rules, only where it would produce profitable
    results". Rules: CUDA only; 3x3, stride 1, dilation 1, groups 1, padding 0/1; Cin, Cout >=
    MIN_CHANNELS; fp16/bf16 activations (when dtype is given); H, W >= MIN_SPATIAL; tile fill >=
    MIN_TILE_FILL; and a roofline model (compute at RIDGE_FLOP_PER_BYTE vs the V/M/U traffic
    Winograd adds, 16-bit activations, the variant FUSED_OUTPUT_TRANSFORM picks) predicting
    >= MIN_SPEEDUP over direct conv.

    Args:
        x_shape: (N, Cin, H, W).
        weight_shape: (Cout, Cin, kh, kw).
        device_type: "cuda", "cpu", ...
        stride, padding, dilation, groups: the conv's (ints or pairs); defaults are the supported case.
        dtype: activation dtype if known; float32 is refused (the GEMM would run on CUDA cores).
    Returns:
        (pays, reason).
    """
    if device_type == "cpu":
        return False, "cpu: direct conv is used"
    if device_type != "cuda":
        return False, f"{device_type}: no Triton Winograd kernel for this device; direct conv is used"
    if len(x_shape) != 4 or len(weight_shape) != 4:
        return False, f"needs 4-D input and weight, got {tuple(x_shape)} and {tuple(weight_shape)}"
    n, cin, h, w = (int(s) for s in x_shape)
    cout, wcin, kh, kw = (int(s) for s in weight_shape)
    if (kh, kw) != (3, 3):
        return False, f"kernel size {kh}x{kw}: only 3x3 (F(4x4,3x3))"
    if _pair(stride, "stride") != (1, 1):
        return False, f"stride {stride}: only stride 1"
    if _pair(dilation, "dilation") != (1, 1):
        return False, f"dilation {dilation}: only dilation 1"
    if groups != 1:
        return False, f"groups {groups}: only groups 1"
    pad = _pair(padding, "padding")
    if pad[0] != pad[1] or pad[0] not in (0, 1):
        return False, f"padding {padding}: only symmetric padding 0 or 1"
    if wcin != cin:
        return False, f"weight Cin {wcin} != input channels {cin}"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False, f"dtype {dtype}: the Winograd GEMM uses tensor cores only for float16/bfloat16"
    if cin < MIN_CHANNELS or cout < MIN_CHANNELS:
        return False, f"Cin={cin}, Cout={cout} < {MIN_CHANNELS}: GEMMs too thin, transforms dominate"
    if h < MIN_SPATIAL or w < MIN_SPATIAL:
        return False, f"spatial {h}x{w} < {MIN_SPATIAL}x{MIN_SPATIAL}: too few tiles"
    ho, wo, th, tw, p = _geometry((n, cin, h, w), pad[0])
    fill = ho * wo / (16.0 * th * tw)
    if fill < MIN_TILE_FILL:
        return False, f"tile fill {fill:.2f} < {MIN_TILE_FILL}: {ho}x{wo} output wastes too much of its 4x4 tiles"
    t_direct, t_wino = _modelled_times(n, cin, cout, h, w, pad[0], winograd_kernels.FUSED_OUTPUT_TRANSFORM)
    ratio = t_direct / t_wino
    if ratio < MIN_SPEEDUP:
        return False, (
            f"modelled speedup {ratio:.2f}x < {MIN_SPEEDUP}x: the V/M/U traffic Winograd adds outweighs "
            f"its 4x fewer multiplications at {p} tiles"
        )
    return True, f"modelled speedup {ratio:.2f}x (4x fewer multiplications, {p} tiles, fill {fill:.2f})"


def winograd_error_report(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> dict:
    """Error of Winograd and of direct conv against a float64 direct conv, in fp32 and x.dtype.

    ``*_max_abs`` is the max absolute error, ``*_rel`` that divided by ``output_scale`` (max |y|
    of the float64 result). Winograd runs through the op (the Triton kernel where it dispatches).

    Returns:
        dict with dtype, path, output_scale, winograd_fp32_{max_abs,rel}, direct_fp32_{max_abs,rel},
        winograd_{max_abs,rel}, direct_{max_abs,rel} (x.dtype) and error_ratio (winograd/direct
        max_abs in x.dtype).
    """
    u = winograd_weight_transform(weight)
    with torch.no_grad():
        wide = torch.float32 if x.device.type == "mps" else torch.float64
        b_wide = bias.to(wide) if bias is not None else None
        truth = F.conv2d(x.to(wide), weight.to(wide), b_wide, padding=padding)
        scale = max(truth.abs().max().item() if truth.numel() else 0.0, 1e-30)
        b32 = bias.float() if bias is not None else None
        w_fp32 = winograd_conv2d(x.float(), u, b32, padding)
        d_fp32 = F.conv2d(x.float(), weight.float(), b32, padding=padding)
        bl = bias.to(x.dtype) if bias is not None else None
        w_lp = winograd_conv2d(x, u, bl, padding)
        d_lp = F.conv2d(x, weight.to(x.dtype), bl, padding=padding)

    def err(y: Tensor) -> float:
        return (y.to(wide) - truth).abs().max().item() if y.numel() else 0.0

    out = {
        "dtype": str(x.dtype).replace("torch.", ""),
        "path": _common.choose_path(x, u),
        "output_scale": scale,
        "winograd_fp32_max_abs": err(w_fp32),
        "direct_fp32_max_abs": err(d_fp32),
        "winograd_max_abs": err(w_lp),
        "direct_max_abs": err(d_lp),
    }
    for k in ("winograd_fp32", "direct_fp32", "winograd", "direct"):
        out[f"{k}_rel"] = out[f"{k}_max_abs"] / scale
    out["error_ratio"] = out["winograd_max_abs"] / max(out["direct_max_abs"], 1e-30)
    return out
