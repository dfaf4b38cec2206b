"""Canonicalization: one vocabulary for the three ways an op reaches us.

The same op arrives as a dynamo torch-function (``F.group_norm``, ``torch.conv2d``), a
``torch.export`` aten overload (``aten.group_norm.default``) or a method call
(``x.chunk(2, dim=-1)``). :func:`canonicalize` annotates every node with a :class:`Canon`
(``node.meta["fusediff"]``): a canonical op name and its arguments **bound by signature**, so
pattern code reads ``c.arg("eps")`` whatever the source. It also

* strips eval-mode no-ops that would hide patterns (``dropout`` with p=0 or training=False,
  identity casts such as ``.to(x.dtype)``/``.float()`` on an fp32 tensor, ``.contiguous()``
  on a contiguous value, ``x / 1.0``), rewiring their users;
* sees through algebraic spellings (:func:`read_spellings`): a node that computes a canonical
  op in other words gets that op as an *alternative reading* (``Canon.alts``), with the other
  nodes the reading spans (``Canon.covers``). ``x * sigmoid(x)`` and ``sigmoid(x) * x`` read as
  ``silu(x)``; ``x * (1 + scale) + shift``, ``addcmul(shift, x, 1 + scale)`` and
  ``x * scale + shift`` read as one ``film(x, scale, shift, plus_one)`` form (``plus_one``: the
  ``1 +`` is in the graph; False: it was folded into ``scale`` elsewhere). Patterns match readings
  (:func:`is_op`, :func:`reading`), so one pattern serves every spelling;
* copies dynamo's ``example_value`` into ``meta["val"]`` so every node carries a (fake) tensor;
* cleans ``nn_module_stack`` paths (``L['self'].__dict__['_modules']['down_blocks'].0`` ->
  ``down_blocks.0``) into ``meta["fusediff_module"]``.

The graph's targets are left as they are: the rewritten graph stays runnable by whichever
consumer produced it (inductor for dynamo graphs, eager/ONNX for exported ones).
"""
from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

log = logging.getLogger("fusediff.fxpasses")
aten = torch.ops.aten

# Canonical op name -> positional parameter names (the signature arguments are bound to).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "silu": ("input",),
    "gelu": ("input", "approximate"),
    "sigmoid": ("input",),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "linear": ("input", "weight", "bias"),
    "matmul": ("input", "other"),
    "baddbmm": ("input", "batch1", "batch2", "beta", "alpha"),
    "einsum": ("equation", "operands"),
    "softmax": ("input", "dim"),
    "sdpa": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
    "chunk": ("input", "chunks", "dim"),
    "split": ("input", "split_size", "dim"),
    "getitem": ("input", "index"),
    "mul": ("input", "other"),
    "add": ("input", "other"),
    "addcmul": ("input", "tensor1", "tensor2", "value"),
    "sub": ("input", "other"),
    "div": ("input", "other"),
    "cast": ("input", "dtype"),
    "view": ("input", "shape"),
    "permute": ("input", "dims"),
    "transpose": ("input", "dim0", "dim1"),
    "contiguous": ("input",),
    "dropout": ("input", "p", "training"),
    "interpolate": ("input",),
    "avg_pool2d": ("input",),
    "normalize": ("input",),
}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "group_norm": {"weight": None, "bias": None, "eps": 1e-5},
    "gelu": {"approximate": "none"},
    "conv": {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
    "linear": {"bias": None},
    "baddbmm": {"beta": 1, "alpha": 1},
    "softmax": {"dim": None},
    "sdpa": {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None},
    "chunk": {"dim": 0},
    "split": {"dim": 0},
    "dropout": {"p": 0.5, "training": True},
    "addcmul": {"value": 1},
}


@dataclass
class Canon:
    """A node's canonical reading: op name + arguments bound by name.

    ``alts`` holds alternative readings of the same node (algebraic spellings: a ``mul`` that is a
    SiLU, an ``add`` that ends a FiLM), each with ``covers``: the other nodes that reading spans
    (the ``sigmoid`` of ``x * sigmoid(x)``), which a rewrite of the reading replaces too.
    """

    op: str
    args: dict[str, Any] = field(default_factory=dict)
    alts: dict[str, "Canon"] = field(default_factory=dict)
    covers: tuple[fx.Node, ...] = ()

    def arg(self, name: str, default: Any = None) -> Any:
        return self.args.get(name, default)


