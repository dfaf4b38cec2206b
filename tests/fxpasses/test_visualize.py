"""Graph pictures: networkx graph, block collapse, DOT, SVG (Graphviz and built-in), HTML."""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import fusediff.kernels.geglu  # noqa: F401  (registers fusediff::gelu for the rewritten-graph test)
from fusediff.fxpasses import costs, viz as V
from fusediff.fxpasses.report import build_report
from fusediff.fxpasses.sites import Site

SVG_NS = "{http://www.w3.org/2000/svg}"


# --------------------------------------------------------------------------- a small U-Net block
class ResnetBlock(nn.Module):
    def __init__(self, c: int, temb: int = 32):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, c), nn.Conv2d(c, c, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, c)
        self.norm2, self.conv2 = nn.GroupNorm(4, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class Attention(nn.Module):
    def __init__(self, c: int, ctx: int | None = None, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(c, c, bias=False)
        self.to_k, self.to_v = nn.Linear(ctx or c, c, bias=False), nn.Linear(ctx or c, c, bias=False)
        self.to_out = nn.Linear(c, c)

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        b, n, c = x.shape
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(o.transpose(1, 2).reshape(b, n, c))


class GEGLU(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.proj = nn.Linear(c, 8 * c)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, c: int, ctx: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(c), Attention(c)
        self.norm2, self.attn2 = nn.LayerNorm(c), Attention(c, ctx)
        self.norm3, self.ff = nn.LayerNorm(c), nn.Sequential(GEGLU(c), nn.Linear(4 * c, c))

    def forward(self, x, ctx):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), ctx) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nn.Module):
    def __init__(self, c: int, ctx: int):
        super().__init__()
        self.norm, self.proj_in = nn.GroupNorm(4, c), nn.Linear(c, c)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(c, ctx)])
        self.proj_out = nn.Linear(c, c)

    def forward(self, x, ctx):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for blk in self.transformer_blocks:
            t = blk(t, ctx)
        return self.proj_out(t).reshape(b, h, w, c).permute(0, 3, 1, 2) + x


class DownBlock(nn.Module):
    """A CrossAttnDownBlock2D in miniature: ResNet, transformer, strided-conv downsampler."""

    def __init__(self, c: int = 16, ctx: int = 24):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c)])
        self.attentions = nn.ModuleList([Transformer2D(c, ctx)])
        self.downsamplers = nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)])

    def forward(self, x, temb, ctx):
        x = self.attentions[0](self.resnets[0](x, temb), ctx)
        return self.downsamplers[0](x)


def block_args():
    return torch.randn(2, 16, 8, 8), torch.randn(2, 32), torch.randn(2, 5, 24)


def hand_sites(gm: fx.GraphModule) -> list[Site]:
    """The sites a matcher would report, built by hand: GN->SiLU pairs matched, the transformer's
    GroupNorm rejected, self-attention matched, cross-attention rejected, GEGLU matched."""
    sites = []
    for n in gm.graph.nodes:
        name, path = costs.target_name(n), costs.node_module_path(n)
        if name == "group_norm":
            silu = [u for u in n.users if costs.target_name(u) == "silu"]
            if silu:
                sites.append(Site("groupnorm_silu", [n.name, silu[0].name], n.name, path, True, "",
                                  {"x": costs.shape_of(n)}, "torch.float32"))
            else:
                sites.append(Site("groupnorm", [n.name], n.name, path, False, "consumer is a permute, not conv/linear",
                                  {"x": costs.shape_of(n)}, "torch.float32"))
        elif name == "scaled_dot_product_attention":
            cross = "attn2" in path
            sites.append(Site("attention", [n.name], n.name, path, not cross,
                              "cross-attention Lk=5 below the kernel's minimum" if cross else "",
                              {"q": costs.shape_of(n.args[0])}, "torch.float32"))
        elif name == "gelu":
            mul = next(iter(n.users))
            sites.append(Site("geglu", [n.name, mul.name], mul.name, path, True, "", {"x": costs.shape_of(n)},
                              "torch.float32"))
    return sites


