"""Winograd F(4x4,3x3) conv: Triton kernels vs direct conv and vs the same-math reference.

CPU tier runs the kernels under TRITON_INTERPRET=1 (tests/conftest.py); GPU tier (-m gpu) runs
real U-Net shapes with autotuning.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusediff.fxpasses.costs.winograd import _modelled_times, winograd_error_report, winograd_pays
from fusediff.kernels import _common, winograd
from fusediff.kernels.winograd import (
    winograd_conv2d,
    winograd_conv2d_ref,
    winograd_weight_transform,
)
from tests.tolerances import TOL, TOL_WINOGRAD

OP = "winograd_conv2d"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# ((N, Cin, H, W), Cout)
SHAPES = [
    ((1, 3, 8, 8), 5),  # tiny: 2x2 tiles, Cin and Cout far below every block size
    ((2, 7, 13, 11), 6),  # odd channels, H and W not multiples of 4 (partial tail tiles), batch 2
    ((1, 16, 17, 9), 24),  # 1-pixel tail row with padding 1, Cin == BLOCK_K, non-square
]
# Cout > BLOCK_CO, P > BLOCK_P (several tile blocks, grouped ordering), Cin > BLOCK_K with a tail.
MULTI_BLOCK = ((2, 20, 18, 17), 36)


def _problem(shape, cout, dtype, bias=True):
    x = torch.randn(*shape).to(dtype)
    w = torch.randn(cout, shape[1], 3, 3) / (9 * shape[1]) ** 0.5
    b = torch.randn(cout) if bias else None
    return x, w, b


def _assert_scaled(actual: torch.Tensor, expected: torch.Tensor, table, dtype) -> None:
    """Tolerance of ``dtype`` from ``table``, relative to the output scale max|expected|."""
    scale = max(expected.float().abs().max().item(), 1.0)
    atol, rtol = table[dtype]
    torch.testing.assert_close(actual.float() / scale, expected.float() / scale, atol=atol, rtol=rtol)


def _check(x, w, b, padding, fused=None):
    """Run through the op (or a chosen variant), prove the Triton path ran, compare."""
    u = winograd_weight_transform(w)
    before = _common.DISPATCH_COUNTS[(OP, "triton")]
    if fused is None:
        y = winograd_conv2d(x, u, b, padding)
        assert _common.DISPATCH_COUNTS[(OP, "triton")] == before + 1, "Triton path did not run"
    else:
        y = winograd._launch(x, u, b, padding, fused=fused)
    assert y.dtype == x.dtype and y.is_contiguous()
    direct = F.conv2d(x.float(), w, b, padding=padding)  # exact-input direct conv in fp32
    assert y.shape == direct.shape
    _assert_scaled(y, direct, TOL_WINOGRAD, x.dtype)
    # Same math, same operand rounding: only summation order and output rounding differ.
    ref = winograd_conv2d_ref(x, u, b, padding)
    _assert_scaled(y, ref, TOL, x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,cout", SHAPES, ids=str)
@pytest.mark.parametrize("padding,bias", [(0, True), (1, False)], ids=["pad0-bias", "pad1-nobias"])
def test_kernel_matches_direct_and_ref(shape, cout, dtype, padding, bias):
    x, w, b = _problem(shape, cout, dtype, bias)
    _check(x, w, b, padding)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", [0, 1])
def test_fused_kernel_matches(dtype, padding):
    x, w, b = _problem((2, 7, 13, 11), 6, dtype, bias=padding == 1)
    _check(x, w, b, padding, fused=True)


@pytest.mark.parametrize("fused,dtype", [(False, torch.float16), (True, torch.float32), (True, torch.bfloat16)])
def test_multi_block(fused, dtype):
    shape, cout = MULTI_BLOCK
    x, w, b = _problem(shape, cout, dtype)
    _check(x, w, b, 1, fused=fused)


def test_fused_flag_routes_op(monkeypatch):
    monkeypatch.setattr(winograd, "FUSED_OUTPUT_TRANSFORM", True)
    x, w, b = _problem((1, 3, 8, 8), 5, torch.float32)
    _check(x, w, b, 1)


def test_non_contiguous_input():
    x, w, b = _problem((2, 7, 13, 11), 6, torch.float32)
    _check(x.to(memory_format=torch.channels_last), w, b, 1)
    _check(x.transpose(2, 3).contiguous().transpose(2, 3), w, b, 0)  # H-stride 1


@pytest.mark.parametrize("padding", [0, 1])
def test_reference_matches_direct_fp32(padding):
    # The reference alone (no interpreter): Winograd's own fp32 error on a wider set of shapes.
    for shape, cout in SHAPES + [MULTI_BLOCK, ((3, 33, 31, 8), 17)]:
        x, w, b = _problem(shape, cout, torch.float32)
        u = winograd_weight_transform(w)
        y = winograd_conv2d_ref(x, u, b, padding)
        _assert_scaled(y, F.conv2d(x, w, b, padding=padding), TOL_WINOGRAD, torch.float32)


def test_weight_transform_layout():
    w = torch.randn(5, 3, 3, 3)
    u = winograd_weight_transform(w)
    assert u.shape == (36, 3, 5) and u.dtype == torch.float32 and u.is_contiguous()
    # G's first row is (1/4, 0, 0) and last row (0, 0, 1): corners of G g G^T are g00/16 and g22.
    torch.testing.assert_close(u[0], w[:, :, 0, 0].T / 16)
    torch.testing.assert_close(u[35], w[:, :, 2, 2].T)
    torch.testing.assert_close(u[5], w[:, :, 0, 2].T / 4)  # (a, b) = (0, 5): g02 / 4
    # fp16 weights are widened, not rounded further.
    torch.testing.assert_close(winograd_weight_transform(w.half()), winograd_weight_transform(w.half().float()))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on inf - inf inside the interpreter
def test_nan_inf_propagation():
    x, w, b = _problem((1, 4, 12, 12), 3, torch.float32)
    u = winograd_weight_transform(w)
    x[0, 1, 5, 5] = float("nan")
    x[0, 2, 1, 10] = float("inf")
    y = winograd_conv2d(x, u, b, 1)
    ref = winograd_conv2d_ref(x, u, b, 1)
    direct = F.conv2d(x, w, b, padding=1)
    bad = ~torch.isfinite(y)
    assert torch.equal(bad, ~torch.isfinite(ref))
    assert torch.equal(torch.isnan(y) | torch.isinf(y), bad)
    # Every output direct conv poisons is poisoned here too; Winograd spreads it to whole tiles.
    assert bad[~torch.isfinite(direct)].all()
    # Tiles whose 6x6 patch misses both pixels stay finite: tile (1,1) holds (5,5), tile (0,2)
    # holds (1,10) (patches start at 4 t - 1), so tile (2,0) (rows 8..11, cols 0..3) is clean.
    assert bad[:, :, 4:8, 4:8].all() and bad[:, :, 0:4, 8:12].all()
    assert torch.isfinite(y[:, :, 8:12, 0:4]).all()
    assert torch.isfinite(y[:, :, 0:4, 0:4]).all()


def test_opcheck():
    x, w, b = _problem((1, 3, 8, 8), 5, torch.float32)
    u = winograd_weight_transform(w)
    torch.library.opcheck(torch.ops.fusediff.winograd_conv2d.default, (x, u, b, 1))
    torch.library.opcheck(torch.ops.fusediff.winograd_conv2d.default, (x, u, None, 0))


def test_compile_fullgraph_smoke():
    x, w, b = _problem((1, 3, 8, 8), 5, torch.float32)
    u = winograd_weight_transform(w)

    def fn(inp):
        return torch.relu(winograd_conv2d(inp * 2.0, u, b, 1))

    before = _common.DISPATCH_COUNTS[(OP, "triton")]
    with torch.no_grad():
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert _common.DISPATCH_COUNTS[(OP, "triton")] > before
    _assert_scaled(got, torch.relu(F.conv2d(x * 2.0, w, b, padding=1)), TOL_WINOGRAD, torch.float32)


def test_dispatch_counts_triton_path():
    x, w, b = _problem((1, 3, 8, 8), 5, torch.float16)
    u = winograd_weight_transform(w)
    tri = _common.DISPATCH_COUNTS[(OP, "triton")]
    ref = _common.DISPATCH_COUNTS[(OP, "reference")]
    winograd_conv2d(x, u, b, 1)
    assert _common.DISPATCH_COUNTS[(OP, "triton")] == tri + 1
    assert _common.DISPATCH_COUNTS[(OP, "reference")] == ref


def test_invalid_arguments():
    x, w, b = _problem((1, 3, 8, 8), 5, torch.float32)
    u = winograd_weight_transform(w)
    with pytest.raises(ValueError, match="padding"):
        winograd_conv2d(x, u, b, 2)
    with pytest.raises(ValueError, match="3, 3"):
        winograd_weight_transform(torch.randn(5, 3, 5, 5))  # 5x5 kernel
    with pytest.raises(ValueError, match="36"):
        winograd_conv2d(x, u[:35], b, 1)  # wrong U shape
    with pytest.raises(ValueError, match="Cin=3"):
        winograd_conv2d(x, winograd_weight_transform(torch.randn(5, 4, 3, 3)), b, 1)
    with pytest.raises(TypeError, match="u must be float32"):
        winograd_conv2d(x, u.half(), b, 1)
    with pytest.raises(ValueError, match="bias"):
        winograd_conv2d(x, u, torch.randn(4), 1)
    with pytest.raises(ValueError, match="4-D"):
        winograd_conv2d(x[0], u, b, 1)
    with pytest.raises(TypeError, match="x must be"):
        winograd_conv2d(x.double(), u, b, 1)
    with pytest.raises(ValueError, match="smaller than the 3x3"):
        winograd_conv2d(torch.randn(1, 3, 2, 8), u, b, 0)
    # Stride, dilation, groups and kernel size are not the op's to take: the policy refuses them.
    big_x, big_w = (8, 640, 32, 32), (640, 640, 3, 3)
    for kw, word in [({"stride": 2}, "stride"), ({"dilation": (2, 2)}, "dilation"), ({"groups": 2}, "groups"),
                     ({"padding": 2}, "padding")]:
        ok, why = winograd_pays(big_x, big_w, "cuda", **kw)
        assert not ok and word in why


def test_winograd_pays_rules():
    assert winograd_pays((8, 640, 32, 32), (640, 640, 3, 3), "cpu") == (False, "cpu: direct conv is used")
    ok, why = winograd_pays((8, 640, 32, 32), (640, 640, 3, 3), "mps")
    assert not ok and "mps" in why
    ok, why = winograd_pays((8, 640, 32, 32), (640, 640, 5, 5), "cuda")
    assert not ok and "5x5" in why
    ok, why = winograd_pays((8, 32, 32, 32), (32, 32, 3, 3), "cuda")
    assert not ok and "Cin=32" in why
    ok, why = winograd_pays((8, 2048, 32, 32), (2048, 2048, 3, 3), "cuda", dtype=torch.float32)
    assert not ok and "float32" in why
    ok, why = winograd_pays((8, 640, 4, 32), (640, 640, 3, 3), "cuda")
    assert not ok and "spatial" in why
    ok, why = winograd_pays((8, 640, 9, 9), (640, 640, 3, 3), "cuda")  # 9x9 out: 9x9 of 12x12 used
    assert not ok and "fill" in why
    # Compute-bound (2048 channels, 512 tiles): the 4x saving dominates the added traffic.
    ok, why = winograd_pays((8, 2048, 32, 32), (2048, 2048, 3, 3), "cuda", dtype=torch.bfloat16)
    assert ok, why
    # One 8x8 image with 1280 channels: 4 tiles, U (9 MB x 4.5) dominates.
    ok, why = winograd_pays((1, 1280, 8, 8), (1280, 1280, 3, 3), "cuda")
    assert not ok and "speedup" in why


def test_pays_model_prefers_fused():
    # Folding the output transform into the GEMM only removes traffic: never modelled slower.
    for n, c, hw in [(1, 320, 64), (8, 640, 32), (32, 192, 32)]:
        td, t3 = _modelled_times(n, c, c, hw, hw, 1, fused=False)
        _, tf = _modelled_times(n, c, c, hw, hw, 1, fused=True)
        assert tf <= t3 and td > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_error_report(dtype):
    x, w, b = _problem((1, 8, 12, 12), 8, dtype)
    rep = winograd_error_report(x, w, b, 1)
    assert rep["dtype"] == str(dtype).replace("torch.", "") and rep["path"] == "triton"
    for k in ("winograd_fp32", "direct_fp32", "winograd", "direct"):
        assert 0.0 <= rep[f"{k}_rel"] < 1.0 and rep[f"{k}_max_abs"] >= 0.0
    assert rep["winograd_fp32_rel"] < TOL_WINOGRAD[torch.float32][0]
    assert rep["winograd_rel"] < TOL_WINOGRAD[dtype][0]
    # Winograd in 16-bit is worse than fp32 Winograd, and (here) no better than direct conv.
    assert rep["winograd_rel"] > rep["winograd_fp32_rel"]
    assert rep["error_ratio"] >= 1.0


# ----------------------------------------------------------------------------- GPU tier
GPU_SHAPES = [((2, 320, 64, 64), 320), ((1, 640, 32, 32), 640), ((8, 192, 32, 32), 192), ((2, 384, 15, 17), 384)]


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,cout", GPU_SHAPES, ids=str)
def test_gpu_real_shapes(shape, cout, dtype, fused, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the fp32 direct conv is the reference
    x, w, b = _problem(shape, cout, dtype)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    for padding in (0, 1):
        _check(x, w, b, padding, fused=fused)
