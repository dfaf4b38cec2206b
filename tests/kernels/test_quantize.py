"""kernels/quantize.py: weight quantizer, INT4 packing, activation / MoDiff / GroupNorm quantizers.

CPU tier runs the Triton kernels interpreted (TRITON_INTERPRET=1 from conftest). The activation
quantizers read identical fp32 inputs as the reference, so q and scales must match bit for bit;
the GroupNorm-fused kernel normalizes with a different reduction order, so q may differ by one
level where a value sits on a rounding boundary.
"""
from __future__ import annotations

import math

import pytest
import torch

import fusediff.kernels._common as common
from fusediff.kernels import quantize as Q
from tests.tolerances import TOL, assert_close

QMAX = {8: 127, 4: 7}


def _primed(v: bool) -> torch.Tensor:
    return torch.tensor(v)


# ------------------------------------------------------------------------------------------------
# Weights and packing (plain torch)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "shape",
    [
        (6, 5, 3, 3),  # conv, odd Cin
        (16, 33),  # linear, odd K
    ],
)
def test_quantize_weight_mse_never_worse_than_minmax(bits, shape):
    w = torch.randn(shape)
    w.view(shape[0], -1)[:, 0] *= 8.0  # one outlier per row: clipping pays off
    w_int, s = Q.quantize_weight(w, bits, "mse")
    w_mm, s_mm = Q.quantize_weight(w, bits, "minmax")
    assert w_int.dtype == torch.int8 and w_int.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (shape[0],)
    assert w_int.abs().max() <= QMAX[bits]
    bshape = (-1,) + (1,) * (w.dim() - 1)
    err = (w_int.double() * s.double().reshape(bshape) - w.double()).pow(2).reshape(shape[0], -1).sum(1)
    err_mm = (w_mm.double() * s_mm.double().reshape(bshape) - w.double()).pow(2).reshape(shape[0], -1).sum(1)
    assert (err <= err_mm * (1 + 1e-9)).all()
    if bits == 4:
        assert err.sum() < err_mm.sum()  # with outliers the search must actually clip
    # min-max: the largest |w| of each row maps to ±qmax
    assert torch.equal(w_mm.reshape(shape[0], -1).abs().amax(1), torch.full((shape[0],), QMAX[bits], dtype=torch.int8))


def test_quantize_weight_zero_row():
    w = torch.randn(4, 10)
    w[2] = 0
    w_int, s = Q.quantize_weight(w, 8)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert (w_int[2] == 0).all()


@pytest.mark.parametrize("k", [1, 7, 8, 33])  # odd K pads a zero nibble
def test_pack_unpack_int4_round_trip(k):
    w = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    packed = Q.pack_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(Q.unpack_int4(packed, k), w)


def test_pack_int4_nibble_order_spec():
    # Spec: element 2i -> low nibble, 2i+1 -> high nibble, two's complement; odd K padded with 0.
    w = torch.tensor([[1, -1, -8]], dtype=torch.int8)
    packed = Q.pack_int4(w)
    assert packed.tolist() == [[1 | (0xF << 4), 0x8]]


def test_pack_int4_flattens_conv_weight():
    w = torch.randint(-8, 8, (3, 5, 3, 3), dtype=torch.int8)
    packed = Q.pack_int4(w)
    assert torch.equal(Q.unpack_int4(packed, 45), w.reshape(3, 45))


# ------------------------------------------------------------------------------------------------
# quantize_act / modiff_quantize kernels vs reference
# ------------------------------------------------------------------------------------------------