@pytest.fixture(scope="module")
def block():
    model = DownBlock().eval()
    gm = torch.export.export(model, block_args()).module()
    sites = hand_sites(gm)
    assert [s.pattern for s in sites].count("groupnorm_silu") == 2
    return model, gm, sites


# --------------------------------------------------------------------------- checks on DOT text
def _strip_quoted(dot: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', dot)


def dot_is_sane(dot: str) -> tuple[set[str], list[tuple[str, str]]]:
    """Balanced braces outside strings, every edge endpoint declared; returns (nodes, edges)."""
    bare = _strip_quoted(dot)
    assert bare.count("{") == bare.count("}")
    depth = 0
    for ch in bare:
        depth += ch == "{"
        depth -= ch == "}"
        assert depth >= 0
    assert bare.lstrip().startswith("digraph")
    declared = set(re.findall(r"^\s*(n\d+) \[", bare, re.M))
    edges = re.findall(r"^\s*(n\d+) -> (n\d+)", bare, re.M)
    for u, v in edges:
        assert u in declared and v in declared, (u, v)
    return declared, edges


def _dot_attrs(dot: str, label_start: str) -> str:
    """The attribute list of the first node whose label starts with ``label_start``."""
    m = re.search(r'^\s*n\d+ \[label="' + re.escape(label_start) + r'.*$', dot, re.M)
    assert m, label_start
    return m.group(0)


# --------------------------------------------------------------------------- tests
def test_to_networkx_attributes(block):
    _, gm, sites = block
    g = V.to_networkx(gm, sites)
    assert not any(a["op"] == "get_attr" for _, a in g.nodes(data=True))  # parameters hidden
    gn = next(n for n, a in g.nodes(data=True) if a["target"] == "group_norm")
    a = g.nodes[gn]
    assert a["module"] == "resnets.0.norm1"
    assert a["shape"] == (2, 16, 8, 8) and a["dtype"] == "float32"
    assert a["pattern"] == "groupnorm_silu" and a["family"] == "groupnorm" and a["matched"] is True
    rejected = [n for n, x in g.nodes(data=True) if x.get("matched") is False]
    assert rejected and all(g.nodes[n]["reason"] for n in rejected)
    conv = next(n for n, x in g.nodes(data=True) if x["target"] == "conv2d")
    assert g.nodes[conv]["flops"] == 2 * 2 * 16 * 8 * 8 * 16 * 9 and "site" not in g.nodes[conv]
    assert nx.is_directed_acyclic_graph(g)
    # every data edge between kept nodes is there
    names = set(g.nodes)
    for n in gm.graph.nodes:
        for i in n.all_input_nodes:
            if n.name in names and i.name in names:
                assert g.has_edge(i.name, n.name)
    with_params = V.to_networkx(gm, sites, params=True)
    assert with_params.number_of_nodes() > g.number_of_nodes()


def test_collapse_groups_blocks_and_keeps_edges(block):
    _, gm, sites = block
    g = V.to_networkx(gm, sites)
    b = V.collapse(g, depth=2)
    assert b.number_of_nodes() < g.number_of_nodes() / 5
    groups = {a["label"]: a for _, a in b.nodes(data=True) if a["kind"] == "group"}
    assert "resnets.0" in groups and "attentions.0.transformer_blocks.0" in groups
    assert groups["resnets.0"]["patterns"] == {"groupnorm_silu": {"matched": 2, "rejected": 0}}
    assert groups["resnets.0"]["module_type"] == "ResnetBlock" and groups["resnets.0"]["matched"] is True
    tb = groups["attentions.0.transformer_blocks.0"]["patterns"]
    assert tb["attention"] == {"matched": 1, "rejected": 1} and tb["geglu"]["matched"] == 1
    assert groups["attentions.0"]["matched"] is False  # only the rejected GroupNorm site
    # the transformer's own ops after its blocks ran form a second run, not an edge back
    assert "attentions.0 (2)" in groups
    assert nx.is_directed_acyclic_graph(b)
    # every FX edge that crosses groups is an edge between those groups
    where = {m: k for k, a in b.nodes(data=True) for m in a["members"]}
    crossing = {(where[u], where[v]) for u, v in g.edges if where[u] != where[v]}
    assert crossing == set(b.edges)
    assert sum(a["count"] for _, _, a in b.edges(data=True)) == sum(1 for u, v in g.edges if where[u] != where[v])
    # members partition the nodes; depth 1 is coarser, depth 3 finer
    assert sorted(m for _, a in b.nodes(data=True) for m in a["members"]) == sorted(g.nodes)
    assert V.collapse(g, depth=1).number_of_nodes() < b.number_of_nodes() < V.collapse(g, depth=3).number_of_nodes()
    with pytest.raises(ValueError, match="depth"):
        V.collapse(g, depth=0)


def test_group_key_levels():
    assert V.group_key("down_blocks.0.resnets.1.norm1", 2) == "down_blocks.0.resnets.1"
    assert V.group_key("mid_block.attentions.0.transformer_blocks.0", 1) == "mid_block"
    assert V.group_key("conv_in", 3) == "conv_in"
    assert V.group_key("", 2) == ""


@pytest.mark.parametrize("view", ["full", "blocks"])
def test_dot_is_sane_and_highlights(block, view):
    _, gm, sites = block
    g = V.to_networkx(gm, sites, title='block "test" {1}')
    if view == "blocks":
        g = V.collapse(g)
    dot = V.to_dot(g)
    declared, edges = dot_is_sane(dot)
    assert len(declared) == g.number_of_nodes()  # no hubs in this block: no stubs
    assert len(edges) == g.number_of_edges()
    fill, border = V.FAMILY_COLORS["groupnorm"]
    if view == "full":
        attrs = _dot_attrs(dot, "group_norm")
        assert f'fillcolor="{fill}"' in attrs and f'color="{border}"' in attrs
        assert "subgraph cluster_site_" in dot
        n_clusters = len(re.findall(r"subgraph cluster_site_\d+", dot))
        assert n_clusters == len(sites)
        rej = re.search(r'subgraph cluster_site_\d+ \{\n\s+label="#\d+ attention \(rejected\)"[^\n]*', dot)
        assert rej and "dashed" in rej.group(0)
        plain = _dot_attrs(dot, "conv2d")
        assert f'fillcolor="{V.PLAIN_COLORS[0]}"' in plain
    else:
        attrs = _dot_attrs(dot, "resnets.0")
        assert f'fillcolor="{fill}"' in attrs and "groupnorm_silu ×2" in attrs
        rej = _dot_attrs(dot, "attentions.0\\n")
        assert f'fillcolor="{V.REJECTED_COLORS[0]}"' in rej and "dashed" in rej
        assert "subgraph cluster_mod_" in dot  # attentions.0's pieces share a cluster
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, check=True, timeout=60)


