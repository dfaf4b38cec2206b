"""ONNX export of MoDiff-quantized models: caches as graph inputs/outputs, run with onnxruntime.

The PyTorch side runs the ops' pure-torch references (TRITON_INTERPRET=0; the kernels equal them,
tests/kernels/). Tolerances: integer accumulators exact; quantized outputs by SQNR and by error
against the float model (``ONNX_QUANT_STEP_SQNR_DB``, ``QUANT_TRAJECTORY_ERR_*`` in
tests/tolerances.py: a quantized net is discontinuous, so two runtimes draw different rounding
noise of the same size). ``FUSEDIFF_ONNX_ALL_ZOO=1`` exports every zoo fixture at opsets 21 and 23.
"""
from __future__ import annotations

import argparse
import os
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import numpy as np  # noqa: E402

from fusediff.fxpasses import modiff as md  # noqa: E402
from fusediff.kernels import conv_int8 as CV  # noqa: E402
from fusediff.kernels import linear_int8 as LN  # noqa: E402
from fusediff.lowering import onnx as ox  # noqa: E402
from tests.tolerances import (MODEL_TOL, ONNX_QUANT_STEP_SQNR_DB, QUANT_TRAJECTORY_ERR_FLOOR,  # noqa: E402
                              QUANT_TRAJECTORY_ERR_RATIO, TOL_LONG_REDUCTION, assert_close, sqnr_db)

FD = torch.ops.fusediff


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


def _all_ops(path) -> dict[str, int]:
    m = onnx.load(os.fspath(path), load_external_data=False)
    c: dict[str, int] = {}
    for n in ox._all_nodes(m.graph):
        c[n.op_type] = c.get(n.op_type, 0) + 1
    return c


# ---------------------------------------------------------------------------------------------
# The quantized ops' translations
# ---------------------------------------------------------------------------------------------
class QuantOps(nn.Module):
    """quantize_act -> int8_conv2d_baseline and int8_linear_baseline, weights as buffers."""

    def __init__(self, w_bits: int, per_sample: bool, cin=5, cout=7, k=3, stride=2, f=9, geglu=False, unit=False):
        super().__init__()
        self.w_bits, self.per_sample, self.k, self.stride, self.geglu = w_bits, per_sample, k, stride, geglu
        pc = CV.prepare_conv_weight(torch.randn(cout, cin, k, k), w_bits)
        pl = LN.prepare_linear_weight(torch.randn(2 * f if geglu else f, cin), w_bits)
        self.register_buffer("cw", pc["w_q"])
        self.register_buffer("cs", torch.ones(cout) if unit else pc["w_scale"])
        self.register_buffer("cb", None if unit else torch.randn(cout))
        self.register_buffer("lw", pl["w_q"])
        self.register_buffer("ls", torch.ones(pl["w_q"].shape[0]) if unit else pl["w_scale"])
        self.register_buffer("lb", None if unit else torch.randn(pl["w_q"].shape[0]))
        self.unit = unit

    def forward(self, x):
        q, s = FD.quantize_act(x, 8, self.per_sample)
        if self.unit:
            s = torch.ones_like(s)
        y = FD.int8_conv2d_baseline(q, s, self.cw, self.cs, self.cb, self.stride, 1, self.w_bits, self.k)
        tok = x.flatten(2).transpose(1, 2)  # (N, L, Cin)
        qt, st = FD.quantize_act(tok, 8, self.per_sample)
        if self.unit:
            st = torch.ones_like(st)
        z = FD.int8_linear_baseline(qt, st, self.lw, self.ls, self.lb, self.w_bits, self.geglu)
        return q, s, y, z


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("per_sample", [True, False])
def test_quantized_ops_translate_exactly(tmp_path, w_bits, per_sample):
    """Q(x) and its scale bit for bit; ConvInteger/MatMulInteger accumulators exact (unit scales)."""
    torch.manual_seed(1)
    x = torch.randn(2, 5, 7, 9) * 3  # odd channels, non-pow2 spatial
    m = QuantOps(w_bits, per_sample, unit=True).eval()
    path = ox.export_onnx(m, (x,), tmp_path / "unit.onnx", rewrite=False)
    assert {"ConvInteger", "MatMulInteger"} <= set(_all_ops(path))
    q, s, acc_c, acc_l = ox.run_onnx(path, x)
    rq, rs, _, _ = m(x)
    assert np.array_equal(q, rq.numpy()) and np.array_equal(s, rs.numpy())
    assert np.array_equal(acc_c, CV.int8_conv2d_acc_ref(rq, m.cw, 2, 1, w_bits, 3).float().numpy())
    qt, _ = FD.quantize_act(x.flatten(2).transpose(1, 2), 8, per_sample)
    assert np.array_equal(acc_l, LN.int8_linear_acc_ref(qt, m.lw, w_bits).float().numpy())
    # real scales and bias: the float epilogue in the reference's order
    m2 = QuantOps(w_bits, per_sample, geglu=True).eval()
    path2 = ox.export_onnx(m2, (x,), tmp_path / "real.onnx", rewrite=False, dynamic_batch=False)
    for got, ref in zip(ox.run_onnx(path2, x)[2:], m2(x)[2:]):
        assert_close(_t(got), ref, TOL_LONG_REDUCTION)


