"""Costs (FLOPs, bytes, params, DRAM traffic) and the report tables.

Expected numbers are computed here from the shapes each test chooses (the formulas of the papers'
tables), never read back from the implementation.
"""
from __future__ import annotations

import json
import logging
import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fusediff.fxpasses import costs
from fusediff.fxpasses.report import Report, build_report, format_shape
from fusediff.fxpasses.sites import Site

F32 = 4  # bytes per float32 element


# --------------------------------------------------------------------------- graph helpers
def traced(module: nn.Module, *args) -> fx.GraphModule:
    """symbolic_trace + FakeTensorProp: torch-function targets, meta["val"] on every node."""
    gm = fx.symbolic_trace(module)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*args)
    return gm


def exported(module: nn.Module, *args) -> fx.GraphModule:
    """torch.export: aten targets (aten.conv2d.default, ...), meta["val"] filled by export."""
    return torch.export.export(module, args).module()


CAPTURES = {"trace": traced, "export": exported}


def nodes_named(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if costs.target_name(n) == name]


def one(gm: fx.GraphModule, name: str) -> fx.Node:
    ns = nodes_named(gm, name)
    assert len(ns) == 1, (name, [costs.target_name(n) for n in gm.graph.nodes])
    return ns[0]


# --------------------------------------------------------------------------- FLOPs
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 4, 3, 3))  # Cout 12, Cin/groups 4 (groups=2)
        self.b = nn.Parameter(torch.randn(12))
        self.w1 = nn.Parameter(torch.randn(6, 5, 3))  # conv1d: Cout 6, Cin 5, k 3

    def forward(self, x, y):
        return F.conv2d(x, self.w, self.b, 2, 1, 1, 2), F.conv1d(y, self.w1)


@pytest.mark.parametrize("capture", list(CAPTURES))
def test_conv_flops(capture):
    n, cin, h, w = 2, 8, 9, 7  # odd, non-square spatial
    gm = CAPTURES[capture](ConvNet(), torch.randn(n, cin, h, w), torch.randn(3, 5, 10))
    hout, wout = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    conv2d_expected = 2 * n * 12 * hout * wout * (cin // 2) * 3 * 3
    conv1d_expected = 2 * 3 * 6 * (10 - 3 + 1) * 5 * 3
    assert costs.node_flops(one(gm, "conv2d")) == conv2d_expected
    assert costs.node_flops(one(gm, "conv1d")) == conv1d_expected
    assert costs.node_class(one(gm, "conv2d")) == "conv"
    assert costs.flops_by_class(gm)["conv"] == conv2d_expected + conv1d_expected


class MatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 16))
        self.bias = nn.Parameter(torch.randn(24))

    def forward(self, x, a, b, c, q, k, v):
        y = F.linear(x, self.w, self.bias)
        m = torch.matmul(a, b)
        bb = torch.bmm(a, c)
        ba = torch.baddbmm(m, a, c, beta=0.5, alpha=2.0)
        e = torch.einsum("bhqd,bhkd->bhqk", q, k)
        s = F.scaled_dot_product_attention(q, k, v)
        return y, m, bb, ba, e, s


def _mat_inputs():
    return (torch.randn(2, 5, 16),  # linear: rows 10, K 16, N 24
            torch.randn(3, 4, 6), torch.randn(6, 5),  # matmul (3,4,6)@(6,5)
            torch.randn(3, 6, 5),  # bmm (3,4,6)@(3,6,5)
            torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8))  # q (Lq 7), k/v (Lk 11)


@pytest.mark.parametrize("capture", list(CAPTURES))
def test_linear_matmul_einsum_sdpa_flops(capture):
    gm = CAPTURES[capture](MatNet(), *_mat_inputs())
    assert costs.node_flops(one(gm, "linear")) == 2 * (2 * 5) * 24 * 16
    assert costs.node_class(one(gm, "linear")) == "linear"
    mm = nodes_named(gm, "matmul") + nodes_named(gm, "bmm")
    # export may spell matmul as view+mm or bmm; the sum over the contractions is what counts
    total_mm = sum(costs.node_flops(n) for n in mm) + sum(costs.node_flops(n) for n in nodes_named(gm, "mm"))
    assert total_mm == 2 * 3 * 4 * 5 * 6 + 2 * 3 * 4 * 5 * 6
    assert costs.node_flops(one(gm, "baddbmm")) == 2 * 3 * 4 * 5 * 6
    assert costs.node_flops(one(gm, "einsum")) == 2 * 2 * 3 * 7 * 11 * 8
    assert costs.node_flops(one(gm, "scaled_dot_product_attention")) == 4 * 2 * 3 * 7 * 11 * 8
    assert costs.node_class(one(gm, "scaled_dot_product_attention")) == "attention"
    assert costs.node_class(one(gm, "einsum")) == "attention"  # no weight operand


