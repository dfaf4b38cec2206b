"""The one table of float tolerances used by every test.

Two rules (docs/architecture.md, "Tests"):
* fp32: fixed ``atol``/``rtol`` below (the kernel and the reference compute the same math in fp32;
  only reduction order differs).
* fp16/bf16: the kernel's max error against an fp32 reference may be at most ``LOWP_ERR_RATIO`` x
  the error of eager PyTorch in the same dtype against that same reference (Liger's rule), with a
  floor ``LOWP_FLOOR`` for ops where eager is (nearly) exact.
Quantized ops: integer accumulators compare exactly; dequantized outputs by SQNR (``SQNR_DB``).
"""
from __future__ import annotations

import math

import torch

# dtype -> (atol, rtol) for direct comparisons against a same-dtype reference.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# Looser fp32 table for long reductions (attention over 1k+ keys, Winograd transforms).
TOL_LONG_REDUCTION: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# Winograd F(4x4,3x3) amplifies rounding (transform matrices have entries up to 8 in magnitude).
TOL_WINOGRAD: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-3, 1e-3),
    torch.float16: (3e-2, 3e-2),
    torch.bfloat16: (1.5e-1, 1.5e-1),
}

LOWP_ERR_RATIO = 2.0
LOWP_FLOOR: dict[torch.dtype, float] = {torch.float16: 1e-3, torch.bfloat16: 8e-3}

# Minimum SQNR (dB) of dequantized outputs vs the float reference.
SQNR_DB: dict[str, float] = {"int8": 28.0, "int4": 14.0}

# Quantized models in another runtime (ONNX Runtime vs PyTorch, tests/lowering/test_onnx_modiff.py).
# A quantized net is discontinuous: a 1e-7 float difference upstream can move a value across a
# rounding boundary (one level), so parity is judged like quantization itself, by SQNR and by
# error against the float model, not by a fixed atol.
# One step from identical inputs and caches: measured 54 dB (zoo:ddpm MoDiff W8A8, integer step),
# >= 100 dB on the float first step.
ONNX_QUANT_STEP_SQNR_DB: float = 35.0
# A whole trajectory: the runtime's error against the FP32 trajectory may be at most this ratio x
# PyTorch's own quantization error (plus a floor). Measured (digits, DDIM-10, 8 samples): final
# latent error vs FP32 MoDiff W8A8 ORT 0.008 / PyTorch 0.025; W8A4 0.075 / 0.055; baseline W8A8
# 0.044 / 0.065: the two runtimes draw different rounding noise of the same size.
QUANT_TRAJECTORY_ERR_RATIO: float = 2.0
QUANT_TRAJECTORY_ERR_FLOOR: float = 0.01

# End-to-end model parity (rewritten graph vs eager, fp32).
MODEL_TOL: tuple[float, float] = (1e-4, 1e-4)
# Whole sampling trajectories (errors compound over steps), fp32. Measured: DDIMPipeline on the
# random-weight ddpm fixture, 25 steps, max |fused - eager| = 1.5e-3 on [0, 1] images (3 of 1536
# values above 1e-3); the 6-step CI runs also passed at (1e-3, 1e-3).
TRAJECTORY_TOL: tuple[float, float] = (5e-3, 5e-3)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, table=TOL) -> None:
    """Compare with the (atol, rtol) of ``expected``'s dtype from ``table``."""
    atol, rtol = table[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


def assert_lowp_close(actual: torch.Tensor, ref_fp32: torch.Tensor, eager_lowp: torch.Tensor) -> None:
    """Liger's rule: |kernel - ref32| <= max(ratio * |eager_lowp - ref32|, floor), both as max-abs."""
    dtype = actual.dtype
    if dtype == torch.float32:
        assert_close(actual, ref_fp32.to(actual.dtype))
        return
    ref = ref_fp32.float()
    finite = torch.isfinite(ref)
    err_k = (actual.float() - ref)[finite].abs().max().item() if finite.any() else 0.0
    err_e = (eager_lowp.float() - ref)[finite].abs().max().item() if finite.any() else 0.0
    scale = max(1.0, ref[finite].abs().max().item() if finite.any() else 1.0)
    bound = max(LOWP_ERR_RATIO * err_e, LOWP_FLOOR[dtype] * scale)
    assert err_k <= bound, f"{dtype}: kernel max err {err_k:.3e} > bound {bound:.3e} (eager err {err_e:.3e})"
    # Non-finite positions must match exactly (NaN/Inf propagate like the reference).
    assert torch.equal(torch.isnan(actual), torch.isnan(ref_fp32.to(dtype))), "NaN pattern differs"


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's definition)."""
    s = signal.float().pow(2).mean().item()
    n = (signal.float() - approx.float()).pow(2).mean().item()
    if n == 0.0:
        return math.inf
    return 10.0 * math.log10(s / n)
