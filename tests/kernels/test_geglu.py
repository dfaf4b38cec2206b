"""fusediff::gelu / fusediff::geglu / fusediff::linear_geglu against their pure-torch references.

CPU tier: TRITON_INTERPRET=1 (tests/conftest.py), small awkward shapes. GPU tier (-m gpu): real
SD-1.5 shapes, compiled Triton.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fusediff.kernels._common as common
from fusediff.kernels import geglu as G
from tests.tolerances import assert_close, assert_lowp_close

# On a CUDA machine the grid runs on the GPU; on CPU the Triton kernels are interpreted.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROX = ["none", "tanh"]

SHAPES = [
    (2, 77, 2 * 45),  # odd F = 45: column tail inside one block; 77 text tokens: row tail
    (3, 5, 2 * 64),  # F a power of two, tiny row count
    (1, 1000, 2 * 320),  # 1000 rows: not a multiple of any row block; F = 320 spans several column blocks
    (4096,),  # 1-D: no leading dims at all
]


def _triton_ran(op: str, fn):
    """Run ``fn`` and assert it went through the Triton kernel of ``op`` (not the reference)."""
    before_t = common.DISPATCH_COUNTS[(op, "triton")]
    before_r = common.DISPATCH_COUNTS[(op, "reference")]
    out = fn()
    assert common.DISPATCH_COUNTS[(op, "triton")] == before_t + 1, f"{op}: Triton path did not run"
    assert common.DISPATCH_COUNTS[(op, "reference")] == before_r, f"{op}: the reference stood in for the kernel"
    return out


def _eager_geglu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """What eager diffusers does, in x's dtype: chunk -> F.gelu -> mul."""
    h, g = x.chunk(2, dim=-1)
    return h * F.gelu(g, approximate=approximate)


# ---------------------------------------------------------------------------------------------
# The references themselves agree with PyTorch / diffusers (so the kernels are not judged against
# a wrong formula or a swapped value/gate order).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approximate", APPROX)
def test_references_match_pytorch(approximate):
    x = torch.randn(3, 7, 2 * 45, dtype=torch.float64) * 4
    assert_close(G.gelu_ref(x.float(), approximate), F.gelu(x, approximate=approximate).float())
    assert_close(G.geglu_ref(x.float(), approximate), _eager_geglu(x, approximate).float())


def test_linear_geglu_ref_matches_diffusers_geglu():
    diffusers_activations = pytest.importorskip("diffusers.models.activations")
    mod = diffusers_activations.GEGLU(40, 45).eval()
    x = torch.randn(2, 9, 40)
    with torch.no_grad():
        expected = mod(x)
    assert_close(G.linear_geglu_ref(x, mod.proj.weight, mod.proj.bias, "none"), expected)
    with torch.no_grad():
        got = _triton_ran("linear_geglu", lambda: G.linear_geglu(x, mod.proj.weight, mod.proj.bias, "none"))
    assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# Kernel vs reference grids. fp32: fixed tolerance; fp16/bf16: Liger's 2x-eager rule.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_grid(dtype, shape, approximate):
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    out = _triton_ran("gelu", lambda: torch.ops.fusediff.gelu(x, approximate))
    assert out.shape == x.shape and out.dtype == dtype
    ref32 = G.gelu_ref(x.float(), approximate)
    assert_lowp_close(out, ref32, F.gelu(x, approximate=approximate))


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_grid(dtype, shape, approximate):
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    out = _triton_ran("geglu", lambda: torch.ops.fusediff.geglu(x, approximate))
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype and out.is_contiguous()
    ref32 = G.geglu_ref(x.float(), approximate)
    assert_lowp_close(out, ref32, _eager_geglu(x, approximate))


