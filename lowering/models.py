"""Resolve a model spec (CLI / demo) into ``(model, args, kwargs)``.

Specs: ``zoo:<name>`` (fixture U-Nets, see ``fusediff.zoo``), ``digits`` (the shipped trained
DDPM U-Net), or ``package.module:function`` returning ``(model, args, kwargs)``.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch


def resolve(spec: str) -> tuple[torch.nn.Module, tuple, dict[str, Any]]:
    if spec.startswith("zoo:"):
        from ..zoo import build

        return build(spec[4:])
    if spec == "digits":
        from ..digits import load_digits_unet

        unet = load_digits_unet()
        x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        return unet, (x, torch.tensor([500, 500])), {}
    if ":" in spec:
        mod, fn = spec.split(":", 1)
        out = getattr(importlib.import_module(mod), fn)()
        if not (isinstance(out, tuple) and len(out) == 3):
            raise ValueError(f"{spec}: the factory must return (model, args, kwargs)")
        return out
    raise ValueError(f"unknown model spec {spec!r}: use zoo:<name>, digits, or module:function")
