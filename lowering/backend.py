"""``torch.compile(model, backend="fusediff")``.

The backend receives dynamo's torch-function-level graph, rewrites matched sites into
``fusediff::`` custom ops (fxpasses), then hands the graph to inductor's ``compile_fx`` so
everything else is still compiled (DESIGN.md: rewriting later, after aot_autograd, hides
patterns). The ``torch_dynamo_backends`` entry point registers ``"fusediff"`` at install time.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from fxpasses.config import RewriteConfig
from fxpasses.match import PassResult
from lowering.transform import OptimizeConfig, rewrite_graph
from lowering.verify import VerifyFailure

log = logging.getLogger("fusediff.lowering")

#: Results of the most recent compilations (newest last), for reports and tests.
LAST_RESULTS: list[PassResult] = []
#: Regions verify mode sent back to the original ops, newest last.
VERIFY_FAILURES: list[VerifyFailure] = []
_MAX_KEEP = 16


class FusediffBackendError(RuntimeError):
    pass


def _check_grad_mode(gm: fx.GraphModule) -> None:
    if torch.is_grad_enabled():
        raise FusediffBackendError(
            "fusediff: compiling with autograd enabled is not supported (the fused ops have no "
            "backward). Run inference under torch.no_grad() or torch.inference_mode().")


def make_backend(config: OptimizeConfig | RewriteConfig | None = None, *, inner: str = "inductor",
                 strict_grad: bool = True) -> Callable[[fx.GraphModule, list], Callable]:
    """Build a dynamo backend.

    Args:
        config: which patterns to rewrite, selection policy and verify mode
            (:class:`OptimizeConfig`, or a :class:`RewriteConfig` for the patterns alone).
        inner: ``"inductor"`` (compile the rest) or ``"eager"`` (run the rewritten graph as is;
            useful on CPU where an inductor compile costs a minute).
        strict_grad: raise a clear error when compiled with grad enabled; when False, fall back
            to ``inner`` on the original graph instead.
    Returns:
        A callable usable as ``torch.compile(model, backend=...)``.
    """
    cfg = OptimizeConfig(rewrite=config) if isinstance(config, RewriteConfig) else (config or OptimizeConfig())
    if not isinstance(cfg, OptimizeConfig):
        raise TypeError(f"fusediff.backend: config must be OptimizeConfig or RewriteConfig, got {type(config).__name__}")
    if inner not in ("inductor", "eager"):
        raise ValueError(f"make_backend: inner must be 'inductor' or 'eager', got {inner!r}")

    def _backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        if torch.is_grad_enabled():
            if strict_grad:
                _check_grad_mode(gm)
            log.warning("fusediff: grad enabled, graph left unrewritten")
        else:
            real = [x for x in example_inputs if isinstance(x, torch.Tensor)]
            fake = any(isinstance(x, torch._subclasses.FakeTensor) for x in real)
            device = real[0].device if real else torch.device("cpu")
            res, failures = rewrite_graph(gm, cfg, device, None if fake else list(example_inputs))
            VERIFY_FAILURES.extend(failures)
            LAST_RESULTS.append(res)
            del LAST_RESULTS[:-_MAX_KEEP]
        if inner == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    _backend.__name__ = "fusediff"
    return _backend


def fusediff_backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """The default backend registered as ``"fusediff"`` (all patterns, inductor for the rest)."""
    return make_backend()(gm, example_inputs)


def backend(config: RewriteConfig | None = None, **kwargs: Any) -> Callable:
    """``torch.compile(model, backend=fusediff.backend(config))`` with options; see :func:`make_backend`."""
    return make_backend(config, **kwargs)