def _strided_inputs(dtype):
    base = torch.randn(2, 77, 2 * 45 + 6, device=DEVICE).to(dtype)
    yield "row-sliced view (row stride 96 != 2F)", base[..., : 2 * 45]
    yield "batch/token transposed (B, T) strides", torch.randn(77, 2, 2 * 45, device=DEVICE).to(dtype).transpose(0, 1)
    yield "4-D, outer dims not collapsible (copy)", torch.randn(3, 2, 5, 2 * 64, device=DEVICE).to(dtype).transpose(0, 1)
    yield "last-dim stride != 1 (copy)", torch.randn(2, 2 * 45, 7, device=DEVICE).to(dtype).transpose(1, 2)
    yield "linear output viewed (B*T, 2F) -> (B, T, 2F)", F.linear(
        torch.randn(2 * 7, 16, device=DEVICE).to(dtype), torch.randn(2 * 45, 16, device=DEVICE).to(dtype)
    ).view(2, 7, 2 * 45)


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_strided_inputs(dtype):
    for what, x in _strided_inputs(dtype):
        out = _triton_ran("geglu", lambda: torch.ops.fusediff.geglu(x, "none"))
        assert out.shape == (*x.shape[:-1], x.shape[-1] // 2), what
        ref32 = G.geglu_ref(x.float(), "none")
        assert_lowp_close(out, ref32, _eager_geglu(x, "none"))


def test_gelu_strided_input():
    x = torch.randn(5, 33, device=DEVICE).t()  # non-contiguous
    out = _triton_ran("gelu", lambda: torch.ops.fusediff.gelu(x, "tanh"))
    assert_close(out, G.gelu_ref(x, "tanh"))


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("F_", [45, 96])  # odd F (column tail) / F spanning several column blocks
@pytest.mark.parametrize("K", [40, 64, 130])  # K tail / K exact / several K steps + tail
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_geglu_grid(dtype, K, F_, has_bias, approximate):
    x = torch.randn(2, 37, K, device=DEVICE).to(dtype)  # M = 74 rows: row tail
    w = (torch.randn(2 * F_, K, device=DEVICE) / math.sqrt(K)).to(dtype)
    b = torch.randn(2 * F_, device=DEVICE).to(dtype) if has_bias else None
    out = _triton_ran("linear_geglu", lambda: torch.ops.fusediff.linear_geglu(x, w, b, approximate))
    assert out.shape == (2, 37, F_) and out.dtype == dtype
    ref32 = G.linear_geglu_ref(x.float(), w.float(), None if b is None else b.float(), approximate)
    eager = _eager_geglu(F.linear(x, w, b), approximate)
    assert_lowp_close(out, ref32, eager)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_geglu_strided_operands(dtype):
    K, F_ = 40, 45
    x = torch.randn(37, 2, K, device=DEVICE).to(dtype).transpose(0, 1)  # (2, 37, K), not viewable as (M, K)
    w = torch.randn(K, 2 * F_, device=DEVICE).to(dtype).t()  # (2F, K) stored K-major (stride_wk != 1)
    b = torch.randn(2 * F_, 2, device=DEVICE).to(dtype)[:, 0]  # strided bias
    out = _triton_ran("linear_geglu", lambda: torch.ops.fusediff.linear_geglu(x, w, b, "tanh"))
    ref32 = G.linear_geglu_ref(x.float(), w.float(), b.float(), "tanh")
    assert_lowp_close(out, ref32, _eager_geglu(F.linear(x, w, b), "tanh"))


def test_linear_geglu_2d_and_single_row():
    w = torch.randn(2 * 45, 40, device=DEVICE)
    for x in (torch.randn(5, 40, device=DEVICE), torch.randn(1, 1, 40, device=DEVICE), torch.randn(40, device=DEVICE)):
        out = _triton_ran("linear_geglu", lambda: torch.ops.fusediff.linear_geglu(x, w, None, "none"))
        assert out.shape == (*x.shape[:-1], 45)
        assert_close(out, G.linear_geglu_ref(x, w, None, "none"))


def test_empty_inputs():
    x = torch.randn(0, 2 * 45, device=DEVICE)
    assert torch.ops.fusediff.geglu(x, "none").shape == (0, 45)
    assert torch.ops.fusediff.gelu(x, "none").shape == (0, 90)
    assert torch.ops.fusediff.linear_geglu(torch.randn(0, 40), torch.randn(90, 40), None, "none").shape == (0, 45)


# ---------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_propagation(dtype, approximate):
    nan, inf = float("nan"), float("inf")
    specials = torch.tensor([nan, inf, -inf, 0.0, 1.0, -1.0], device=DEVICE)
    # gelu(NaN) = NaN, gelu(+inf) = +inf, gelu(-inf) = -inf * 0 = NaN (math; PyTorch CUDA).
    expected = torch.tensor([nan, inf, nan], device=DEVICE)
    out = _triton_ran("gelu", lambda: torch.ops.fusediff.gelu(specials.to(dtype), approximate))
    assert_close(out[:3].float(), expected)
    assert_close(out, G.gelu_ref(specials.to(dtype), approximate))  # dtype's own tolerance

    # geglu: specials in the value half (gate = 1) and in the gate half (value = 1).
    x = torch.ones(2, 12, device=DEVICE)
    x[0, :6] = specials
    x[1, 6:] = specials
    x = x.to(dtype)
    out = _triton_ran("geglu", lambda: torch.ops.fusediff.geglu(x, approximate))
    assert_close(out, G.geglu_ref(x, approximate))
    assert torch.isnan(out[0, 0]) and torch.isnan(out[1, 0]) and torch.isnan(out[1, 2])
    assert torch.isinf(out[0, 1]) and torch.isinf(out[1, 1])

    # linear_geglu: a NaN in one row of x poisons exactly that output row.
    xl = torch.randn(3, 40, device=DEVICE).to(dtype)
    xl[1, 7] = nan
    w = torch.randn(2 * 45, 40, device=DEVICE).to(dtype)
    out = _triton_ran("linear_geglu", lambda: torch.ops.fusediff.linear_geglu(xl, w, None, approximate))
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[[0, 2]]).all()


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile, dispatch proof
# ---------------------------------------------------------------------------------------------
def _opcheck_cases():
    yield torch.ops.fusediff.gelu.default, (torch.randn(3, 5, 16, device=DEVICE), "none")
    yield torch.ops.fusediff.gelu.default, (torch.randn(37, device=DEVICE, dtype=torch.float16), "tanh")
    yield torch.ops.fusediff.geglu.default, (torch.randn(3, 5, 2 * 45, device=DEVICE), "none")
    yield torch.ops.fusediff.geglu.default, (torch.randn(2, 9, 2 * 45 + 6, device=DEVICE, dtype=torch.bfloat16)[..., :90], "tanh")
    w = torch.randn(2 * 45, 40, device=DEVICE)
    yield torch.ops.fusediff.linear_geglu.default, (torch.randn(2, 7, 40, device=DEVICE), w, torch.randn(90, device=DEVICE), "none")
    yield torch.ops.fusediff.linear_geglu.default, (torch.randn(7, 40, device=DEVICE).half(), w.half(), None, "tanh")


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = list(_opcheck_cases())[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    w = torch.randn(2 * 45, 40, device=DEVICE) / math.sqrt(40)
    b = torch.randn(2 * 45, device=DEVICE)

    def block(x):
        proj = F.linear(x, w, b)
        a = torch.ops.fusediff.geglu(proj, "none")
        fused = torch.ops.fusediff.linear_geglu(x, w, b, "tanh")
        return torch.ops.fusediff.gelu(a + fused, "none")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, 40, device=DEVICE)
    before = {op: common.DISPATCH_COUNTS[(op, "triton")] for op in ("gelu", "geglu", "linear_geglu")}
    with torch.no_grad():
        out = compiled(x)
    for op, n in before.items():
        assert common.DISPATCH_COUNTS[(op, "triton")] > n, f"{op} did not run its Triton kernel under compile"
    expected = G.gelu_ref(G.geglu_ref(F.linear(x, w, b), "none") + G.linear_geglu_ref(x, w, b, "tanh"), "none")
    assert_close(out, expected)


