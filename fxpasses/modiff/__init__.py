"""MoDiff low-bit inference (INT8/INT4) for whole diffusion models: module surgery and graph level.

Modulated Diffusion as "Real-Time On-Device Diffusion: Practical Acceleration via Fused Low-Bit
Kernels" builds its kernels for (eq. 4-7: quantize the temporal difference of each layer's input
against the â/ô caches). ``quantize(model, QuantConfig(...))`` replaces the model's conv/linear
layers by low-bit ones calling the ``fusediff::`` ops; ``torch.compile(unet,
backend=fusediff.backend(quant=...))`` does the same on a dynamo graph (:mod:`.graph`). Modules:

* :mod:`.config`: :class:`QuantConfig`, :class:`LayerDecision`, :class:`QuantReport`;
* :mod:`.calibrate`: SmoothQuant statistics (:func:`calibrate`, :class:`Calibration`);
* :mod:`.layers`: :class:`QuantConv2d`, :class:`QuantLinear`, :class:`GainScaled` (eq. 6-7, the
  per-layer caches and shape guard, context K/V once per trajectory);
* :mod:`.plan`: the layer policy (:func:`plan`: which layers are quantized, and why);
* :mod:`.lifecycle`: the trajectory (:func:`allocate`/:func:`prepare`, :func:`reset`,
  :func:`trajectory`, :func:`preserve_state`, :func:`cache_bytes`, :func:`quant_layers`,
  :func:`register_graph_layers`);
* :mod:`.explicit_state`: the caches as call inputs/outputs for the ONNX export
  (:class:`ExplicitStateModel`, :func:`state_slots`);
* :mod:`.quantize`: :func:`quantize`, :func:`quant_report`, :func:`dequantized_copy`;
* :mod:`.traffic`: the analytic DRAM model (:func:`layer_shapes`, :func:`dram_transfer`);
* :mod:`.graph`: ``backend(quant=...)`` (:func:`~.graph.quantize_graph`, per-shape static copies,
  one trajectory at a time across a model's graphs); imported by ``lowering.backend``, not here.

The GroupNorm -> quantizer fusion (paper Fig. 1 left) of both paths is the pattern file
``fxpasses/patterns/gn_quant.py`` (:func:`fuse_group_norm_quantize` re-exported here).
"""
from __future__ import annotations

from ..patterns.gn_quant import fuse_group_norm_quantize, group_norm_args, is_group_norm_silu  # noqa: F401
from .calibration import Calibration, calibrate
from .config import DEFAULT_EXCLUDE, LayerDecision, QuantConfig, QuantReport
from .explicit import ExplicitIO, ExplicitStateModel, StateSlot, explicit_state, state_slots
from .layers import GainScaled, QuantConv2d, QuantLinear, _QuantLayer  # noqa: F401  (_QuantLayer: isinstance checks)
from .lifecycle import (allocate, cache_bytes, prepare, preserve_state, quant_layers, register_graph_layers, reset,
                        trajectory)
from .policy import plan
from .surgery import dequantized_copy, quant_report, quantize
from .traffic import LayerShape, dram_transfer, layer_shapes

__all__ = [
    "DEFAULT_EXCLUDE",
    "QuantConfig",
    "LayerDecision",
    "QuantReport",
    "Calibration",
    "QuantConv2d",
    "QuantLinear",
    "plan",
    "quantize",
    "quant_report",
    "quant_layers",
    "allocate",
    "prepare",
    "reset",
    "trajectory",
    "preserve_state",
    "cache_bytes",
    "calibrate",
    "dequantized_copy",
    "LayerShape",
    "layer_shapes",
    "dram_transfer",
    "fuse_group_norm_quantize",
    "StateSlot",
    "ExplicitIO",
    "explicit_state",
    "state_slots",
    "ExplicitStateModel",
    "GainScaled",
    "register_graph_layers",
]
