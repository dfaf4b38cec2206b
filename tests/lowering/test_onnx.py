"""ONNX export (lowering/onnx/): fusediff ops -> standard ONNX, run with onnxruntime (CPU).

Tolerances: exported float models vs PyTorch eager use ``MODEL_TOL`` (fp32; measured errors are
~1e-6). The per-op module below is compared with the same table.
Set ``FUSEDIFF_ONNX_ALL_ZOO=1`` to export every zoo fixture at opsets 21 and 23 (~5 min on 2
cores); by default ddpm (21, 23) and sdxl (23) run.
"""
from __future__ import annotations

import argparse
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import numpy as np  # noqa: E402

import fusediff  # noqa: E402,F401
from fusediff.kernels.winograd import winograd_weight_transform  # noqa: E402
from fusediff.lowering import onnx as ox  # noqa: E402
from tests.tolerances import MODEL_TOL, TOL, TRAJECTORY_TOL  # noqa: E402

FD = torch.ops.fusediff


def _close(got: np.ndarray, ref: torch.Tensor, tol=MODEL_TOL) -> None:
    torch.testing.assert_close(torch.from_numpy(np.asarray(got)), ref.detach().float(), atol=tol[0], rtol=tol[1],
                               equal_nan=True)


def _op_counts(path) -> dict[str, int]:
    m = onnx.load(os.fspath(path), load_external_data=False)
    c: dict[str, int] = {}
    for n in m.graph.node:
        c[n.op_type] = c.get(n.op_type, 0) + 1
    return c


def _domains(path) -> set[str]:
    m = onnx.load(os.fspath(path), load_external_data=False)
    return {n.domain for n in m.graph.node}


