"""Pictures of an exported ONNX model: :func:`onnx_to_networkx` turns the ONNX graph (one branch of
a MoDiff ``If``) into the networkx graph that :mod:`fxpasses.viz` draws, with the nodes a
``fusediff::`` op was translated into grouped as sites (from torch.onnx's node metadata), and
:func:`visualize_onnx` writes its DOT/SVG/HTML pictures.
"""
from __future__ import annotations

import os
from typing import Any

from .common import FIRST_STEP


_ONNX_FAMILY = {"GroupNormalization": "groupnorm", "InstanceNormalization": "groupnorm", "Attention": "attention",
                "Gelu": "gelu"}
_ONNX_VIEWS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Slice", "Gather",
               "Concat", "Split", "Expand", "Cast", "Constant", "ConstantOfShape"}
_ONNX_CLASS = {"Conv": "conv", "ConvTranspose": "conv", "MatMul": "matmul", "Gemm": "matmul", "Attention": "attention",
               "GroupNormalization": "norm", "InstanceNormalization": "norm", "LayerNormalization": "norm",
               "Softmax": "softmax", "ReduceMean": "reduce", "ReduceSum": "reduce", "ReduceMax": "reduce"}


def _meta(n) -> dict[str, str]:
    return {p.key: p.value for p in n.metadata_props}


def _value_info(model) -> dict[str, tuple[tuple, str]]:
    import onnx

    out: dict[str, tuple[tuple, str]] = {}
    vis = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    for vi in vis:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        # Static shapes as int tuples (drawn "2x64x16x16"); symbolic ones as that string already.
        shape = dims if all(isinstance(x, int) for x in dims) else "x".join(map(str, dims))
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else ""
        out[vi.name] = (shape, dt)
    return out


def _scope_stack(meta: dict[str, str]) -> list[tuple[str, str, str]]:
    """Module stack ``[(path, type, qualified type), ...]`` from torch.onnx's node metadata.

    ``pkg.torch.onnx.name_scopes`` holds the full module path of every enclosing module (root
    ``""`` first) and then the FX node's own name; ``class_hierarchy`` the matching types.
    """
    import ast

    from ...fxpasses.canonicalize import clean_module_path

    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
    except (ValueError, SyntaxError):
        return []
    out = []
    for scope, cls in list(zip(scopes, classes))[:-1]:  # the last entry is the FX node itself
        path = clean_module_path(str(scope))
        if not path or path.startswith("_empty_nn_module_stack"):
            continue  # the root module, or torch.export's placeholder for "no module"
        qual = str(cls)
        out.append((path, qual.rsplit(".", 1)[-1], qual))
    return out


def _fx_node_name(meta: dict[str, str]) -> str:
    import ast

    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    return str(scopes[-1]) if scopes else ""


def _fx_source(meta: dict[str, str]) -> str:
    """The FX target an ONNX node came from (``fusediff::geglu``, ``aten::conv2d``, ...), or ``""``."""
    src = meta.get("pkg.torch.onnx.fx_node", "")
    # e.g. "%geglu : [num_users=1] = call_function[target=torch.ops.fusediff.geglu.default](args = ...)"
    i = src.find("target=")
    if i < 0:
        return ""
    tgt = src[i + 7:].split("]", 1)[0].split("(", 1)[0]
    if tgt.startswith("torch.ops."):
        parts = tgt[len("torch.ops."):].split(".")
        if len(parts) >= 2:
            return f"{parts[0]}::{parts[1]}"
    return tgt


def _branch_view(model, branch: str):
    """A MoDiff export (one ``If`` on ``first_step``) seen as the plain graph of one of its branches:
    ``"step"`` (the integer step, what runs on all but the first call) or ``"first_step"``."""
    import onnx

    if branch not in ("step", "first_step"):
        raise ValueError(f"onnx_to_networkx: branch must be 'step' or 'first_step', got {branch!r}")
    g = model.graph
    if len(g.node) != 1 or g.node[0].op_type != "If" or g.node[0].input[0] != FIRST_STEP:
        return model
    attr = "else_branch" if branch == "step" else "then_branch"
    sub = next(a.g for a in g.node[0].attribute if a.name == attr)
    view = onnx.ModelProto()
    view.CopyFrom(model)
    del view.graph.node[:]
    view.graph.node.extend(sub.node)
    del view.graph.output[:]
    for so, mo in zip(sub.output, g.output):  # the branch's values under the model's output names
        view.graph.node.append(onnx.helper.make_node("Identity", [so.name], [mo.name], name=f"output_{mo.name}"))
    view.graph.output.extend(g.output)
    view.graph.value_info.extend(sub.value_info)
    return view


