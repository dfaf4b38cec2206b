"""SmoothQuant calibration for MoDiff: :func:`calibrate` and the per-channel migration factors.

:func:`calibrate` runs the float model on calibration inputs and records each conv/linear's
per-input-channel activation absmax (:class:`Calibration`); with
``QuantConfig(smoothquant=True)``, :func:`fxpasses.modiff.quantize` moves activation outliers into
the weights by ``s_j = amax_x_j^α / amax_w_j^(1-α)`` (:func:`_smooth_factors`) before the weights
are quantized, so the low-bit layers of "Real-Time On-Device Diffusion: Practical Acceleration via
Fused Low-Bit Kernels" (eq. 4-7) see a flatter activation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .layers import _kind

__all__ = ["Calibration", "calibrate"]


@dataclass
class Calibration:
    """Per-input-channel activation absmax of each conv/linear, from :func:`calibrate`."""

    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: int = 0


def _as_call(item: Any) -> tuple[tuple, dict]:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple) and isinstance(item[1], dict):
        return item[0], item[1]
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise TypeError(f"calibrate: inputs must yield tensors, tuples of args or (args, kwargs) pairs, got "
                    f"{type(item).__name__}")


def _in_channel_absmax(x: torch.Tensor, kind: str) -> torch.Tensor:
    x = x.detach().float()
    if kind == "linear":
        return x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
    return x.transpose(0, 1).reshape(x.shape[1], -1).abs().amax(dim=1)


@torch.no_grad()
def calibrate(model: nn.Module, inputs: Iterable[Any], steps: Optional[int] = None,
              progress: bool = True) -> Calibration:
    """Run the float ``model`` on calibration inputs and record per-input-channel activation absmax.

    Args:
        model: the float model (before :func:`quantize`).
        inputs: an iterable of model calls: tensors (one positional arg), tuples of args, or
            ``(args, kwargs)`` pairs -- e.g. the ``(x_t, t)`` of a float sampling trajectory.
        steps: how many calls to take from ``inputs`` (all when None); the progress bar's total.
        progress: show a tqdm progress bar.
    Returns:
        :class:`Calibration` for ``quantize(model, QuantConfig(smoothquant=True), calibration=...)``.
    Example:
        >>> cal = calibrate(unet, [((x_t, t), {}) for x_t, t in recorded], steps=len(recorded))
    """
    from tqdm.auto import tqdm

    cal = Calibration()
    hooks = []
    for path, mod in model.named_modules():
        kind = _kind(mod)
        if kind is None:
            continue

        def _hook(m, args, _path=path, _kind=kind):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            amax = _in_channel_absmax(args[0], _kind)
            old = cal.act_absmax.get(_path)
            cal.act_absmax[_path] = amax if old is None else torch.maximum(old, amax)

        hooks.append(mod.register_forward_pre_hook(_hook))
    try:
        it = iter(inputs)
        bar = tqdm(total=steps, desc="fusediff calibrate", disable=not progress)
        while steps is None or cal.calls < steps:
            try:
                item = next(it)
            except StopIteration:
                break
            args, kwargs = _as_call(item)
            model(*args, **kwargs)
            cal.calls += 1
            bar.update(1)
        bar.close()
    finally:
        for h in hooks:
            h.remove()
    if cal.calls == 0:
        raise ValueError("calibrate: inputs yielded no calls")
    return cal


def _smooth_factors(w: torch.Tensor, act_absmax: torch.Tensor, alpha: float, kind: str) -> torch.Tensor:
    """SmoothQuant s_j = amax_x_j^α / amax_w_j^(1-α) per input channel (clamped; 1 where unseen)."""
    wf = w.detach().float()
    w_in = wf.abs().amax(dim=0) if kind == "linear" else wf.transpose(0, 1).reshape(wf.shape[1], -1).abs().amax(dim=1)
    ax = act_absmax.to(w_in.device).float().clamp_min(1e-5)
    s = ax.pow(alpha) / w_in.clamp_min(1e-5).pow(1.0 - alpha)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.clamp(1e-2, 1e2)