def test_einsum_formula_forms():
    # batched matmul, ellipsis, implicit output, three operands
    assert costs.einsum_flops("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]) == 2 * 2 * 3 * 4 * 5
    assert costs.einsum_flops("...ij,...jk->...ik", [(6, 2, 3, 4), (6, 2, 4, 5)]) == 2 * 6 * 2 * 3 * 4 * 5
    assert costs.einsum_flops("ij,jk", [(3, 4), (4, 5)]) == 2 * 3 * 4 * 5
    # (3x4)(4x5) first -> (3x5), then (3x5)(5x2)
    assert costs.einsum_flops("ij,jk,kl->il", [(3, 4), (4, 5), (5, 2)]) == 2 * 3 * 4 * 5 + 2 * 3 * 5 * 2
    assert costs.einsum_flops("ij->ji", [(3, 4)]) == 0
    with pytest.raises(ValueError, match="operands"):
        costs.einsum_flops("ij,jk->ik", [(3, 4)])


def test_call_module_leaves_are_counted():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    gm = traced(m, torch.randn(2, 3, 6, 6))
    convs = [n for n in gm.graph.nodes if costs.target_name(n) == "module:Conv2d"]
    assert costs.node_flops(convs[0]) == 2 * 2 * 8 * 6 * 6 * 3 * 3 * 3
    lin = [n for n in gm.graph.nodes if costs.target_name(n) == "module:Linear"][0]
    assert costs.node_flops(lin) == 2 * 2 * 10 * 8 * 6 * 6
    assert costs.graph_params(gm) == sum(p.numel() for p in m.parameters())
    # the module's own weights are read
    read, written = costs.node_bytes(convs[0])
    assert read == (2 * 3 * 6 * 6 + 8 * 3 * 3 * 3 + 8) * F32
    assert written == 2 * 8 * 6 * 6 * F32


def test_exported_conv_net_uses_aten_targets():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1)).eval()
    gm = exported(m, torch.randn(1, 3, 10, 10))
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert len(convs) == 2
    expected = 2 * 1 * 8 * 10 * 10 * 3 * 3 * 3 + 2 * 1 * 4 * 10 * 10 * 8 * 1 * 1
    assert costs.flops_by_class(gm)["conv"] == expected
    assert costs.flops_by_class(gm)["norm"] == costs.NORM_FLOPS_PER_ELEMENT * 8 * 10 * 10
    assert costs.graph_params(gm) == sum(p.numel() for p in m.parameters())
    assert costs.graph_params(gm, model=m) == sum(p.numel() for p in m.parameters())


def test_dynamo_placeholder_params_counted():
    m = nn.Sequential(nn.Linear(6, 5), nn.SiLU(), nn.Linear(5, 3)).eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(m, backend=backend)(torch.randn(4, 6))
    finally:
        torch._dynamo.reset()
    gm = graphs[0]
    for n in gm.graph.nodes:  # dynamo keeps the fake values in example_value
        if "val" not in n.meta and "example_value" in n.meta:
            n.meta["val"] = n.meta["example_value"]
    assert costs.graph_params(gm) == sum(p.numel() for p in m.parameters())
    lin = nodes_named(gm, "linear")
    assert [costs.node_flops(n) for n in lin] == [2 * 4 * 5 * 6, 2 * 4 * 3 * 5]
    assert all(costs.is_weight(n.args[1]) for n in lin)


def test_views_cost_nothing_and_bytes_count_inputs_and_weights():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4, 3, 3))
            self.b = nn.Parameter(torch.randn(8))

        def forward(self, x):
            y = F.conv2d(x, self.w, self.b, 1, 1)
            return y.flatten(2).transpose(1, 2).reshape(2, -1)

    gm = traced(M(), torch.randn(2, 4, 5, 5))
    read, written = costs.node_bytes(one(gm, "conv2d"))
    assert read == (2 * 4 * 5 * 5 + 8 * 4 * 3 * 3 + 8) * F32
    assert written == 2 * 8 * 5 * 5 * F32
    for name in ("flatten", "transpose", "reshape"):
        assert costs.node_bytes(one(gm, name)) == (0, 0)
        assert costs.node_flops(one(gm, name)) == 0


