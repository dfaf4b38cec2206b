"""ONNX export of fusediff-rewritten models, onto standard ONNX operators only.

Pipeline::

    torch.export (dynamic batch)  ->  fxpasses.pipeline.Pipeline (rewrite into fusediff:: ops)
        ->  torch.onnx.export(dynamo=True, custom_translation_table=translation_table(opset))
        ->  onnx.checker  ->  model.onnx            (run it with run_onnx / onnxruntime)

The package's modules: ``translate`` (the fusediff op -> ONNX translation table), ``capture``
(:func:`prepare`: torch.export with dynamic dims + the rewrite passes), ``export``
(:func:`export_onnx`, :func:`export_graph`), ``stateful`` (a MoDiff model's first and integer
steps joined under one ``If``), ``runtime`` (onnxruntime: :func:`run_onnx`,
:class:`StatefulSession`, latency), ``draw`` (:func:`onnx_to_networkx`, :func:`visualize_onnx`),
``cli`` (the ``fusediff export-onnx`` subcommand) and ``common`` (constants, exceptions).

Example:
    >>> from fusediff.lowering.onnx import export_onnx, run_onnx
    >>> path = export_onnx(unet.eval(), (latents, t), "unet.onnx", example_kwargs={"encoder_hidden_states": ctx})
    >>> (eps,) = run_onnx(path, latents, t, ctx)
"""
from __future__ import annotations

from .capture import Prepared, prepare
from .cli import add_cli, parse_quant
from .common import (ATTENTION_MODES, DEFAULT_OPSET, EXTERNAL_DATA_BYTES, FIRST_STEP, MAX_OPSET, MIN_OPSET, STATE_KEY,
                     TRANSLATED_OPS, OnnxExportError, UnsupportedOpError, _all_nodes)
from .draw import onnx_to_networkx, visualize_onnx
from .export import export_graph, export_onnx
from .runtime import StatefulSession, compare_latency, make_session, onnx_inputs, run_onnx, state_spec, time_ms
from .translate import _WINOGRAD_G_PINV, check_translatable, fused_ops_in, translation_table

# _all_nodes and _WINOGRAD_G_PINV are not public: they are here for the tests, which reach them as
# ``onnx._all_nodes`` / ``onnx._WINOGRAD_G_PINV`` like the other names of this package.
__all__ = [
    "ATTENTION_MODES", "DEFAULT_OPSET", "EXTERNAL_DATA_BYTES", "FIRST_STEP", "MAX_OPSET", "MIN_OPSET", "STATE_KEY",
    "TRANSLATED_OPS", "OnnxExportError", "Prepared", "StatefulSession", "UnsupportedOpError", "add_cli",
    "check_translatable", "compare_latency", "export_graph", "export_onnx", "fused_ops_in", "make_session",
    "onnx_inputs", "onnx_to_networkx", "parse_quant", "prepare", "run_onnx", "state_spec", "time_ms",
    "translation_table", "visualize_onnx",
]
