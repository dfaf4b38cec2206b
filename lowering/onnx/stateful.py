"""The stateful (MoDiff) export: the float first-step and integer-step ONNX graphs of a quantized
model joined under one ``If`` on a ``first_step`` input, with the caches as ``past.*`` inputs and
``present.*`` outputs, the shared weights deduplicated, and the state layout written to the
model's ``fusediff.state`` metadata (read back by :func:`runtime.state_spec` and
:class:`runtime.StatefulSession`).
"""
from __future__ import annotations

from .capture import Prepared
from .common import FIRST_STEP, STATE_KEY, OnnxExportError


def _join_first_step(first, step, prep: Prepared):
    """One ModelProto from the first-step and integer-step exports of a MoDiff model.

    Inputs: the model's own, then ``first_step`` (bool scalar), then ``past.<layer>.<a_hat|o_hat>``
    (read by the integer step only); outputs: the model's own, then ``present.<layer>.<kind>``
    in the same order, like an LLM's KV cache. One ``If(first_step)`` holds the two graphs as its
    branches; every name inside a branch gets the branch's prefix, the weights move to the main
    graph (shared by both branches, deduplicated), and the layout goes to the model's metadata
    (``fusediff.state``, JSON) for :class:`StatefulSession`.
    """
    import json

    import onnx
    from onnx import helper

    n_in, n_state = prep.model_inputs, len(prep.state)
    fg, sg = first.graph, step.graph
    if len(fg.input) != n_in or len(sg.input) != n_in + n_state or len(sg.output) != len(fg.output) \
            or len(sg.output) <= n_state:
        raise OnnxExportError(f"export_onnx: expected {n_in} model inputs (+ {n_state} caches), got "
                              f"{len(fg.input)}/{len(sg.input)} inputs and {len(fg.output)}/{len(sg.output)} outputs")
    n_out = len(sg.output) - n_state
    step_in = [i.name for i in sg.input]
    inits: list = []

    def branch(g, prefix: str, outer: dict[str, str]):  # outer: the branch's input names -> main names
        names: dict[str, str] = dict(outer)

        def ren(n: str) -> str:
            if not n:
                return n
            if n not in names:
                names[n] = prefix + n
            return names[n]

        for t in g.initializer:
            t.name = ren(t.name)
            inits.append(t)
        for node in g.node:
            for a in node.attribute:
                if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise OnnxExportError("export_onnx: nested subgraphs in a MoDiff step graph are not supported")
            node.input[:] = [ren(n) for n in node.input]
            node.output[:] = [ren(n) for n in node.output]
            node.name = prefix + node.name if node.name else node.name
        outs, nodes, used = [], list(g.node), set()
        for i, (o, so) in enumerate(zip(g.output, sg.output)):
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(so)  # the step graph's types/shapes (the same values in both branches)
            vi.name = ren(o.name)
            if vi.name in outer.values() or vi.name in used:  # an input or a value leaving twice: copy it
                fresh = f"{prefix}output_{i}"
                nodes.append(helper.make_node("Identity", [vi.name], [fresh], name=f"{prefix}identity_{i}"))
                vi.name = fresh
            used.add(vi.name)
            outs.append(vi)
        return helper.make_graph(nodes, prefix.rstrip("/"), [], outs)

    then_g = branch(fg, "first_step/", {fi.name: si for fi, si in zip(fg.input, step_in[:n_in])})
    else_g = branch(sg, "step/", {n: n for n in step_in})
    out_names = [o.name for o in sg.output[:n_out]] + [f"past.{sl.key}".replace("past.", "present.", 1)
                                                        for sl in prep.state]
    first_vi = helper.make_tensor_value_info(FIRST_STEP, onnx.TensorProto.BOOL, [])
    inputs = list(sg.input[:n_in]) + [first_vi] + list(sg.input[n_in:])
    for vi, sl in zip(inputs[n_in + 1:], prep.state):
        vi.name = f"past.{sl.key}"
    ren_in = {old: vi.name for old, vi in zip(step_in[n_in:], inputs[n_in + 1:])}
    for node in else_g.node:  # the step branch reads the caches under their new names
        node.input[:] = [ren_in.get(n, n) for n in node.input]
    outputs = []
    for name, so in zip(out_names, sg.output):
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(so)
        vi.name = name
        outputs.append(vi)
    node = helper.make_node("If", [FIRST_STEP], out_names, name="first_step_if", then_branch=then_g,
                            else_branch=else_g)
    graph = helper.make_graph([node], step.graph.name or "fusediff", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(step.opset_import), producer_name=step.producer_name,
                              producer_version=step.producer_version, ir_version=step.ir_version)
    for p in step.metadata_props:
        model.metadata_props.add(key=p.key, value=p.value)
    model.metadata_props.add(key=STATE_KEY, value=json.dumps({
        "first_step": FIRST_STEP, "model_inputs": n_in, "model_outputs": n_out, "quant": prep.quant,
        "caches": [{"layer": sl.layer, "kind": sl.kind, "input": f"past.{sl.key}", "output": f"present.{sl.key}",
                    "dtype": str(sl.dtype).replace("torch.", "")} for sl in prep.state],
    }))
    return _dedup_initializers(model)


def _dedup_initializers(model):
    """Weights shared by both branches (same bytes under two prefixes) stored once."""
    import hashlib

    from onnx import numpy_helper

    keep: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    kept = []
    for t in model.graph.initializer:
        raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
        key = (t.data_type, tuple(t.dims), hashlib.sha1(raw).hexdigest())
        if key in keep:
            alias[t.name] = keep[key]
        else:
            keep[key] = t.name
            kept.append(t)
    if alias:
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        for g in (a.g for n in model.graph.node for a in n.attribute if a.type == a.GRAPH):
            for n in g.node:
                n.input[:] = [alias.get(i, i) for i in n.input]
    return model