# --------------------------------------------------------------------------- traffic
class GnSiluConv(nn.Module):
    def __init__(self, reuse: bool = False):
        super().__init__()
        self.reuse = reuse
        self.gw, self.gb = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))
        self.w, self.b = nn.Parameter(torch.randn(8, 8, 3, 3)), nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = F.group_norm(x, 2, self.gw, self.gb, 1e-5)
        y = F.silu(h)
        y = F.conv2d(y, self.w, self.b, 1, 1)
        return y + h if self.reuse else y


def _gn_site(gm, matched=True, reason=""):
    gn, silu = one(gm, "group_norm"), one(gm, "silu")
    return Site("groupnorm_silu", [gn.name, silu.name], gn.name, "block.norm1", matched, reason,
                {"x": (2, 8, 6, 6)}, "torch.float32")


@pytest.mark.parametrize("capture", list(CAPTURES))
def test_traffic_fused_site_saves_the_intermediate(capture):
    gm = CAPTURES[capture](GnSiluConv(), torch.randn(2, 8, 6, 6))
    act = 2 * 8 * 6 * 6 * F32  # every activation in this graph has this size
    none = costs.traffic(gm, [])
    assert none["fused"] == none["unfused"] and none["ratio"] == 1.0
    # unfused: GN reads x + gw + gb, writes h; SiLU reads h, writes y; conv reads y + w + b, writes out
    params = (8 + 8 + 8 * 8 * 9 + 8) * F32
    assert none["unfused"]["weights"] == params
    assert none["unfused"]["activations"] == 3 * act
    assert none["unfused"]["outputs"] == 3 * act
    t = costs.traffic(gm, [_gn_site(gm)])
    assert t["fused"]["total"] < t["unfused"]["total"]
    # h is neither written by GN nor read by SiLU
    assert t["saved_bytes"] == 2 * act
    assert t["per_site_saved"] == {0: 2 * act}
    assert t["fused"]["weights"] == params
    # a rejected site fuses nothing
    r = costs.traffic(gm, [_gn_site(gm, matched=False, reason="dtype")])
    assert r["fused"] == r["unfused"]


def test_traffic_intermediate_used_outside_is_still_written():
    gm = traced(GnSiluConv(reuse=True), torch.randn(2, 8, 6, 6))
    act = 2 * 8 * 6 * 6 * F32
    t = costs.traffic(gm, [_gn_site(gm)])
    assert t["saved_bytes"] == act  # SiLU's read of h is saved, GN's write of h is not


def test_traffic_cache_columns():
    gm = traced(GnSiluConv(), torch.randn(2, 8, 6, 6))
    one(gm, "conv2d").meta["fusediff_cache_bytes"] = (1000, 700)
    t = costs.traffic(gm, [_gn_site(gm)])
    for mode in ("unfused", "fused"):
        assert t[mode]["cache_read"] == 1000 and t[mode]["cache_write"] == 700
    assert costs.traffic(gm, [])["unfused"]["total"] == costs.traffic(traced(GnSiluConv(), torch.randn(2, 8, 6, 6)),
                                                                     [])["unfused"]["total"] + 1700


# --- a fused op in the graph: "fdtest::gn_silu" stands for fusediff::group_norm_silu
@torch.library.custom_op("fdtest::gn_silu", mutates_args=())
def _gn_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
             apply_silu: bool) -> torch.Tensor:
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if apply_silu else y


@_gn_silu.register_fake
def _(x, weight, bias, num_groups, eps, apply_silu):
    return torch.empty_like(x)