def _svg_root(path):
    root = ET.parse(path).getroot()
    assert root.tag == SVG_NS + "svg"
    return root


@pytest.mark.parametrize("view", ["full", "blocks"])
def test_builtin_svg_parses_and_draws_every_node(block, tmp_path, view):
    _, gm, sites = block
    g = V.to_networkx(gm, sites, title="block & <test>")
    if view == "blocks":
        g = V.collapse(g)
    path = tmp_path / "g.svg"
    assert V.write_svg(g, path, renderer="builtin") == "builtin"
    root = _svg_root(path)
    nodes = root.findall(f".//{SVG_NS}g[@class='node']")
    assert len(nodes) == g.number_of_nodes()
    assert len(root.findall(f".//{SVG_NS}g[@class='edges']/{SVG_NS}path")) == g.number_of_edges()
    text = path.read_text()
    assert V.FAMILY_COLORS["groupnorm"][0] in text and V.FAMILY_COLORS["attention"][0] in text
    assert 'stroke-dasharray' in text  # rejected sites
    assert float(root.get("width")) > 100 and float(root.get("height")) > 100


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot not installed")
def test_graphviz_svg_parses(block, tmp_path):
    _, gm, sites = block
    b = V.collapse(V.to_networkx(gm, sites))
    assert V.write_svg(b, tmp_path / "b.svg", renderer="graphviz") == "graphviz"
    _svg_root(tmp_path / "b.svg")