ACT_SHAPES = [
    (2, 5, 7, 9),  # odd channels, non-pow2 spatial
    (3, 40, 33),  # (N, L, K) tokens: L > BLOCK_C (two channel tiles), odd K
    (77, 40),  # per-token view (T, K): 77 "samples"
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_quantize_act_matches_reference(shape, bits):
    a = torch.randn(shape) * 3
    for per_sample in (True, False):
        q, s = Q.quantize_act(a, bits, per_sample)
        q_ref, s_ref = Q.quantize_act_ref(a, bits, per_sample)
        assert torch.equal(q, q_ref)
        assert q.stride() == q_ref.stride()
        assert torch.equal(s, s_ref)
        # Independent of the reference: the scale is absmax / qmax and |a - s q| <= s / 2.
        n = shape[0] if per_sample else 1
        absmax = a.reshape(n, -1).abs().amax(1)
        assert_close(s, absmax / QMAX[bits])
        sb = s.reshape((-1,) + (1,) * (a.dim() - 1))
        assert ((a - sb * q.float()).abs() <= sb / 2 * (1 + 1e-5)).all()
        assert q.abs().max() <= QMAX[bits]


def test_rounding_ties_to_even():
    # absmax 127 -> s = 1 exactly, so a/s hits the .5 ties; torch.round semantics: half to even.
    a = torch.tensor([[127.0, 2.5, -2.5, 3.5, 0.5, -0.5, 1.5, 126.5, -127.0]])
    q, s = Q.quantize_act(a, 8, True)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 2, -2, 4, 0, 0, 2, 126, -127]]
    q4, s4 = Q.quantize_act(torch.tensor([[7.0, 2.5, -3.5, 6.5]]), 4, True)  # INT4: s = 1
    assert s4.item() == 1.0 and q4.tolist() == [[7, 2, -4, 6]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_act_low_precision_inputs(dtype):
    a = (torch.randn(2, 6, 5, 7) * 2).to(dtype)
    q, s = Q.quantize_act(a, 8, True)
    q_ref, s_ref = Q.quantize_act_ref(a, 8, True)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_quantize_act_channels_last_input_and_q_layout():
    a = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    q, s = Q.quantize_act(a, 8, True)
    q_ref, s_ref = Q.quantize_act_ref(a.contiguous(), 8, True)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q.is_contiguous(memory_format=torch.channels_last)  # the conv reads channels contiguously


def test_per_sample_scales_do_not_share_a_grid():
    # CFG: the two halves of a batch have different ranges; each must get its own grid.
    a = torch.randn(2, 4, 6, 6)
    a[0] *= 10.0
    _, s = Q.quantize_act(a, 8, True)
    assert s.shape == (2,)
    assert s[0] > 5 * s[1]
    _, s_t = Q.quantize_act(a, 8, False)
    assert s_t.shape == (1,) and s_t[0] == s.max()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_modiff_quantize_trajectory(bits, cache_dtype):
    shape = (2, 5, 7, 9)  # odd channels, non-pow2 spatial
    base = torch.randn(shape)
    a_hat = torch.full(shape, float("nan"), dtype=cache_dtype)  # garbage before the first step
    a_hat_ref = a_hat.clone()
    for step in range(3):
        a = base + 0.1 * step * torch.randn(shape)
        primed = _primed(step > 0)
        old = a_hat.clone()
        q, s = Q.modiff_quantize(a, a_hat, primed, bits, True)
        q_ref, s_ref = Q.modiff_quantize_ref(a, a_hat_ref, primed, bits, True)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
        assert torch.equal(a_hat, a_hat_ref)
        if step == 0:
            # First step: â_T = a_T (in the cache dtype), q = 0, s = 1.
            assert torch.equal(a_hat, a.to(cache_dtype))
            assert (q == 0).all() and torch.equal(s, torch.ones(2))
        else:
            # Eq. (6) from its definition: Δ = a - â_{t+1}; â_t = s q + â_{t+1}; |Δ - s q| <= s/2.
            sb = s.reshape(-1, 1, 1, 1)
            d = a - old.float()
            assert_close(s, d.reshape(2, -1).abs().amax(1) / QMAX[bits])
            assert ((d - sb * q.float()).abs() <= sb / 2 * (1 + 1e-5)).all()
            assert_close(a_hat.float(), (old.float() + sb * q.float()).to(cache_dtype).float(), TOL)


def test_modiff_quantize_zero_delta():
    a = torch.randn(2, 3, 4, 5)
    a_hat = a.clone()
    q, s = Q.modiff_quantize(a, a_hat, _primed(True), 8, True)
    assert (q == 0).all() and torch.equal(s, torch.ones(2))
    assert torch.equal(a_hat, a)


# ------------------------------------------------------------------------------------------------
# group_norm_quantize
# ------------------------------------------------------------------------------------------------


def _assert_q_close(q, q_ref):
    """GN normalizes with another reduction order: allow one level on rare rounding ties."""
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() < 0.01


GN_CASES = [
    # (shape, groups, film, silu, per_sample, bits)
    ((2, 12, 7, 9), 4, True, True, True, 8),  # 3 channels per group (non-pow2), FiLM + SiLU
    ((2, 12, 7, 9), 3, False, True, False, 4),  # per-tensor scale, INT4
    ((2, 10, 5, 6), 5, True, False, True, 4),  # no SiLU (GroupNorm before attention)
    ((2, 8, 48, 48), 1, False, True, True, 8),  # S = 2304 > BLOCK_S: multi-chunk Welford loop
]


@pytest.mark.parametrize("shape,groups,film,silu,per_sample,bits", GN_CASES)
def test_group_norm_quantize_trajectory(shape, groups, film, silu, per_sample, bits):
    N, C = shape[:2]
    w, b = torch.randn(C), torch.randn(C)
    fs = torch.randn(N, C) * 0.3 if film else None
    fsh = torch.randn(N, C) * 0.3 if film else None
    base = torch.randn(shape) * 2 + 0.5
    a_hat = torch.zeros(shape)
    a_hat_ref = a_hat.clone()
    for step in range(3):
        x = base + 0.2 * step * torch.randn(shape)
        primed = _primed(step > 0)
        q, s = Q.group_norm_quantize(x, w, b, fs, fsh, groups, 1e-5, silu, a_hat, primed, bits, per_sample)
        q_ref, s_ref = Q.group_norm_quantize_ref(x, w, b, fs, fsh, groups, 1e-5, silu, a_hat_ref, primed, bits, per_sample)
        if step == 0:
            act = Q.group_norm_act_ref(x, w, b, fs, fsh, groups, 1e-5, silu)
            assert_close(a_hat, act)  # first step: â = the normalized activation (the float conv reads it)
            assert (q == 0).all() and (s == 1).all()
        assert_close(s, s_ref)
        _assert_q_close(q, q_ref)
        assert_close(a_hat, a_hat_ref, TOL)
        a_hat_ref.copy_(a_hat)  # keep both trajectories on the same â (q ties would otherwise drift)


def test_group_norm_quantize_large_mean_and_layouts():
    # Mean 100, std 1: sum/sumsq statistics would cancel; chunked Welford must not. Channels_last x.
    x = (torch.randn(2, 6, 9, 11) + 100.0).contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(6), torch.zeros(6)
    a_hat = torch.zeros(2, 6, 9, 11, dtype=torch.float16)
    Q.group_norm_quantize(x, w, b, None, None, 2, 1e-6, False, a_hat, _primed(False), 8, True)
    act = Q.group_norm_act_ref(x, w, b, None, None, 2, 1e-6, False)
    assert_close(a_hat, act.half())


def test_group_norm_quantize_without_affine():
    # GroupNorm(affine=False): weight and bias None, like fusediff::group_norm_silu accepts.
    x = torch.randn(2, 6, 5, 7)
    a_hat = torch.randn(2, 6, 5, 7)
    a_hat_ref = a_hat.clone()
    q, s = Q.group_norm_quantize(x, None, None, None, None, 3, 1e-5, True, a_hat, _primed(True), 8, True)
    q_ref, s_ref = Q.group_norm_quantize_ref(x, None, None, None, None, 3, 1e-5, True, a_hat_ref, _primed(True), 8, True)
    assert_close(s, s_ref)
    _assert_q_close(q, q_ref)
    assert_close(a_hat, a_hat_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_quantize_low_precision_input(dtype):
    x = torch.randn(2, 8, 5, 7).to(dtype)
    w, b = torch.randn(8).to(dtype), torch.randn(8).to(dtype)
    a_hat = torch.randn(2, 8, 5, 7)
    a_hat_ref = a_hat.clone()
    q, s = Q.group_norm_quantize(x, w, b, None, None, 4, 1e-5, True, a_hat, _primed(True), 8, True)
    q_ref, s_ref = Q.group_norm_quantize_ref(x, w, b, None, None, 4, 1e-5, True, a_hat_ref, _primed(True), 8, True)
    assert_close(s, s_ref)
    _assert_q_close(q, q_ref)
    assert_close(a_hat, a_hat_ref)


# ------------------------------------------------------------------------------------------------
# Non-finite values
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy inf/inf inside the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_propagates_through_the_scale(bad):
    a = torch.randn(2, 3, 4, 5)
    a[0, 1, 2, 3] = bad
    q, s = Q.quantize_act(a, 8, True)
    q_ref, s_ref = Q.quantize_act_ref(a, 8, True)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref) or (torch.isnan(s[0]) and torch.isnan(s_ref[0]) and s[1] == s_ref[1])
    assert not math.isfinite(s[0].item()) and math.isfinite(s[1].item())
    assert (q[0] == 0).all()  # the whole sample dequantizes to 0 * s = NaN
    assert torch.isnan((s[0] * q[0].float())).all()
    # MoDiff: â of the bad sample becomes non-finite, the other sample is untouched by it.
    a_hat = torch.zeros_like(a)
    Q.modiff_quantize(a, a_hat, _primed(True), 8, True)
    assert not torch.isfinite(a_hat[0]).all() and torch.isfinite(a_hat[1]).all()


def test_group_norm_quantize_nan():
    x = torch.randn(2, 4, 5, 5)
    x[1, 0, 0, 0] = float("nan")
    a_hat = torch.zeros_like(x)
    _, s = Q.group_norm_quantize(x, torch.ones(4), torch.zeros(4), None, None, 2, 1e-5, True, a_hat, _primed(True), 8, True)
    assert torch.isfinite(s[0]) and torch.isnan(s[1])


# ------------------------------------------------------------------------------------------------
# Op machinery: dispatch proof, opcheck, compile
# ------------------------------------------------------------------------------------------------


def test_triton_path_ran():
    before = dict(common.DISPATCH_COUNTS)
    a = torch.randn(2, 3, 4, 5)
    Q.quantize_act(a, 8, True)
    Q.modiff_quantize(a, torch.zeros_like(a), _primed(True), 8, True)
    Q.group_norm_quantize(a, torch.ones(3), torch.zeros(3), None, None, 3, 1e-5, True, torch.zeros_like(a),
                          _primed(True), 8, True)
    for op in ("quantize_act", "modiff_quantize", "group_norm_quantize"):
        assert common.DISPATCH_COUNTS[(op, "triton")] == before.get((op, "triton"), 0) + 1


def test_opcheck():
    x = torch.randn(2, 4, 3, 5)
    torch.library.opcheck(torch.ops.fusediff.quantize_act.default, (x, 4, False))
    torch.library.opcheck(torch.ops.fusediff.modiff_quantize.default, (x, torch.randn_like(x), _primed(True), 8, True))
    torch.library.opcheck(
        torch.ops.fusediff.group_norm_quantize.default,
        (x, torch.randn(4), torch.randn(4), torch.randn(2, 4), torch.randn(2, 4), 2, 1e-5, True, torch.randn_like(x),
         _primed(True), 8, True),
    )


def test_compile_fullgraph_trajectory():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, w, b, a_hat, primed):
        q, s = torch.ops.fusediff.group_norm_quantize(x, w, b, None, None, 2, 1e-5, True, a_hat, primed, 8, True)
        return q.float() * s.reshape(-1, 1, 1, 1)

    x0 = torch.randn(2, 4, 3, 5)
    w, b = torch.randn(4), torch.randn(4)
    a_hat, a_hat_ref = torch.zeros_like(x0), torch.zeros_like(x0)
    for t in range(3):
        x = x0 + 0.1 * t
        primed = _primed(t > 0)
        y = step(x, w, b, a_hat, primed)
        q, s = Q.group_norm_quantize_ref(x, w, b, None, None, 2, 1e-5, True, a_hat_ref, primed, 8, True)
        assert_close(y, q.float() * s.reshape(-1, 1, 1, 1), TOL)
        assert_close(a_hat, a_hat_ref)
        a_hat_ref.copy_(a_hat)