def test_dispatch_counts_prove_triton_path():
    common.reset_counts()
    x = torch.randn(4, 2 * 45, device=DEVICE)
    torch.ops.fusediff.gelu(x, "none")
    torch.ops.fusediff.geglu(x, "none")
    torch.ops.fusediff.linear_geglu(x, torch.randn(2 * 45, 2 * 45, device=DEVICE), None, "none")
    for op in ("gelu", "geglu", "linear_geglu"):
        assert common.DISPATCH_COUNTS[(op, "triton")] == 1
        assert common.DISPATCH_COUNTS[(op, "reference")] == 0


# ---------------------------------------------------------------------------------------------
# Invalid arguments and the *_supported predicates
# ---------------------------------------------------------------------------------------------
def test_bad_approximate_raises():
    x = torch.randn(4, 8)
    for bad in ("exact", "Tanh", ""):
        with pytest.raises(ValueError, match="approximate"):
            torch.ops.fusediff.gelu(x, bad)
        with pytest.raises(ValueError, match="approximate"):
            torch.ops.fusediff.geglu(x, bad)
        with pytest.raises(ValueError, match="approximate"):
            torch.ops.fusediff.linear_geglu(x, torch.randn(6, 8), None, bad)


def test_geglu_odd_last_dim_raises():
    with pytest.raises(ValueError, match="even"):
        torch.ops.fusediff.geglu(torch.randn(2, 3, 91), "none")
    with pytest.raises(ValueError, match="at least 1 dimension"):
        torch.ops.fusediff.geglu(torch.tensor(1.0), "none")


