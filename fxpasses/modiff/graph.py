"""MoDiff quantization of a dynamo graph: ``torch.compile(unet, backend=fusediff.backend(quant=...))``.

A dynamo backend never sees the module, only a graph whose parameters are placeholders (and their
real tensors among the example inputs). :func:`quantize_graph` does at graph level what
:func:`fxpasses.modiff.quantize` does to modules (the low-bit layers of "Real-Time On-Device
Diffusion: Practical Acceleration via Fused Low-Bit Kernels", eq. 4-7):

    conv2d / 1x1 conv1d (x, W, b, ...) / linear(x, W, b)   ->   call_module(QuantConv2d / QuantLinear)(x)
    x @ W.t()                                              ->   call_module(QuantLinear)(x)
    conv_q(group_norm_silu(x, ...))                        ->   conv_q(x, norm=(...))   (MoDiff, Fig. 1)

The last rewrite is the pattern :func:`fxpasses.patterns.gn_quant.fuse_into_layer`.

``W`` and ``b`` are parameters or computed from parameters only (EDM2's ``MPConv``: normalize(W) *
gain / sqrt(fan_in)); a computed weight is evaluated once here and its subgraph erased. A conv whose
weight reads a non-parameter input stays float, with that reason in the report.

Each replaced call gets its own :class:`~fxpasses.modiff.QuantConv2d`/``QuantLinear``, built from
the real weight and registered as a submodule of the graph module, so the MoDiff caches â/ô and
``primed`` are module buffers there, and inductor compiles their in-place updates as buffer
mutations. The layer policy is :func:`fxpasses.modiff.plan` itself, run on a shadow module tree
rebuilt from the nodes' ``nn_module_stack`` (paths and class names, in execution order: the first
and last conv are the first and last conv calls of the graph); linears whose input is a graph input
other than the sample (the text context) get the context K/V role. Each layer is registered under
its weight tensor (:func:`fxpasses.modiff.register_graph_layers`), so ``fusediff.reset(unet)`` and
``with fusediff.trajectory(compiled):`` reach the compiled graph's caches through the model's
parameters. The caches are sized at compile time from the nodes' shapes. A graph traced with
symbolic shapes (``dynamic=True``, or dynamo's automatic dynamic shapes after a batch change) is
compiled again per concrete shape from a static copy (:func:`specialize`, in ``lowering.backend``);
:func:`guard_trajectory` keeps one trajectory at a time across a model's graphs.

Weights are quantized when the graph is compiled: an in-place weight change afterwards (a LoRA
merge) needs a recompile (``torch._dynamo.reset()``), unlike ``fusediff.optimize``.
"""
from __future__ import annotations

import copy
import logging
import weakref
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from torch.utils.weak import WeakTensorKeyDictionary

from ..canonicalize import canon, clean_module_path, module_path, tensor_meta, through
from ..match import has_side_effect
from ..patterns.gn_quant import fuse_into_layer
from .config import LayerDecision, QuantConfig, QuantReport
from .layers import QuantConv2d, QuantLinear
from .lifecycle import register_graph_layers
from .policy import plan

log = logging.getLogger("fusediff.fxpasses")

__all__ = ["quantize_graph", "QuantGraphError", "guard_trajectory", "check_trajectory", "graph_states", "is_symbolic", "specialize", "scalar_inputs"]


class QuantGraphError(ValueError):
    """The graph cannot be quantized as asked (dynamic shapes, a module called twice...)."""


def _standard(node: fx.Node, kind: str, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    """An ``nn.Conv2d``/``nn.Linear`` holding the call's real weight (shared, not copied)."""
    c = canon(node)
    if kind == "linear":
        std = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    elif kind == "conv1d":
        std = nn.Conv1d(w.shape[1] * c.arg("groups", 1), w.shape[0], tuple(w.shape[2:]), stride=c.arg("stride", 1),
                        padding=c.arg("padding", 0), dilation=c.arg("dilation", 1), groups=c.arg("groups", 1),
                        bias=b is not None, device="meta")
    else:
        groups = c.arg("groups", 1)
        padding = c.arg("padding", 0)
        std = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=c.arg("stride", 1),
                        padding=padding if isinstance(padding, str) else padding, dilation=c.arg("dilation", 1),
                        groups=groups, bias=b is not None, device="meta")
    std.weight = nn.Parameter(w.detach(), requires_grad=False)
    if b is not None:
        std.bias = nn.Parameter(b.detach(), requires_grad=False)
    return std.eval()


