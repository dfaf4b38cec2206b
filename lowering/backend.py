"""``torch.compile(model, backend="fusediff")``.

The backend receives dynamo's torch-function-level graph, rewrites matched sites into
``fusediff::`` custom ops (fxpasses), then hands the graph to inductor's ``compile_fx`` so
everything else is still compiled (docs/architecture.md, "Capture": rewriting
later, after aot_autograd, hides patterns). The ``torch_dynamo_backends`` entry point registers ``"fusediff"`` at install time.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from ..fxpasses.config import RewriteConfig
from ..fxpasses.modiff import QuantConfig, QuantReport
from ..fxpasses.modiff import graph as quant_graph
from ..fxpasses.pipeline import PassResult
from .transform import OptimizeConfig, pipeline
from .verify import VerifyFailure

log = logging.getLogger("fusediff.lowering")

#: Results of the most recent compilations (newest last), for reports and tests.
LAST_RESULTS: list[PassResult] = []
#: Regions verify mode sent back to the original ops, newest last.
VERIFY_FAILURES: list[VerifyFailure] = []
#: Per-layer decisions of the most recent ``backend(quant=...)`` compilations, newest last.
LAST_QUANT_REPORTS: list[QuantReport] = []
_MAX_KEEP = 16


class FusediffBackendError(RuntimeError):
    pass


def _check_grad_mode(gm: fx.GraphModule) -> None:
    if torch.is_grad_enabled():
        raise FusediffBackendError(
            "fusediff: compiling with autograd enabled is not supported (the fused ops have no "
            "backward). Run inference under torch.no_grad() or torch.inference_mode().")


def make_backend(config: OptimizeConfig | RewriteConfig | QuantConfig | None = None, *, inner: str = "inductor",
                 strict_grad: bool = True, quant: QuantConfig | None = None,
                 mode: str | None = None) -> Callable[[fx.GraphModule, list], Callable]:
    """Build a dynamo backend.

    Args:
        config: which patterns to rewrite, selection policy and verify mode
            (:class:`OptimizeConfig`, or a :class:`RewriteConfig` for the patterns alone, or a
            :class:`QuantConfig` for ``quant``).
        inner: ``"inductor"`` (compile the rest) or ``"eager"`` (run the rewritten graph as is;
            useful on CPU where an inductor compile costs a minute).
        strict_grad: raise a clear error when compiled with grad enabled; when False, fall back
            to ``inner`` on the original graph instead.
        quant: MoDiff/baseline low-bit quantization of the graph's conv2d/linear calls
            (:mod:`fxpasses.modiff.graph`; also ``OptimizeConfig.quant``). The caches live in the
            compiled graph; ``fusediff.reset(model)`` / ``with fusediff.trajectory(model):`` reach
            them. Weights are quantized at compile time; a graph with symbolic shapes is compiled
            again per concrete shape (MoDiff caches have one shape).
        mode: inductor's ``torch.compile`` mode for the rest of the graph (``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``, ...; ``torch.compile(mode=...)`` itself only applies to
            ``backend="inductor"``). ``None``: inductor's defaults.
    Returns:
        A callable usable as ``torch.compile(model, backend=...)``.
    Example:
        >>> fast = torch.compile(unet, backend=fusediff.backend(quant=fusediff.QuantConfig(a_bits=4)))
        >>> with torch.no_grad(), fusediff.trajectory(unet):
        ...     for t in timesteps:
        ...         eps = fast(x, t).sample
    """
    if isinstance(config, QuantConfig):
        config, quant = None, quant or config
    cfg = OptimizeConfig(rewrite=config) if isinstance(config, RewriteConfig) else (config or OptimizeConfig())
    if not isinstance(cfg, OptimizeConfig):
        raise TypeError(f"fusediff.backend: config must be OptimizeConfig, RewriteConfig or QuantConfig, got "
                        f"{type(config).__name__}")
    quant = quant or cfg.quant
    if quant is not None and not isinstance(quant, QuantConfig):
        raise TypeError(f"fusediff.backend: quant must be a QuantConfig, got {type(quant).__name__}")
    if quant is not None:  # quantized convs are not Winograd candidates
        cfg = dataclasses.replace(cfg, quant=quant, rewrite=dataclasses.replace(cfg.rewrite, winograd="off"))
    if inner not in ("inductor", "eager"):
        raise ValueError(f"make_backend: inner must be 'inductor' or 'eager', got {inner!r}")
    patches = None
    if mode is not None:
        from torch._inductor import list_mode_options

        if mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"make_backend: mode {mode!r}; allowed values are 'default', 'reduce-overhead', "
                             "'max-autotune', 'max-autotune-no-cudagraphs'")
        patches = dict(list_mode_options(mode))

    def _backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        if torch.is_grad_enabled():
            if strict_grad:
                _check_grad_mode(gm)
            log.warning("fusediff: grad enabled, graph left unrewritten")
        else:
            real = [x for x in example_inputs if isinstance(x, torch.Tensor)]
            fake = any(isinstance(x, torch._subclasses.FakeTensor) for x in real)
            device = real[0].device if real else torch.device("cpu")
            res = pipeline(cfg, None if fake else list(example_inputs)).run(gm, device=device)
            VERIFY_FAILURES.extend(res.failures)
            LAST_RESULTS.append(res)
            del LAST_RESULTS[:-_MAX_KEEP]
            if quant is not None:
                if fake:
                    raise FusediffBackendError("fusediff: backend(quant=...) needs the real weights among the "
                                               "example inputs; this graph came with fake tensors")
                if quant_graph.is_symbolic(gm, list(example_inputs)):
                    return _PerShape(gm, example_inputs, _backend, quant)
                LAST_QUANT_REPORTS.append(quant_graph.quantize_graph(gm, list(example_inputs), quant))
                del LAST_QUANT_REPORTS[:-_MAX_KEEP]
                return quant_graph.guard_trajectory(compile_inner(gm, example_inputs), gm, list(example_inputs), quant)
        return compile_inner(gm, example_inputs)

    def compile_inner(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        if inner == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=patches)

    _backend.__name__ = "fusediff"
    return _backend


class _PerShape:
    """A graph dynamo traced with symbolic shapes (``dynamic=True``, or its automatic dynamic shapes
    after a batch/resolution change) under ``backend(quant=...)``: MoDiff caches have one shape, so
    each concrete input shape compiles a static copy of the graph with the same backend
    (``torch.compile(copy, dynamic=False)``), quantized and trajectory-guarded like any static graph."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], backend: Callable, quant: QuantConfig) -> None:
        self.gm, self.backend, self.quant = gm, backend, quant
        self.user = [i for i, x in enumerate(example_inputs) if not isinstance(x, torch.nn.Parameter)]
        self.scalars = quant_graph.scalar_inputs(gm)  # baked into each copy: their values join the key
        self.graphs: dict[tuple, Callable] = {}
        self.own: dict[tuple, set[int]] = {}  # per copy: its graphs' trajectory states

    def __call__(self, *args: Any) -> Any:
        key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in (args[i] for i in self.user))
        key += tuple(args[i].item() for i in self.scalars)
        # here, not inside the nested compiled graph (an exception there unwinds through dynamo's frames)
        quant_graph.check_trajectory(list(args), self.quant, self.own.get(key, set()))
        fn = self.graphs.get(key)
        if fn is None:
            log.info("fusediff quant backend: compiling a static copy of a symbolic-shape graph for %s", key)
            fn = self.graphs[key] = torch.compile(quant_graph.specialize(self.gm, list(args)), backend=self.backend,
                                                  dynamic=False, fullgraph=True)
        before = quant_graph.graph_states(list(args))
        out = fn(*args)
        self.own[key] = self.own.get(key, set()) | (quant_graph.graph_states(list(args)) - before)
        return out


def fusediff_backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """The default backend registered as ``"fusediff"`` (all patterns, inductor for the rest)."""
    return make_backend()(gm, example_inputs)


def backend(config: OptimizeConfig | RewriteConfig | QuantConfig | None = None, **kwargs: Any) -> Callable:
    """``torch.compile(model, backend=fusediff.backend(config, quant=...))`` with options; see :func:`make_backend`."""
    return make_backend(config, **kwargs)