def test_bad_dtype_raises():
    with pytest.raises(TypeError, match="must be one of"):
        torch.ops.fusediff.geglu(torch.ones(2, 4, dtype=torch.int32), "none")
    with pytest.raises(TypeError, match="must be one of"):
        torch.ops.fusediff.gelu(torch.ones(4, dtype=torch.float64), "none")
    with pytest.raises(TypeError, match="weight dtype"):
        torch.ops.fusediff.linear_geglu(torch.randn(2, 8), torch.randn(6, 8).half(), None, "none")
    with pytest.raises(TypeError, match="bias dtype"):
        torch.ops.fusediff.linear_geglu(torch.randn(2, 8), torch.randn(6, 8), torch.randn(6).half(), "none")


def test_linear_geglu_shape_mismatch_raises():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] \(8\) must equal weight.shape\[1\] \(9\)"):
        torch.ops.fusediff.linear_geglu(x, torch.randn(6, 9), None, "none")
    with pytest.raises(ValueError, match="even"):
        torch.ops.fusediff.linear_geglu(x, torch.randn(7, 8), None, "none")
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.fusediff.linear_geglu(x, torch.randn(6, 8, 1), None, "none")
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.fusediff.linear_geglu(x, torch.randn(6, 8), torch.randn(3), "none")


def test_supported_predicates():
    assert G.geglu_supported((2, 4096, 2560), torch.float16) == (True, "")
    assert G.geglu_supported((2, 77, 90), torch.bfloat16)[0]
    assert not G.geglu_supported((2, 77, 91), torch.float16)[0]
    assert not G.geglu_supported((2, 77, 90), torch.float64)[0]
    assert not G.geglu_supported((), torch.float32)[0]
    assert G.linear_geglu_supported((2, 4096, 320), (2560, 320), torch.float16) == (True, "")
    ok, why = G.linear_geglu_supported((2, 4096, 320), (2560, 321), torch.float16)
    assert not ok and "321" in why
    assert not G.linear_geglu_supported((2, 4096, 320), (2561, 320), torch.float16)[0]
    assert not G.linear_geglu_supported((2, 4096, 320), (2560, 320), torch.int8)[0]


def test_autotune_prune_predicates():
    # Under the interpreter there is one config and no pruning: check the predicates directly.
    triton = pytest.importorskip("triton")
    lin = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8})
        for bm, bn, bk in ((128, 128, 64), (64, 64, 32), (16, 64, 128), (32, 32, 64))
    ]
    kept = G._prune_linear_geglu_configs(lin, {"M": 4, "F": 45, "K": 130})
    assert [c.kwargs["BLOCK_M"] for c in kept] == [16]  # only the few-rows tile
    kept = G._prune_linear_geglu_configs(lin, {"M": 4, "F": 45, "K": 40})  # nothing fits: smallest tile
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == [(32, 32)]
    assert len(G._prune_linear_geglu_configs(lin, {"M": 8192, "F": 1280, "K": 320})) == len(lin)
    assert G._prune_linear_geglu_configs(lin[:1], {"M": 1, "F": 1, "K": 1})  # never empty
    gg = [triton.Config({"BLOCK_M": bm, "BLOCK_F": bf}) for bm, bf in ((1, 1024), (2, 1024), (8, 256), (32, 128))]
    kept = G._prune_geglu_configs(gg, {"M": 2, "F": 5120})  # two rows: only 1- and 2-row tiles
    assert [c.kwargs["BLOCK_M"] for c in kept] == [1, 2]
    kept = G._prune_geglu_configs(gg, {"M": 4096, "F": 64})  # narrow rows: no 1024-wide tiles
    assert [c.kwargs["BLOCK_F"] for c in kept] == [256, 128]
    assert G._prune_geglu_configs(gg[:1], {"M": 3, "F": 45})  # never empty


# ---------------------------------------------------------------------------------------------
# GPU tier: real SD-1.5 shapes, compiled Triton with autotuning.
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,inner", [(4096, 1280), (1024, 2560), (256, 5120)])
def test_gpu_sd15_shapes(dtype, tokens, inner):
    dim = inner // 4
    x = torch.randn(2, tokens, dim, device="cuda", dtype=dtype)
    w = (torch.randn(2 * inner, dim, device="cuda") / math.sqrt(dim)).to(dtype)
    b = torch.randn(2 * inner, device="cuda", dtype=dtype)
    proj = F.linear(x, w, b)
    out = _triton_ran("geglu", lambda: torch.ops.fusediff.geglu(proj, "none"))
    assert_lowp_close(out, G.geglu_ref(proj.float(), "none"), _eager_geglu(proj, "none"))
    out = _triton_ran("linear_geglu", lambda: torch.ops.fusediff.linear_geglu(x, w, b, "none"))
    ref32 = G.linear_geglu_ref(x.float(), w.float(), b.float(), "none")
    assert_lowp_close(out, ref32, _eager_geglu(proj, "none"))
