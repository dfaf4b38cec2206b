"""Capture and rewrite: ``torch.export`` of the model with dynamic batch / spatial dims, then the
fusediff rewrite passes (the one pipeline, ``fxpasses.pipeline.Pipeline``, without selection). :func:`prepare` returns a
:class:`Prepared` graph (for a MoDiff-quantized model, the integer step and the float first step
as two captures with the caches as inputs/outputs) that :func:`export.export_graph` turns into ONNX
at any opset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .common import OnnxExportError, log
from .translate import fused_ops_in


def _dynamic_shapes(fn: Any, args: tuple, kwargs: dict, batch: bool, spatial: bool, caches: tuple = ()):
    """``Dim.AUTO`` on dim 0 of every tensor input (batch) and dims 2.. of rank-4 inputs (spatial).

    AUTO lets torch.export keep a dim static when the model needs it (no error), so the result
    says which dims really are dynamic. ``caches`` (MoDiff state inputs) get AUTO on every dim
    but the channel dim when ``spatial`` (a linear's (N, L, K) cache follows H*W), else on dim 0.
    """
    if not (batch or spatial):
        return None
    from torch.export import Dim, ShapesCollection

    sc = ShapesCollection()
    seen = False
    cache_ids = {id(c) for c in caches}
    for t in pytree.tree_leaves((args, kwargs)):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            continue
        spec: dict[int, Any] = {}
        if batch:
            spec[0] = Dim.AUTO
        if spatial and id(t) in cache_ids:
            channel = 1 if t.dim() == 4 else t.dim() - 1
            spec.update({i: Dim.AUTO for i in range(1, t.dim()) if i != channel})
        elif spatial and t.dim() == 4:
            spec[2] = Dim.AUTO
            spec[3] = Dim.AUTO
        if spec:
            sc[t] = spec
            seen = True
    return sc.dynamic_shapes(fn, args, kwargs) if seen else None


@dataclass
class Prepared:
    """A captured (and maybe rewritten) graph ready for :func:`export_graph`.

    Attributes:
        gm: the graph (``ep.module()`` of the dynamic-shape export, rewritten in place).
        args, kwargs: the example inputs it was captured with.
        result: the :class:`fxpasses.match.PassResult` (None when ``rewrite=False``).
        dynamic_batch, dynamic_spatial: what was requested.
    """

    gm: fx.GraphModule
    args: tuple
    kwargs: dict
    result: Any = None
    dynamic_batch: bool = True
    dynamic_spatial: bool = False
    fused_ops: list[str] = field(default_factory=list)
    exported: Any = None
    #: MoDiff state (:class:`fxpasses.modiff.StateSlot` list) when the model carries caches: then
    #: ``gm`` captures the integer step (:class:`fxpasses.modiff.ExplicitStateModel`, ``args`` =
    #: ``(model_args, model_kwargs, caches)``) and ``first`` the float first step (``args`` =
    #: ``(model_args, model_kwargs)``); :func:`export_graph` joins them under one ``If``.
    state: list = field(default_factory=list)
    first: "Prepared | None" = None
    model_inputs: int = 0
    quant: str = ""

    def _cache_examples(self) -> tuple:
        return tuple(self.args[2]) if self.state and self.first is not None else ()


def _unwrap(model_or_optimized: torch.nn.Module, rewrite_config):
    from ..transform import OptimizedModule

    if isinstance(model_or_optimized, OptimizedModule):
        cfg = rewrite_config or model_or_optimized._fd_config.rewrite
        return model_or_optimized.original, cfg
    if not isinstance(model_or_optimized, torch.nn.Module):
        raise TypeError(f"export_onnx: expected an nn.Module or OptimizedModule, got {type(model_or_optimized).__name__}")
    return model_or_optimized, rewrite_config


def prepare(model_or_optimized: torch.nn.Module, example_args: tuple, *, example_kwargs: dict | None = None,
            dynamic_batch: bool = True, dynamic_spatial: bool = False, rewrite: bool = True,
            rewrite_config=None) -> Prepared:
    """Capture ``model`` with ``torch.export`` (dynamic dims as requested) and run the rewrite passes.

    The first half of :func:`export_onnx`; use it to export one capture at several opsets. A
    MoDiff-quantized model (:func:`fxpasses.modiff.quantize`) is captured twice, as
    :class:`fxpasses.modiff.ExplicitStateModel` for its float first step and for its integer
    step, with the caches as inputs/outputs (sized by one first step on the example inputs; the
    model's own state is left as it was).
    """
    from ...fxpasses import modiff
    from ..transform import first_device

    model, cfg = _unwrap(model_or_optimized, rewrite_config)
    args, kwargs = tuple(example_args), dict(example_kwargs or {})
    was_training = model.training
    model.eval()
    try:
        layers = modiff.quant_layers(model, graphs=False)
        n_in = sum(1 for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        if not any(m.state_kinds() for m in layers):
            prep = _capture(model, args, kwargs, (), dynamic_batch, dynamic_spatial, rewrite, cfg)
        else:
            state = modiff.state_slots(model, args, kwargs)
            dev = first_device(args, kwargs)
            caches = tuple(torch.zeros(sl.shape, dtype=sl.dtype, device=dev) for sl in state)
            prep = _capture(modiff.ExplicitStateModel(model, state, first=False).eval(), (args, kwargs, caches), {},
                            caches, dynamic_batch, dynamic_spatial, rewrite, cfg)
            prep.first = _capture(modiff.ExplicitStateModel(model, state, first=True).eval(), (args, kwargs), {}, (),
                                  dynamic_batch, dynamic_spatial, rewrite, cfg)
            prep.state = state
    finally:
        model.train(was_training)
    prep.model_inputs = n_in
    if layers:
        rep = getattr(model, "_fusediff_quant_report", None)
        prep.quant = rep.config.label if rep is not None else layers[0].mode
    return prep


def _capture(fn: torch.nn.Module, args: tuple, kwargs: dict, caches: tuple, dynamic_batch: bool,
             dynamic_spatial: bool, rewrite: bool, cfg) -> Prepared:
    from ...fxpasses.patterns.gn_quant import fuse_group_norm_quantize
    from ...fxpasses.config import RewriteConfig
    from ...fxpasses.pipeline import Pipeline

    dyn = None
    try:
        dyn = _dynamic_shapes(fn, args, kwargs, dynamic_batch, dynamic_spatial, caches)
        with torch.no_grad():
            ep = torch.export.export(fn, args, kwargs, dynamic_shapes=dyn)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        hint = " (try dynamic_batch=False / dynamic_spatial=False)" if dyn is not None else ""
        name = type(getattr(fn, "model", fn)).__name__
        raise OnnxExportError(f"export_onnx: torch.export failed on {name}{hint}: {e}") from e
    gm = ep.module()
    # ONNX runs the one pipeline without selection (no timing) and without verify.
    res = Pipeline(cfg or RewriteConfig(), post_passes=(fuse_group_norm_quantize,)).run(gm) if rewrite else None
    if res is not None:
        log.info("export_onnx: rewritten %s", res.rewritten)
    return Prepared(gm=gm, args=args, kwargs=kwargs, result=res, dynamic_batch=dynamic_batch,
                    dynamic_spatial=dynamic_spatial, fused_ops=fused_ops_in(gm))