def _shadow(entries: list[tuple[str, fx.Node, nn.Module]]) -> nn.Module:
    """A module tree with the graph's layers at their paths (in call order) and containers named
    like the originals (``Attention``, ``FeedForward``, ... for the policy's class checks)."""
    root = nn.Module()
    for path, node, std in entries:
        types = {}
        for p, t in (node.meta.get("nn_module_stack") or {}).values():
            types[clean_module_path(p)] = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        parts = path.split(".")
        cur = root
        for i, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[: i + 1])
            if part not in cur._modules:
                name = str(types.get(prefix, "Module")).rsplit(".", 1)[-1]
                cur.add_module(part, type(name, (nn.Module,), {})())
            cur = cur._modules[part]
        cur.add_module(parts[-1], std)
    return root


class _Folder:
    """The value of a weight/bias node that depends on parameters only, computed at compile time.

    A plain layer's weight is a parameter placeholder. EDM2's ``MPConv`` computes its weight in the
    graph every call (``normalize(W) * gain / sqrt(fan_in)``, gain a constant or a learned scalar):
    that subgraph is evaluated once on the real parameters, like the weight quantization itself, and
    erased when no call reads it any more. A subgraph reading a non-parameter input (the sample, a
    LoRA scale passed as an argument) or doing something in place is not folded: the call stays float.
    """

    def __init__(self, gm: fx.GraphModule, real: dict, params: set) -> None:
        self.interp = fx.Interpreter(gm)
        self.real, self.params = real, params
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.folded: set[fx.Node] = set()

    def _ancestors(self, n: fx.Node) -> list[fx.Node]:
        seen, stack = {n}, [n]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    stack.append(a)
        return sorted(seen, key=self.order.__getitem__)

    def _constant(self, nodes: list[fx.Node]) -> bool:
        return all(a in self.params if a.op == "placeholder" else
                   a.op in ("call_function", "call_method", "get_attr") and not has_side_effect(a) for a in nodes)

    def varies(self, n: Any) -> bool:
        """A layer weight that changes per call: computed from parameters *and* another input."""
        nodes = self._ancestors(n) if isinstance(n, fx.Node) else []
        return any(a in self.params for a in nodes) and not self._constant(nodes)

    def __call__(self, n: Any) -> Optional[torch.Tensor]:
        if not isinstance(n, fx.Node):
            return None
        if n in self.params:
            return self.real[n]
        nodes = self._ancestors(n)
        if not self._constant(nodes):
            return None
        env = self.interp.env
        with torch.no_grad():
            for a in nodes:
                if a not in env:
                    env[a] = self.real[a] if a.op == "placeholder" else self.interp.run_node(a)
        self.folded.update(a for a in nodes if a.op != "placeholder")
        return env[n].detach()

    def owner(self, n: fx.Node) -> torch.Tensor:
        """The largest model Parameter ``n`` is computed from (the key of ``register_graph_layers``)."""
        roots = [a for a in self._ancestors(n) if a in self.params]
        return max((self.real[a] for a in roots), key=lambda t: t.numel())

    def erase_dead(self) -> None:
        for a in sorted(self.folded, key=self.order.__getitem__, reverse=True):
            if not a.users:
                a.graph.erase_node(a)


def _transposed_2d(n: Any) -> Optional[fx.Node]:
    """``W`` when ``n`` is ``W.t()`` / ``W.transpose(0, 1)`` / ``torch.t(W)`` of a 2-D ``W``."""
    if not isinstance(n, fx.Node):
        return None
    src = n.args[0] if n.args else None
    val = tensor_meta(src)
    if val is None or val.dim() != 2:
        return None
    if (n.op == "call_method" and n.target == "t") or (n.op == "call_function" and n.target in (torch.t,
                                                                                               torch.ops.aten.t.default)):
        return src
    if (n.op == "call_method" and n.target == "transpose") or (n.op == "call_function" and n.target in (
            torch.transpose, torch.ops.aten.transpose.int)):
        dims = {d % 2 for d in n.args[1:3]} if len(n.args) >= 3 else set()
        return src if dims == {0, 1} else None
    return None


