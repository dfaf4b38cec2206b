"""Block view: collapse a :func:`~fxpasses.viz.graph.to_networkx` graph to one node per module block.

A whole U-Net is thousands of FX nodes; :func:`collapse` groups them by module-path prefix
(``down_blocks.0.resnets.1``), one node per contiguous run of execution, so the picture to read
first has a few dozen boxes.
"""
from __future__ import annotations

from collections import Counter

import networkx as nx


def _levels(path: str) -> list[str]:
    """``"down_blocks.0.resnets.1.norm1"`` -> ``["down_blocks.0", "resnets.1", "norm1"]``:
    a list index belongs to the name before it."""
    out: list[str] = []
    for tok in path.split(".") if path else []:
        if (tok.isdigit() or tok.startswith("slice(")) and out:  # seq[1:] -> "seq.slice(1, None, None)"
            out[-1] += "." + tok
        else:
            out.append(tok)
    return out


def group_key(path: str, depth: int) -> str:
    """Module path cut to ``depth`` levels (a list index counts with its name)."""
    return ".".join(_levels(path)[:depth])


TOP_LEVEL = "(top level)"


def collapse(g: nx.DiGraph, depth: int = 2) -> nx.DiGraph:
    """Block-level view: one node per module-path prefix of ``depth`` levels.

    Levels count a list index with its name, so depth 2 gives ``down_blocks.0.resnets.1`` (one
    ResnetBlock2D) and ``mid_block.attentions.0``. A layer (a module without sub-modules such as
    Conv2d, Linear, GroupNorm32, or a torch.nn container of layers) below the first level joins
    its parent block, so a block is not split into its own ops and its layers
    (``mid_block.norm1`` -> ``mid_block``, ``input_blocks.1.0.in_layers`` -> ``input_blocks.1.0``,
    ``time_embedding.linear_1`` -> ``time_embedding``), while sub-blocks stay apart (an up
    block's ResNets, though the up block runs a ``cat`` of its own). Graph inputs and the output
    keep their own nodes; ops outside every module form one ``"(top level)"`` node per contiguous
    run (so they do not tie distant blocks into cycles).

    Group attributes: ``label``, ``kind`` (group/input/output), ``module``, ``module_type``,
    ``n_nodes``, ``ops`` (target -> count of compute ops), ``flops``, ``patterns`` (pattern ->
    {"matched", "rejected"} site counts), ``families`` (matched families), ``fused_ops``,
    ``matched`` (True: a matched site or fused op inside; False: only rejected sites; None:
    no site), ``shape`` (of the group's last value), ``order``, ``members`` (FX node names).
    Edges between groups carry ``count`` (FX edges merged) and ``shape``.
    """
    if depth < 1:
        raise ValueError(f"collapse: depth must be >= 1, got {depth}")
    b = nx.DiGraph(view="blocks", depth=depth, title=g.graph.get("title", ""),
                   sites=g.graph.get("sites", []))
    qual: dict[str, str] = {}
    short: dict[str, str] = {}
    for _, a in g.nodes(data=True):
        for path, typ, q in a.get("stack", []):
            qual.setdefault(path, q)
            short.setdefault(path, typ)

    # A layer joins its parent when the parent is itself a block. A *layer* is a module with no
    # sub-modules in the graph (Linear, GroupNorm32, QKVAttention) or a torch.nn container of
    # layers (a Sequential in_layers). A *block* has compute ops of its own (a ResBlock's residual
    # add) or only layers below it. So ResBlock.in_layers and mid_block.norm1 fold into their
    # block, while an up block's ResNets stay apart even though the up block has a cat of its own.
    direct: set[str] = set()
    children: dict[str, set[str]] = {}
    for _, a in g.nodes(data=True):
        if a["op"] not in ("placeholder", "output", "get_attr") and not a.get("view_op"):
            direct.add(a.get("module", ""))
        for path, _, _ in a.get("stack", []):
            lv = _levels(path)
            if len(lv) >= 2:
                children.setdefault(".".join(lv[:-1]), set()).add(".".join(lv))
    layer_memo: dict[str, bool] = {}

    def is_layer(path: str) -> bool:
        if path not in layer_memo:
            kids = children.get(path, set())
            q = qual.get(path)  # None: a path never called itself (a ModuleList, a slice's parent)
            container = q is None or q.startswith("torch.nn.modules.container.")
            layer_memo[path] = not kids or (container and all(is_layer(c) for c in kids))
        return layer_memo[path]

    def is_block(path: str) -> bool:
        return path in direct or all(is_layer(c) for c in children.get(path, ()))

    def block_of(path: str) -> str:
        lv = _levels(path)
        # the deepest enclosing layer (within depth + its layers) that is not part of a block
        cut = lv[:depth]
        while len(cut) >= 2 and is_layer(".".join(cut)) and is_block(".".join(cut[:-1])):
            cut = cut[:-1]
        return ".".join(cut)

    # Each group is a contiguous run of execution: when a module's own ops resume after one of
    # its sub-blocks ran (a Transformer's proj_out after its transformer_blocks, the cat before
    # each ResNet of an up block), they start a new run "path#2" instead of drawing an edge back
    # into the first run. Top-level ops form one run per stretch between blocks.
    key_of: dict[str, str] = {}
    base_of: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    runs: dict[str, int] = {}
    last: str | None = None
    deferred: list[str] = []
    for n, a in sorted(g.nodes(data=True), key=lambda na: na[1]["order"]):
        if a["op"] == "placeholder" and not a.get("param"):
            k = f"input:{n}"
        elif a["op"] == "output":
            k = "output"
        elif a["op"] == "get_attr" or a.get("param"):
            deferred.append(n)  # parameters join the block of their first consumer
            continue
        elif a.get("view_op") and not block_of(a.get("module", "")) and list(g.successors(n)):
            deferred.append(n)  # so do top-level reshapes (no one-node "view" blocks)
            continue
        else:
            base = block_of(a.get("module", ""))
            if base not in runs:
                runs[base] = 1
            elif last is not None and last != base and (base == "" or last.startswith(base + ".")):
                runs[base] += 1
            last = base
            if base == "":
                k = f"{TOP_LEVEL}#{runs[base]}"
            else:
                k = base if runs[base] == 1 else f"{base}#{runs[base]}"
            base_of[k] = base
        key_of[n] = k
        members.setdefault(k, []).append(n)
    for n in reversed(deferred):  # reversed: a chain of views resolves from its consumer end
        users = sorted(g.successors(n), key=lambda u: g.nodes[u]["order"])
        k = key_of.get(users[0]) if users else None
        if k is None:
            k = f"{TOP_LEVEL}#0"
            base_of[k] = ""
        key_of[n] = k
        members.setdefault(k, []).append(n)
    for k, ns in members.items():
        ns.sort(key=lambda x: g.nodes[x]["order"])
        attrs = [g.nodes[x] for x in ns]
        ops = Counter(a["target"] for a in attrs if a["op"] not in ("placeholder", "output") and not a.get("view_op"))
        pats: dict[str, dict[str, int]] = {}
        seen_sites: set[int] = set()
        for a in attrs:
            i = a.get("site")
            if i is None or i in seen_sites:
                continue
            seen_sites.add(i)
            d = pats.setdefault(a["pattern"], {"matched": 0, "rejected": 0})
            d["matched" if a["matched"] else "rejected"] += 1
        families = sorted({a["family"] for a in attrs if a.get("family") and a.get("matched")})
        fused = Counter(a["target"] for a in attrs if a.get("fused"))
        matched: bool | None = True if families else (False if pats else None)
        mtype = short.get(k, "")
        if k.startswith("input:"):
            kind, label = "input", k.split(":", 1)[1]
        elif k == "output":
            kind, label = "output", "output"
        elif k.startswith(TOP_LEVEL):
            kind, mtype = "group", TOP_LEVEL
            label = ", ".join(dict.fromkeys(a["target"] for a in attrs if not a.get("view_op"))) or "view"
            label = label if len(label) <= 40 else label[:37] + "..."
        else:
            kind, label = "group", k.replace("#", " (") + ")" if "#" in k else k
            mtype = short.get(base_of[k], "")
        last_shape = next((a["shape"] for a in reversed(attrs) if a.get("shape")), None)
        b.add_node(k, label=label, kind=kind, op=attrs[0]["op"] if kind != "group" else "group",
                   module=base_of.get(k, ""), module_type=mtype, n_nodes=len(ns), ops=dict(ops),
                   flops=sum(a.get("flops", 0) for a in attrs), patterns=pats, families=families,
                   fused_ops=dict(fused), matched=matched, shape=last_shape,
                   order=min(a["order"] for a in attrs), members=ns)
    for u, v, a in g.edges(data=True):
        ku, kv = key_of[u], key_of[v]
        if ku == kv:
            continue
        if b.has_edge(ku, kv):
            b.edges[ku, kv]["count"] += 1
        else:
            b.add_edge(ku, kv, count=1, shape=a.get("shape"))
    return b