# ------------------------------------------------------------------------------------------------
# Invalid arguments
# ------------------------------------------------------------------------------------------------


def test_invalid_arguments():
    a = torch.randn(2, 3, 4, 5)
    p = _primed(True)
    with pytest.raises(ValueError, match="bits"):
        Q.quantize_act(a, 3, True)
    with pytest.raises(ValueError, match="bits"):
        Q.quantize_weight(torch.randn(4, 4), 16)
    with pytest.raises(ValueError, match="search"):
        Q.quantize_weight(torch.randn(4, 4), 8, "percentile")
    with pytest.raises(TypeError, match="a must be"):
        Q.quantize_act(a.to(torch.int32), 8, True)
    with pytest.raises(TypeError, match="per_sample"):
        Q.quantize_act_ref(a, 8, 1)  # (the op's schema already coerces/rejects non-bools)
    with pytest.raises(ValueError, match="never broadcast"):  # batch changed mid-trajectory
        Q.modiff_quantize(a, torch.zeros(1, 3, 4, 5), p, 8, True)
    with pytest.raises(TypeError, match="primed"):
        Q.modiff_quantize(a, torch.zeros_like(a), torch.tensor([True]), 8, True)
    with pytest.raises(TypeError, match="primed"):
        Q.modiff_quantize(a, torch.zeros_like(a), torch.tensor(1), 8, True)
    with pytest.raises(TypeError, match="a_hat"):
        Q.modiff_quantize(a, torch.zeros_like(a, dtype=torch.int8), p, 8, True)
    with pytest.raises(ValueError, match="num_groups"):
        Q.group_norm_quantize(a, torch.ones(3), torch.zeros(3), None, None, 2, 1e-5, True, torch.zeros_like(a), p, 8, True)
    with pytest.raises(ValueError, match="film_scale"):
        Q.group_norm_quantize(a, torch.ones(3), torch.zeros(3), torch.ones(1, 3), None, 3, 1e-5, True,
                              torch.zeros_like(a), p, 8, True)
    with pytest.raises(ValueError, match="int4 values"):
        Q.pack_int4(torch.tensor([[9]], dtype=torch.int8))
    with pytest.raises(ValueError, match="k="):
        Q.unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 7)