# --------------------------------------------------------------------------- vocabulary tables
def _fn_table() -> dict[Any, str]:
    t: dict[Any, str] = {
        F.group_norm: "group_norm", torch.group_norm: "group_norm",
        F.layer_norm: "layer_norm", torch.layer_norm: "layer_norm",
        F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
        F.gelu: "gelu",
        F.conv2d: "conv", torch.conv2d: "conv", F.conv1d: "conv", torch.conv1d: "conv",
        F.linear: "linear",
        torch.matmul: "matmul", torch.bmm: "matmul", torch.mm: "matmul", operator.matmul: "matmul",
        torch.baddbmm: "baddbmm",
        torch.einsum: "einsum",
        torch.softmax: "softmax", F.softmax: "softmax", torch.nn.functional.softmax: "softmax",
        F.scaled_dot_product_attention: "sdpa",
        torch.chunk: "chunk", torch.split: "split",
        operator.getitem: "getitem",
        operator.mul: "mul", torch.mul: "mul",
        operator.add: "add", torch.add: "add", torch.addcmul: "addcmul",
        operator.sub: "sub", torch.sub: "sub",
        operator.truediv: "div", torch.div: "div",
        torch.reshape: "view", torch.permute: "permute", torch.transpose: "transpose",
        F.dropout: "dropout", torch.dropout: "dropout",
        F.interpolate: "interpolate", F.avg_pool2d: "avg_pool2d", torch._C._nn.avg_pool2d: "avg_pool2d",
        F.normalize: "normalize",
    }
    # torch._C._nn builtins that dynamo records directly
    for name, op in (("gelu", "gelu"), ("linear", "linear"), ("silu", "silu")):
        fn = getattr(torch._C._nn, name, None)
        if fn is not None:
            t[fn] = op
    return t


_FN = _fn_table()

_ATEN: dict[Any, str] = {
    aten.group_norm.default: "group_norm",
    aten.layer_norm.default: "layer_norm",
    aten.silu.default: "silu",
    aten.sigmoid.default: "sigmoid",
    aten.gelu.default: "gelu",
    aten.conv2d.default: "conv", aten.conv1d.default: "conv",
    aten.linear.default: "linear",
    aten.matmul.default: "matmul", aten.bmm.default: "matmul", aten.mm.default: "matmul",
    aten.baddbmm.default: "baddbmm",
    aten.einsum.default: "einsum",
    aten.softmax.int: "softmax", aten._softmax.default: "softmax",
    aten.scaled_dot_product_attention.default: "sdpa",
    aten.chunk.default: "chunk", aten.split.Tensor: "split", aten.split_with_sizes.default: "split",
    aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
    aten.add.Tensor: "add", aten.add.Scalar: "add", aten.addcmul.default: "addcmul",
    aten.sub.Tensor: "sub", aten.div.Tensor: "div", aten.div.Scalar: "div",
    aten.view.default: "view", aten.reshape.default: "view", aten._unsafe_view.default: "view",
    aten.permute.default: "permute", aten.transpose.int: "transpose",
    aten.contiguous.default: "contiguous", aten.clone.default: "contiguous",
    aten.dropout.default: "dropout",
    aten.to.dtype: "cast", aten._to_copy.default: "cast",
    aten.upsample_nearest2d.vec: "interpolate", aten.upsample_nearest2d.default: "interpolate",
    aten.avg_pool2d.default: "avg_pool2d",
}

_METHODS: dict[str, str] = {
    "chunk": "chunk", "split": "split", "softmax": "softmax", "view": "view", "reshape": "view",
    "permute": "permute", "transpose": "transpose", "contiguous": "contiguous",
    "to": "cast", "type": "cast", "float": "cast", "half": "cast", "bfloat16": "cast",
    "mul": "mul", "add": "add", "sub": "sub", "div": "div", "matmul": "matmul", "bmm": "matmul",
    "sigmoid": "sigmoid", "addcmul": "addcmul",
}


