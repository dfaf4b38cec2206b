"""fusediff::group_norm_silu vs the pure-torch reference (CPU tier: Triton interpreted)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusediff.kernels import _common, groupnorm
from fusediff.kernels.groupnorm import group_norm_silu_kernel_supported, group_norm_silu_ref
from tests.tolerances import TOL, assert_close, assert_lowp_close

OP = torch.ops.fusediff.group_norm_silu
OP_NAME = "group_norm_silu"
EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (shape, num_groups)
CASES = [
    pytest.param((2, 63, 21, 17), 3, id="c63g3"),  # odd channels, non-pow2 spatial, 21 ch/group (7497 elems)
    pytest.param((2, 63, 21, 17), 7, id="c63g7"),  # odd channels, 9 ch/group, non-pow2 group size 3213
    pytest.param((1, 32, 8, 8), 32, id="c32g32"),  # one channel per group, 32 programs
    pytest.param((2, 64, 5, 7), 8, id="c64g8"),  # tiny odd spatial (35 positions)
    pytest.param((2, 48, 19), 6, id="ncl"),  # 3-D (N, C, L) as in conv1d/attention blocks
]

# (weight/bias present, FiLM scale/shift present, SiLU)
EPILOGUES = {
    "affine_film_silu": (True, True, True),
    "affine_only": (True, False, False),
}


def _make(shape, groups, dtype, *, affine=True, film=True, channels_last=False, offset=0.5, std=2.0):
    N, C = shape[0], shape[1]
    x = (torch.randn(shape) * std + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    # Parameters in x's dtype (as in a half-precision model); references upcast the same values.
    w = (torch.randn(C) * 0.5 + 1.0).to(dtype) if affine else None
    b = (torch.randn(C) * 0.5).to(dtype) if affine else None
    scale = (torch.randn(N, C) * 0.5).to(dtype) if film else None
    shift = (torch.randn(N, C) * 0.5).to(dtype) if film else None
    return x, w, b, scale, shift


def _eager_same_dtype(x, w, b, scale, shift, groups, eps, silu):
    """What eager PyTorch computes in x's dtype (the Liger baseline)."""
    cast = (lambda t: None if t is None else t.to(x.dtype))
    y = F.group_norm(x, groups, cast(w), cast(b), eps)
    bshape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.to(x.dtype).reshape(bshape))
    if shift is not None:
        y = y + shift.to(x.dtype).reshape(bshape)
    return F.silu(y) if silu else y


def _run_and_check(x, w, b, scale, shift, groups, silu, eps=EPS):
    """Run the op, prove Triton ran, compare with the fp32 reference (Liger rule for fp16/bf16)."""
    before = _common.DISPATCH_COUNTS[(OP_NAME, "triton")]
    y = OP(x, w, b, scale, shift, groups, eps, silu)
    assert _common.DISPATCH_COUNTS[(OP_NAME, "triton")] == before + 1, "the Triton path did not run"
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == torch.empty_like(x).stride(), "output must keep x's memory format"
    ref32 = group_norm_silu_ref(x.float(), w, b, scale, shift, groups, eps, silu)
    eager = _eager_same_dtype(x, w, b, scale, shift, groups, eps, silu)
    assert_lowp_close(y, ref32, eager)
    return y


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, shape, groups, epilogue):
    affine, film, silu = EPILOGUES[epilogue]
    x, w, b, scale, shift = _make(shape, groups, dtype, affine=affine, film=film)
    _run_and_check(x, w, b, scale, shift, groups, silu)


@pytest.mark.parametrize("shape,groups", [CASES[0], CASES[3]])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last(dtype, shape, groups):
    x, w, b, scale, shift = _make(shape, groups, dtype, channels_last=True)
    y = _run_and_check(x, w, b, scale, shift, groups, True)
    assert y.is_contiguous(memory_format=torch.channels_last)


# Knob overrides forcing each variant on a (2, 32, 24, 20) input, 4 groups of 8 x 480 = 3840 elements.
VARIANT_KNOBS = {
    "one_tile": {},
    "loop": {"ONE_TILE_MAX": 0},  # 4 BLOCK=1024 iterations, the last one partial
    "split": {"ONE_TILE_MAX": 0, "SPLIT_THRESHOLD": 1024, "SPLIT_CHUNK": 1024},  # 4 chunks
    # chunks of 700 (not a multiple of BLOCK, nor of CPG=8 in channels_last): 6 chunks, last 340
    "split_ragged": {"ONE_TILE_MAX": 0, "SPLIT_THRESHOLD": 1024, "SPLIT_CHUNK": 700, "SPLIT_MIN_CHUNK": 100},
}