def quantize_graph(gm: fx.GraphModule, example_inputs: list, config: QuantConfig) -> QuantReport:
    """Replace ``gm``'s conv2d/linear calls on parameter weights by quantized layers (in place).

    Run it on a canonicalized dynamo graph (``lowering.transform.pipeline(...).run`` first). Returns
    the :class:`~fxpasses.modiff.QuantReport` (one row per conv/linear call found).

    Raises:
        QuantGraphError: a quantized layer's shapes are symbolic (:func:`specialize` the graph first).
    """
    g = gm.graph
    done = {"quantize_act", "modiff_quantize", "group_norm_quantize", "int8_conv2d", "int8_linear",
            "int8_conv2d_baseline", "int8_linear_baseline"}
    names = {str(n.target).split("fusediff.", 1)[-1].split(".")[0] for n in g.nodes
             if n.op == "call_function" and "fusediff." in str(n.target)}  # OpOverload or packet
    if names & done:
        log.warning("MoDiff (graph): the model is quantized already (fusediff.quantize); backend(quant=...) leaves it")
        return QuantReport(config=config)
    phs = [n for n in g.nodes if n.op == "placeholder"]
    real = {n: x for n, x in zip(phs, example_inputs)}
    params = {n for n, x in real.items() if isinstance(x, nn.Parameter)}
    user = [n for n in phs if n not in params and isinstance(real.get(n), torch.Tensor)]  # sample first
    fold = _Folder(gm, real, params)
    entries: list[tuple[str, fx.Node, nn.Module]] = []
    owners: dict[fx.Node, torch.Tensor] = {}  # call -> the model Parameter its layer is registered under
    seen: dict[str, int] = {}
    varying: list[LayerDecision] = []
    for node in g.nodes:
        c = canon(node)
        if c is None or node.op != "call_function":
            continue
        if c.op in ("conv", "linear"):
            w, b = c.arg("weight"), c.arg("bias")
        elif c.op == "matmul":  # x @ W.t() == linear(x, W) (EDM2's MPConv linear)
            w, b = _transposed_2d(c.arg("other")), None
        else:
            continue
        wt = fold(w)
        bt = fold(b) if b is not None else None
        if wt is None or (b is not None and bt is None):
            if c.op != "matmul" and fold.varies(w) and tensor_meta(w) is not None:  # (a fixed resample filter
                # computed from buffers is no layer: the module-level policy never sees it either)
                wm = tensor_meta(w)
                varying.append(LayerDecision(module_path(node) or node.name, "linear" if c.op == "linear" else
                                             f"conv{wm.dim() - 2}d", False, "weight computed from a non-parameter "
                                             "input (changes per call): kept float", "", tuple(wm.shape)))
            continue
        kind = "linear" if c.op != "conv" else {4: "conv2d", 3: "conv1d"}.get(wt.dim())
        if kind is None or (kind == "linear" and wt.dim() != 2):
            continue
        path = module_path(node) or node.name
        seen[path] = seen.get(path, 0) + 1
        if seen[path] > 1:
            path = f"{path}#{seen[path]}"  # a module called twice: its calls cannot share one state
        entries.append((path, node, _standard(node, kind, wt, bt)))
        owners[node] = fold.owner(w)
    shadow = _shadow([(p.replace("#", "_call"), n, s) for p, n, s in entries])
    report = plan(shadow, config)
    report.layers.extend(varying)
    by_path = {d.path: d for d in report.layers}
    layers = []
    fused = 0
    for i, (path, node, std) in enumerate(entries):
        d = by_path[path.replace("#", "_call")]
        d.path = path
        x = node.args[0] if node.args else node.kwargs.get("input")  # live arg (canon's binding predates rewrites)
        if "#" in path and d.quantized:
            d.quantized, d.reason, d.role = False, "module called more than once in the graph (kept float)", ""
        if d.quantized and d.kind == "linear":
            src = through(x)
            ctx = src in user[1:] and tensor_meta(src) is not None and tensor_meta(src).dim() >= 3
            if ctx and config.context_kv_once:
                d.role, d.reason = "context", "quantized; context K/V computed once per trajectory"
            else:
                d.role, d.reason = "act", "quantized"
        if not d.quantized:
            continue
        xv, ov = tensor_meta(x), tensor_meta(node)
        if xv is None or ov is None or not all(isinstance(s, int) for s in (*xv.shape, *ov.shape)):
            raise QuantGraphError(f"fusediff quant backend: layer {path!r} has symbolic shapes; MoDiff caches need "
                                  "static shapes (lowering.backend compiles a static copy per shape: call that)")
        layer = (QuantLinear if d.kind == "linear" else QuantConv2d)(std, config, path, d.role)
        with torch.no_grad():  # size the caches for this graph's shapes, then start un-primed
            layer(torch.zeros(tuple(xv.shape), dtype=xv.dtype, device=std.weight.device))
        layer.primed.fill_(False)
        name = f"fusediff_quant_{i}"
        gm.add_submodule(name, layer)
        with g.inserting_before(node):
            new = g.call_module(name, (x,))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", "nn_module_stack",
                                                                        "stack_trace")})
        new.meta["fusediff_module"] = path
        node.replace_all_uses_with(new)
        g.erase_node(node)
        if fuse_into_layer(g, new, layer):  # paper Fig. 1 (left): patterns/gn_quant.py
            d.reason += "; GroupNorm fused into the quantizer"
            fused += 1
        register_graph_layers(owners[node], [layer])  # the model's own Parameter
        layers.append(layer)
    if layers:
        fold.erase_dead()
        g.lint()
        gm.recompile()
        # aot_autograd looks up every parameter/buffer of a dynamo graph in dynamo's source table;
        # the new layers' buffers have no dynamo source, so compile it as a plain graph module.
        gm.meta.pop("dynamo_compile_id", None)
    log.info("MoDiff (graph): quantized %d of %d conv/linear calls (%s); %d GroupNorm -> quantizer fusions",
             len(layers), len(report.layers), config.label, fused)
    return report