def _bind(op: str, args: tuple, kwargs: dict, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    names = names or SIGNATURES.get(op, ())
    bound: dict[str, Any] = dict(_DEFAULTS.get(op, {}))
    if op == "einsum":
        eq = args[0] if args else kwargs.get("equation")
        ops = list(args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        return {"equation": eq, "operands": ops}
    for name, value in zip(names, args):
        bound[name] = value
    for k, v in kwargs.items():
        bound[{"self": "input", "x": "input", "p": "p"}.get(k, k)] = v
    return bound


def _canon_of(node: fx.Node) -> Canon | None:
    if node.op == "call_function":
        tgt = node.target
        if tgt in _FN:
            op = _FN[tgt]
            return Canon(op, _bind(op, node.args, dict(node.kwargs)))
        if tgt in _ATEN:
            op = _ATEN[tgt]
            if op == "softmax" and tgt is aten._softmax.default:
                return Canon(op, {"input": node.args[0], "dim": node.args[1]})
            if op == "split" and tgt is aten.split_with_sizes.default:
                return Canon(op, {"input": node.args[0], "split_size": node.args[1],
                                  "dim": node.args[2] if len(node.args) > 2 else 0})
            if op == "cast":
                return Canon(op, {"input": node.args[0], "dtype": node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)})
            if op in ("interpolate", "avg_pool2d", "contiguous"):
                return Canon(op, {"input": node.args[0]})
            names = tuple(a.name for a in tgt._schema.arguments)
            b = _bind(op, node.args, dict(node.kwargs), names)
            # aten spells some parameters differently: map onto the canonical names.
            ren = {"self": "input", "mat2": "other", "tensor": "input", "split_size": "split_size",
                   "split_sizes": "split_size", "size": "shape"}
            if op == "addcmul":  # aten.addcmul(self, tensor1, tensor2, *, value)
                ren = {"self": "input"}
            b = {ren.get(k, k): v for k, v in b.items()}
            if op == "gelu":
                b.setdefault("approximate", "none")
            if op == "dropout":
                b["training"] = b.pop("train", b.get("training", True))
            return Canon(op, b)
        return None
    if node.op == "call_method":
        m = node.target
        if m not in _METHODS:
            return None
        op = _METHODS[m]
        args = node.args
        if op == "cast":
            dtype = None
            if m == "float":
                dtype = torch.float32
            elif m == "half":
                dtype = torch.float16
            elif m == "bfloat16":
                dtype = torch.bfloat16
            else:
                for a in list(args[1:]) + list(node.kwargs.values()):
                    if isinstance(a, torch.dtype):
                        dtype = a
            return Canon(op, {"input": args[0], "dtype": dtype})
        if op in ("view", "permute"):
            rest = args[1:]
            if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
                rest = rest[0]
            return Canon(op, {"input": args[0], SIGNATURES[op][1]: tuple(rest)})
        return Canon(op, _bind(op, args, dict(node.kwargs)))
    return None


# --------------------------------------------------------------------------- metadata helpers
def val(n: Any) -> Any:
    """The (fake) tensor a node produces, or the constant itself."""
    if isinstance(n, fx.Node):
        v = n.meta.get("val", n.meta.get("example_value"))
        return v
    return n


def tensor_meta(n: Any) -> torch.Tensor | None:
    v = val(n)
    return v if isinstance(v, torch.Tensor) else None


def canon(n: Any) -> Canon | None:
    return n.meta.get("fusediff") if isinstance(n, fx.Node) else None


def is_op(n: Any, *ops: str) -> bool:
    """Whether ``n`` reads as any of ``ops`` (its canonical op, or an alternative reading)."""
    c = canon(n)
    return c is not None and (c.op in ops or any(o in c.alts for o in ops))


def reading(n: Any, op: str) -> Canon | None:
    """``n``'s reading as ``op``: its canonical one, or the alternative (algebraic spelling), or None."""
    c = canon(n)
    if c is None:
        return None
    return c if c.op == op else c.alts.get(op)


def spanned(n: fx.Node, op: str) -> list[fx.Node]:
    """The nodes ``n``'s reading as ``op`` spans, in graph order, ``n`` last (for site regions)."""
    r = reading(n, op)
    return [*(r.covers if r is not None else ()), n]


_PATH_RE = [
    (re.compile(r"^L\['self'\]\.?"), ""),
    (re.compile(r"^L\['self'\]"), ""),
    (re.compile(r"\.?__dict__\['_modules'\]\['([^']+)'\]"), r".\1"),
    (re.compile(r"\._modules\['([^']+)'\]"), r".\1"),
    (re.compile(r"\['([^']+)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
    (re.compile(r"\.slice\([^)]*\)"), ""),  # Sequential slices (openaimodel's in_layers[:-1])
]


def clean_module_path(p: str) -> str:
    for rx, rep in _PATH_RE:
        p = rx.sub(rep, p)
    return p.strip(".")


def module_path(n: fx.Node) -> str:
    if "fusediff_module" in n.meta:
        return n.meta["fusediff_module"]
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    path = last[0] if isinstance(last, tuple) else str(last)
    return clean_module_path(path)


# --------------------------------------------------------------------------- no-op stripping
def _is_noop(node: fx.Node, c: Canon) -> bool:
    if c.op == "dropout":
        p, training = c.arg("p"), c.arg("training")
        return (isinstance(p, (int, float)) and p == 0) or training is False
    if c.op == "cast":
        src, out = tensor_meta(c.arg("input")), tensor_meta(node)
        return (src is not None and out is not None and src.dtype == out.dtype
                and src.device == out.device and tuple(src.shape) == tuple(out.shape))
    if c.op == "contiguous":
        src = tensor_meta(c.arg("input"))
        return node.op == "call_method" and src is not None and src.is_contiguous()
    if c.op == "div":
        o = c.arg("other")
        return isinstance(o, (int, float)) and not isinstance(o, bool) and o == 1 \
            and isinstance(c.arg("input"), fx.Node) and tensor_meta(node) is not None \
            and tensor_meta(c.arg("input")) is not None \
            and tensor_meta(node).dtype == tensor_meta(c.arg("input")).dtype
    return False


# --------------------------------------------------------------------------- algebraic spellings
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _operands(c: Canon) -> tuple[Any, Any]:
    return c.arg("input"), c.arg("other")


def _silu_reading(node: fx.Node, c: Canon) -> Canon | None:
    """``x * sigmoid(x)`` / ``sigmoid(x) * x`` -> silu(x)."""
    if c.op != "mul":
        return None
    for a, b in (_operands(c), _operands(c)[::-1]):
        if isinstance(b, fx.Node) and is_op(b, "sigmoid") and canon(b).arg("input") is a and isinstance(a, fx.Node):
            am, bm, om = tensor_meta(a), tensor_meta(b), tensor_meta(node)
            if am is None or bm is None or om is None or am.dtype != om.dtype or tuple(am.shape) != tuple(om.shape):
                return None
            return Canon("silu", {"input": a}, covers=(b,) if len(b.users) == 1 else ())
    return None


def _one_plus(n: Any) -> Any:
    """``s`` when ``n`` is ``1 + s`` / ``s + 1`` (a node), else None."""
    if not (isinstance(n, fx.Node) and is_op(n, "add") and canon(n).op == "add"):
        return None
    a, b = _operands(canon(n))
    if _num(a) == 1.0 and isinstance(b, fx.Node):
        return b
    if _num(b) == 1.0 and isinstance(a, fx.Node):
        return a
    return None


def _film_shapes_ok(x: fx.Node, scale: fx.Node, shift: Any, out: fx.Node) -> bool:
    """``scale``/``shift`` broadcast per (sample, channel) over ``x``'s spatial dims: (N, C, 1, ...)."""
    xm, om = tensor_meta(x), tensor_meta(out)
    if xm is None or om is None or xm.dim() < 3 or tuple(om.shape) != tuple(xm.shape) or om.dtype != xm.dtype:
        return False
    for t in (scale, shift):
        m = tensor_meta(t)
        if m is None or m.dim() != xm.dim() or any(d != 1 for d in m.shape[2:]) \
                or m.shape[1] != xm.shape[1] or m.shape[0] not in (1, xm.shape[0]):
            return False
    return True


def _film_reading(node: fx.Node, c: Canon) -> Canon | None:
    """``x*(1+s)+t`` / ``addcmul(t, x, 1+s)`` / ``x*s+t`` (any operand order) -> film(x, s, t, plus_one)."""
    if c.op == "addcmul":
        if _num(c.arg("value")) != 1.0:
            return None
        t1, t2, shift = c.arg("tensor1"), c.arg("tensor2"), c.arg("input")
        cands = [(t1, t2, (), shift), (t2, t1, (), shift)]
    elif c.op == "add":
        cands = []
        for m, shift in (_operands(c), _operands(c)[::-1]):
            if isinstance(m, fx.Node) and len(m.users) == 1 and canon(m) is not None and canon(m).op == "mul":
                a, b = _operands(canon(m))
                cands += [(a, b, (m,), shift), (b, a, (m,), shift)]
    else:
        return None
    for x, factor, cov, shift in cands:
        if not all(isinstance(v, fx.Node) for v in (x, factor, shift)):
            continue
        s = _one_plus(factor)
        plus_one = s is not None
        s = s if plus_one else factor
        if x is s or x is shift or not _film_shapes_ok(x, s, shift, node):
            continue
        # covers: the nodes between x and this one (a ``1 + s`` computed beside them is left to DCE)
        return Canon("film", {"input": x, "scale": s, "shift": shift, "plus_one": plus_one}, covers=tuple(cov))
    return None


def read_spellings(gm: fx.GraphModule) -> dict[str, int]:
    """Give nodes that spell a canonical op in other words that op as an alternative reading.

    Targets stay untouched (a site that is not rewritten keeps the model's own spelling). Returns
    counts by reading (``{"silu": 3, "film": 2}``).
    """
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        c = canon(node)
        if c is None:
            continue
        for op, fn in (("silu", _silu_reading), ("film", _film_reading)):
            if c.op == op or op in c.alts:
                continue
            r = fn(node, c)
            if r is not None:
                c.alts[op] = r
                counts[op] = counts.get(op, 0) + 1
    return counts


_ASSERTS = tuple(t for t in (getattr(aten, "_assert_tensor_metadata", None),
                              getattr(aten, "_assert_scalar", None)) if t is not None)
_ASSERTS = tuple(getattr(t, "default", t) for t in _ASSERTS)


@dataclass
class CanonStats:
    nodes: int = 0
    annotated: int = 0
    stripped: dict[str, int] = field(default_factory=dict)
    spellings: dict[str, int] = field(default_factory=dict)


def canonicalize(gm: fx.GraphModule, *, strip_noops: bool = True) -> CanonStats:
    """Annotate ``gm`` in place with :class:`Canon` readings and strip eval-mode no-ops.

    Returns counts of annotated nodes and of stripped no-ops by kind.
    """
    stats = CanonStats()
    g = gm.graph
    for node in list(g.nodes):
        stats.nodes += 1
        if strip_noops and node.op == "call_function" and node.target in _ASSERTS and not node.users:
            g.erase_node(node)  # export's metadata asserts would pin dead nodes alive
            stats.stripped["assert"] = stats.stripped.get("assert", 0) + 1
            continue
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
        node.meta["fusediff_module"] = module_path(node)
        c = _canon_of(node)
        if c is None:
            continue
        node.meta["fusediff"] = c
        stats.annotated += 1
        if strip_noops and _is_noop(node, c):
            src = c.arg("input")
            if isinstance(src, fx.Node):
                node.replace_all_uses_with(src)
                g.erase_node(node)
                stats.stripped[c.op] = stats.stripped.get(c.op, 0) + 1
    if stats.stripped:
        log.info("canonicalize: stripped no-ops %s", stats.stripped)
    stats.spellings = read_spellings(gm)
    if stats.spellings:
        log.info("canonicalize: algebraic spellings read as canonical ops %s", stats.spellings)
    g.lint()
    gm.recompile()
    return stats


# --------------------------------------------------------------------------- graph walking helpers
LOOK_THROUGH = ("cast", "contiguous")


def through(n: Any, ops: tuple[str, ...] = LOOK_THROUGH) -> Any:
    """Follow ``n`` backwards through value-preserving nodes (casts, contiguous)."""
    while isinstance(n, fx.Node) and is_op(n, *ops):
        n = canon(n).arg("input")
    return n


def sole_user(n: fx.Node, ops: tuple[str, ...] = LOOK_THROUGH) -> fx.Node | None:
    """The single consumer of ``n`` (looking forward through casts), or None."""
    cur = n
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        if is_op(u, *ops):
            cur = u
            continue
        return u


def forward_chain(n: fx.Node, ops: tuple[str, ...] = LOOK_THROUGH) -> list[fx.Node]:
    """Nodes from ``n`` forward through single-user value-preserving nodes (excluding n)."""
    out = []
    cur = n
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if not is_op(u, *ops):
            break
        out.append(u)
        cur = u
    return out


def make_call(g: fx.Graph, fn: Callable, args: tuple, like: fx.Node | None = None, val_: Any = None) -> fx.Node:
    """Insert ``fn(*args)`` before ``like`` and copy its metadata (module path, stack)."""
    n = g.call_function(fn, args)
    if like is not None:
        for k in ("nn_module_stack", "stack_trace", "fusediff_module", "source_fn_stack"):
            if k in like.meta:
                n.meta[k] = like.meta[k]
    if val_ is not None:
        n.meta["val"] = val_
    return n
