"""Partially fused softmax (kernels/softmax.py): softmax_stats, softmax_matmul and the composite.

CPU tier: Triton interpreted (TRITON_INTERPRET=1, set by tests/conftest.py), small shapes.
GPU tier (-m gpu): the real SD-1.5 / LDM-8 attention shapes from benchmarks/shapes.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusediff.kernels.softmax as sm
from fusediff.kernels import _common
from fusediff.kernels.attention import flash_attention_ref
from tests.tolerances import TOL, TOL_LONG_REDUCTION, assert_close, assert_lowp_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, H, Lq, Lk, D) -- same grid as test_attention; the interpreter runs 32x32 matmul tiles and
# 16-row x 64-column stats blocks.
SHAPES = [
    (2, 3, 33, 77, 40),  # SD cross-attn: 77 text tokens (column tail), Lq tail, D=40 -> 64
    (1, 2, 64, 64, 24),  # tile-aligned lengths, D=24 padded to 32
    (2, 1, 17, 17, 80),  # odd lengths below one tile, D=80 padded to 128
    (1, 1, 16, 9, 160),  # Lq != Lk, Lk < one tile, D=160 padded to 256
    (1, 2, 50, 50, 48),  # non-pow2 lengths and D
    (1, 1, 8, 8, 96),  # tiny lengths, D=96 padded to 128
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]

# (N, L) score matrices for softmax_stats.
STATS_SHAPES = [
    (198, 77),  # 2*3*33 cross-attn rows x 77 tokens: row-block tail (198 = 12*16 + 6), column tail
    (128, 64),  # aligned
    (17, 17),  # one partial block each way
    (16, 9),  # L < one column block
    (3, 2000),  # long rows: 32 column blocks merged online (the paper's multi-stage reduction)
]


def _scores(shape, dtype, spread=3.0):
    # Scores with a spread like real logits (not all near 0) so exp() is not ~1 everywhere.
    return (torch.randn(*shape) * spread).to(dtype)


# ---------------------------------------------------------------------------------------------
# softmax_stats
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", STATS_SHAPES, ids=["x".join(map(str, s)) for s in STATS_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_match_reference(shape, dtype):
    s = _scores(shape, dtype)
    out = sm.softmax_stats(s)
    assert out.shape == (shape[0], 2) and out.dtype == torch.float32
    # Kernel and reference both upcast the same low-precision scores and work in fp32.
    assert_close(out, sm.softmax_stats_ref(s), table=TOL_LONG_REDUCTION if shape[1] >= 1000 else TOL)
    # Eq. (4) independently of the reference: max is exact, sum against torch.logsumexp.
    x = s.float()
    torch.testing.assert_close(out[:, 0], x.amax(-1), atol=0, rtol=0)
    torch.testing.assert_close(out[:, 0] + out[:, 1].log(), torch.logsumexp(x, -1), atol=1e-5, rtol=1e-5)


def test_stats_non_contiguous():
    base = _scores((77, 40), torch.float16)
    s = base.t()  # (40, 77) with column stride 40
    assert not s.is_contiguous()
    assert_close(sm.softmax_stats(s), sm.softmax_stats_ref(s))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_stats_special_values():
    s = _scores((6, 150), torch.float32)
    s[0] = float("-inf")  # fully masked row -> (-inf, 0)
    s[1, :64] = float("-inf")  # first column block fully masked, later blocks live (safe max)
    s[2, 100] = float("nan")  # NaN -> (NaN, NaN) like torch.amax / exp-sum
    s[3, 5] = float("inf")  # +inf -> (inf, NaN): exp(inf - inf)
    s[4, ::2] = float("-inf")  # half masked
    out = sm.softmax_stats(s)
    ref = sm.softmax_stats_ref(s)
    assert_close(out, ref)
    assert out[0, 0].item() == -math.inf and out[0, 1].item() == 0.0
    assert math.isnan(out[2, 0].item()) and math.isnan(out[2, 1].item())
    assert out[3, 0].item() == math.inf and math.isnan(out[3, 1].item())


# ---------------------------------------------------------------------------------------------
# softmax_matmul
# ---------------------------------------------------------------------------------------------
def _sm_inputs(shape, dtype):
    B, H, Lq, Lk, D = shape
    s = _scores((B * H, Lq, Lk), dtype)
    v = torch.randn(B * H, Lk, D).to(dtype)
    return s, v


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_matches_reference(shape, dtype):
    s, v = _sm_inputs(shape, dtype)
    stats = sm.softmax_stats(s.reshape(-1, s.shape[-1]))
    out = sm.softmax_matmul(s, stats, v)
    assert out.shape == (s.shape[0], s.shape[1], v.shape[2]) and out.dtype == dtype and out.is_contiguous()
    ref32 = torch.softmax(s.float(), -1) @ v.float()
    if dtype == torch.float32:
        assert_close(out, ref32)
        assert_close(out, sm.softmax_matmul_ref(s, stats, v))
    else:
        # Eager: the unfused torch ops in the same dtype.
        assert_lowp_close(out, ref32, torch.softmax(s, -1) @ v)


def test_matmul_non_contiguous():
    B, Lq, Lk, D = 3, 20, 40, 48
    s = _scores((B, Lk, Lq), torch.float32).transpose(1, 2)  # (B, Lq, Lk) column-major rows
    v = torch.randn(B, D, Lk).transpose(1, 2)  # (B, Lk, D) with last-dim stride Lk
    stats_t = sm.softmax_stats(s.reshape(-1, Lk)).t().contiguous().t()  # (N, 2) column-major
    assert not s.is_contiguous() and v.stride(-1) != 1 and not stats_t.is_contiguous()
    out = sm.softmax_matmul(s, stats_t, v)
    assert_close(out, torch.softmax(s, -1) @ v)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_matmul_masked_and_nan_rows():
    B, Lq, Lk, D = 2, 12, 70, 24
    s = _scores((B, Lq, Lk), torch.float32)
    v = torch.randn(B, Lk, D)
    s[0, 3] = float("-inf")  # fully masked row -> zeros (SDPA semantics)
    s[1, 0, :40] = float("-inf")  # partially masked across the first tile
    s[1, 5, 66] = float("nan")  # NaN score -> NaN row
    stats = sm.softmax_stats(s.reshape(-1, Lk))
    out = sm.softmax_matmul(s, stats, v)
    ref = sm.softmax_matmul_ref(s, stats, v)
    assert_close(out, ref)
    assert torch.equal(out[0, 3], torch.zeros(D))
    assert torch.isnan(out[1, 5]).all() and torch.isfinite(out[1, torch.arange(Lq) != 5]).all()


# ---------------------------------------------------------------------------------------------
# Composite partial_softmax_attention
# ---------------------------------------------------------------------------------------------
def _attn_inputs(shape, dtype):
    B, H, Lq, Lk, D = shape
    return (torch.randn(B, H, Lq, D).to(dtype), torch.randn(B, H, Lk, D).to(dtype), torch.randn(B, H, Lk, D).to(dtype))


def _eager_unfused(q, k, v, scale=None, mask=None):
    """The pattern this path replaces, in the inputs' dtype: baddbmm -> softmax -> bmm.

    The composite materializes the scores in q's dtype exactly like this eager code, so this is
    the like-for-like Liger baseline (SDPA's CPU math backend upcasts internally instead).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if mask is None:
        bias, beta = q.new_zeros(B * H, Lq, Lk), 0.0
    else:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias, beta = mask.to(q.dtype).expand(B, H, Lq, Lk).reshape(B * H, Lq, Lk), 1.0
    q3, kt = q.reshape(B * H, Lq, D), k.reshape(B * H, Lk, D).transpose(1, 2)
    scores = torch.baddbmm(bias, q3, kt, beta=beta, alpha=scale)
    return (torch.softmax(scores, -1) @ v.reshape(B * H, Lk, -1)).reshape(B, H, Lq, -1)


def _check_composite(out, q, k, v, scale=None, mask=None):
    ref32 = flash_attention_ref(q.float(), k.float(), v.float(), mask, scale)
    assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == q.dtype
    if q.dtype == torch.float32:
        assert_close(out, ref32)
    else:
        assert_lowp_close(out, ref32, _eager_unfused(q, k, v, scale, mask))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_composite_matches_reference(shape, dtype):
    q, k, v = _attn_inputs(shape, dtype)
    _check_composite(sm.partial_softmax_attention(q, k, v), q, k, v)


@pytest.mark.parametrize("kind", ["bool_keypad", "add_bcast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_composite_masks(dtype, kind):
    shape = SHAPES[0]
    B, H, Lq, Lk, _ = shape
    q, k, v = _attn_inputs(shape, dtype)
    if kind == "bool_keypad":
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[1, ..., 50:] = False
    else:
        mask = torch.randn(Lq, Lk).to(dtype)
    _check_composite(sm.partial_softmax_attention(q, k, v, scale=0.2, attn_mask=mask), q, k, v, 0.2, mask)


def test_composite_matches_sdpa_on_fully_masked_rows():
    q, k, v = _attn_inputs((1, 2, 20, 40, 24), torch.float32)
    v = v[..., :16]  # Dv != D is fine for this path
    keep = torch.rand(1, 2, 20, 40) > 0.5
    keep[0, 1, [0, 17]] = False
    out = sm.partial_softmax_attention(q, k, v, attn_mask=keep)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert_close(out, expected)
    assert torch.equal(out[0, 1, 17], torch.zeros(16))


def test_composite_non_contiguous():
    B, H, Lq, Lk, D = SHAPES[0]
    q = torch.randn(B, Lq, H, D).transpose(1, 2)
    k = torch.randn(B, Lk, H, D).transpose(1, 2)
    v = torch.randn(B, Lk, H, D).transpose(1, 2)
    _check_composite(sm.partial_softmax_attention(q, k, v), q, k, v)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def test_invalid_arguments():
    f32 = torch.float32
    with pytest.raises(ValueError, match="rank 2"):
        sm.softmax_stats(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="int64"):
        sm.softmax_stats(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one column"):
        sm.softmax_stats(torch.randn(4, 0))
    s, v = torch.randn(2, 5, 7), torch.randn(2, 7, 8)
    good = torch.zeros(10, 2, dtype=f32)
    with pytest.raises(ValueError, match="rank 3"):
        sm.softmax_matmul(s[0], good, v)
    with pytest.raises(ValueError, match=r"\(B\*Lq, 2\)"):
        sm.softmax_matmul(s, torch.zeros(9, 2), v)
    with pytest.raises(TypeError, match="float32"):
        sm.softmax_matmul(s, good.half(), v)
    with pytest.raises(ValueError, match="v must be"):
        sm.softmax_matmul(s, good, torch.randn(2, 6, 8))
    with pytest.raises(TypeError, match="int32"):
        sm.softmax_matmul(s, good, v.to(torch.int32))
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="rank-4"):
        sm.partial_softmax_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="shapes"):
        sm.partial_softmax_attention(q, torch.randn(1, 2, 5, 4), q)
    with pytest.raises(TypeError, match="share a dtype"):
        sm.partial_softmax_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="int"):
        sm.partial_softmax_attention(q.int(), q.int(), q.int())


# ---------------------------------------------------------------------------------------------
# Op registration, compile, dispatch
# ---------------------------------------------------------------------------------------------
def test_opcheck():
    s = _scores((2, 9, 13), torch.float32)
    v = torch.randn(2, 13, 24)
    stats = sm.softmax_stats(s.reshape(-1, 13))
    torch.library.opcheck(torch.ops.fusediff.softmax_stats.default, (s.reshape(-1, 13),))
    torch.library.opcheck(torch.ops.fusediff.softmax_matmul.default, (s, stats, v))


def test_compile_fullgraph_smoke():
    q, k, v = _attn_inputs((1, 2, 9, 13, 24), torch.float32)
    mask = torch.rand(9, 13) > 0.2

    def block(q, k, v, mask):
        return sm.partial_softmax_attention(q, k, v, attn_mask=mask) + 1.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(q, k, v, mask), block(q, k, v, mask))