def test_falls_back_to_builtin_without_graphviz(block, tmp_path, monkeypatch, caplog):
    _, gm, sites = block
    monkeypatch.setattr(shutil, "which", lambda name: None)
    b = V.collapse(V.to_networkx(gm, sites))
    with caplog.at_level(logging.INFO, logger="fusediff.fxpasses"):
        assert V.write_svg(b, tmp_path / "b.svg") == "builtin"
        assert V.write_svg(b, tmp_path / "c.svg", renderer="graphviz") == "builtin"
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "builtin renderer" in msgs and "not on PATH" in msgs
    _svg_root(tmp_path / "b.svg")
    with pytest.raises(ValueError, match="renderer"):
        V.write_svg(b, tmp_path / "d.svg", renderer="png")


def test_html_is_self_contained(block, tmp_path):
    model, gm, sites = block
    rep = build_report(gm, sites, model=model, title="DownBlock")
    for renderer in ("builtin",) + (("graphviz",) if shutil.which("dot") else ()):
        path = tmp_path / f"{renderer}.html"
        V.write_html(V.collapse(V.to_networkx(gm, sites)), path, report=rep, renderer=renderer)
        html = path.read_text()
        assert "http://" not in html and "https://" not in html
        assert not re.search(r"<(link|img|iframe)\b|\bsrc\s*=", html)
        assert html.count("<svg") == 1 and "</svg>" in html and "<!DOCTYPE svg" not in html
        assert "Legend" in html and "rejected site" in html
        for s in sites:
            assert s.module_path in html
        assert "cross-attention Lk=5 below the kernel" in html
        assert "Mparams" in html and "Total MB" in html  # the report's tables
    # without a report the site table comes from the graph
    V.write_html(V.to_networkx(gm, sites), tmp_path / "plain.html", renderer="builtin")
    html = (tmp_path / "plain.html").read_text()
    assert "consumer is a permute" in html and "http" not in html


def test_visualize_writes_all_files(block, tmp_path):
    model, gm, sites = block
    rep = build_report(gm, sites, model=model, title="DownBlock")
    paths = V.visualize(gm, sites, tmp_path / "out", report=rep, renderer="builtin")
    assert set(paths) == {f"{s}.{e}" for s in ("graph", "blocks") for e in ("dot", "svg", "html")}
    for p in paths.values():
        assert os.path.getsize(p) > 200
    dot_is_sane(open(paths["blocks.dot"]).read())
    _svg_root(paths["graph.svg"])
    only_blocks = V.visualize(gm, sites, tmp_path / "b", full=False, renderer="builtin")
    assert set(only_blocks) == {"blocks.dot", "blocks.svg", "blocks.html"}


def test_rewritten_graph_marks_fused_ops():
    class M(nn.Module):
        def forward(self, x):
            return torch.ops.fusediff.gelu(x, "none") + 1

    gm = torch.export.export(M(), (torch.randn(4, 8),)).module()
    g = V.to_networkx(gm, [])
    fused = [a for _, a in g.nodes(data=True) if a.get("fused")]
    assert len(fused) == 1 and fused[0]["family"] == "gelu" and fused[0]["matched"]
    dot = V.to_dot(g)
    assert "penwidth=2.2" in _dot_attrs(dot, "fusediff::gelu")
    assert V.fused_op_family("fusediff::group_norm_silu") == "groupnorm"
    assert V.fused_op_family("fusediff::int8_conv2d") == "quant"
    assert V.fused_op_family("fusediff::flash_attention") == "attention"


