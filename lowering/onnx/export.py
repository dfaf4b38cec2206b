"""Export: a :class:`capture.Prepared` graph through ``torch.onnx.export`` (dynamo, with the
translation table) and onnxscript's optimizer to a checked ``.onnx`` file. Holds
:func:`export_onnx` (capture + export in one call), :func:`export_graph`, the trimming of unused
``Attention`` outputs and the renaming of torch's dim symbols to ``batch``/``height``/``width``;
a stateful capture is joined by :func:`stateful._join_first_step`.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

from .capture import Prepared, _dynamic_shapes, prepare
from .common import (ATTENTION_MODES, DEFAULT_OPSET, EXTERNAL_DATA_BYTES, OnnxExportError, _all_nodes, _check_opset,
                     log)
from .stateful import _join_first_step
from .translate import check_translatable, translation_table


def _param_bytes(gm: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _exported_program(prep: Prepared):
    """``torch.export`` of the rewritten graph (cached on ``prep``: one re-export for every opset)."""
    if prep.exported is None:
        dyn = _dynamic_shapes(prep.gm, prep.args, prep.kwargs, prep.dynamic_batch, prep.dynamic_spatial,
                              prep._cache_examples())
        try:
            with torch.no_grad():
                prep.exported = torch.export.export(prep.gm, prep.args, prep.kwargs, dynamic_shapes=dyn)
        except Exception as e:  # noqa: BLE001
            raise OnnxExportError(f"export_onnx: torch.export of the rewritten graph failed: {e}") from e
    return prep.exported


def _optimize(model) -> None:
    """onnxscript's optimizer without its pattern-rewrite rules (those cost ~2/3 of the export time
    on a U-Net and onnxruntime fuses at load anyway): constant folding, dead-node removal,
    constants lifted to initializers, deduplication, CSE."""
    import onnx_ir.passes.common as common
    import onnxscript.optimizer as opt
    from onnxscript import ir

    ir.passes.Sequential(
        common.InlinePass(),
        common.RemoveUnusedNodesPass(),
    )(model)
    opt.fold_constants_ir(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _to_onnx(prep: Prepared, opset: int, table: dict, optimize: bool, external: bool):
    """torch.onnx export of one capture (translatability checked by the caller); returns the
    (optimized) ``torch.onnx.ONNXProgram``."""
    ep = _exported_program(prep)
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    old_level = reg_log.level
    reg_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" x4
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*training mode.*")
            prog = torch.onnx.export(ep, prep.args, kwargs=prep.kwargs, dynamo=True, opset_version=opset,
                                     custom_translation_table=table, optimize=False, external_data=external,
                                     verbose=False)
    except Exception as e:  # noqa: BLE001
        raise OnnxExportError(f"export_onnx: torch.onnx.export failed: {e}") from e
    finally:
        reg_log.setLevel(old_level)
    if optimize:
        _optimize(prog.model)
    _trim_unused_outputs(prog.model)
    return prog


def export_graph(prep: Prepared, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                 attention: str = "auto", check: bool = True, optimize: bool = True) -> str:
    """Export a :class:`Prepared` graph to ``path`` at ``opset``; returns the path.

    Raises :class:`UnsupportedOpError` (op named) before exporting when a fusediff op has no
    translation, :class:`OnnxExportError` when torch.onnx fails or ``onnx.checker`` rejects
    the file. A stateful (MoDiff) capture becomes one model whose ``If`` on ``first_step`` runs
    the float first step or the integer step (see :func:`_join_first_step`).
    """
    import onnx

    _check_opset(opset)
    table = translation_table(opset, attention=attention)
    for p in (prep, prep.first):
        if p is not None:
            check_translatable(p.gm, table)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    external = _param_bytes(prep.gm) > EXTERNAL_DATA_BYTES
    prog = _to_onnx(prep, opset, table, optimize, external)
    if prep.first is None:
        prog.save(path, external_data=external)
        model = onnx.load(path, load_external_data=False)
    else:
        first = _to_onnx(prep.first, opset, table, optimize, external)
        model = _join_first_step(first.model_proto, prog.model_proto, prep)
        onnx.save_model(model, path, save_as_external_data=external, location=os.path.basename(path) + ".data")
        model = onnx.load(path, load_external_data=False)
    if _name_dynamic_dims(model):
        onnx.save(model, path)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in _all_nodes(model.graph) if n.domain not in ("", "ai.onnx")})
    if custom:
        raise OnnxExportError(f"export_onnx: {path} contains non-standard nodes {custom}")
    if check:
        try:
            onnx.checker.check_model(path if external else model, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise OnnxExportError(f"export_onnx: onnx.checker rejected {path}: {e}") from e
    log.info("export_onnx: wrote %s (opset %d, %d nodes)", path, opset, len(model.graph.node))
    return path


def _name_dynamic_dims(model) -> dict[str, str]:
    """Rename torch's symbols (``s53``) to ``batch`` / ``height`` / ``width`` everywhere in ``model``.

    Dim 0 of the inputs gives ``batch`` (a second, independent batch symbol ``batch_<input>``);
    dims 2 and 3 of rank-4 inputs give ``height``/``width`` (``<input>_height`` for others).
    Expressions such as ``2*s53`` are rewritten too. Returns the renaming.
    """
    import re

    ren: dict[str, str] = {}
    taken: set[str] = set()

    def claim(sym: str, want: str) -> None:
        if not sym or sym in ren or not re.fullmatch(r"[A-Za-z_]\w*", sym):
            return
        name = want
        while name in taken:
            name += "_"
        ren[sym] = name
        taken.add(name)

    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 1 and dims[0].dim_param:
            claim(dims[0].dim_param, "batch" if "batch" not in taken else f"batch_{vi.name}")
        if len(dims) == 4:
            for i, what in ((2, "height"), (3, "width")):
                if dims[i].dim_param:
                    claim(dims[i].dim_param, what if what not in taken else f"{vi.name}_{what}")
    if not ren:
        return ren
    rx = re.compile(r"\b(" + "|".join(map(re.escape, sorted(ren, key=len, reverse=True))) + r")\b")
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = rx.sub(lambda m: ren[m.group(1)], d.dim_param)
    return ren


def _trim_unused_outputs(model) -> None:
    """Drop trailing optional outputs nobody reads (Attention's present_key/value, qk) so the
    runtime does not compute them."""
    graph_outs = {v.name for v in model.graph.outputs}
    for node in model.graph:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        keep = len(node.outputs)
        while keep > 1 and not node.outputs[keep - 1].uses() and node.outputs[keep - 1].name not in graph_outs:
            keep -= 1
        if keep < len(node.outputs):
            node.resize_outputs(keep)


def export_onnx(model_or_optimized: torch.nn.Module, example_args: tuple, path: str | os.PathLike, *,
                example_kwargs: dict | None = None, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                dynamic_spatial: bool = False, rewrite: bool = True, attention: str = "auto",
                rewrite_config=None) -> str:
    """Export a model, rewritten into fusediff ops and translated to standard ONNX, to ``path``.

    Args:
        model_or_optimized: an ``nn.Module`` or a :class:`lowering.transform.OptimizedModule`
            (its original model and rewrite config are used).
        example_args / example_kwargs: example inputs (the traced signature; non-tensor inputs
            such as ``return_dict=False`` are baked in).
        path: the ``.onnx`` file to write (parent folders are created).
        opset: ONNX opset, 18..25 (21: GroupNormalization; 23: Attention).
        dynamic_batch: make dim 0 of every tensor input dynamic where the model allows it.
        dynamic_spatial: also dims 2 and 3 of rank-4 inputs (H, W), where the model allows it.
        rewrite: run the fusediff rewrite passes first (False: export the model as captured).
        attention: ``"auto"``, ``"onnx"`` or ``"matmul"`` (see :func:`translation_table`).
        rewrite_config: a :class:`fxpasses.config.RewriteConfig` (default: the OptimizedModule's
            or the default config).
    Returns:
        ``path``.
    Raises:
        UnsupportedOpError: a fusediff op has no translation (the message names it).
        OnnxExportError: capture, export or ``onnx.checker`` failed.
    Example:
        >>> export_onnx(unet, (x, t), "unet.onnx", example_kwargs={"encoder_hidden_states": ctx}, opset=23)
    """
    _check_opset(opset)
    if attention not in ATTENTION_MODES:
        raise ValueError(f"export_onnx: attention must be one of {ATTENTION_MODES}, got {attention!r}")
    prep = prepare(model_or_optimized, example_args, example_kwargs=example_kwargs, dynamic_batch=dynamic_batch,
                   dynamic_spatial=dynamic_spatial, rewrite=rewrite, rewrite_config=rewrite_config)
    return export_graph(prep, path, opset=opset, attention=attention)
