"""kernels/linear_int8.py: INT8/INT4-weight linear with the MoDiff epilogue and fused GEGLU."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fusediff.kernels._common as common
from fusediff.kernels import linear_int8 as LN
from fusediff.kernels import quantize as Q
from tests.tolerances import SQNR_DB, TOL, TOL_LONG_REDUCTION, assert_close, sqnr_db


def _geglu(pre):
    h, g = pre.chunk(2, dim=-1)
    return h * F.gelu(g)


def _quant_tokens(x, bits):
    """Per-token scales: every row of x.reshape(T, K) is its own 'sample'."""
    q, s = Q.quantize_act(x.reshape(-1, x.shape[-1]), bits, True)
    return q.view(x.shape), s


# ------------------------------------------------------------------------------------------------
# Exact integer accumulators
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize(
    "shape,f",
    [
        ((2, 77, 40), 24),  # 77 text tokens (non-pow2 rows), K=40 > BLOCK_K, F > BLOCK_N
        ((7, 33), 6),  # odd K (INT4 pad nibble), F < BLOCK_N, 2-D input
    ],
)
def test_accumulator_exact(shape, f, w_bits):
    q = torch.randint(-127, 128, shape, dtype=torch.int8)
    p = LN.prepare_linear_weight(torch.randn(f, shape[-1]), w_bits)
    acc = LN.int8_linear_acc(q, p["w_q"], w_bits)
    w_int = Q.unpack_int4(p["w_q"], shape[-1]) if w_bits == 4 else p["w_q"]
    ref = q.double() @ w_int.double().t()
    assert acc.dtype == torch.int32 and acc.shape == shape[:-1] + (f,)
    assert torch.equal(acc.double(), ref)


def test_accumulator_extremes_do_not_overflow():
    q = torch.full((3, 1000), 127, dtype=torch.int8)
    w_q = torch.full((4, 1000), -127, dtype=torch.int8)
    assert (LN.int8_linear_acc(q, w_q, 8) == -127 * 127 * 1000).all()


# ------------------------------------------------------------------------------------------------
# Dequantized outputs (baseline)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geglu", [False, True])
@pytest.mark.parametrize("w_bits,a_bits,key", [(8, 8, "int8"), (4, 8, "int4"), (8, 4, "int4")])
def test_baseline_sqnr(w_bits, a_bits, key, geglu):
    x = torch.randn(1, 77, 40)  # 77 text tokens, per-token scales
    w = torch.randn(48, 40) * 0.2
    b = torch.randn(48) * 0.1
    p = LN.prepare_linear_weight(w, w_bits)
    q, s = _quant_tokens(x, a_bits)
    out = torch.ops.fusediff.int8_linear(q, s, p["w_q"], p["w_scale"], b, None, None, None, w_bits, geglu)
    pre = F.linear(x, w, b)
    ref = _geglu(pre) if geglu else pre
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not torch.isnan(out).any()
    assert sqnr_db(ref, out) >= SQNR_DB[key]
    assert_close(out, LN.int8_linear_ref(q, s, p["w_q"], p["w_scale"], b, None, None, None, w_bits, geglu))


@pytest.mark.parametrize("per", ["sample", "tensor"])
def test_scale_granularities(per):
    x = torch.randn(2, 5, 33)  # odd K
    x[0] *= 8  # CFG-like: the two samples have different ranges
    w = torch.randn(10, 33) * 0.2
    p = LN.prepare_linear_weight(w, 8)
    q, s = Q.quantize_act(x, 8, per == "sample")
    assert s.shape == ((2,) if per == "sample" else (1,))
    out = torch.ops.fusediff.int8_linear(q, s, p["w_q"], p["w_scale"], None, None, None, None, 8, False)
    assert sqnr_db(F.linear(x, w), out) >= SQNR_DB["int8"]
    assert_close(out, LN.int8_linear_ref(q, s, p["w_q"], p["w_scale"], None, None, None, None, 8, False))


# ------------------------------------------------------------------------------------------------
# MoDiff trajectory (plain and GEGLU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w_bits,a_bits,geglu,cache_dtype",
    [
        (8, 8, False, torch.float32),
        (4, 4, True, torch.float32),  # GEGLU: ô caches the pre-gate 2F projection
        (8, 8, True, torch.bfloat16),
    ],
)
def test_modiff_trajectory(w_bits, a_bits, geglu, cache_dtype):
    N, L, K, Fw = 2, 77, 40, 32
    w = torch.randn(Fw, K) * 0.2
    b = torch.randn(Fw)
    p = LN.prepare_linear_weight(w, w_bits)
    wd = LN.dequantize_linear_weight(p["w_q"], p["w_scale"], w_bits, K)
    a_hat = torch.full((N, L, K), float("nan"), dtype=cache_dtype)  # garbage before step 1
    o_hat = torch.full((N, L, Fw), float("nan"), dtype=cache_dtype)
    o_hat_r = o_hat.clone()
    base = torch.randn(N, L, K)
    for t in range(3):
        x = base + 0.1 * t * torch.randn_like(base)
        primed = torch.tensor(t > 0)
        o_prev = o_hat.clone()
        q, s = Q.modiff_quantize(x, a_hat, primed, a_bits, True)
        out = torch.ops.fusediff.int8_linear(q, s, p["w_q"], p["w_scale"], b, o_hat, a_hat, primed, w_bits, geglu)
        out_r = LN.int8_linear_ref(q, s, p["w_q"], p["w_scale"], b, o_hat_r, a_hat.clone(), primed, w_bits, geglu)
        assert out.dtype == cache_dtype and out.shape == (N, L, Fw // 2 if geglu else Fw)
        assert not torch.isnan(out).any()
        assert_close(out, out_r, TOL)
        assert_close(o_hat, o_hat_r, TOL)
        if cache_dtype == torch.float32:
            # The cache holds the pre-gate projection and the output is its gate (in bf16 the gate
            # is computed from the fp32 sum before ô is rounded, so this only holds exactly in fp32).
            assert_close(out, _geglu(o_hat) if geglu else o_hat)
            # ô_t = â_t @ deQ(W)ᵀ + bias (the invariant behind eq. 6-7).
            assert_close(o_hat, F.linear(a_hat, wd, b), TOL_LONG_REDUCTION)
            if t == 0:
                assert torch.equal(a_hat, x)
                assert_close(o_hat, F.linear(x, wd, b))
            else:
                acc = LN.int8_linear_acc_ref(q, p["w_q"], w_bits).double()
                expect = acc * s.double().reshape(-1, 1, 1) * p["w_scale"].double() + o_prev.double()  # eq. (7)
                assert_close(o_hat, expect.float())
            pre = F.linear(x, w, b)
            ref = _geglu(pre) if geglu else pre
            assert sqnr_db(ref, out) >= SQNR_DB["int8" if (w_bits, a_bits) == (8, 8) else "int4"]
        o_hat_r.copy_(o_hat)


# ------------------------------------------------------------------------------------------------
# Non-finite, op machinery, invalid arguments
# ------------------------------------------------------------------------------------------------


def test_nan_propagates():
    q = torch.randint(-127, 128, (2, 3, 16), dtype=torch.int8)
    p = LN.prepare_linear_weight(torch.randn(8, 16), 8)
    s = torch.tensor([0.1, float("nan")])  # per sample
    out = torch.ops.fusediff.int8_linear(q, s, p["w_q"], p["w_scale"], None, None, None, None, 8, True)
    assert not torch.isnan(out[0]).any() and torch.isnan(out[1]).all()


def test_triton_path_ran():
    q = torch.randint(-127, 128, (3, 16), dtype=torch.int8)
    p = LN.prepare_linear_weight(torch.randn(8, 16), 4)
    before = common.DISPATCH_COUNTS[("int8_linear", "triton")]
    before_acc = common.DISPATCH_COUNTS[("int8_linear_acc", "triton")]
    torch.ops.fusediff.int8_linear(q, torch.ones(3), p["w_q"], p["w_scale"], None, None, None, None, 4, True)
    LN.int8_linear_acc(q, p["w_q"], 4)
    assert common.DISPATCH_COUNTS[("int8_linear", "triton")] == before + 1
    assert common.DISPATCH_COUNTS[("int8_linear_acc", "triton")] == before_acc + 1


def test_opcheck():
    q = torch.randint(-127, 128, (2, 5, 17), dtype=torch.int8)
    s = torch.rand(10) + 0.01  # per token
    p = LN.prepare_linear_weight(torch.randn(12, 17), 4)
    b = torch.randn(12)
    op = torch.ops.fusediff.int8_linear.default
    torch.library.opcheck(op, (q, s, p["w_q"], p["w_scale"], b, None, None, None, 4, True))
    for primed in (True, False):
        torch.library.opcheck(
            op, (q, s, p["w_q"], p["w_scale"], b, torch.randn(2, 5, 12), torch.randn(2, 5, 17), torch.tensor(primed), 4, True)
        )


def test_compile_fullgraph_trajectory():
    p = LN.prepare_linear_weight(torch.randn(16, 24) * 0.2, 8)
    bias = torch.randn(16)

    def step(x, a_hat, o_hat, primed):
        q, s = torch.ops.fusediff.modiff_quantize(x, a_hat, primed, 8, True)
        return torch.ops.fusediff.int8_linear(q, s, p["w_q"], p["w_scale"], bias, o_hat, a_hat, primed, 8, True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x0 = torch.randn(2, 9, 24)
    caches, caches_e = [torch.zeros(2, 9, 24), torch.zeros(2, 9, 16)], [torch.zeros(2, 9, 24), torch.zeros(2, 9, 16)]
    for t in range(3):
        primed = torch.tensor(t > 0)
        y = compiled(x0 + 0.1 * t, *caches, primed)
        y_e = step(x0 + 0.1 * t, *caches_e, primed)
        assert torch.equal(y, y_e) and torch.equal(caches[1], caches_e[1])


def test_invalid_arguments():
    q = torch.randint(-127, 128, (2, 5, 16), dtype=torch.int8)
    p8 = LN.prepare_linear_weight(torch.randn(6, 16), 8)
    op = torch.ops.fusediff.int8_linear
    s = torch.ones(2)
    with pytest.raises(ValueError, match="w_bits"):
        op(q, s, p8["w_q"], p8["w_scale"], None, None, None, None, 16, False)
    with pytest.raises(TypeError, match="q must be an int8"):
        op(q.float(), s, p8["w_q"], p8["w_scale"], None, None, None, None, 8, False)
    with pytest.raises(TypeError, match="w_q must be torch.uint8"):
        op(q, s, p8["w_q"], p8["w_scale"], None, None, None, None, 4, False)
    with pytest.raises(ValueError, match="act_scale"):
        op(q, torch.ones(3), p8["w_q"], p8["w_scale"], None, None, None, None, 8, False)
    p7 = LN.prepare_linear_weight(torch.randn(7, 16), 8)
    with pytest.raises(ValueError, match="geglu"):  # odd number of weight rows cannot split into h, gate
        op(q, s, p7["w_q"], p7["w_scale"], None, None, None, None, 8, True)
    with pytest.raises(ValueError, match="never broadcast"):  # batch 1 cache for a batch-2 input
        op(q, s, p8["w_q"], p8["w_scale"], None, torch.zeros(1, 5, 6), torch.zeros(2, 5, 16), torch.tensor(True), 8, False)
    with pytest.raises(ValueError, match="never broadcast"):
        op(q, s, p8["w_q"], p8["w_scale"], None, torch.zeros(2, 5, 6), torch.zeros(1, 5, 16), torch.tensor(True), 8, False)
    with pytest.raises(ValueError, match="together"):
        op(q, s, p8["w_q"], p8["w_scale"], None, None, torch.zeros(2, 5, 16), None, 8, False)
    with pytest.raises(TypeError, match="primed"):
        op(q, s, p8["w_q"], p8["w_scale"], None, torch.zeros(2, 5, 6), torch.zeros(2, 5, 16), torch.tensor(1.0), 8, False)


@pytest.mark.gpu
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("t,k,f,geglu", [(4096, 320, 2560, True), (77 * 16, 768, 320, False), (1024, 1280, 1280, False)])
def test_gpu_real_shapes(t, k, f, geglu, w_bits):
    dev = "cuda"
    q = torch.randint(-127, 128, (t, k), dtype=torch.int8, device=dev)
    p = LN.prepare_linear_weight(torch.randn(f, k, device=dev), w_bits)
    assert torch.equal(LN.int8_linear_acc(q, p["w_q"], w_bits), LN.int8_linear_acc_ref(q, p["w_q"], w_bits))
    s = torch.rand(t, device=dev) * 0.01
    o_hat = torch.randn(t, f, device=dev)
    o_hat_r = o_hat.clone()
    primed = torch.tensor(True)
    a_hat = torch.zeros(t, k, device=dev)
    out = torch.ops.fusediff.int8_linear(q, s, p["w_q"], p["w_scale"], None, o_hat, a_hat, primed, w_bits, geglu)
    out_r = LN.int8_linear_ref(q, s, p["w_q"], p["w_scale"], None, o_hat_r, a_hat, primed, w_bits, geglu)
    assert_close(out, out_r, TOL_LONG_REDUCTION)
    assert_close(o_hat, o_hat_r, TOL_LONG_REDUCTION)


# ------------------------------------------------------------------------------------------------
# fusediff::int8_linear_baseline: the pure (cache-free) form, same kernel
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("shape,f,scales,geglu", [
    ((2, 77, 24), 10, "sample", False),   # 77 tokens (text context), odd F
    ((3, 5, 17), 12, "token", True),      # per-token scales, odd K, GEGLU
    ((4, 33), 7, "tensor", False),        # 2-D, per-tensor scale
])
def test_baseline_op_equals_reference_and_int8_linear(w_bits, shape, f, scales, geglu):
    q = torch.randint(-127, 128, shape, dtype=torch.int8)
    rows = math.prod(shape[:-1])
    n = {"sample": shape[0], "token": rows, "tensor": 1}[scales]
    s = torch.rand(n) + 0.01
    p = LN.prepare_linear_weight(torch.randn(2 * f if geglu else f, shape[-1]), w_bits)
    b = torch.randn(p["w_q"].shape[0])
    before = common.DISPATCH_COUNTS[("int8_linear_baseline", "triton")]
    got = torch.ops.fusediff.int8_linear_baseline(q, s, p["w_q"], p["w_scale"], b, w_bits, geglu)
    assert common.DISPATCH_COUNTS[("int8_linear_baseline", "triton")] == before + 1  # the kernel ran
    ref = LN.int8_linear_ref(q, s, p["w_q"], p["w_scale"], b, None, None, None, w_bits, geglu)
    assert got.shape == shape[:-1] + (f,) and got.dtype == torch.float32
    assert_close(got, ref, TOL_LONG_REDUCTION)
    assert torch.equal(got, torch.ops.fusediff.int8_linear(q, s, p["w_q"], p["w_scale"], b, None, None, None, w_bits,
                                                            geglu))
    acc = torch.ops.fusediff.int8_linear_baseline(q, torch.ones(1), p["w_q"], torch.ones(p["w_q"].shape[0]), None,
                                                  w_bits, False)
    assert torch.equal(acc, LN.int8_linear_acc_ref(q, p["w_q"], w_bits).float())  # exact integer accumulator


def test_baseline_op_opcheck_and_compile():
    q = torch.randint(-127, 128, (2, 5, 17), dtype=torch.int8)
    s = torch.rand(10) + 0.01
    p = LN.prepare_linear_weight(torch.randn(12, 17), 4)
    args = (q, s, p["w_q"], p["w_scale"], torch.randn(12), 4, True)
    torch.library.opcheck(torch.ops.fusediff.int8_linear_baseline.default, args)
    fn = torch.compile(lambda *a: torch.ops.fusediff.int8_linear_baseline(*a) + 1, backend="aot_eager", fullgraph=True)
    assert_close(fn(*args), torch.ops.fusediff.int8_linear_baseline(*args) + 1)
