"""The ``fusediff export-onnx`` subcommand: :func:`add_cli` adds it to the ``fusediff`` command
line (``lowering/cli.py``), ``_cmd_export`` resolves the model spec, quantizes it when
``--quant`` asks (:func:`parse_quant`), exports, prints the inputs/outputs/op counts and
optionally checks against eager and draws the graph.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.utils._pytree as pytree

from .capture import prepare
from .common import ATTENTION_MODES, DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, _all_nodes
from .draw import visualize_onnx
from .export import export_graph
from .runtime import StatefulSession, onnx_inputs, run_onnx


def _cmd_export(a: argparse.Namespace) -> int:
    from ..models import resolve

    model, args, kwargs = resolve(a.model)
    model.eval()
    if a.quant:
        from ...fxpasses import modiff

        model = modiff.quantize(model, parse_quant(a.quant), example_args=args, example_kwargs=kwargs, inplace=False)
    out = a.out or f"{a.model.replace(':', '_').replace('/', '_')}.onnx"
    prep = prepare(model, args, example_kwargs=kwargs, dynamic_batch=not a.static_batch,
                   dynamic_spatial=a.dynamic_spatial, rewrite=not a.no_rewrite)
    export_graph(prep, out, opset=a.opset, attention=a.attention)
    import onnx

    m = onnx.load(out, load_external_data=False)
    counts: dict[str, int] = {}
    for n in _all_nodes(m.graph):
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    print(f"wrote {out} (opset {a.opset}, {len(_all_nodes(m.graph))} nodes)")
    if prep.state:
        print(f"MoDiff state ({prep.quant}): first_step + {len(prep.state)} caches in (past.*) and out (present.*), "
              f"{sum(math.prod(sl.shape) * sl.dtype.itemsize for sl in prep.state) / 2**20:.2f} MiB")
    if prep.result is not None:
        print(f"rewritten: {prep.result.rewritten}")
    print("inputs:  " + ", ".join(f"{i.name}{_fmt_dims(i)}" for i in m.graph.input))
    print("outputs: " + ", ".join(f"{o.name}{_fmt_dims(o)}" for o in m.graph.output))
    print("ops:     " + ", ".join(f"{k}x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    if a.check and prep.state:  # first step (float) and one integer step, from the same input
        from ...fxpasses import modiff

        sess = StatefulSession(out)
        with torch.no_grad(), modiff.preserve_state(model), modiff.trajectory(model):
            for step in ("first step", "integer step"):
                ref_t = [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
                got = sess(*onnx_inputs(args, kwargs))
                err = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref_t))
                print(f"onnxruntime vs eager ({step}): max abs error {err:.3e}")
    elif a.check:
        with torch.no_grad():
            ref = model(*args, **kwargs)
        ref_t = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
        got = run_onnx(out, *onnx_inputs(args, kwargs))
        err = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref_t))
        print(f"onnxruntime vs eager: max abs error {err:.3e}")
    if a.viz:
        for k, v in sorted(visualize_onnx(m, a.viz, title=f"{a.model} (ONNX opset {a.opset})").items()):
            print(f"  {k}: {v}")
    return 0


def _fmt_dims(vi) -> str:
    dims = [d.dim_param or str(d.dim_value) for d in vi.type.tensor_type.shape.dim]
    return "[" + ",".join(dims) + "]"


def parse_quant(spec: str):
    """``"modiff-w8a4"`` -> ``QuantConfig(mode="modiff", w_bits=8, a_bits=4)`` (CLI ``--quant``)."""
    import re

    from ...fxpasses.modiff import QuantConfig

    m = re.fullmatch(r"(baseline|modiff)[-_:]w(\d+)a(\d+)", spec.strip().lower())
    if m is None:
        raise ValueError(f"--quant: expected MODE-WxAy such as 'modiff-w8a8' or 'baseline-w8a4', got {spec!r}")
    return QuantConfig(mode=m.group(1), w_bits=int(m.group(2)), a_bits=int(m.group(3)))


def add_cli(subparsers) -> None:
    """Add the ``export-onnx`` subcommand to the ``fusediff`` CLI's subparsers."""
    p = subparsers.add_parser("export-onnx", help="export a (rewritten) model to standard ONNX")
    p.add_argument("model", help="zoo:<name> | digits | package.module:function")
    p.add_argument("--out", default=None, help="the .onnx file (default: <model>.onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset {MIN_OPSET}..{MAX_OPSET} (21: GroupNormalization, 23: Attention)")
    p.add_argument("--no-rewrite", action="store_true", help="export the model as captured (no fusediff ops)")
    p.add_argument("--attention", choices=ATTENTION_MODES, default="auto",
                   help="ONNX Attention (opset >= 23) or MatMul/Softmax")
    p.add_argument("--static-batch", action="store_true", help="do not make the batch dim dynamic")
    p.add_argument("--dynamic-spatial", action="store_true", help="make H, W dynamic where the model allows")
    p.add_argument("--quant", default=None, metavar="MODE-WxAy",
                   help="quantize first (fxpasses.modiff): modiff-w8a8, baseline-w8a4, modiff-w4a8, ...")
    p.add_argument("--check", action="store_true", help="run with onnxruntime and compare with eager")
    p.add_argument("--viz", default=None, metavar="DIR", help="also write pictures of the ONNX graph to DIR")
    p.set_defaults(fn=_cmd_export)