def _rebatch(tree, b: int, old: int = 2):
    """Every tensor with leading dim ``old`` resized to ``b`` along dim 0 (repeat, then cut)."""
    def f(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == old:
            return torch.cat([x] * (b // old + 1))[:b].clone()
        return x
    return pytree.tree_map(f, tree)


# ---------------------------------------------------------------------------------------------
# A module calling every translated fusediff op directly (no rewrite needed)
# ---------------------------------------------------------------------------------------------
class AllOps(nn.Module):
    def __init__(self, c=16, g=4, heads=2, emb=8, mask: str = "none"):
        super().__init__()
        self.g, self.heads, self.mask = g, heads, mask
        self.gn_w = nn.Parameter(torch.randn(c) * 0.2 + 1)
        self.gn_b = nn.Parameter(torch.randn(c) * 0.2)
        self.film = nn.Linear(emb, 2 * c)
        w = torch.randn(c, c, 3, 3) / math.sqrt(9 * c)
        self.register_buffer("u", winograd_weight_transform(w))
        self.register_buffer("w_ref", w)  # only to check that Winograd -> Conv recovers w
        self.conv_b = nn.Parameter(torch.randn(c) * 0.1)
        self.qkv = nn.Linear(c, 3 * c)
        self.lg_w = nn.Parameter(torch.randn(4 * c, c) / math.sqrt(c))
        self.lg_b = nn.Parameter(torch.randn(4 * c) * 0.1)
        self.proj = nn.Linear(2 * c, 2 * c)

    def forward(self, x, emb):
        N, C, H, W = x.shape
        scale, shift = self.film(emb).chunk(2, dim=1)
        h = FD.group_norm_silu(x, self.gn_w, self.gn_b, scale, shift, self.g, 1e-5, True)  # GN + FiLM + SiLU
        h = FD.group_norm_silu(h, None, None, None, None, self.g, 1e-6, False)  # no affine, no SiLU
        h = FD.winograd_conv2d(h, self.u, self.conv_b, 1)
        t = h.flatten(2).transpose(1, 2)  # (N, L, C)
        L, D = t.shape[1], C // self.heads
        q, k, v = self.qkv(t).reshape(N, L, 3, self.heads, D).permute(2, 0, 3, 1, 4)
        mask = None
        if self.mask == "bool":  # key padding; the last query row sees nothing (fully masked -> 0)
            mask = torch.ones(L, L, dtype=torch.bool, device=x.device)
            mask[:, -3:] = False
            mask[-1, :] = False
        elif self.mask == "float":
            mask = torch.linspace(-2.0, 0.0, L * L, device=x.device).reshape(L, L)
        a = FD.flash_attention(q, k, v, mask, None if self.mask == "none" else 0.3)
        s = torch.matmul(q, k.transpose(-1, -2)).reshape(N * self.heads, L, L) * D ** -0.5
        stats = FD.softmax_stats(s.reshape(-1, L))
        a2 = FD.softmax_matmul(s, stats, v.reshape(N * self.heads, L, D)).reshape(N, self.heads, L, D)
        t = t + (a + a2).transpose(1, 2).reshape(N, L, C)
        t = FD.linear_geglu(t, self.lg_w, self.lg_b, "tanh")  # (N, L, 2C)
        t = FD.geglu(self.proj(t), "none")  # (N, L, C)
        t = FD.gelu(t, "none")
        return t.transpose(1, 2).reshape(N, C, H, W) + h


def _allops_inputs(n=2, h=6, w=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 16, h, w, generator=g), torch.randn(n, 8, generator=g)


@pytest.mark.parametrize("opset,attention,mask", [
    (18, "auto", "none"),    # lowest opset: GroupNorm by ReduceMean math, GELU by Erf
    (20, "auto", "float"),   # Gelu op, GroupNorm still by math; additive mask, explicit scale
    (21, "auto", "bool"),    # GroupNormalization; MatMul/Softmax attention, bool mask with a fully masked row
    (23, "auto", "bool"),    # ONNX Attention with the same bool mask
    (23, "auto", "float"),   # ONNX Attention, additive mask
    (23, "matmul", "none"),  # opset 23 with the MatMul/Softmax attention
])
def test_every_op_translates_and_matches(tmp_path, opset, attention, mask):
    torch.manual_seed(0)
    model = AllOps(mask=mask).eval()
    x, emb = _allops_inputs()
    with torch.no_grad():
        ref = model(x, emb)
    path = ox.export_onnx(model, (x, emb), tmp_path / "allops.onnx", opset=opset, rewrite=False,
                          attention=attention)
    onnx.checker.check_model(os.fspath(path), full_check=True)
    assert _domains(path) <= {""}, "custom-domain node in the export"
    ops = _op_counts(path)
    assert ("GroupNormalization" in ops) == (opset >= 21)
    assert ("Gelu" in ops) == (opset >= 20)
    assert ("Attention" in ops) == (opset >= 23 and attention == "auto")
    assert ops.get("Conv", 0) == 1  # winograd_conv2d -> Conv
    (got,) = ox.run_onnx(path, x, emb)
    _close(got, ref)
    # dynamic batch: another batch size than exported
    x3, e3 = _allops_inputs(n=3)
    with torch.no_grad():
        ref3 = model(x3, e3)
    _close(ox.run_onnx(path, x3, e3)[0], ref3)


def test_winograd_weight_recovered_exactly():
    """The Conv weight recovered from U = G g G^T equals the original 3x3 filter."""
    torch.manual_seed(0)
    allops_model = AllOps()
    u = allops_model.u.double().numpy()
    cin, cout = u.shape[1:]
    uu = u.reshape(6, 6, cin, cout).transpose(3, 2, 0, 1)
    w = ox._WINOGRAD_G_PINV @ uu @ ox._WINOGRAD_G_PINV.T
    np.testing.assert_allclose(w, allops_model.w_ref.double().numpy(), atol=1e-6, rtol=0)


def test_fp16_ops_compute_in_fp32(tmp_path):
    """fp16 in/out: the translation casts to fp32 inside (like the kernels); GEGLU + GroupNorm only
    (onnxruntime's CPU EP lacks fp16 kernels for much else)."""

    class Half(nn.Module):
        def forward(self, x):
            y = FD.group_norm_silu(x, None, None, None, None, 2, 1e-5, True)
            return FD.geglu(y.flatten(2), "none")

    x = torch.randn(2, 4, 4, 6).half()
    m = Half().eval()
    with torch.no_grad():
        ref = m(x)
    path = ox.export_onnx(m, (x,), tmp_path / "half.onnx", opset=21, rewrite=False)
    (got,) = ox.run_onnx(path, x)
    assert got.dtype == np.float16
    atol, rtol = TOL[torch.float16]
    torch.testing.assert_close(torch.from_numpy(got).float(), ref.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Rewrite + export on small blocks and the plain / OptimizedModule entry points
# ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    """GroupNorm -> SiLU -> conv, SDPA self-attention, Linear -> GEGLU: one site of each family."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.norm = nn.GroupNorm(4, c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)
        self.ff = nn.Linear(c, 4 * c)
        self.heads = heads

    def forward(self, x):
        h = self.conv(F.silu(self.norm(x)))
        N, C, H, W = h.shape
        t = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(N, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, H * W, C)
        t = t + self.out(a)
        u, g = self.ff(t).chunk(2, dim=-1)
        t = t + (u * F.gelu(g))[..., :C]
        return t.transpose(1, 2).reshape(N, C, H, W)


def test_block_rewritten_and_exported(tmp_path):
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 16, 4, 5)
    with torch.no_grad():
        ref = m(x)
    prep = ox.prepare(m, (x,))
    assert prep.result.rewritten == {"groupnorm_silu": 1, "attention": 1, "geglu": 1}
    assert prep.fused_ops == ["fusediff::group_norm_silu", "fusediff::flash_attention", "fusediff::geglu"]
    path = ox.export_graph(prep, tmp_path / "block.onnx", opset=23)
    ops = _op_counts(path)
    assert ops["GroupNormalization"] == 1 and ops["Attention"] == 1 and ops["Gelu"] == 1
    _close(ox.run_onnx(path, x)[0], ref)
    # the same graph without the rewrite: torch's own translation, no GroupNormalization/Attention from us
    plain = ox.export_onnx(m, (x,), tmp_path / "plain.onnx", opset=23, rewrite=False)
    _close(ox.run_onnx(plain, x)[0], ref)


def test_optimized_module_uses_original_and_config(tmp_path):
    import fusediff

    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 16, 4, 5)
    om = fusediff.optimize(m, fusediff.RewriteConfig(patterns=("groupnorm",)))
    path = ox.export_onnx(om, (x,), tmp_path / "om.onnx", opset=23)
    assert _op_counts(path).get("GroupNormalization") == 1
    # Only the GroupNorm site became a fusediff op (attention/GEGLU were left out by the config);
    # torch's own translation still turns SDPA into ONNX Attention at opset 23.
    sources = {s["pattern"] for s in ox.onnx_to_networkx(path).graph["sites"]}
    assert sources == {"group_norm_silu"}
    with torch.no_grad():
        ref = m(x)
    _close(ox.run_onnx(path, x)[0], ref)


def _register_untranslatable() -> None:
    """A fusediff op without an ONNX translation (registered only when the test runs)."""
    if hasattr(torch.ops.fusediff, "onnx_test_untranslatable"):
        return

    @torch.library.custom_op("fusediff::onnx_test_untranslatable", mutates_args=())
    def _untranslatable(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @_untranslatable.register_fake
    def _untranslatable_fake(x):
        return torch.empty_like(x)


def test_untranslatable_op_error_names_it(tmp_path):
    _register_untranslatable()

    class M(nn.Module):
        def forward(self, x):
            return torch.ops.fusediff.onnx_test_untranslatable(FD.gelu(x, "none"))

    with pytest.raises(ox.UnsupportedOpError, match="fusediff::onnx_test_untranslatable") as ei:
        ox.export_onnx(M(), (torch.randn(2, 3),), tmp_path / "bad.onnx", rewrite=False)
    assert ei.value.op == "fusediff::onnx_test_untranslatable"
    assert not (tmp_path / "bad.onnx").exists()


def test_invalid_arguments(tmp_path):
    m, x = Block().eval(), torch.randn(2, 16, 4, 4)
    with pytest.raises(ValueError, match="opset"):
        ox.export_onnx(m, (x,), tmp_path / "a.onnx", opset=17)
    with pytest.raises(ValueError, match="attention"):
        ox.export_onnx(m, (x,), tmp_path / "a.onnx", attention="flash")
    with pytest.raises(ValueError, match="opset >= 23"):
        ox.translation_table(21, attention="onnx")
    with pytest.raises(TypeError, match="nn.Module"):
        ox.export_onnx(lambda x: x, (x,), tmp_path / "a.onnx")


# ---------------------------------------------------------------------------------------------
# Zoo U-Nets
# ---------------------------------------------------------------------------------------------
_ALL_ZOO = os.environ.get("FUSEDIFF_ONNX_ALL_ZOO") == "1"


def _zoo_cases():
    from fusediff import zoo

    if _ALL_ZOO:
        return [(n, o) for n in zoo.names() for o in (21, 23)]
    return [("ddpm", 21), ("ddpm", 23), ("sdxl", 23)]


_PREPARED: dict[str, tuple] = {}


def _zoo_prepared(name):
    """(model, args, kwargs, Prepared) captured once per fixture for both opsets."""
    if name not in _PREPARED:
        from fusediff import zoo

        model, args, kwargs = zoo.build(name)
        _PREPARED.clear()  # keep one model alive at a time
        _PREPARED[name] = (model, args, kwargs, ox.prepare(model, args, example_kwargs=kwargs))
    return _PREPARED[name]


@pytest.fixture(scope="module")
def zoo_exports(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo_onnx")


@pytest.mark.parametrize("name,opset", _zoo_cases())
def test_zoo_unet_exports_and_matches(zoo_exports, name, opset):
    from fusediff import zoo

    model, args, kwargs, prep = _zoo_prepared(name)
    assert prep.result.rewritten, f"{name}: nothing rewritten"
    path = ox.export_graph(prep, zoo_exports / f"{name}_{opset}.onnx", opset=opset)
    onnx.checker.check_model(os.fspath(path), full_check=True)
    assert _domains(path) <= {""}
    ops = _op_counts(path)
    rew = prep.result.rewritten
    if rew.get("groupnorm_silu") or rew.get("groupnorm"):
        assert ops.get("GroupNormalization", 0) >= rew.get("groupnorm_silu", 0) + rew.get("groupnorm", 0)
    if rew.get("attention"):
        assert ops.get("Attention", 0) == (rew["attention"] if opset >= 23 else 0)
    m = onnx.load(os.fspath(path), load_external_data=False)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    with torch.no_grad():
        ref = zoo.output_tensor(model(*args, **kwargs))
    _close(ox.run_onnx(path, *ox.onnx_inputs(args, kwargs))[0], ref)
    # dynamic batch: run batch 3 through the file exported at batch 2
    a3, k3 = _rebatch(args, 3), _rebatch(kwargs, 3)
    with torch.no_grad():
        ref3 = zoo.output_tensor(model(*a3, **k3))
    _close(ox.run_onnx(path, *ox.onnx_inputs(a3, k3))[0], ref3)


def test_onnx_graph_draws_with_the_fx_visualizer(zoo_exports):
    from fusediff.fxpasses import viz

    path = zoo_exports / "ddpm_23.onnx"
    if not path.exists():
        _, args, kwargs, prep = _zoo_prepared("ddpm")
        ox.export_graph(prep, path, opset=23)
    g = ox.onnx_to_networkx(onnx.load(os.fspath(path)), title="ddpm onnx")
    targets = {a["target"] for _, a in g.nodes(data=True)}
    assert {"onnx::GroupNormalization", "onnx::Attention", "onnx::Conv"} <= targets
    sites = g.graph["sites"]
    assert sites and {s["pattern"] for s in sites} == {"group_norm_silu", "flash_attention"}
    gn = [a for _, a in g.nodes(data=True) if a["target"] == "onnx::GroupNormalization"]
    assert all(a["family"] == "groupnorm" and a["matched"] and a["fused"] for a in gn)
    assert any(a["module"].startswith("down_blocks.") for a in gn)  # module scopes survived
    dot = viz.to_dot(g)
    assert dot.startswith("digraph") and "GroupNormalization" in dot and "cluster_site_" in dot
    b = viz.collapse(g, 2)
    assert any(k.startswith("down_blocks.") for k in b.nodes)
    viz.write_svg(b, zoo_exports / "blocks.svg", renderer="builtin")
    assert (zoo_exports / "blocks.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


def test_dynamic_spatial(tmp_path):
    """H, W dynamic (dims 2, 3 of rank-4 inputs): another resolution runs through the same file."""
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 16, 4, 5)
    path = ox.export_onnx(m, (x,), tmp_path / "sp.onnx", opset=21, dynamic_spatial=True)
    dims = [d.dim_param or d.dim_value for d in onnx.load(os.fspath(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 16, "height", "width"]
    x2 = torch.randn(3, 16, 6, 3)
    with torch.no_grad():
        ref = m(x2)
    _close(ox.run_onnx(path, x2)[0], ref)


# ---------------------------------------------------------------------------------------------
# CLI + latency on the shipped digits model
# ---------------------------------------------------------------------------------------------
def test_cli_export_digits_and_latency(tmp_path, capsys):
    """``fusediff export-onnx digits --check`` and onnxruntime CPU latency vs PyTorch eager."""
    from fusediff.lowering.models import resolve

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    ox.add_cli(sub)
    out = tmp_path / "digits.onnx"
    a = p.parse_args(["export-onnx", "digits", "--out", str(out), "--opset", "21", "--check"])
    assert a.fn(a) == 0
    text = capsys.readouterr().out
    assert "GroupNormalization" in text and "onnxruntime vs eager" in text
    err = float(text.split("max abs error")[1].split()[0])
    assert err < MODEL_TOL[0]

    unet, args, kwargs = resolve("digits")
    unet.eval()
    with torch.no_grad():
        ref = unet(*args, **kwargs).sample
    _close(ox.run_onnx(out, *ox.onnx_inputs(args, kwargs))[0], ref)
    # One intra-op thread for both: on a shared 2-core machine multi-threaded eager timings swing
    # by 100x with the load (OpenMP oversubscription); one thread is the stable comparison.
    r = ox.compare_latency(unet, args, kwargs, out, threads=1, warmup=2, reps=10)
    assert r["eager_ms"] > 0 and r["ort_ms"] > 0
    with capsys.disabled():
        print(f"\n[onnx latency] digits UNet2DModel, input (2,1,16,16) + timestep, opset 21, 1 thread, median of "
              f"10 after 2 warm-up: PyTorch eager {r['eager_ms']:.2f} ms (min {r['eager_min_ms']:.2f}), "
              f"onnxruntime CPU {r['ort_ms']:.2f} ms (min {r['ort_min_ms']:.2f}), eager/ORT {r['speedup']:.2f}x; "
              f"torch {torch.__version__}, onnxruntime {ort.__version__}, load avg {os.getloadavg()[0]:.1f}")


def test_digits_ddim_trajectory_through_onnxruntime(tmp_path):
    """The shipped model's whole DDIM run (float, rewritten) through onnxruntime matches PyTorch."""
    from fusediff import digits
    from fusediff.lowering.onnx import export_onnx, make_session, run_onnx

    unet = digits.load_digits_unet()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    path = export_onnx(unet, (x, torch.full((4,), 500, dtype=torch.int64)), str(tmp_path / "digits.onnx"), opset=21)
    sess = make_session(path, threads=1)

    def ort_fn(xt, t):
        (eps,) = run_onnx(path, xt, t.to(torch.int64), session=sess)
        return torch.from_numpy(eps)

    with torch.no_grad():
        ref = digits.ddim_sample(unet, 4, steps=10, seed=3)
    out = digits.ddim_sample(None, 4, steps=10, seed=3, unet_fn=ort_fn)
    torch.testing.assert_close(out, ref, atol=TRAJECTORY_TOL[0], rtol=TRAJECTORY_TOL[1])