def _force_variant(monkeypatch, variant):
    for name, value in VARIANT_KNOBS[variant].items():
        monkeypatch.setattr(groupnorm, name, value)
    return variant.split("_")[0] if variant.startswith("split") else variant


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("variant", list(VARIANT_KNOBS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # fp16: main grid
def test_variants(monkeypatch, dtype, variant, channels_last):
    expected = _force_variant(monkeypatch, variant)
    before = groupnorm.VARIANT_COUNTS[expected]
    x, w, b, scale, shift = _make((2, 32, 24, 20), 4, dtype, channels_last=channels_last)
    _run_and_check(x, w, b, scale, shift, 4, True)
    assert groupnorm.VARIANT_COUNTS[expected] == before + 1, f"{variant} variant did not run"


@pytest.mark.parametrize("variant", ["one_tile", "loop", "split_ragged"])
def test_large_mean_is_stable(monkeypatch, variant):
    """|mean| >> std: E[x^2]-E[x]^2 in fp32 would lose ~all digits; Welford/two-pass must not."""
    _force_variant(monkeypatch, variant)
    x = torch.randn(2, 32, 24, 20) + 300.0
    w, b = torch.randn(32), torch.randn(32)
    y = OP(x, w, b, None, None, 4, EPS, False)
    expected = F.group_norm(x.double(), 4, w.double(), b.double(), EPS).float()
    assert_close(y, expected)


@pytest.mark.parametrize(
    "form",
    ["no_affine", "weight_only", "bias_only", "scale_only", "shift_only", "film_nc11", "film_chunk_view",
     "params_fp64", "params_bf16"],
)
def test_parameter_forms(form):
    """Optional pieces of the epilogue in fp32 (x fp32, FiLM in the forms diffusion code produces)."""
    shape, groups = (2, 24, 6, 5), 6
    N, C = shape[:2]
    x, w, b, scale, shift = _make(shape, groups, torch.float32)
    if form == "no_affine":
        w = b = None
    elif form == "weight_only":
        b, scale, shift = None, None, None
    elif form == "bias_only":
        w = None
    elif form == "scale_only":
        shift = None
    elif form == "shift_only":
        scale = None
    elif form == "film_nc11":  # ADM: emb_out[..., None, None]
        scale, shift = scale[:, :, None, None], shift[:, :, None, None]
    elif form == "film_chunk_view":  # scale, shift = emb_out.chunk(2, dim=1): strided views
        scale, shift = torch.randn(N, 2 * C).chunk(2, dim=1)
        assert not scale.is_contiguous()
    elif form == "params_fp64":
        w, b, scale, shift = (t.double() for t in (w, b, scale, shift))
    elif form == "params_bf16":
        w, b, scale, shift = (t.bfloat16() for t in (w, b, scale, shift))
    _run_and_check(x, w, b, scale, shift, groups, True)


def test_non_mergeable_spatial_layout():
    """(H, W) transposed view: spatial dims do not merge into one stride -> dense fallback."""
    x = torch.randn(2, 16, 9, 7).transpose(2, 3)
    w, b = torch.randn(16), torch.randn(16)
    y = _run_and_check(x, w, b, None, None, 4, True)
    assert y.stride() == torch.empty_like(x).stride()


def test_empty_batch():
    x = torch.randn(0, 8, 4, 4)
    y = OP(x, None, None, None, None, 2, EPS, True)
    assert y.shape == x.shape


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("variant", ["one_tile", "loop", "split_ragged"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_stays_in_its_group(monkeypatch, variant, bad):
    _force_variant(monkeypatch, variant)
    x, w, b, scale, shift = _make((2, 32, 24, 20), 4, torch.float32)
    x[1, 17, 5, 3] = bad  # sample 1, group 2 (channels 16..23)
    y = OP(x, w, b, scale, shift, 4, EPS, True)
    ref = group_norm_silu_ref(x, w, b, scale, shift, 4, EPS, True)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN mask differs from the reference"
    assert torch.isnan(y[1, 16:24]).all() and not torch.isnan(y[0]).any() and not torch.isnan(y[1, :16]).any()
    assert_close(y, ref)


def test_opcheck():
    x, w, b, scale, shift = _make((2, 16, 5, 6), 4, torch.float16)
    torch.library.opcheck(OP, (x, w, b, scale, shift, 4, EPS, True))
    xcl, *_ = _make((2, 16, 5, 6), 4, torch.float32, channels_last=True)
    torch.library.opcheck(OP, (xcl, None, None, None, None, 4, EPS, False))


def test_compile_fullgraph_smoke():
    def block(x, w, b, emb):
        scale, shift = emb.chunk(2, dim=1)
        return OP(x, w, b, scale, shift, 4, EPS, True) * 2.0

    x = torch.randn(2, 16, 6, 5)
    w, b, emb = torch.randn(16), torch.randn(16), torch.randn(2, 32)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    before = _common.DISPATCH_COUNTS[(OP_NAME, "triton")]
    with torch.no_grad():
        y = compiled(x, w, b, emb)
    assert _common.DISPATCH_COUNTS[(OP_NAME, "triton")] > before
    scale, shift = emb.chunk(2, dim=1)
    assert_close(y, group_norm_silu_ref(x, w, b, scale, shift, 4, EPS, True) * 2.0)


def test_reference_matches_torch_modules():
    """The reference itself: nn.GroupNorm -> FiLM -> nn.SiLU, independently written."""
    gn = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x, scale, shift = torch.randn(2, 16, 5, 6), torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        expected = torch.nn.SiLU()(gn(x) * (1 + scale[..., None, None]) + shift[..., None, None])
        got = group_norm_silu_ref(x, gn.weight, gn.bias, scale, shift, 4, gn.eps, True)
    torch.testing.assert_close(got, expected, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])


def test_invalid_arguments():
    x = torch.randn(2, 63, 4, 4)
    with pytest.raises(ValueError, match=r"C=63.*num_groups=4"):
        OP(x, None, None, None, None, 4, EPS, True)
    with pytest.raises(ValueError, match="scale"):
        OP(x, None, None, torch.randn(2, 62), None, 7, EPS, True)
    with pytest.raises(ValueError, match="shift"):
        OP(x, None, None, None, torch.randn(63), 7, EPS, True)
    with pytest.raises(ValueError, match="weight"):
        OP(x, torch.randn(62), None, None, None, 7, EPS, True)
    with pytest.raises(TypeError, match="x must be"):
        OP(torch.ones(2, 63, 4, 4, dtype=torch.int32), None, None, None, None, 7, EPS, True)
    with pytest.raises(TypeError, match="bias"):
        OP(x, None, torch.ones(63, dtype=torch.int64), None, None, 7, EPS, True)
    with pytest.raises(ValueError, match="4-D"):
        OP(torch.randn(2, 63), None, None, None, None, 7, EPS, True)
    with pytest.raises(ValueError, match="num_groups"):
        OP(x, None, None, None, None, 0, EPS, True)


def test_kernel_supported():
    assert group_norm_silu_kernel_supported((2, 320, 64, 64), torch.float16, 32) == (True, "")
    assert group_norm_silu_kernel_supported((2, 48, 19), torch.bfloat16, 6)[0]
    ok, why = group_norm_silu_kernel_supported((2, 63, 8, 8), torch.float32, 4)
    assert not ok and "63" in why and "4" in why
    ok, why = group_norm_silu_kernel_supported((2, 32, 4, 4, 4), torch.float32, 8)
    assert not ok and "5-D" in why
    ok, why = group_norm_silu_kernel_supported((2, 32, 4, 4), torch.float64, 8)
    assert not ok and "float64" in why
    ok, why = group_norm_silu_kernel_supported((1, 128, 8192, 8192), torch.float16, 32)
    assert not ok and "int32" in why


def test_plan_launch(monkeypatch):
    monkeypatch.setattr(groupnorm, "ONE_TILE_MAX", 8192)
    monkeypatch.setattr(groupnorm, "SPLIT_THRESHOLD", 65536)
    monkeypatch.setattr(groupnorm, "SPLIT_CHUNK", 16384)
    monkeypatch.setattr(groupnorm, "SPLIT_MIN_CHUNK", 1024)
    plan = groupnorm._plan_launch
    assert plan(64, 2560, 132)[0] == "one_tile"  # SD 8x8x1280, G=32
    assert plan(32 * 32, 40960, 132) == ("loop", 1, 40960)  # batch 32: enough programs
    variant, splits, chunk = plan(32, 1 << 20, None)  # VAE-size group: split by size alone
    assert variant == "split" and splits == 64 and chunk == 16384
    variant, splits, chunk = plan(32, 40960, 132)  # batch 1: split to fill 132 SMs
    assert variant == "split" and 32 * splits >= 132 and splits * chunk >= 40960 and chunk % 1024 == 0


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_real_shapes(dtype, channels_last):
    from benchmarks.shapes import GROUPNORM

    for _, C, H, W, G in GROUPNORM:
        for batch in (1, 8):
            x, w, b, scale, shift = _make((batch, C, H, W), G, dtype, channels_last=channels_last)
            args = [t.cuda() if t is not None else None for t in (x, w, b, scale, shift)]
            _run_and_check(*args, G, True)
    # VAE decoder size: 1M-element groups take the split variant.
    x, w, b, scale, shift = _make((1, 128, 256, 256), 32, dtype, film=False, channels_last=channels_last)
    _run_and_check(x.cuda(), w.cuda(), b.cuda(), None, None, 32, True)
