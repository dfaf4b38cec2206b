"""fusediff::flash_attention (kernels/attention.py) against its fp32 reference and SDPA.

CPU tier: Triton interpreted (TRITON_INTERPRET=1, set by tests/conftest.py), small shapes.
GPU tier (-m gpu): the real SD-1.5 / LDM-8 attention shapes from benchmarks/shapes.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusediff.kernels.attention as attn
from fusediff.kernels import _common
from tests.tolerances import TOL, TOL_LONG_REDUCTION, assert_close, assert_lowp_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, H, Lq, Lk, D); the interpreter runs 32x32 tiles (BLOCK_M = BLOCK_N = 32).
SHAPES = [
    (2, 3, 33, 77, 40),  # SD cross-attn: 77 text tokens (Lk tail: 32+32+13), Lq tail, D=40 -> 64
    (1, 2, 64, 64, 24),  # tile-aligned lengths, D=24 padded to 32
    (2, 1, 17, 17, 80),  # odd lengths below one tile, D=80 (SD-1.5 level 2) padded to 128
    (1, 1, 16, 9, 160),  # Lq != Lk, Lk < one tile, D=160 (SD-1.5 levels 3-4) padded to 256
    (1, 2, 50, 50, 48),  # non-pow2 lengths and D, second tile partial
    (1, 1, 8, 8, 96),  # tiny lengths, D=96 padded to 128
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def _inputs(shape, dtype, device="cpu"):
    B, H, Lq, Lk, D = shape
    q = torch.randn(B, H, Lq, D, device=device, dtype=dtype)
    k = torch.randn(B, H, Lk, D, device=device, dtype=dtype)
    v = torch.randn(B, H, Lk, D, device=device, dtype=dtype)
    return q, k, v


def _sdpa_math(q, k, v, mask=None, scale=None):
    """Eager PyTorch in the inputs' dtype (math backend) -- the Liger-rule baseline."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _check(out, q, k, v, mask=None, scale=None, long_reduction=False):
    ref32 = attn.flash_attention_ref(q.float(), k.float(), v.float(), mask, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    if q.dtype == torch.float32:
        assert_close(out, ref32, table=TOL_LONG_REDUCTION if long_reduction else TOL)
    else:
        assert_lowp_close(out, ref32, _sdpa_math(q, k, v, mask, scale))


def _make_mask(kind, shape, dtype):
    B, H, Lq, Lk, _ = shape
    if kind == "add_full":  # per-head additive bias (e.g. relative position), includes -inf
        m = torch.randn(B, H, Lq, Lk).mul_(2.0)
        m[..., :, 3] = float("-inf")
        return m.to(dtype)
    if kind == "add_bcast":  # (Lq, Lk) broadcast over batch and heads: zero strides in the kernel
        return torch.randn(Lq, Lk).to(dtype)
    if kind == "bool_keypad":  # key-padding mask (B, 1, 1, Lk): last keys of sample 0 dropped
        m = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        m[0, ..., Lk // 2:] = False
        return m
    if kind == "bool_full":  # random keep-mask with one fully masked query row
        m = torch.rand(B, H, Lq, Lk) > 0.4
        m[0, 0, 1] = False
        return m
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, dtype):
    q, k, v = _inputs(shape, dtype)
    _check(attn.flash_attention(q, k, v, None, None), q, k, v)


@pytest.mark.parametrize("kind", ["add_full", "add_bcast", "bool_keypad", "bool_full"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=[SHAPE_IDS[0], SHAPE_IDS[4]])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks(dtype, shape, kind):
    q, k, v = _inputs(shape, dtype)
    mask = _make_mask(kind, shape, dtype)
    _check(attn.flash_attention(q, k, v, mask, None), q, k, v, mask)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=str)
def test_fully_masked_rows_match_sdpa(mask_dtype):
    """Rows with every key masked give what SDPA gives (0 since torch 2.5's _safe_softmax)."""
    shape = (1, 2, 20, 40, 24)
    q, k, v = _inputs(shape, torch.float32)
    keep = torch.rand(1, 2, 20, 40) > 0.5
    keep[0, 0, [2, 19]] = False  # fully masked rows, one in the Lq tail tile
    keep[0, 1, :, :32] = False  # first key tile fully masked for all rows, second one live
    mask = keep if mask_dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    out = attn.flash_attention(q, k, v, mask, None)
    expected = _sdpa_math(q, k, v, mask)
    # The reference is the spec: check it agrees with the installed torch's SDPA here too.
    torch.testing.assert_close(attn.flash_attention_ref(q, k, v, mask), expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert_close(out, expected)
    assert torch.isfinite(out).all()


def test_custom_scale_and_mixed_mask_dtype():
    q, k, v = _inputs(SHAPES[0], torch.float16)
    mask32 = torch.randn(SHAPES[0][2], SHAPES[0][3])  # fp32 additive mask with fp16 q: upcast in-kernel
    out = attn.flash_attention(q, k, v, mask32, 0.3)
    ref32 = attn.flash_attention_ref(q.float(), k.float(), v.float(), mask32, 0.3)
    assert_lowp_close(out, ref32, _sdpa_math(q, k, v, mask32.half(), 0.3))
    # A scale that differs from 1/sqrt(D) must change the answer (the argument is not ignored).
    assert not torch.allclose(out, attn.flash_attention(q, k, v, mask32, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_inputs(dtype):
    B, H, Lq, Lk, D = SHAPES[0]
    # Projections produce (B, L, H, D); heads are a transposed view, never copied by the op.
    q = torch.randn(B, Lq, H, D, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, Lk, H, D, dtype=dtype).transpose(1, 2)
    # v with last-dim stride != 1: the one layout the launcher copies.
    v = torch.randn(B, H, D, Lk, dtype=dtype).transpose(2, 3)
    assert not q.is_contiguous() and v.stride(-1) != 1
    _check(attn.flash_attention(q, k, v, None, None), q, k, v)
    # Sliced view with a gap between rows (stride_qm > D).
    big = torch.randn(B, H, Lq, 2 * D, dtype=dtype)
    q2 = big[..., :D]
    _check(attn.flash_attention(q2, k, v, None, None), q2, k, v)


def test_empty_and_degenerate_lengths():
    q, k, v = _inputs((1, 2, 0, 5, 24), torch.float32)
    assert attn.flash_attention(q, k, v, None, None).shape == (1, 2, 0, 24)
    q, k, v = _inputs((1, 2, 3, 0, 24), torch.float32)
    torch.testing.assert_close(attn.flash_attention(q, k, v, None, None), attn.flash_attention_ref(q, k, v))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on NaN math
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_inf_propagate_like_reference(dtype):
    shape = (1, 2, 40, 45, 40)
    q, k, v = _inputs(shape, dtype)
    q[0, 0, 5, 3] = float("nan")  # one query row -> that output row NaN
    k[0, 1, 7, 0] = float("inf")  # one key -> inf/NaN logits in head 1
    v[0, 0, 40, 2] = float("nan")  # one value in the last key tile -> column 2 of head 0 NaN
    mask = torch.ones(1, 1, 40, 45, dtype=torch.bool)
    mask[..., 10, :] = False  # a fully masked row still sees the NaN value column (0 * NaN)
    out = attn.flash_attention(q, k, v, mask, None)
    ref = attn.flash_attention_ref(q, k, v, mask)
    assert torch.isnan(out).any() and not torch.isnan(out).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isnan(out), torch.isnan(_sdpa_math(q, k, v, mask)))
    finite = torch.isfinite(ref)
    assert_close(out[finite], ref[finite], table=TOL if dtype == torch.float32 else TOL_LONG_REDUCTION)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((_t(1, 2, 8, 24), _t(1, 2, 8, 32), _t(1, 2, 8, 32), None, None), ValueError, "head dim"),
        ((_t(1, 2, 8, 24), _t(1, 2, 8, 24), _t(1, 2, 8, 32), None, None), ValueError, "Dv"),
        ((_t(2, 8, 24), _t(2, 8, 24), _t(2, 8, 24), None, None), ValueError, "rank 4"),
        ((_t(1, 1, 2, 8, 24), _t(1, 1, 2, 8, 24), _t(1, 1, 2, 8, 24), None, None), ValueError, "rank 4"),
        ((_t(1, 2, 8, 24, dtype=torch.int32),) * 3 + (None, None), TypeError, "int32"),
        ((_t(1, 2, 8, 24), _t(1, 2, 8, 24, dtype=torch.float16), _t(1, 2, 8, 24), None, None),
         TypeError, "share a dtype"),
        ((_t(1, 2, 8, 24), _t(1, 3, 8, 24), _t(1, 3, 8, 24), None, None), ValueError, "batch/head"),
        ((_t(1, 1, 4, 320),) * 3 + (None, None), ValueError, "head dim 320"),
        ((_t(1, 2, 8, 24),) * 3 + (torch.ones(8, 8, dtype=torch.int64), None), TypeError, "attn_mask"),
        ((_t(1, 2, 8, 24),) * 3 + (torch.zeros(3, 8), None), ValueError, "broadcastable"),
    ],
    ids=["d_mismatch", "dv_mismatch", "rank3", "rank5", "int_dtype", "mixed_dtype", "heads", "d_too_big",
         "mask_int", "mask_shape"],
)
def test_invalid_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        attn.flash_attention(*args)


def test_supported_predicate():
    ok = attn.flash_attention_supported
    assert ok((2, 8, 4096, 40), (2, 8, 77, 40), torch.float16) == (True, "")
    assert ok((2, 8, 64, 160), (2, 8, 64, 160), torch.bfloat16, v_shape=(2, 8, 64, 160))[0]
    for args in [
        ((1, 1, 8, 512), (1, 1, 8, 512), torch.float16),  # D > 256
        ((1, 1, 8, 40), (1, 1, 8, 40), torch.int8),  # dtype
        ((1, 1, 8, 40), (1, 1, 8, 48), torch.float16),  # D mismatch
        ((8, 40), (8, 40), torch.float32),  # rank
    ]:
        supported, reason = ok(*args)
        assert not supported and reason
    assert not ok((1, 1, 8, 40), (1, 1, 8, 40), torch.float16, v_shape=(1, 1, 8, 80))[0]  # Dv != D


# ---------------------------------------------------------------------------------------------
# Op registration, compile, dispatch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", [None, "bool_keypad", "add_bcast"])
def test_opcheck(mask_kind):
    shape = (1, 2, 9, 13, 24)
    q, k, v = _inputs(shape, torch.float32)
    mask = None if mask_kind is None else _make_mask(mask_kind, shape, torch.float32)
    torch.library.opcheck(torch.ops.fusediff.flash_attention.default, (q, k, v, mask, 0.25))


def test_compile_fullgraph_smoke():
    q, k, v = _inputs((1, 2, 9, 13, 24), torch.float32)
    mask = torch.rand(9, 13) > 0.2

    def block(q, k, v, mask):
        return torch.ops.fusediff.flash_attention(q, k, v, mask, None) * 2.0 + 1.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(q, k, v, mask), block(q, k, v, mask))