# ------------------------------------------------------------------------------------------------
# One trajectory at a time across a model's compiled graphs (one graph per input shape)
# ------------------------------------------------------------------------------------------------


class _GraphState:
    """The quantized layers of one compiled graph and the input shapes it was built for."""

    def __init__(self, layers: list[nn.Module], shapes: tuple) -> None:
        self.layers = layers
        self.stateful = [m for m in layers if m.state_kinds()]
        self.shapes = shapes

    def primed(self) -> bool:
        return any(bool(m.primed) for m in self.stateful)

    def reseed(self) -> None:
        for m in self.stateful:
            m.primed.fill_(False)


#: Per model (keyed by its first parameter, weakly): the states of every graph compiled from it.
_GROUPS = WeakTensorKeyDictionary()


def _user_shapes(example_inputs: list) -> tuple:
    """The shapes of a call's data inputs (not parameters, symbolic sizes or lifted 0-d scalars)."""
    return tuple(tuple(x.shape) for x in example_inputs
                 if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter) and x.dim() > 0)


def guard_trajectory(fn: Callable, gm: fx.GraphModule, example_inputs: list, config: QuantConfig) -> Callable:
    """Wrap a compiled quantized graph so the model runs one trajectory at a time across its graphs.

    A new batch size or resolution compiles (or picks) another graph with its own caches. Called in
    the middle of a trajectory that another graph of the same model holds (its layers primed), it
    raises like a quantized module would (``on_shape_change="error"``), or starts the trajectory
    over (``"reseed"``): never a silent mix of two trajectories. ``fusediff.reset(model)`` un-primes
    every graph's layers, so the next trajectory may use any shape.
    """
    layers = [m for m in gm.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    state = _GraphState(layers, _user_shapes(example_inputs))
    if not state.stateful:
        return fn
    key = next((x for x in example_inputs if isinstance(x, nn.Parameter)), None)
    if key is None:
        return fn
    group = _GROUPS.setdefault(key, [])
    group[:] = [r for r in group if r() is not None] + [weakref.ref(state)]

    def guarded(*args: Any) -> Any:
        for other in _primed_others(group, lambda o: o is not state):
            if config.on_shape_change == "error":
                _raise_mid_trajectory(_user_shapes(list(args)), other.shapes)
            log.warning("MoDiff (backend): input shapes %s -> %s mid-trajectory; re-seeding (float step)",
                        other.shapes, state.shapes)
            other.reseed()
            state.reseed()
        return fn(*args)

    guarded._fusediff_state = state  # keeps the state alive as long as the compiled callable
    return guarded


def _primed_others(group: list, pick: Callable[[_GraphState], bool]) -> list[_GraphState]:
    return [o for o in (r() for r in group) if o is not None and pick(o) and o.primed()]


def _raise_mid_trajectory(shapes: tuple, started: tuple) -> None:
    what = (f"input shapes {shapes} in the middle of a trajectory started with {started}; MoDiff caches are never "
            "broadcast" if shapes != started else
            f"the same input shapes {shapes}, but dynamo compiled another graph (a guard failed: an input's dtype, "
            "layout or Python value changed) in the middle of a trajectory; its caches cannot continue it")
    raise ValueError(
        f"fusediff MoDiff (backend): the model was called with {what}. Call fusediff.reset(model) (or use "
        "`with fusediff.trajectory(model):`) before a new batch/shape, or quantize with "
        "QuantConfig(on_shape_change='reseed').")


def _group(args: list) -> list:
    key = next((x for x in args if isinstance(x, nn.Parameter)), None)
    return _GROUPS.get(key, []) if key is not None else []


def graph_states(args: list) -> set[int]:
    """Ids of the live graph states of the model whose parameters are among ``args``."""
    return {id(o) for o in (r() for r in _group(args)) if o is not None}


def check_trajectory(args: list, config: QuantConfig, own: set[int]) -> None:
    """The check of :func:`guard_trajectory`'s wrapper, made before a call instead of inside it:
    another graph of this model (not in ``own``, the ids of the graphs this call will run) holds a
    trajectory -> raise (``"error"`` mode; ``"reseed"`` is left to the wrapper). For callers that
    dispatch to a nested compiled graph, where an exception raised inside would unwind through
    dynamo's frames."""
    if config.on_shape_change != "error":
        return
    for other in _primed_others(_group(args), lambda o: id(o) not in own):
        _raise_mid_trajectory(_user_shapes(args), other.shapes)


def is_symbolic(gm: fx.GraphModule, example_inputs: list) -> bool:
    """Whether dynamo traced ``gm`` with symbolic shapes (``dynamic=True`` or automatic dynamic)."""
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        return True
    for n in gm.graph.nodes:
        v = n.meta.get("example_value", n.meta.get("val")) if n.op == "placeholder" else None
        if isinstance(v, torch.Tensor) and not all(isinstance(s, int) for s in v.shape):
            return True
    return False


_SHAPE_METHODS = {"size", "stride", "dim", "numel", "item"}


def specialize(gm: fx.GraphModule, args: list) -> fx.GraphModule:
    """A copy of a symbolic-shape dynamo graph to re-trace with the concrete ``args`` (static shapes).

    MoDiff caches have one shape, so the backend compiles a graph traced with symbolic shapes again
    per concrete input shape (``torch.compile(copy, dynamic=False)``, quantized like any static
    graph). The copy runs once on ``args`` and its shape arithmetic is baked in: the symbolic-size
    inputs, ``size()``/``stride()``/``sym_size`` readings and what is computed from them alone
    (``torch.sym_sum``, ``operator.*``), and the scalars dynamo lifted into tensor inputs read with
    ``.item()`` (GroupNorm's eps; the caller keys its copies on them, :func:`scalar_inputs`).
    ``.item()`` of any other tensor stays: data, not shape.
    """
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    g2 = fx.GraphModule(gm, graph)
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    scalars = {phs[i] for i in scalar_inputs(g2)}
    values: dict[fx.Node, Any] = {}

    class _Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, (int, float, bool)) and not isinstance(out, torch.Tensor):
                values[n] = out
            return out

    _Record(g2).run(*args)

    def static(n: fx.Node) -> bool:
        if n not in values:
            return False
        if n.op == "placeholder":
            return True
        if n.op == "call_method" and n.target in _SHAPE_METHODS:
            return n.target != "item" or n.args[0] in scalars
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int:
            return True
        return n.op == "call_function" and all(static(a) for a in n.all_input_nodes)

    for n in list(graph.nodes):
        if n.op != "placeholder" and static(n):
            n.replace_all_uses_with(values[n])
    for n in reversed(list(graph.nodes)):
        if n.op not in ("placeholder", "output") and not n.users and n in values:
            graph.erase_node(n)
    graph.lint()
    g2.recompile()
    return g2


def scalar_inputs(gm: fx.GraphModule) -> list[int]:
    """Placeholders read as Python scalars (``x.item()``): dynamo lifts float module attributes such
    as GroupNorm's eps into tensor inputs under dynamic shapes. A specialized graph bakes them in."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, n in enumerate(phs) if any(u.op == "call_method" and u.target == "item" for u in n.users)]