def test_triton_path_ran():
    if _common.choose_path(torch.empty(1)) != "triton":
        pytest.skip("Triton path unavailable on this CPU run (TRITON_INTERPRET unset)")
    q, k, v = _attn_inputs(SHAPES[3], torch.float32)
    keys = [(op, p) for op in ("softmax_stats", "softmax_matmul") for p in ("triton", "reference")]
    before = {key: _common.DISPATCH_COUNTS[key] for key in keys}
    sm.partial_softmax_attention(q, k, v)
    for op in ("softmax_stats", "softmax_matmul"):
        assert _common.DISPATCH_COUNTS[(op, "triton")] == before[(op, "triton")] + 1
        assert _common.DISPATCH_COUNTS[(op, "reference")] == before[(op, "reference")]


# ---------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------
def _gpu_cases():
    from benchmarks.shapes import ATTENTION

    return [(name, (2, h, lq, lk, d)) for name, h, lq, lk, d in ATTENTION]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, shape", _gpu_cases(), ids=[c[0] for c in _gpu_cases()])
def test_gpu_real_shapes(name, shape, dtype):
    B, H, Lq, Lk, D = shape
    q, k, v = (t.cuda() for t in _attn_inputs(shape, dtype))
    out = sm.partial_softmax_attention(q, k, v)
    ref32 = flash_attention_ref(q.float(), k.float(), v.float())
    if dtype == torch.float32:
        assert_close(out, ref32, table=TOL_LONG_REDUCTION)
    else:
        assert_lowp_close(out, ref32, _eager_unfused(q, k, v))
    s = _scores((B * H * Lq, Lk), dtype).cuda()
    assert_close(sm.softmax_stats(s), sm.softmax_stats_ref(s), table=TOL_LONG_REDUCTION)
