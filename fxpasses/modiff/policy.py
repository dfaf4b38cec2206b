"""MoDiff layer policy: :func:`plan` decides which conv/linear layers are quantized, and why.

Each decision is a :class:`~fxpasses.modiff.config.LayerDecision` with its reason in the
:class:`~fxpasses.modiff.config.QuantReport`: time/class embeddings (``QuantConfig.exclude``) and
the first and the last conv of the model (found structurally: the first/last conv executed in an
example forward, or registered when no example is given) stay float; convs the kernels cannot run
(groups, dilation, non-square kernels, padding modes) stay float; ``include``,
``quantize_attention_proj`` and ``quantize_ff`` narrow the set further. Linears fed by the text
context get the context K/V role (computed once per trajectory). The layers that are quantized
run the low-bit GEMMs of "Real-Time On-Device Diffusion: Practical Acceleration via Fused Low-Bit
Kernels" (eq. 4-7).
"""
from __future__ import annotations

import fnmatch
from typing import Optional

import torch
import torch.nn as nn

from .calibration import Calibration
from .config import LayerDecision, QuantConfig, QuantReport
from .layers import _kind, _standard_layer

__all__ = ["plan"]

_CONTEXT_KWARGS = ("encoder_hidden_states", "context", "cond", "c_crossattn")
_CONTEXT_NAMES = ("to_k", "to_v", "add_k_proj", "add_v_proj")
_FF_CLASSES = ("FeedForward", "GEGLU", "GELU", "ApproximateGELU", "SwiGLU", "GLU")


def _conv_support(conv: nn.Module, kind: str) -> Optional[str]:
    """None when the int8 conv kernel can run this conv, else the reason it cannot."""
    if conv.groups != 1:
        return f"groups={conv.groups} (kernel supports groups=1)"
    if any(d != 1 for d in conv.dilation):
        return f"dilation={tuple(conv.dilation)} (kernel supports 1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (kernel supports 'zeros')"
    if kind == "conv1d":
        if conv.kernel_size != (1,) or conv.stride != (1,) or conv.padding not in ((0,), "valid"):
            return f"Conv1d with kernel {conv.kernel_size}, stride {conv.stride} (only 1x1 Conv1d is supported)"
        return None
    kh, kw = conv.kernel_size
    if kh != kw:
        return f"non-square kernel {conv.kernel_size}"
    if conv.stride[0] != conv.stride[1]:
        return f"stride {tuple(conv.stride)} differs per axis"
    if isinstance(conv.padding, str):
        if conv.padding == "same" and (kh % 2 == 0 or conv.stride[0] != 1):
            return "padding='same' with an even kernel or stride > 1"
    elif conv.padding[0] != conv.padding[1]:
        return f"padding {tuple(conv.padding)} differs per axis"
    return None


def _matches(path: str, pattern: str) -> bool:
    if path == pattern or path.startswith(pattern + ".") or pattern in path.split("."):
        return True
    return any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(path, pattern)


def _owner_classes(model: nn.Module, path: str) -> list[nn.Module]:
    """The non-container ancestors of ``path``, nearest first."""
    parts = path.split(".")
    mods = [model]
    cur = model
    for p in parts[:-1]:
        cur = getattr(cur, p)
        mods.append(cur)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return [m for m in reversed(mods) if not isinstance(m, containers)]


def _is_attention(m: nn.Module) -> bool:
    name = type(m).__name__
    return "Attention" in name or "Attn" in name


def _is_ff(owners: list[nn.Module]) -> bool:
    return any(type(m).__name__ in _FF_CLASSES or "FeedForward" in type(m).__name__ for m in owners)


def _structural_context(owners: list[nn.Module], name: str) -> bool:
    if not owners or name not in _CONTEXT_NAMES:
        return False
    att = owners[0]
    return _is_attention(att) and bool(getattr(att, "is_cross_attention", getattr(att, "is_cross", False)))