def test_nan_sample_dequantizes_to_nan_like_the_reference(tmp_path):
    class M(nn.Module):
        def forward(self, x):
            return FD.quantize_act(x, 8, True)

    x = torch.randn(3, 4, 5)
    x[1, 2, 3] = float("nan")
    q, s = ox.run_onnx(ox.export_onnx(M(), (x,), tmp_path / "nan.onnx", rewrite=False), x)
    rq, rs = FD.quantize_act(x, 8, True)
    assert np.array_equal(q, rq.numpy())
    assert np.isnan(s[1]) and np.array_equal(s[[0, 2]], rs[[0, 2]].numpy())


def test_inplace_modiff_op_is_named_untranslatable(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("a_hat", torch.zeros(2, 3, 4))
            self.register_buffer("primed", torch.tensor(True))

        def forward(self, x):
            return FD.modiff_quantize(x, self.a_hat, self.primed, 8, True)[0]

    with pytest.raises(ox.UnsupportedOpError, match="fusediff::modiff_quantize.*in place") as ei:
        ox.export_onnx(M(), (torch.randn(2, 3, 4),), tmp_path / "bad.onnx", rewrite=False)
    assert ei.value.op == "fusediff::modiff_quantize"


# ---------------------------------------------------------------------------------------------
# A small U-Net-like model: GN+SiLU -> conv, stride-2 conv, token linear, cross-attention K/V
# ---------------------------------------------------------------------------------------------
class CrossAttn(nn.Module):
    is_cross_attention = True

    def __init__(self, c, ctx):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(ctx, c), nn.Linear(ctx, c)

    def forward(self, tok, context):
        return F.scaled_dot_product_attention(self.to_q(tok), self.to_k(context), self.to_v(context))


class Tiny(nn.Module):
    def __init__(self, c=6, ctx=10):
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.proj = nn.Linear(2 * c, 2 * c)
        self.attn = CrossAttn(2 * c, ctx)
        self.conv_out = nn.Conv2d(2 * c, 3, 1)

    def forward(self, x, t, context):
        h = self.conv_in(x)
        h = self.conv1(F.silu(self.norm(h))) + h
        h = self.down(h)
        n, c, hh, ww = h.shape
        tok = self.proj(h.flatten(2).transpose(1, 2))
        tok = tok + self.attn(tok, context)
        return self.conv_out(tok.transpose(1, 2).reshape(n, c, hh, ww)) * t.view(-1, 1, 1, 1)


def _tiny_inputs(b=2, hw=(9, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, *hw, generator=g), torch.rand(b, generator=g) + 0.5), \
        {"context": torch.randn(b, 77, 10, generator=g)}  # 77-token text context


def _steps(args, n, seed=1, size=0.05):
    """A slowly moving x_t, like a sampler's: the MoDiff deltas stay small."""
    g = torch.Generator().manual_seed(seed)
    x, out = args[0], []
    for _ in range(n):
        out.append((x,) + tuple(args[1:]))
        x = x + size * torch.randn(x.shape, generator=g)
    return out


def _quantized(cfg, seed=0):
    torch.manual_seed(seed)
    model = Tiny().eval()
    args, kwargs = _tiny_inputs()
    return model, md.quantize(model, cfg, example_args=args, example_kwargs=kwargs, inplace=False), args, kwargs


def _trajectory_errors(model, q, path, calls, kwargs):
    """Per-step (ORT vs PyTorch SQNR, ORT error vs float, PyTorch error vs float)."""
    sess = ox.StatefulSession(path)
    rows = []
    with torch.no_grad(), md.trajectory(q):
        for call in calls:
            fp, ref = model(*call, **kwargs), q(*call, **kwargs)
            got = _t(sess(*ox.onnx_inputs(call, kwargs))[0])
            rel = lambda a: float((a - fp).norm() / fp.norm())  # noqa: E731
            rows.append((sqnr_db(ref, got), rel(got), rel(ref)))
    return rows


@pytest.mark.parametrize("w_bits,a_bits,cache_dtype,opset,per_token", [
    (8, 8, torch.float32, 21, False),
    (8, 4, torch.float32, 23, True),   # per-token scales for the linears
    (4, 8, torch.float32, 25, False),
    (8, 8, torch.float16, 21, False),
])
def test_tiny_modiff_trajectory_through_onnxruntime(tmp_path, w_bits, a_bits, cache_dtype, opset, per_token):
    cfg = md.QuantConfig(mode="modiff", w_bits=w_bits, a_bits=a_bits, cache_dtype=cache_dtype, per_token=per_token)
    model, q, args, kwargs = _quantized(cfg)
    rep = md.quant_report(q)
    assert {d.path for d in rep.quantized} == {"conv1", "down", "proj", "attn.to_q", "attn.to_k", "attn.to_v"}
    assert rep.get("attn.to_k").role == "context"
    path = ox.export_onnx(q, args, tmp_path / "tiny.onnx", example_kwargs=kwargs, opset=opset)
    ops = _all_ops(path)
    # conv1, down; proj, to_q (MoDiff computes the context K/V once, in float on the first step)
    assert ops["If"] == 1 and ops["ConvInteger"] == 2 and ops["MatMulInteger"] == 2
    rows = _trajectory_errors(model, q, path, _steps(args, 4), kwargs)
    first_db = 60.0 if cache_dtype == torch.float32 else ONNX_QUANT_STEP_SQNR_DB  # float step (fp16 caches: fp16 math)
    assert rows[0][0] > first_db, rows
    for db, err_ort, err_pt in rows:
        assert db > ONNX_QUANT_STEP_SQNR_DB, rows
        assert err_ort <= QUANT_TRAJECTORY_ERR_RATIO * err_pt + QUANT_TRAJECTORY_ERR_FLOOR, rows


def test_one_integer_step_from_the_same_caches(tmp_path):
    """ExplicitStateModel in PyTorch and the exported If's step branch, fed identical caches."""
    _, q, args, kwargs = _quantized(md.QuantConfig(mode="modiff"))
    path = ox.export_onnx(q, args, tmp_path / "tiny.onnx", example_kwargs=kwargs)
    slots = md.state_slots(q, args, kwargs)
    first = md.ExplicitStateModel(q, slots, first=True)
    step = md.ExplicitStateModel(q, slots, first=False)
    (a0, a1) = _steps(args, 2)
    with torch.no_grad():
        out0, c0 = first(a0, kwargs)
        out1, c1 = step(a1, kwargs, c0)
    spec = ox.state_spec(path)
    assert [c["input"] for c in spec["caches"]] == [f"past.{s.key}" for s in slots]
    got = ox.run_onnx(path, *ox.onnx_inputs(a1, kwargs), np.array(False), *[c.numpy() for c in c0])
    assert sqnr_db(out1, _t(got[0])) > ONNX_QUANT_STEP_SQNR_DB
    for s, ref, g in zip(slots, c1, got[1:]):
        assert g.shape == tuple(ref.shape), s.key
        assert sqnr_db(ref, _t(g)) > ONNX_QUANT_STEP_SQNR_DB, s.key
    # the context K/V are computed on the first step only, then served from the cache: bit for bit
    for s, ref, g in zip(slots, c0, got[1:]):
        if s.layer.startswith("attn.to_k") or s.layer.startswith("attn.to_v"):
            assert np.array_equal(g, ref.numpy()), s.key
    # the first step through ONNX equals the float first step in PyTorch
    got0 = ox.run_onnx(path, *ox.onnx_inputs(a0, kwargs), np.array(True), *[np.zeros_like(c.numpy()) for c in c0])
    assert_close(_t(got0[0]), out0, {torch.float32: MODEL_TOL})


def test_stateful_session_lifecycle(tmp_path, caplog):
    model, q, args, kwargs = _quantized(md.QuantConfig(mode="modiff"))
    with torch.no_grad(), md.trajectory(q):  # the model's own trajectory, in progress during the export
        q(*args, **kwargs)
    before = [(m.primed.clone(), m.a_hat.clone(), m.o_hat.clone()) for m in md.quant_layers(q)]
    path = ox.export_onnx(q, args, tmp_path / "tiny.onnx", example_kwargs=kwargs)
    for m, (p, a, o) in zip(md.quant_layers(q), before):  # export left the PyTorch state alone
        assert bool(m.primed) == bool(p) and torch.equal(m.a_hat, a) and torch.equal(m.o_hat, o)

    mp = onnx.load(os.fspath(path))
    onnx.checker.check_model(mp, full_check=True)
    assert {n.domain for n in ox._all_nodes(mp.graph)} <= {""}
    names = [i.name for i in mp.graph.input]
    n_caches = len(md.state_slots(q, args, kwargs))
    assert ox.state_spec(path)["model_inputs"] == 3 and names[3] == "first_step"
    assert all(n.startswith("past.") for n in names[4:]) and len(names) == 4 + n_caches
    assert [o.name for o in mp.graph.output][1:] == [n.replace("past.", "present.", 1) for n in names[4:]]
    assert mp.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    sess = ox.StatefulSession(path)
    calls_a, calls_b = _steps(args, 3, seed=5), _steps(args, 3, seed=6)
    run = lambda calls: [sess(*ox.onnx_inputs(c, kwargs))[0] for c in calls]  # noqa: E731
    assert sess.first_step
    b_alone = run(calls_b)
    assert not sess.first_step
    with sess.trajectory():
        run(calls_a)
    with sess.trajectory():
        b_after_a = run(calls_b)
    assert all(np.array_equal(x, y) for x, y in zip(b_alone, b_after_a))  # nothing leaks between trajectories

    args3, kw3 = _tiny_inputs(b=3)
    with pytest.raises(ValueError, match="never broadcast"):
        sess(*ox.onnx_inputs(args3, kw3))
    sess.reset()  # dynamic batch: a new trajectory at batch 3 sizes its caches from the inputs
    with torch.no_grad(), md.trajectory(q):
        for c in _steps(args3, 2):
            assert sqnr_db(q(*c, **kw3), _t(sess(*ox.onnx_inputs(c, kw3))[0])) > ONNX_QUANT_STEP_SQNR_DB
    reseed = ox.StatefulSession(path, on_shape_change="reseed")
    reseed(*ox.onnx_inputs(args, kwargs))
    with caplog.at_level("WARNING", logger="fusediff.lowering"):
        got = reseed(*ox.onnx_inputs(args3, kw3))[0]
    assert "new trajectory" in caplog.text
    assert np.array_equal(got, ox.StatefulSession(path)(*ox.onnx_inputs(args3, kw3))[0])
    with pytest.raises(ValueError, match="takes 3 inputs"):
        sess(args[0])
    with pytest.raises(ValueError, match="on_shape_change"):
        ox.StatefulSession(path, on_shape_change="broadcast")


def test_dynamic_spatial_caches(tmp_path):
    """dynamic_spatial=True: one file runs another batch and resolution; the caches of downsampled
    layers have their own symbols (fed as 1 on the first step, which does not read them)."""
    _, q, args, kwargs = _quantized(md.QuantConfig(mode="modiff"))
    path = ox.export_onnx(q, args, tmp_path / "sp.onnx", example_kwargs=kwargs, dynamic_spatial=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(os.fspath(path)).graph.input}
    assert dims["args_0"] == ["batch", 3, "height", "width"] and dims["past.conv1.a_hat"] == dims["args_0"][:1] + [6] + \
        dims["args_0"][2:]
    args2, kw2 = _tiny_inputs(b=3, hw=(12, 10))
    sess = ox.StatefulSession(path)
    with torch.no_grad(), md.trajectory(q):
        for c in _steps(args2, 3):
            assert sqnr_db(q(*c, **kw2), _t(sess(*ox.onnx_inputs(c, kw2))[0])) > ONNX_QUANT_STEP_SQNR_DB


def test_baseline_models_export(tmp_path):
    """Baseline W8A8: stateless layers (plain run_onnx) unless a context K/V cache is kept."""
    cfg = md.QuantConfig(mode="baseline", context_kv_once=False)
    model, q, args, kwargs = _quantized(cfg)
    path = ox.export_onnx(q, args, tmp_path / "base.onnx", example_kwargs=kwargs, opset=23)
    assert ox.state_spec(path) is None and "If" not in _all_ops(path)
    with pytest.raises(ValueError, match="no MoDiff state"):
        ox.StatefulSession(path)
    with torch.no_grad():
        ref, fp = q(*args, **kwargs), model(*args, **kwargs)
    got = _t(ox.run_onnx(path, *ox.onnx_inputs(args, kwargs))[0])
    assert sqnr_db(ref, got) > ONNX_QUANT_STEP_SQNR_DB
    rel = lambda a: float((a - fp).norm() / fp.norm())  # noqa: E731
    assert rel(got) <= QUANT_TRAJECTORY_ERR_RATIO * rel(ref) + QUANT_TRAJECTORY_ERR_FLOOR
    # baseline with the context K/V computed once: only those two caches are state
    model, q, args, kwargs = _quantized(md.QuantConfig(mode="baseline"))
    path = ox.export_onnx(q, args, tmp_path / "base_ctx.onnx", example_kwargs=kwargs)
    spec = ox.state_spec(path)
    assert [(c["layer"], c["kind"]) for c in spec["caches"]] == [("attn.to_k", "o_hat"), ("attn.to_v", "o_hat")]
    rows = _trajectory_errors(model, q, path, _steps(args, 3), kwargs)
    for db, err_ort, err_pt in rows:
        assert db > ONNX_QUANT_STEP_SQNR_DB and err_ort <= QUANT_TRAJECTORY_ERR_RATIO * err_pt + \
            QUANT_TRAJECTORY_ERR_FLOOR, rows


def test_stateful_graph_draws_with_the_fx_visualizer(tmp_path):
    from fusediff.fxpasses import viz

    _, q, args, kwargs = _quantized(md.QuantConfig(mode="modiff"))
    path = ox.export_onnx(q, args, tmp_path / "tiny.onnx", example_kwargs=kwargs)
    step = ox.onnx_to_networkx(path)
    first = ox.onnx_to_networkx(path, branch="first_step")
    t_step = {a["target"] for _, a in step.nodes(data=True)}
    t_first = {a["target"] for _, a in first.nodes(data=True)}
    assert {"onnx::ConvInteger", "onnx::MatMulInteger", "onnx::GroupNormalization"} <= t_step
    assert "onnx::ConvInteger" not in t_first and "onnx::Conv" in t_first
    outs = {a["name"] for _, a in step.nodes(data=True) if a["op"] == "output"}
    assert any(o.startswith("present.conv1.") for o in outs)
    assert viz.to_dot(viz.collapse(step, 1)).startswith("digraph")
    with pytest.raises(ValueError, match="branch"):
        ox.onnx_to_networkx(path, branch="else")


# ---------------------------------------------------------------------------------------------
# Zoo U-Nets, MoDiff W8A8
# ---------------------------------------------------------------------------------------------
_ALL_ZOO = os.environ.get("FUSEDIFF_ONNX_ALL_ZOO") == "1"


def _zoo_cases():
    from fusediff import zoo

    if _ALL_ZOO:
        return [(n, o) for n in zoo.names() for o in (21, 23)]
    return [("ddpm", 21)]


@pytest.mark.parametrize("name,opset", _zoo_cases())
def test_zoo_modiff_w8a8_exports_and_matches(tmp_path, name, opset):
    from fusediff import zoo

    model, args, kwargs = zoo.build(name)
    model.eval()
    q = md.quantize(model, md.QuantConfig(mode="modiff"), example_args=args, example_kwargs=kwargs, inplace=False)
    path = ox.export_onnx(q, args, tmp_path / f"{name}.onnx", example_kwargs=kwargs, opset=opset)
    ops = _all_ops(path)
    assert {n.domain for n in ox._all_nodes(onnx.load(os.fspath(path)).graph)} <= {""}
    if md.quant_layers(q):
        assert ops.get("ConvInteger", 0) + ops.get("MatMulInteger", 0) > 0 and ops["If"] == 1
        sess = ox.StatefulSession(path)
    else:  # EDM2/EDM2+ build their convs from MPConv modules, which quantize() does not take (yet)
        assert ox.state_spec(path) is None
        sess = lambda *a: ox.run_onnx(path, *a)  # noqa: E731
    with torch.no_grad(), md.trajectory(q):
        for i, call in enumerate(_steps(args, 3, size=0.02)):
            ref = zoo.output_tensor(q(*call, **kwargs))
            got = _t(sess(*ox.onnx_inputs(call, kwargs))[0])
            if i == 0:  # the float first step
                assert_close(got, ref, {torch.float32: MODEL_TOL})
            assert sqnr_db(ref, got) > ONNX_QUANT_STEP_SQNR_DB, (name, i, sqnr_db(ref, got))


# ---------------------------------------------------------------------------------------------
# The shipped digits model: CLI, a whole DDIM trajectory, latency
# ---------------------------------------------------------------------------------------------
def test_digits_cli_trajectory_and_latency(tmp_path, capsys):
    from fusediff import digits

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    ox.add_cli(sub)
    out = tmp_path / "digits_w8a8.onnx"
    a = p.parse_args(["export-onnx", "digits", "--quant", "modiff-w8a8", "--out", str(out), "--opset", "21", "--check"])
    assert a.fn(a) == 0
    text = capsys.readouterr().out
    assert "MoDiff state (modiff W8A8)" in text and "ConvIntegerx" in text
    errs = [float(line.split("max abs error")[1]) for line in text.splitlines() if "max abs error" in line]
    assert len(errs) == 2 and errs[0] < MODEL_TOL[0]  # first step float; the integer step: rounding noise
    with pytest.raises(ValueError, match="MODE-WxAy"):
        ox.parse_quant("int8")

    unet = digits.load_digits_unet()
    q = md.quantize(unet, ox.parse_quant("modiff-w8a8"), inplace=False)
    sess = ox.StatefulSession(out, threads=1)

    def ort_fn(xt, t):
        return _t(sess(xt, t.to(torch.int64))[0])

    n, steps = 8, 10
    lat = {"fp32": [], "torch": [], "ort": []}
    with torch.no_grad():
        digits.ddim_sample(unet, n, steps=steps, seed=3, callback=lambda i, t, z: lat["fp32"].append(z.clone()))
        with md.trajectory(q):
            digits.ddim_sample(q, n, steps=steps, seed=3, callback=lambda i, t, z: lat["torch"].append(z.clone()))
        with sess.trajectory():
            digits.ddim_sample(None, n, steps=steps, seed=3, unet_fn=ort_fn,
                               callback=lambda i, t, z: lat["ort"].append(z.clone()))
    rel = lambda k: [float((a - b).norm() / b.norm()) for a, b in zip(lat[k], lat["fp32"])]  # noqa: E731
    e_ort, e_pt = rel("ort"), rel("torch")
    assert len(e_ort) == steps
    for eo, ep in zip(e_ort, e_pt):
        assert eo <= QUANT_TRAJECTORY_ERR_RATIO * ep + QUANT_TRAJECTORY_ERR_FLOOR, (e_ort, e_pt)

    # CPU latency of one integer step, same run: PyTorch eager (reference ops) vs onnxruntime
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 500, dtype=torch.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), md.trajectory(q):
            q(x, t)  # the first step is float: time integer steps
            eager_ms = statistics.median(ox.time_ms(lambda: q(x, t), warmup=2, reps=10))
    finally:
        torch.set_num_threads(threads)
    with sess.trajectory():
        sess(x, t)
        ort_ms = statistics.median(ox.time_ms(lambda: sess(x, t), warmup=2, reps=10))
    assert eager_ms > 0 and ort_ms > 0
    with capsys.disabled():
        print(f"\n[onnx latency] digits MoDiff W8A8 integer step, input (2,1,16,16), opset 21, 1 thread, median of 10: "
              f"PyTorch eager (reference ops) {eager_ms:.2f} ms, onnxruntime CPU {ort_ms:.2f} ms, eager/ORT "
              f"{eager_ms / ort_ms:.2f}x; DDIM-{steps} final latent error vs FP32: ORT {e_ort[-1]:.4f}, "
              f"PyTorch {e_pt[-1]:.4f}; load avg {os.getloadavg()[0]:.1f}")