def _hub_graph(n_blocks: int, per_block: int = 10) -> fx.GraphModule:
    """A long chain of small 'blocks' that all read one time embedding (a hub)."""
    g = fx.Graph()
    x = g.placeholder("x")
    temb = g.placeholder("temb")
    for i in range(n_blocks):
        stack = {f"blocks.{i}": (f"blocks.{i}", "Block")}
        for j in range(per_block):
            x = g.call_function(torch.add, (x, temb if j == 0 else 1.0))
            x.meta["nn_module_stack"] = stack
    g.output(x)
    gm = fx.GraphModule(nn.Module(), g)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(torch.randn(4), torch.randn(4))
    return gm


def test_hub_edges_become_stubs():
    g = V.to_networkx(_hub_graph(8, per_block=3), [])
    s = V.with_stubs(g)
    stubs = [n for n, a in s.nodes(data=True) if a.get("kind") == "stub"]
    assert 5 <= len(stubs) < 8  # the nearest consumers keep their edge
    assert all(s.in_degree(n) == 0 and s.out_degree(n) == 1 for n in stubs)
    assert s.out_degree("temb") + len(stubs) == g.out_degree("temb")
    dot = V.to_dot(g)
    dot_is_sane(dot)
    assert "↪ temb" in dot


def test_large_graph_stays_usable(tmp_path):
    gm = _hub_graph(200)  # 2000 compute nodes
    g = V.to_networkx(gm, [])
    assert g.number_of_nodes() > 2000
    b = V.collapse(g)
    assert b.number_of_nodes() == 200 + 3  # blocks + x, temb, output
    V.write_svg(g, tmp_path / "full.svg", renderer="builtin")
    V.write_svg(b, tmp_path / "blocks.svg", renderer="builtin")
    # What keeps a large graph cheap to draw is the layout's work, not a clock: the time
    # embedding's edges to distant blocks become stubs (all blocks but the first), so every edge
    # left joins adjacent layers and the layout places no dummy nodes: one box per FX node, one
    # per stub, one single-segment curve per edge.
    full = _svg_root(tmp_path / "full.svg")
    assert len(full.findall(f".//{SVG_NS}g[@class='node']")) == g.number_of_nodes()
    assert len(full.findall(f".//{SVG_NS}g[@class='stub']")) == 200 - 1
    paths = full.findall(f".//{SVG_NS}g[@class='edges']/{SVG_NS}path")
    assert len(paths) == g.number_of_edges()
    assert all(p.get("d").count(" C") == 1 for p in paths)
    root = _svg_root(tmp_path / "blocks.svg")
    assert len(root.findall(f".//{SVG_NS}g[@class='node']")) == b.number_of_nodes()


#: Title of the picture in docs/visualization.md.
DOCS_TITLE = "DownBlock (CrossAttnDownBlock2D in miniature), block view"


def docs_block_view(gm: fx.GraphModule, sites: list[Site]) -> nx.DiGraph:
    """The block view drawn in docs/visualization.md (``examples/docs_block_picture.py`` writes
    docs/images/blocks_example.svg from it): DownBlock collapsed at depth 3."""
    return V.collapse(V.to_networkx(gm, sites, title=DOCS_TITLE), depth=3)


def _svg_boxes(root) -> dict[str, dict]:
    """Per drawn box (``<g class="node" id=...>``): its text lines, shape tag, fill, stroke
    width and whether it is dashed."""
    out = {}
    for g in root.findall(f".//{SVG_NS}g[@class='node']"):
        shape = g.find(f"{SVG_NS}rect")
        if shape is None:
            shape = g.find(f"{SVG_NS}ellipse")
        out[g.get("id")] = {"lines": [t.text for t in g.findall(f"{SVG_NS}text")],
                            "shape": shape.tag.replace(SVG_NS, ""), "fill": shape.get("fill"),
                            "stroke_width": shape.get("stroke-width"),
                            "dashed": shape.get("stroke-dasharray") is not None}
    return out