@torch.library.custom_op("fdtest::lin_cache", mutates_args=("o_hat",))
def _lin_cache(x: torch.Tensor, w: torch.Tensor, o_hat: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
    o_hat.add_(F.linear(x, w))
    return o_hat.clone()


@_lin_cache.register_fake
def _(x, w, o_hat, a_hat):
    return torch.empty_like(o_hat)


def test_fused_op_counts_like_what_it_replaces():
    costs.register_op_cost("fdtest::gn_silu", costs.OP_COSTS["fusediff::group_norm_silu"])

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.gw, self.gb = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return torch.ops.fdtest.gn_silu(x, self.gw, self.gb, 2, 1e-5, True)

    x = torch.randn(2, 8, 6, 6)
    gm_f = exported(Fused(), x)
    gm_u = exported(GnSiluConv(), x)
    node = one(gm_f, "fdtest::gn_silu")
    numel = 2 * 8 * 6 * 6
    assert costs.node_flops(node) == (costs.NORM_FLOPS_PER_ELEMENT + costs.POINTWISE_FLOPS_PER_ELEMENT) * numel
    assert costs.node_class(node) == "norm"
    # unfused column adds back the intermediate the fused op keeps on chip; fused = what it does
    t = costs.traffic(gm_f, [])
    assert t["fused"]["total"] == sum(costs.node_bytes(node))
    assert t["saved_bytes"] == 2 * numel * F32
    # and the unfused estimate equals the GN+SiLU part of the unfused graph
    u = costs.traffic(gm_u, [])
    conv_bytes = sum(costs.node_bytes(one(gm_u, "conv2d")))
    assert t["unfused"]["total"] == u["unfused"]["total"] - conv_bytes


def test_mutated_schema_arguments_are_cache_traffic():
    class Q(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 6))
            self.register_buffer("o_hat", torch.zeros(4, 5))
            self.register_buffer("a_hat", torch.zeros(4, 6))

        def forward(self, x):
            return torch.ops.fdtest.lin_cache(x, self.w, self.o_hat, self.a_hat)

    gm = exported(Q(), torch.randn(4, 6))
    node = one(gm, "fdtest::lin_cache")
    assert costs.node_cache_bytes(node) == (4 * 5 * F32, 4 * 5 * F32)
    t = costs.traffic(gm, [])
    assert t["unfused"]["cache_read"] == t["unfused"]["cache_write"] == 4 * 5 * F32
    # x and w are read; a_hat (first step only) is not; o_hat is cache, not activation/weight
    assert t["unfused"]["weights"] + t["unfused"]["activations"] == (4 * 6 + 5 * 6) * F32


# --------------------------------------------------------------------------- report
@pytest.fixture(scope="module")
def block_report():
    x = torch.randn(2, 8, 6, 6)
    gm = traced(GnSiluConv(), x)
    gn, silu = one(gm, "group_norm"), one(gm, "silu")
    conv = one(gm, "conv2d")
    sites = [
        Site("groupnorm_silu", [gn.name, silu.name], gn.name, "down_blocks.0.resnets.0.norm1", True, "",
             {"x": (2, 8, 6, 6)}, "torch.float32", {"consumer": "conv3x3"}),
        Site("attention", [conv.name], conv.name, "mid_block.attentions.0.transformer_blocks.0.attn2", False,
             "cross-attention: Lk=77 not a multiple of 16 | odd", {"q": (2, 8, 64, 40)}, "torch.float16"),
    ]
    return build_report(gm, sites, model=GnSiluConv(), title="GN-SiLU-conv block"), gm, sites


def test_report_tables(block_report):
    rep, gm, sites = block_report
    counts = rep.counts_table()
    assert "groupnorm_silu" in counts and "attention" in counts
    row = next(line for line in counts.splitlines() if line.startswith("| groupnorm_silu"))
    assert [c.strip() for c in row.strip("|").split("|")][2:5] == ["1", "1", "0"]
    row = next(line for line in counts.splitlines() if line.startswith("| attention"))
    assert [c.strip() for c in row.strip("|").split("|")][2:5] == ["1", "0", "1"]
    st = rep.sites_table()
    for s in sites:
        assert s.module_path in st
    assert "cross-attention: Lk=77 not a multiple of 16" in st
    assert "\\|" in st  # a '|' inside a cell does not break the github table
    assert "2x8x64x40" in st and "float16" in st
    assert "rejected" in rep.sites_table("simple")
    params = sum(p.numel() for p in GnSiluConv().parameters())
    cost = rep.cost_table()
    assert f"{params / 1e6:.3f}" in cost and "GN-SiLU-conv block" in cost
    assert rep.params == params
    assert rep.flops["conv"] == 2 * 2 * 8 * 6 * 6 * 8 * 9
    tr = rep.traffic_table()
    assert "unfused" in tr and "fused" in tr and "100.0%" in tr
    assert rep.traffic["fused"]["total"] < rep.traffic["unfused"]["total"]
    text = rep.to_text()
    for part in (counts, cost, tr):
        assert part in text
    simple = rep.to_text("simple")
    assert "Patterns:" in simple and "down_blocks.0.resnets.0.norm1" in simple