def onnx_to_networkx(model, *, title: str = "", initializers: bool = False, branch: str = "step"):
    """An exported ONNX model as the networkx graph :mod:`fxpasses.viz` draws.

    One node per ONNX node (plus graph inputs and outputs), edges along tensors. Node attributes
    follow :func:`fxpasses.viz.to_networkx`: ``op`` (``placeholder``/``call_function``/
    ``output``), ``target`` (``onnx::<OpType>``), ``module`` and ``stack`` (from torch.onnx's
    scope metadata, so :func:`fxpasses.viz.collapse` gives the block view), ``shape``,
    ``dtype``, ``flops`` (0: not modelled), ``op_class``, ``order``, ``view_op``, ``name``,
    and ``fused``/``family``/``matched``/``site``/``pattern`` for nodes that a fusediff op was
    translated into (or a standard GroupNormalization/Attention/Gelu node): each source fusediff
    call forms one site cluster.

    Args:
        model: an ``onnx.ModelProto`` or a path to one.
        title: picture title.
        initializers: keep weight initializers as input nodes (hidden by default).
        branch: for a MoDiff export (one ``If`` on ``first_step``), which branch to draw:
            ``"step"`` (integer step, default) or ``"first_step"``.
    """
    import networkx as nx
    import onnx

    from ...fxpasses.viz import fused_op_family

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    model = _branch_view(model, branch)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes are decoration only
        pass
    info = _value_info(model)
    g = nx.DiGraph(view="full", title=title, sites=[])
    producer: dict[str, str] = {}
    inits = {i.name for i in model.graph.initializer}
    order = 0
    for vi in model.graph.input:
        if vi.name in inits and not initializers:
            continue
        shape, dt = info.get(vi.name, (None, ""))
        g.add_node(vi.name, op="placeholder", target="input", module="", stack=[], shape=shape, dtype=dt, flops=0,
                   op_class="", order=order, fused=False, view_op=False, name=vi.name)
        producer[vi.name] = vi.name
        order += 1
    if initializers:
        for t in model.graph.initializer:
            g.add_node(t.name, op="placeholder", target="initializer", module="", stack=[], shape=tuple(t.dims),
                       dtype="", flops=0, op_class="", order=order, fused=False, view_op=False, name=t.name)
            producer[t.name] = t.name
            order += 1
    sites: list[dict[str, Any]] = []
    site_of_src: dict[str, int] = {}
    names: set[str] = set(g.nodes)
    for i, n in enumerate(model.graph.node):
        key = n.name or f"{n.op_type}_{i}"
        while key in names:
            key += "_"
        names.add(key)
        meta = _meta(n)
        stack = _scope_stack(meta)
        out0 = n.output[0] if n.output else ""
        shape, dt = info.get(out0, (None, ""))
        src = _fx_source(meta)
        attrs: dict[str, Any] = {
            "op": "call_function", "target": f"onnx::{n.op_type}", "module": stack[-1][0] if stack else "",
            "stack": stack, "shape": shape, "dtype": dt, "flops": 0, "op_class": _ONNX_CLASS.get(n.op_type, "elementwise"),
            "order": order, "fused": False, "view_op": n.op_type in _ONNX_VIEWS, "name": key, "source": src,
        }
        if src.startswith("fusediff::"):
            fam = fused_op_family(src)
            # One site per source FX node (its name is the first token of the fx_node metadata).
            fx_name = _fx_node_name(meta) or src
            idx = site_of_src.get(fx_name)
            if idx is None:
                idx = len(sites)
                site_of_src[fx_name] = idx
                sites.append({"index": idx, "pattern": src.split("::", 1)[1], "family": fam, "module": attrs["module"],
                              "matched": True, "rewritten": True, "status": "translated", "shapes": "",
                              "dtype": dt, "nodes": []})
            sites[idx]["nodes"].append(key)
            attrs.update(fused=n.op_type in _ONNX_FAMILY, family=fam, matched=True, site=idx,
                         pattern=sites[idx]["pattern"], reason="")
        elif n.op_type in _ONNX_FAMILY:
            attrs.update(family=_ONNX_FAMILY[n.op_type], matched=True)
        g.add_node(key, **attrs)
        order += 1
        for inp in n.input:
            if inp and inp in producer:
                g.add_edge(producer[inp], key, shape=info.get(inp, (None, ""))[0])
        for o in n.output:
            if o:
                producer[o] = key
    for vi in model.graph.output:
        key = f"output:{vi.name}"
        shape, dt = info.get(vi.name, (None, ""))
        g.add_node(key, op="output", target="output", module="", stack=[], shape=shape, dtype=dt, flops=0,
                   op_class="", order=order, fused=False, view_op=False, name=vi.name)
        order += 1
        if vi.name in producer:
            g.add_edge(producer[vi.name], key, shape=shape)
    g.graph["sites"] = sites
    return g


def visualize_onnx(model, out_dir: str | os.PathLike, *, depth: int = 2, title: str = "",
                   renderer: str = "auto") -> dict[str, str]:
    """Write ``onnx_graph.{dot,svg,html}`` and ``onnx_blocks.{dot,svg,html}`` of an ONNX model."""
    from ...fxpasses import viz

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    g = onnx_to_networkx(model, title=title)
    paths: dict[str, str] = {}
    for stem, view in (("onnx_blocks", viz.collapse(g, depth)), ("onnx_graph", g)):
        p = os.path.join(out_dir, f"{stem}.dot")
        with open(p, "w", encoding="utf-8") as f:
            f.write(viz.to_dot(view))
        paths[f"{stem}.dot"] = p
        paths[f"{stem}.svg"] = os.path.join(out_dir, f"{stem}.svg")
        viz.write_svg(view, paths[f"{stem}.svg"], renderer=renderer)
        paths[f"{stem}.html"] = os.path.join(out_dir, f"{stem}.html")
        with open(paths[f"{stem}.svg"], encoding="utf-8") as f:
            viz.write_html(view, paths[f"{stem}.html"], svg=f.read())
    return paths