def test_docs_example_picture(block, tmp_path):
    """What the picture in docs/visualization.md shows: every block of the miniature
    CrossAttnDownBlock2D at depth 3, with its module type and patterns, family colors for the
    matched sites, grey dashed boxes for the rejected ones, and the two nested module frames."""
    _, gm, sites = block
    b = docs_block_view(gm, sites)
    tb = "attentions.0.transformer_blocks.0"
    # The boxes in execution order: the transformer's own ops form a new run after each of its
    # sub-blocks (attn1, attn2, ff), so the graph has no edge pointing back up.
    order = [n for n, _ in sorted(b.nodes(data=True), key=lambda na: na[1]["order"])]
    assert order == ["input:x", "input:temb", "input:ctx", "resnets.0", "attentions.0", tb, f"{tb}.attn1",
                     f"{tb}#2", f"{tb}.attn2", f"{tb}#3", f"{tb}.ff.0", f"{tb}#4", "attentions.0#2",
                     "downsamplers.0", "output"]
    assert nx.is_directed_acyclic_graph(b)
    assert set(b.successors("input:temb")) == {"resnets.0"}
    assert set(b.successors("input:ctx")) == {f"{tb}.attn2"}  # the text context feeds cross-attention only
    assert set(b.predecessors("output")) == {"downsamplers.0"}

    out = tmp_path / "blocks_example.svg"
    assert V.write_svg(b, out, renderer="builtin") == "builtin"
    root = _svg_root(out)
    assert DOCS_TITLE in "".join(root.itertext())
    boxes = _svg_boxes(root)
    assert set(boxes) == set(b.nodes)
    assert len(root.findall(f".//{SVG_NS}g[@class='edges']/{SVG_NS}path")) == b.number_of_edges()
    matched = {"groupnorm": V.FAMILY_COLORS["groupnorm"][0], "attention": V.FAMILY_COLORS["attention"][0],
               "gelu": V.FAMILY_COLORS["gelu"][0]}
    # box -> (module type, pattern lines, fill, dashed)
    expected = {
        "resnets.0": ("ResnetBlock", ["groupnorm_silu ×2"], matched["groupnorm"], False),
        "attentions.0": ("Transformer2D", ["groupnorm ×1 rejected"], V.REJECTED_COLORS[0], True),
        f"{tb}.attn1": ("Attention", ["attention ×1"], matched["attention"], False),
        f"{tb}.attn2": ("Attention", ["attention ×1 rejected"], V.REJECTED_COLORS[0], True),
        f"{tb}.ff.0": ("GEGLU", ["geglu ×1"], matched["gelu"], False),
        "downsamplers.0": ("Conv2d", [], V.PLAIN_COLORS[0], False),
        "attentions.0#2": ("Transformer2D", [], V.PLAIN_COLORS[0], False),
        **{k: ("TransformerBlock", [], V.PLAIN_COLORS[0], False) for k in (tb, f"{tb}#2", f"{tb}#3", f"{tb}#4")},
    }
    for k, (mtype, pats, fill, dashed) in expected.items():
        box = boxes[k]
        label = k.replace("#", " (") + ")" if "#" in k else k
        lines = box["lines"]
        assert lines[0] == label and lines[1].split(" · ")[0] == mtype, (k, lines)
        assert lines[2:-1] == pats and re.fullmatch(r"\d+x\d+(x\d+)*", lines[-1]), (k, lines)  # patterns, shape
        assert (box["shape"], box["fill"], box["dashed"]) == ("rect", fill, dashed), (k, box)
        assert box["stroke_width"] == ("1.4" if fill in matched.values() else "1.0"), (k, box)  # no fused op: no bold
    for k in ("input:x", "input:temb", "input:ctx", "output"):
        assert (boxes[k]["shape"], boxes[k]["fill"]) == ("ellipse", V.IO_COLORS[0]), k
    assert boxes["input:ctx"]["lines"] == ["ctx", "2x5x24"]
    # nested module frames: the Transformer2D around its runs and its transformer block's
    frames = {c.findtext(f"{SVG_NS}title") for c in root.findall(f".//{SVG_NS}g[@class='cluster']")}
    assert frames == {"attentions.0", tb}
