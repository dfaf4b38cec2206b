"""Shared pieces of the ONNX export package: the opset range and attention modes, the
``fusediff.state`` metadata key and ``first_step`` input name of a stateful (MoDiff) export, the
package logger, the two exceptions (:class:`OnnxExportError`, :class:`UnsupportedOpError`) with the
list of translated ops they name, the opset check and the walk over every node of a graph
including ``If``/``Loop`` subgraphs. Imports nothing heavy (no onnx, no onnxscript).
"""
from __future__ import annotations

import logging


log = logging.getLogger("fusediff.lowering")

MIN_OPSET = 18
MAX_OPSET = 25
DEFAULT_OPSET = 21
ATTENTION_MODES = ("auto", "onnx", "matmul")
#: Above this many parameter bytes the weights go to an external ``<path>.data`` file (ONNX protobuf
#: files are limited to 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


STATE_KEY = "fusediff.state"
FIRST_STEP = "first_step"


class OnnxExportError(RuntimeError):
    """The model could not be exported or the exported file failed ``onnx.checker``."""


class UnsupportedOpError(OnnxExportError):
    """A ``fusediff::`` op (or an argument combination) has no ONNX translation.

    Attributes:
        op: the op name, e.g. ``"fusediff::int8_linear"``.
    """

    def __init__(self, op: str, why: str = "") -> None:
        self.op = op
        msg = f"fusediff ONNX export: no translation for {op}"
        super().__init__(msg + (f": {why}" if why else "") + f". Translated ops: {', '.join(sorted(TRANSLATED_OPS))}. "
                         "Rewrite without this op (export_onnx(..., rewrite=False) or a RewriteConfig that "
                         "leaves its family out) or add a translation to lowering/onnx/translate.py.")


TRANSLATED_OPS = ("fusediff::group_norm_silu", "fusediff::flash_attention", "fusediff::gelu", "fusediff::geglu",
                  "fusediff::linear_geglu", "fusediff::winograd_conv2d", "fusediff::softmax_stats",
                  "fusediff::softmax_matmul", "fusediff::quantize_act", "fusediff::int8_conv2d_baseline",
                  "fusediff::int8_linear_baseline")


def _check_opset(opset: int) -> None:
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"export_onnx: opset must be an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r} "
                         "(torch.onnx's dynamo exporter builds at opset 18 and only converts upwards)")


def _all_nodes(graph) -> list:
    """Nodes of a GraphProto including those inside If/Loop/Scan subgraphs."""
    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            if a.g is not None and a.g.node:
                out.extend(_all_nodes(a.g))
            for g in a.graphs:
                out.extend(_all_nodes(g))
    return out
