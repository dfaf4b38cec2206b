"""MoDiff low-bit inference for a whole model, by module surgery: :func:`quantize`, :func:`quant_report`.

``quantize(model, QuantConfig(...))`` replaces the model's ``nn.Conv2d`` / ``nn.Linear`` (and
1x1 ``nn.Conv1d``; diffusers' ``LoRACompatible*`` subclasses too) chosen by
:func:`fxpasses.modiff.policy.plan` by :class:`~fxpasses.modiff.layers.QuantConv2d` /
:class:`~fxpasses.modiff.layers.QuantLinear` ("Real-Time On-Device Diffusion: Practical
Acceleration via Fused Low-Bit Kernels", eq. 4-7), then sizes the caches
(:func:`fxpasses.modiff.lifecycle.allocate`) when given an example call. :func:`quant_report`
returns the per-layer decisions; :func:`dequantized_copy` is the float model with deQ(W), the
reference the MoDiff first step equals.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
import torch.nn as nn

from .calibration import Calibration, _smooth_factors
from .config import QuantConfig, QuantReport
from .layers import GainScaled, QuantConv2d, QuantLinear, _QuantLayer, _standard_layer
from .lifecycle import allocate
from .policy import plan

log = logging.getLogger("fusediff.fxpasses")

__all__ = ["quantize", "quant_report", "dequantized_copy"]


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def quantize(model: nn.Module, config: Optional[QuantConfig] = None, *, example_args: tuple = (),
             example_kwargs: Optional[dict] = None, calibration: Optional[Calibration] = None,
             inplace: bool = True) -> nn.Module:
    """Replace ``model``'s conv/linear layers by low-bit MoDiff (or baseline) modules.

    Args:
        model: a float model in eval mode (diffusers U-Nets, LDM/openaimodel nets, plain modules).
        config: :class:`QuantConfig` (default: MoDiff W8A8).
        example_args / example_kwargs: optional example call. The float model is run once to find
            the first/last conv and the context-fed linears structurally, then (MoDiff) once more
            quantized to size the caches (:func:`allocate`); the trajectory is reset afterwards.
        calibration: from :func:`calibrate`; required when ``config.smoothquant``.
        inplace: modify ``model`` (default, no second copy of the weights) or a deep copy.
    Returns:
        The quantized model (``model`` itself when ``inplace``); :func:`quant_report` gives the
        per-layer decisions.
    Example:
        >>> q = quantize(unet, QuantConfig(mode="modiff", w_bits=8, a_bits=4), example_args=(x, t))
        >>> with trajectory(q):
        ...     for t in timesteps:
        ...         eps = q(x, t).sample
    """
    cfg = config or QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"quantize: config must be a QuantConfig, got {type(cfg).__name__}")
    if cfg.smoothquant and not isinstance(calibration, Calibration):
        raise ValueError("QuantConfig.smoothquant=True needs calibration=calibrate(model, inputs, steps)")
    if not inplace:
        model = copy.deepcopy(model)
    if any(isinstance(m, _QuantLayer) for m in model.modules()):
        raise ValueError("quantize: the model already holds quantized layers; quantize the float model once")
    report = plan(model, cfg, example_args, example_kwargs, calibration)
    for d in report.layers:
        if not d.quantized:
            log.info("MoDiff: %s (%s) kept float: %s", d.path, d.kind, d.reason)
            continue
        orig = model.get_submodule(d.path)
        src = _standard_layer(orig)
        smooth = None
        if cfg.smoothquant:
            smooth = _smooth_factors(src.weight, calibration.act_absmax[d.path], float(cfg.smoothquant_alpha), d.kind)
        new = (QuantLinear if d.kind == "linear" else QuantConv2d)(src, cfg, d.path, d.role, smooth)
        if src is not orig:
            new = GainScaled(new)
        new.train(orig.training)
        _set_submodule(model, d.path, new)
    model._fusediff_quant_report = report  # plain attribute (not a module/buffer)
    log.info("MoDiff: quantized %d of %d conv/linear layers (%s)", len(report.quantized), len(report.layers), cfg.label)
    if example_args or example_kwargs:
        allocate(model, example_args, example_kwargs)
    return model


def quant_report(model: nn.Module) -> QuantReport:
    """The :class:`QuantReport` of a model returned by :func:`quantize`."""
    rep = getattr(model, "_fusediff_quant_report", None)
    if rep is None:
        raise ValueError("quant_report: model was not quantized by fxpasses.modiff.quantize")
    return rep


@torch.no_grad()
def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float copy of a quantized model: every quantized layer back to ``nn.Conv2d/Conv1d/Linear``
    holding deQ(W). The MoDiff first step of ``model`` equals this copy's forward (the reference
    for tests and error studies)."""
    out = copy.deepcopy(model)
    for path, m in [(p, m) for p, m in out.named_modules() if isinstance(m, _QuantLayer)]:
        w = m.weight
        b = m.bias
        if isinstance(m, QuantLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=b is not None, device=w.device, dtype=w.dtype)
        elif m.is_1d:
            new = nn.Conv1d(m.in_channels, m.out_channels, 1, bias=b is not None, device=w.device, dtype=w.dtype)
        else:
            new = nn.Conv2d(m.in_channels, m.out_channels, m.k_size, stride=m.stride, padding=m.padding,
                            bias=b is not None, device=w.device, dtype=w.dtype)
        if m.smooth_inv is not None:
            raise ValueError("dequantized_copy: SmoothQuant layers scale the activation; no plain float equivalent")
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
        _set_submodule(out, path, new.eval())
    if hasattr(out, "_fusediff_quant_report"):
        del out._fusediff_quant_report
    return out