# ------------------------------------------------------------------------------------------------
# GPU tier
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape,groups", [((8, 320, 64, 64), 32), ((32, 384, 16, 16), 32), ((2, 1280, 8, 8), 32)])
def test_gpu_real_shapes(shape, groups):
    dev = "cuda"
    x = torch.randn(shape, device=dev, dtype=torch.float16)
    a_hat = torch.randn(shape, device=dev)
    a_hat_ref = a_hat.clone()
    primed = torch.tensor(True, device=dev)
    C = shape[1]
    w, b = torch.randn(C, device=dev), torch.randn(C, device=dev)
    q, s = Q.modiff_quantize(x, a_hat, primed, 8, True)
    q_ref, s_ref = Q.modiff_quantize_ref(x, a_hat_ref, primed, 8, True)
    assert torch.equal(s, s_ref)
    _assert_q_close(q, q_ref)  # FMA contraction may move a value across a rounding boundary
    assert_close(a_hat, a_hat_ref)
    a_hat_ref.copy_(a_hat)
    q, s = Q.group_norm_quantize(x, w, b, None, None, groups, 1e-5, True, a_hat, primed, 4, True)
    q_ref, s_ref = Q.group_norm_quantize_ref(x, w, b, None, None, groups, 1e-5, True, a_hat_ref, primed, 4, True)
    assert_close(s, s_ref)
    _assert_q_close(q, q_ref)
    assert_close(a_hat, a_hat_ref)