def test_report_json(block_report, tmp_path):
    rep, _, sites = block_report
    d = rep.to_dict()
    json.dumps(d)
    assert d["params"] == rep.params and d["title"] == "GN-SiLU-conv block"
    assert [s["module_path"] for s in d["sites"]] == [s.module_path for s in sites]
    assert d["sites"][1]["reason"].startswith("cross-attention")
    assert d["sites"][0]["saved_bytes"] == 2 * 2 * 8 * 6 * 6 * F32
    assert d["traffic"]["unfused"]["total"] > d["traffic"]["fused"]["total"]
    path = rep.to_json(tmp_path / "sub" / "report.json")
    assert json.loads(open(path).read()) == json.loads(json.dumps(d))


def test_report_logs_summary(caplog):
    gm = traced(GnSiluConv(), torch.randn(2, 8, 6, 6))
    with caplog.at_level(logging.DEBUG, logger="fusediff.fxpasses"):
        rep = build_report(gm, [_gn_site(gm, matched=False, reason="bf16 not allowed")], title="t")
    assert isinstance(rep, Report)
    msgs = [r.getMessage() for r in caplog.records if r.name == "fusediff.fxpasses"]
    assert any("1 sites (0 matched, 1 rejected)" in m for m in msgs)
    assert any("bf16 not allowed" in m for m in msgs)


def test_empty_report_and_format_shape():
    gm = traced(nn.Identity(), torch.randn(3))
    rep = build_report(gm, [])
    assert "(no sites)" in rep.to_text()
    assert rep.traffic["ratio"] == 1.0 and rep.total_flops == 0
    assert format_shape((2, 3, 4)) == "2x3x4" and format_shape(()) == "scalar"
    assert math.isclose(rep.gflops, 0.0)
    assert operator.eq(rep.to_dict()["counts"][-1]["pattern"], "total")


def test_no_copy_nodes_cost_nothing():
    class M(nn.Module):
        def forward(self, q, a, c):
            p = torch.einsum("bhld->blhd", q)  # permute only: a view
            s = torch.einsum("bhld->bh", q)  # a reduction: reads q, writes (b, h)
            f = q.to(torch.float32).contiguous()  # already fp32, already contiguous
            scores = torch.baddbmm(a.new_empty(3, 4, 5), a, c, beta=0, alpha=0.5)  # diffusers passes empty()
            return p, s, f, scores

    gm = traced(M(), torch.randn(2, 3, 4, 5), torch.randn(3, 4, 6), torch.randn(3, 6, 5))
    e_view, e_sum = nodes_named(gm, "einsum")
    assert costs.is_view(e_view) and costs.node_bytes(e_view) == (0, 0)
    assert costs.node_bytes(e_sum) == (2 * 3 * 4 * 5 * F32, 2 * 3 * F32)
    assert costs.node_bytes(one(gm, "to")) == (0, 0) and costs.node_bytes(one(gm, "contiguous")) == (0, 0)
    assert costs.node_bytes(one(gm, "new_empty")) == (0, 0)
    # beta=0: the empty input is not read, only the two batches
    assert costs.node_bytes(one(gm, "baddbmm")) == ((3 * 4 * 6 + 3 * 6 * 5) * F32, 3 * 4 * 5 * F32)


def test_inplace_aten_ops_are_not_cache_and_fused_away_override():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)
            return F.silu(y)

    gm = exported(M(), torch.randn(4, 8))
    t = costs.traffic(gm, [])
    assert t["unfused"]["cache_read"] == 0 and t["unfused"]["cache_write"] == 0
    silu = one(gm, "silu")
    silu.meta["fusediff_fused_away"] = (100, 60)
    t2 = costs.traffic(gm, [])
    assert t2["unfused"]["total"] == t["unfused"]["total"] + 160
    assert t2["fused"]["total"] == t["fused"]["total"]
    silu.meta["fusediff_flops"] = 12345
    assert costs.node_flops(silu) == 12345
