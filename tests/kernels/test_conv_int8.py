"""kernels/conv_int8.py: implicit-GEMM INT8/INT4-weight conv with the MoDiff epilogue.

* integer accumulators: exact against a float64 conv of the integer values;
* dequantized outputs: SQNR against the float conv (tests/tolerances.SQNR_DB) plus no NaN;
* MoDiff: a 3-step trajectory against the reference recursion, the float first step, the cache
  mutations of eq. (6)-(7) and the invariant ô_t = deQ(W) * â_t + bias that the â cache exists for.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusediff.kernels._common as common
from fusediff.kernels import conv_int8 as CV
from fusediff.kernels import quantize as Q
from tests.tolerances import SQNR_DB, TOL, TOL_LONG_REDUCTION, assert_close, sqnr_db


def _q(shape, lo=-127, hi=127, channels_last=True):
    q = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    return q.contiguous(memory_format=torch.channels_last) if channels_last else q


# ------------------------------------------------------------------------------------------------
# Exact integer accumulators
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("k_size", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
def test_accumulator_exact(w_bits, k_size, stride, padding):
    # N=2, Cin=5 (odd: odd K for 1x1 -> padded INT4 nibble), 7x9 (non-pow2), Cout=6 (< BLOCK_N)
    q = _q((2, 5, 7, 9))
    p = CV.prepare_conv_weight(torch.randn(6, 5, k_size, k_size), w_bits)
    acc = CV.int8_conv2d_acc(q, p["w_q"], stride, padding, w_bits, k_size)
    w_int = Q.unpack_int4(p["w_q"], k_size * k_size * 5) if w_bits == 4 else p["w_q"]
    w4 = w_int.reshape(6, k_size, k_size, 5).permute(0, 3, 1, 2)  # the documented (r, s, cin) K order
    ref = F.conv2d(q.double(), w4.double(), stride=stride, padding=padding)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.double(), ref)


@pytest.mark.parametrize("w_bits", [8, 4])
def test_accumulator_exact_multi_tile(w_bits):
    # Cin=40 > BLOCK_K (two channel blocks per tap, odd tap offsets in the packed INT4 weight),
    # Cout=20 > BLOCK_N (two column tiles), NCHW q (strided channel reads).
    q = _q((2, 40, 7, 9), channels_last=False)
    p = CV.prepare_conv_weight(torch.randn(20, 40, 3, 3), w_bits)
    acc = CV.int8_conv2d_acc(q, p["w_q"], 1, 1, w_bits, 3)
    assert torch.equal(acc, CV.int8_conv2d_acc_ref(q, p["w_q"], 1, 1, w_bits, 3))


def test_accumulator_extremes_do_not_overflow():
    # Every product at its maximum: 127 * 127 * K must stay exact in int32.
    q = torch.full((1, 24, 5, 5), -127, dtype=torch.int8)
    w_q = torch.full((6, 9 * 24), 127, dtype=torch.int8)
    acc = CV.int8_conv2d_acc(q, w_q, 1, 0, 8, 3)
    assert (acc == -127 * 127 * 9 * 24).all()


# ------------------------------------------------------------------------------------------------
# Dequantized outputs (baseline mode)
# ------------------------------------------------------------------------------------------------

SQNR_CASES = [
    # (w_bits, a_bits, threshold key, compare against)
    (8, 8, "int8", "float"),
    (4, 8, "int4", "float"),
    (8, 4, "int4", "float"),
    # W4A4 baseline measures ~14.4 dB against the float weights (right at the int4 floor) and
    # ~16.3 dB against the dequantized weights: judge its activation path against deQ(W).
    (4, 4, "int4", "deq"),
]


@pytest.mark.parametrize("w_bits,a_bits,key,against", SQNR_CASES)
def test_baseline_sqnr(w_bits, a_bits, key, against):
    x = torch.randn(2, 24, 7, 9)
    w = torch.randn(16, 24, 3, 3) * 0.1
    b = torch.randn(16) * 0.1
    p = CV.prepare_conv_weight(w, w_bits)
    q, s = Q.quantize_act(x, a_bits, True)
    out = torch.ops.fusediff.int8_conv2d(q, s, p["w_q"], p["w_scale"], b, None, None, None, 1, 1, w_bits, 3)
    w_ref = w if against == "float" else CV.dequantize_conv_weight(p["w_q"], p["w_scale"], w_bits, 3, 24)
    ref = F.conv2d(x, w_ref, b, padding=1)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not torch.isnan(out).any()
    assert sqnr_db(ref, out) >= SQNR_DB[key]
    # And the kernel's epilogue equals the reference epilogue on the same q.
    assert_close(out, CV.int8_conv2d_ref(q, s, p["w_q"], p["w_scale"], b, None, None, None, 1, 1, w_bits, 3))


def test_baseline_stride2_per_tensor_no_bias():
    x = torch.randn(2, 7, 9, 8)
    w = torch.randn(12, 7, 3, 3) * 0.2
    p = CV.prepare_conv_weight(w, 8)
    q, s = Q.quantize_act(x, 8, False)
    out = torch.ops.fusediff.int8_conv2d(q, s, p["w_q"], p["w_scale"], None, None, None, None, 2, 1, 8, 3)
    ref = F.conv2d(x, w, None, stride=2, padding=1)
    assert sqnr_db(ref, out) >= SQNR_DB["int8"]


def test_prepare_conv_weight_round_trip():
    w = torch.randn(6, 5, 3, 3)
    for bits, qmax in ((8, 127), (4, 7)):
        p = CV.prepare_conv_weight(w, bits)
        wd = CV.dequantize_conv_weight(p["w_q"], p["w_scale"], bits, 3, 5)
        sb = p["w_scale"].reshape(-1, 1, 1, 1)
        inside = w.abs() <= qmax * sb  # not clipped by the MSE search: within half a step
        assert ((wd - w).abs()[inside] <= (sb / 2 * (1 + 1e-5)).expand_as(w)[inside]).all()
        assert torch.equal(wd[~inside], (torch.sign(w) * qmax * sb).expand_as(w)[~inside])
        assert sqnr_db(w, wd) >= SQNR_DB["int8" if bits == 8 else "int4"]


# ------------------------------------------------------------------------------------------------
# MoDiff trajectory
# ------------------------------------------------------------------------------------------------


def _trajectory(w_bits, a_bits, cache_dtype, steps=3, stride=1, padding=1, k=3, use_gn=False):
    """Run the fused ops and the references side by side over a short trajectory."""
    N, Cin, Cout, H, W = 2, 12, 10, 7, 9
    w = torch.randn(Cout, Cin, k, k) * 0.1
    b = torch.randn(Cout)
    p = CV.prepare_conv_weight(w, w_bits)
    wd = CV.dequantize_conv_weight(p["w_q"], p["w_scale"], w_bits, k, Cin)
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    a_hat = torch.full((N, Cin, H, W), float("nan"), dtype=cache_dtype)  # garbage before step 1
    o_hat = torch.full((N, Cout, Ho, Wo), float("nan"), dtype=cache_dtype)
    a_hat_r, o_hat_r = a_hat.clone(), o_hat.clone()
    base = torch.randn(N, Cin, H, W)
    gw, gb = torch.randn(Cin), torch.randn(Cin)
    records = []
    for t in range(steps):
        x = base + 0.1 * t * torch.randn_like(base)
        primed = torch.tensor(t > 0)
        o_hat_prev = o_hat.clone()
        if use_gn:
            q, s = Q.group_norm_quantize(x, gw, gb, None, None, 3, 1e-5, True, a_hat, primed, a_bits, True)
            a_true = Q.group_norm_act_ref(x, gw, gb, None, None, 3, 1e-5, True)
        else:
            q, s = Q.modiff_quantize(x, a_hat, primed, a_bits, True)
            a_true = x
        out = torch.ops.fusediff.int8_conv2d(q, s, p["w_q"], p["w_scale"], b, o_hat, a_hat, primed, stride, padding,
                                             w_bits, k)
        # Reference recursion on the same q (so rounding ties cannot make the two drift apart).
        a_hat_r.copy_(a_hat)
        out_r = CV.int8_conv2d_ref(q, s, p["w_q"], p["w_scale"], b, o_hat_r, a_hat_r, primed, stride, padding, w_bits, k)
        records.append(dict(t=t, x=a_true, q=q, s=s, out=out, out_r=out_r, o_hat=o_hat.clone(), o_hat_r=o_hat_r.clone(),
                            o_hat_prev=o_hat_prev, a_hat=a_hat.clone()))
    return records, w, wd, b, stride, padding, p


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 4)])
def test_modiff_trajectory(w_bits, a_bits):
    records, w, wd, b, stride, padding, p = _trajectory(w_bits, a_bits, torch.float32)
    for r in records:
        assert not torch.isnan(r["out"]).any()
        assert torch.equal(r["out"], r["o_hat"])  # the output is ô_t, which is also the cache
        assert r["out"].data_ptr() != r["o_hat"].data_ptr()
        assert_close(r["out"], r["out_r"])
        assert_close(r["o_hat"], r["o_hat_r"])
        # The invariant the â cache exists for: ô_t = deQ(W) * â_t + bias (eq. 6-7, linearity).
        assert_close(r["o_hat"], F.conv2d(r["a_hat"], wd, b, stride=stride, padding=padding), TOL_LONG_REDUCTION)
        if r["t"] == 0:
            # First step: float conv of â_T = a_T with deQ(W), bias included; o_hat = out.
            assert torch.equal(r["a_hat"], r["x"])
            assert_close(r["out"], F.conv2d(r["x"], wd, b, stride=stride, padding=padding))
        else:
            # Eq. (7) spelled out: ô_t = s_a s_w (W_int ⊗ q) + ô_{t+1}, no bias.
            acc = CV.int8_conv2d_acc_ref(r["q"], p["w_q"], stride, padding, w_bits, 3)
            expect = acc.double() * r["s"].double().reshape(-1, 1, 1, 1) * p["w_scale"].double().reshape(1, -1, 1, 1)
            assert_close(r["o_hat"], (expect + r["o_hat_prev"].double()).float())
        # MoDiff keeps A4 close to the float conv of the true activation.
        key = "int8" if (w_bits, a_bits) == (8, 8) else "int4"
        assert sqnr_db(F.conv2d(r["x"], w, b, stride=stride, padding=padding), r["out"]) >= SQNR_DB[key]


def test_modiff_trajectory_fused_groupnorm_stride2_1x1():
    records, _, wd, b, stride, padding, _ = _trajectory(8, 8, torch.float32, stride=2, padding=0, k=1, use_gn=True)
    for r in records:
        assert_close(r["out"], r["out_r"])
        assert_close(r["o_hat"], F.conv2d(r["a_hat"], wd, b, stride=stride, padding=padding), TOL_LONG_REDUCTION)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_modiff_low_precision_caches(cache_dtype):
    records, *_ = _trajectory(8, 8, cache_dtype)
    for r in records:
        assert r["out"].dtype == cache_dtype and r["o_hat"].dtype == cache_dtype
        assert_close(r["out"], r["out_r"], TOL)
        assert_close(r["o_hat"], r["o_hat_r"], TOL)


# ------------------------------------------------------------------------------------------------
# Non-finite values
# ------------------------------------------------------------------------------------------------


def test_nan_propagates():
    q = _q((2, 5, 6, 6))
    p = CV.prepare_conv_weight(torch.randn(6, 5, 3, 3), 8)
    s = torch.tensor([float("nan"), 0.01])
    out = torch.ops.fusediff.int8_conv2d(q, s, p["w_q"], p["w_scale"], None, None, None, None, 1, 1, 8, 3)
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1]).any()
    # A NaN in ô_{t+1} stays in ô_t (and only there).
    o_hat = torch.zeros(2, 6, 6, 6)
    o_hat[1, 2, 3, 4] = float("nan")
    s = torch.tensor([0.01, 0.01])
    out = torch.ops.fusediff.int8_conv2d(q, s, p["w_q"], p["w_scale"], None, o_hat, torch.zeros(2, 5, 6, 6),
                                         torch.tensor(True), 1, 1, 8, 3)
    assert torch.isnan(out).sum() == 1 and torch.isnan(out[1, 2, 3, 4]) and torch.isnan(o_hat[1, 2, 3, 4])


# ------------------------------------------------------------------------------------------------
# Op machinery
# ------------------------------------------------------------------------------------------------


def test_triton_path_ran():
    q = _q((1, 5, 4, 4))
    p = CV.prepare_conv_weight(torch.randn(6, 5, 3, 3), 4)
    before = common.DISPATCH_COUNTS[("int8_conv2d", "triton")]
    before_acc = common.DISPATCH_COUNTS[("int8_conv2d_acc", "triton")]
    torch.ops.fusediff.int8_conv2d(q, torch.ones(1), p["w_q"], p["w_scale"], None, None, None, None, 1, 1, 4, 3)
    CV.int8_conv2d_acc(q, p["w_q"], 1, 1, 4, 3)
    assert common.DISPATCH_COUNTS[("int8_conv2d", "triton")] == before + 1
    assert common.DISPATCH_COUNTS[("int8_conv2d_acc", "triton")] == before_acc + 1


def test_opcheck():
    q = _q((2, 6, 5, 7))
    s = torch.rand(2) + 0.01
    p = CV.prepare_conv_weight(torch.randn(8, 6, 3, 3), 4)
    b = torch.randn(8)
    torch.library.opcheck(torch.ops.fusediff.int8_conv2d.default, (q, s, p["w_q"], p["w_scale"], b, None, None, None, 2, 1, 4, 3))
    for primed in (True, False):
        args = (q, s, p["w_q"], p["w_scale"], b, torch.randn(2, 8, 5, 7), torch.randn(2, 6, 5, 7), torch.tensor(primed),
                1, 1, 4, 3)
        torch.library.opcheck(torch.ops.fusediff.int8_conv2d.default, args)


def test_compile_fullgraph_trajectory():
    p = CV.prepare_conv_weight(torch.randn(8, 6, 3, 3) * 0.1, 8)
    bias = torch.randn(8)

    def step(x, a_hat, o_hat, primed):
        q, s = torch.ops.fusediff.modiff_quantize(x, a_hat, primed, 8, True)
        return torch.ops.fusediff.int8_conv2d(q, s, p["w_q"], p["w_scale"], bias, o_hat, a_hat, primed, 1, 1, 8, 3)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x0 = torch.randn(2, 6, 5, 7)
    caches = [torch.zeros(2, 6, 5, 7), torch.zeros(2, 8, 5, 7)]
    caches_e = [c.clone() for c in caches]
    for t in range(3):
        x = x0 + 0.1 * t
        primed = torch.tensor(t > 0)
        y = compiled(x, *caches, primed)
        y_e = step(x, *caches_e, primed)
        assert torch.equal(y, y_e)
        assert torch.equal(caches[0], caches_e[0]) and torch.equal(caches[1], caches_e[1])


def test_invalid_arguments():
    q = _q((2, 5, 6, 6))
    s = torch.ones(2)
    p8 = CV.prepare_conv_weight(torch.randn(6, 5, 3, 3), 8)
    p4 = CV.prepare_conv_weight(torch.randn(6, 5, 3, 3), 4)
    op = torch.ops.fusediff.int8_conv2d
    with pytest.raises(ValueError, match="w_bits"):
        op(q, s, p8["w_q"], p8["w_scale"], None, None, None, None, 1, 1, 2, 3)
    with pytest.raises(ValueError, match="bits"):
        CV.prepare_conv_weight(torch.randn(6, 5, 3, 3), 3)
    with pytest.raises(TypeError, match="q must be an int8"):
        op(q.float(), s, p8["w_q"], p8["w_scale"], None, None, None, None, 1, 1, 8, 3)
    with pytest.raises(TypeError, match="w_q must be torch.uint8"):
        op(q, s, p8["w_q"], p8["w_scale"], None, None, None, None, 1, 1, 4, 3)
    with pytest.raises(ValueError, match="w_q must be"):
        op(q, s, p4["w_q"], p4["w_scale"], None, None, None, None, 1, 1, 4, 1)  # k_size mismatch
    with pytest.raises(ValueError, match="act_scale"):
        op(q, torch.ones(3), p8["w_q"], p8["w_scale"], None, None, None, None, 1, 1, 8, 3)
    with pytest.raises(TypeError, match="act_scale"):
        op(q, s.double(), p8["w_q"], p8["w_scale"], None, None, None, None, 1, 1, 8, 3)
    with pytest.raises(ValueError, match="together"):
        op(q, s, p8["w_q"], p8["w_scale"], None, torch.zeros(2, 6, 6, 6), None, None, 1, 1, 8, 3)
    with pytest.raises(ValueError, match="never broadcast"):  # batch 1 cache for a batch-2 input
        op(q, s, p8["w_q"], p8["w_scale"], None, torch.zeros(1, 6, 6, 6), torch.zeros(2, 5, 6, 6), torch.tensor(True),
           1, 1, 8, 3)
    with pytest.raises(ValueError, match="never broadcast"):
        op(q, s, p8["w_q"], p8["w_scale"], None, torch.zeros(2, 6, 6, 6), torch.zeros(1, 5, 6, 6), torch.tensor(True),
           1, 1, 8, 3)
    with pytest.raises(ValueError, match="stride"):
        op(q, s, p8["w_q"], p8["w_scale"], None, None, None, None, 0, 1, 8, 3)


# ------------------------------------------------------------------------------------------------
# GPU tier: the paper's Table 3 shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("cin,cout,k,hw", [(1536, 768, 3, 8), (384, 384, 3, 16), (576, 192, 3, 32), (768, 384, 1, 16)])
def test_gpu_table3_shapes(cin, cout, k, hw, w_bits):
    dev = "cuda"
    q = torch.randint(-127, 128, (8, cin, hw, hw), dtype=torch.int8, device=dev).contiguous(memory_format=torch.channels_last)
    p = CV.prepare_conv_weight(torch.randn(cout, cin, k, k, device=dev), w_bits)
    pad = k // 2
    acc = CV.int8_conv2d_acc(q, p["w_q"], 1, pad, w_bits, k)
    assert torch.equal(acc, CV.int8_conv2d_acc_ref(q, p["w_q"], 1, pad, w_bits, k))
    s = torch.rand(8, device=dev) * 0.01
    o_hat = torch.randn(8, cout, hw, hw, device=dev)
    o_hat_r = o_hat.clone()
    primed = torch.tensor(True)
    out = torch.ops.fusediff.int8_conv2d(q, s, p["w_q"], p["w_scale"], None, o_hat, torch.zeros(8, cin, hw, hw, device=dev),
                                         primed, 1, pad, w_bits, k)
    out_r = CV.int8_conv2d_ref(q, s, p["w_q"], p["w_scale"], None, o_hat_r, torch.zeros(8, cin, hw, hw, device=dev),
                               primed, 1, pad, w_bits, k)
    assert_close(out, out_r, TOL_LONG_REDUCTION)


# ------------------------------------------------------------------------------------------------
# fusediff::int8_conv2d_baseline: the pure (cache-free) form, same kernel
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("shape,cout,k,stride,padding,per_sample", [
    ((2, 5, 7, 9), 6, 3, 1, 1, True),    # odd channels, non-pow2 spatial
    ((3, 12, 6, 6), 9, 3, 2, 1, False),  # stride 2, per-tensor scale
    ((1, 7, 5, 3), 4, 1, 1, 0, True),    # 1x1
])
def test_baseline_op_equals_reference_and_int8_conv2d(w_bits, shape, cout, k, stride, padding, per_sample):
    q = _q(shape)
    s = torch.rand(shape[0] if per_sample else 1) + 0.01
    p = CV.prepare_conv_weight(torch.randn(cout, shape[1], k, k), w_bits)
    b = torch.randn(cout)
    args = (q, s, p["w_q"], p["w_scale"], b)
    geo = (stride, padding, w_bits, k)
    before = common.DISPATCH_COUNTS[("int8_conv2d_baseline", "triton")]
    got = torch.ops.fusediff.int8_conv2d_baseline(*args, *geo)
    assert common.DISPATCH_COUNTS[("int8_conv2d_baseline", "triton")] == before + 1  # the kernel ran
    ref = CV.int8_conv2d_ref(*args, None, None, None, *geo)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got, ref, TOL_LONG_REDUCTION)
    # same kernel and epilogue as the cache-free form of int8_conv2d
    assert torch.equal(got, torch.ops.fusediff.int8_conv2d(*args, None, None, None, *geo))
    # integer accumulator exact: unit scales, no bias
    ones = torch.ones(cout)
    acc = torch.ops.fusediff.int8_conv2d_baseline(q, torch.ones(1), p["w_q"], ones, None, *geo)
    assert torch.equal(acc, CV.int8_conv2d_acc_ref(q, p["w_q"], *geo).float())


def test_baseline_op_opcheck_and_compile():
    q = _q((2, 6, 5, 7))
    s = torch.rand(2) + 0.01
    p = CV.prepare_conv_weight(torch.randn(8, 6, 3, 3), 4)
    args = (q, s, p["w_q"], p["w_scale"], torch.randn(8), 2, 1, 4, 3)
    torch.library.opcheck(torch.ops.fusediff.int8_conv2d_baseline.default, args)
    fn = torch.compile(lambda *a: torch.ops.fusediff.int8_conv2d_baseline(*a) * 2, backend="aot_eager", fullgraph=True)
    assert_close(fn(*args), torch.ops.fusediff.int8_conv2d_baseline(*args) * 2)
    with pytest.raises(ValueError, match="w_scale"):
        torch.ops.fusediff.int8_conv2d_baseline(q, s, p["w_q"], p["w_scale"][:3], None, 1, 1, 4, 3)