@torch.no_grad()
def _trace(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[str], set[str]]:
    """Execution order of conv/linear modules and the linears fed directly by a context input."""
    ctx = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 3]
    ctx += [v for v in args[1:] if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 3]
    order: list[str] = []
    fed: set[str] = set()
    hooks = []

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a is b:
            return True
        if a.device.type == "meta" or b.device.type == "meta":
            return False
        return a.shape == b.shape and a.dtype == b.dtype and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()

    for path, mod in model.named_modules():
        kind = _kind(mod)
        if kind is None:
            continue

        def _hook(m, a, _path=path, _kind=kind):
            if _path not in order:
                order.append(_path)
            if _kind == "linear" and a and isinstance(a[0], torch.Tensor) and any(same(a[0], c) for c in ctx):
                fed.add(_path)

        hooks.append(mod.register_forward_pre_hook(_hook))
    try:
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return order, fed


def plan(model: nn.Module, config: Optional[QuantConfig] = None, example_args: tuple = (),
         example_kwargs: Optional[dict] = None, calibration: Optional[Calibration] = None) -> QuantReport:
    """Decide, without changing ``model``, which conv/linear layers :func:`quantize` would replace.

    With example inputs the float model is run once (works on the ``meta`` device) to find the
    first/last conv by execution order and the linears fed by the text context; without, the
    first/last registered convs and attention-module structure (``is_cross_attention``) are used.
    """
    cfg = config or QuantConfig()
    kwargs = example_kwargs or {}
    traced = bool(example_args or kwargs)
    order, fed = _trace(model, tuple(example_args), kwargs) if traced else ([], set())
    cands = [(p, m, _kind(m)) for p, m in model.named_modules() if _kind(m) is not None]
    convs = [p for p, m, k in cands if k in ("conv2d", "conv1d")]
    run_convs = [p for p in order if p in set(convs)] if traced else convs
    first_last = {run_convs[0]: "first", run_convs[-1]: "last"} if run_convs else {}
    report = QuantReport(config=cfg)
    for path, mod, kind in cands:
        name = path.rsplit(".", 1)[-1]
        owners = _owner_classes(model, path)
        shape = tuple(mod.weight.shape)
        mod = _standard_layer(mod)
        reason, role = "", "act"
        excl = next((p for p in cfg.exclude if _matches(path, p)), None)
        if getattr(mod, "lora_layer", None) is not None:
            reason = "LoRA layer attached (fuse LoRA into the weight first)"
        elif excl is not None:
            reason = f"excluded by pattern {excl!r} (kept float)"
        elif cfg.include and not any(_matches(path, p) for p in cfg.include):
            reason = "not matched by QuantConfig.include"
        elif cfg.keep_first_last and path in first_last:
            reason = f"{first_last[path]} conv of the model (kept float)"
        elif kind != "linear" and (why := _conv_support(mod, kind)) is not None:
            reason = f"unsupported conv: {why}"
        elif owners and _is_attention(owners[0]) and not cfg.quantize_attention_proj:
            reason = "attention projection (QuantConfig.quantize_attention_proj=False)"
        elif kind == "linear" and _is_ff(owners) and not cfg.quantize_ff:
            reason = "feed-forward (QuantConfig.quantize_ff=False)"
        elif traced and path not in order:
            reason = "not executed by the example forward (kept float)"
        elif cfg.smoothquant and (calibration is None or path not in calibration.act_absmax):
            reason = "smoothquant=True but no calibration statistics for this layer (kept float)"
        if reason:
            report.layers.append(LayerDecision(path, kind, False, reason, "", shape))
            continue
        is_ctx = kind == "linear" and cfg.context_kv_once and (path in fed if traced else _structural_context(owners, name))
        if is_ctx:
            role = "context"
            reason = "quantized; context K/V computed once per trajectory"
        else:
            reason = "quantized"
        report.layers.append(LayerDecision(path, kind, True, reason, role, shape))
    return report
