"""fusediff: fuse diffusion U-Net patterns into Triton kernels, on torch.fx.

Three ways in:

* ``torch.compile(unet, backend="fusediff")`` (or ``backend=fusediff.backend(config)``);
* ``fusediff.optimize(unet, config)``: an eager module with the rewritten graph inside;
* ``fusediff.inspect(unet, args, kwargs)`` / ``fusediff inspect`` on the CLI: what was found and
  rewritten, with tables and pictures (``fusediff.visualize``).
"""
from __future__ import annotations

import importlib as _importlib

from . import _layout

# kernels/, fxpasses/ and lowering/ install as fusediff.kernels|fxpasses|lowering (fusediff/_layout.py).
LAYOUT = _layout.mount(__name__, __path__[0])

#: Every kernels/ op-family file; importing fusediff registers all of their ``fusediff::`` ops.
KERNEL_FAMILIES = ("attention", "conv_int8", "geglu", "groupnorm", "linear_int8", "quantize", "softmax", "winograd")
for _family in KERNEL_FAMILIES:
    _importlib.import_module(f".kernels.{_family}", __name__)
del _family

from .fxpasses.api import Inspection
from .fxpasses.api import inspect_model as inspect
from .fxpasses.config import RewriteConfig
from .fxpasses.modiff import (QuantConfig, allocate, cache_bytes, calibrate, fuse_group_norm_quantize, prepare,
                              preserve_state, quant_report, quantize, reset, trajectory)
from .fxpasses.report import Report, build_report
from .fxpasses.sites import Site
from .fxpasses.viz import visualize
from .lowering.backend import backend
from .lowering.onnx import StatefulSession, export_onnx, run_onnx
from .lowering.transform import OptimizeConfig, OptimizedModule, optimize

__version__ = "0.1.0"

__all__ = [
    "Inspection", "OptimizeConfig", "OptimizedModule", "QuantConfig", "Report", "RewriteConfig", "Site",
    "allocate", "cache_bytes", "calibrate", "fuse_group_norm_quantize", "prepare", "preserve_state",
    "quant_report", "quantize", "reset", "trajectory",
    "backend", "build_report", "export_onnx", "inspect", "optimize", "run_onnx", "visualize", "__version__",
    "StatefulSession",
]