def test_triton_path_ran():
    if _common.choose_path(torch.empty(1)) != "triton":
        pytest.skip("Triton path unavailable on this CPU run (TRITON_INTERPRET unset)")
    q, k, v = _inputs(SHAPES[3], torch.float32)
    before_t = _common.DISPATCH_COUNTS[("flash_attention", "triton")]
    before_r = _common.DISPATCH_COUNTS[("flash_attention", "reference")]
    torch.ops.fusediff.flash_attention(q, k, v, None, None)
    assert _common.DISPATCH_COUNTS[("flash_attention", "triton")] == before_t + 1
    assert _common.DISPATCH_COUNTS[("flash_attention", "reference")] == before_r


# ---------------------------------------------------------------------------------------------
# GPU tier: real U-Net shapes, compiled Triton, autotuning
# ---------------------------------------------------------------------------------------------
def _gpu_cases():
    from benchmarks.shapes import ATTENTION

    return [(name, (2, h, lq, lk, d)) for name, h, lq, lk, d in ATTENTION]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, shape", _gpu_cases(), ids=[c[0] for c in _gpu_cases()])
def test_gpu_real_shapes(name, shape, dtype):
    q, k, v = _inputs(shape, dtype, device="cuda")
    out = attn.flash_attention(q, k, v, None, None)
    _check(out, q, k, v, long_reduction=True)
    # Text-padding mask on the cross-attention shapes.
    if shape[3] == 77:
        keep = torch.ones(shape[0], 1, 1, 77, dtype=torch.bool, device="cuda")
        keep[0, ..., 60:] = False
        _check(attn.flash_attention(q, k, v, keep, None), q, k, v, keep, long_reduction=True)
    assert math.isfinite(out.float().abs().max().item())
