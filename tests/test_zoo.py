"""The zoo fixtures: build, run, determinism, export/compile parity, and pattern counts.

The expected counts (fusediff.zoo.*.expected_*) are formulas over each fixture's configuration.
Here they are checked two independent ways:
* against the instantiated modules (GroupNorm / Conv / Linear / GEGLU / GELU / attention
  module instances), and
* against an eager data-flow trace (a TorchFunctionMode that follows each GroupNorm output
  through FiLM and dtype casts to see whether it reaches a SiLU, counts softmax/SDPA calls and
  classifies them by key length, and tells GEGLU gelus from standalone ones).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fusediff import zoo
from fusediff.zoo import PATTERN_KEYS, edm2, ldm
from tests.tolerances import MODEL_TOL

NAMES = zoo.names()
DIFFUSERS_NAMES = {"ddpm", "ddpm_scale_shift", "sd15", "sd15_baddbmm", "sdxl"}
CONTEXT_TOKENS = 77


def _needs(name: str) -> None:
    if name in DIFFUSERS_NAMES:
        pytest.importorskip("diffusers")


@functools.lru_cache(maxsize=None)
def _built(name: str):
    """(model, args, kwargs, eager output) for seed 0, built once per session."""
    model, args, kwargs = zoo.build(name)
    with torch.no_grad():
        ref = zoo.output_tensor(model(*args, **kwargs))
    return model, args, kwargs, ref


def _assert_model_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = MODEL_TOL
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_every_fixture():
    assert set(NAMES) == {"ddpm", "ddpm_scale_shift", "sd15", "sd15_baddbmm", "sdxl", "ldm", "edm2", "edm2plus"}
    for name in NAMES:
        entry = zoo.get(name)
        assert entry.name == name and entry.description
        with pytest.raises(AttributeError):  # frozen
            entry.name = "other"


def test_get_unknown_name_lists_known_names():
    with pytest.raises(KeyError, match="sd15") as info:
        zoo.get("sd99")
    assert "sd99" in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_expected_counts_are_complete_and_consistent(name):
    counts = zoo.get(name).expected()
    assert tuple(counts) == PATTERN_KEYS
    assert all(isinstance(v, int) and v >= 0 for v in counts.values())
    assert counts["attention"] == counts["attention_self"] + counts["attention_cross"]
    assert counts["conv"] > 0 and counts["linear"] > 0


def test_every_pattern_has_a_fixture():
    # Each pattern key must be exercised (count > 0) by at least one fixture.
    totals = {k: sum(zoo.get(n).expected()[k] for n in NAMES) for k in PATTERN_KEYS}
    assert all(v > 0 for v in totals.values()), totals
    # Specific coverage the downstream pattern tests rely on.
    assert zoo.get("edm2").expected()["groupnorm"] + zoo.get("edm2").expected()["groupnorm_silu"] == 0
    assert zoo.get("edm2plus").expected()["groupnorm_silu"] == 0
    assert zoo.get("ldm").expected()["gelu"] > 0 and zoo.get("ldm").expected()["geglu"] > 0
    # FiLM variant: the mid-block attention loses its GroupNorm, nothing else changes.
    plain, film = zoo.get("ddpm").expected(), zoo.get("ddpm_scale_shift").expected()
    assert film["groupnorm"] == plain["groupnorm"] - 1
    assert {k: v for k, v in film.items() if k != "groupnorm"} == {k: v for k, v in plain.items() if k != "groupnorm"}


# ---------------------------------------------------------------------------------------------
# Build / forward / determinism


@pytest.mark.parametrize("name", NAMES)
def test_forward_finite_with_input_shape(name):
    _needs(name)
    model, args, kwargs, out = _built(name)
    assert not model.training, "fixtures are returned in eval mode"
    sample = args[0]
    assert sample.shape[0] == 2, "batch 2"
    assert out.shape == sample.shape
    assert torch.isfinite(out).all()
    assert out.std() > 1e-2, "output should not be (near) constant: every branch must reach it"
    # Per-sample conditioning differs, so the two batch entries must differ.
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic_for_a_seed(name):
    _needs(name)
    m1, a1, _, o1 = _built(name)  # seed 0, built earlier in the session
    rng_before = torch.random.get_rng_state()
    m2, a2, k2 = zoo.build(name, seed=0)
    m3, a3, _ = zoo.build(name, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "builders must not consume the global RNG"

    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert any(not torch.equal(sd1[k], sd3[k]) for k in sd1), "seed must change the parameters"
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert not torch.equal(a1[0], a3[0]), "seed must change the example inputs"
    with torch.no_grad():
        o2 = zoo.output_tensor(m2(*a2, **k2))
    assert torch.equal(o1, o2)


# ---------------------------------------------------------------------------------------------
# Capture: torch.export and torch.compile(fullgraph=True)


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_matches_eager(name):
    _needs(name)
    model, args, kwargs, ref = _built(name)
    with torch.no_grad():
        ep = torch.export.export(model, args, kwargs)
        out = zoo.output_tensor(ep.module()(*args, **kwargs))
    _assert_model_close(out, ref)


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_single_graph_matches_eager(name):
    _needs(name)
    model, args, kwargs, ref = _built(name)
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)  # raises on a graph break
    with torch.no_grad():
        out = zoo.output_tensor(compiled(*args, **kwargs))
    torch._dynamo.reset()
    assert len(graphs) == 1
    _assert_model_close(out, ref)


# ---------------------------------------------------------------------------------------------
# Expected counts vs the instantiated model


def _diffusers_types():
    try:
        from diffusers.models.activations import GEGLU, GELU
        from diffusers.models.attention_processor import Attention
    except ImportError:
        return (), (), ()
    return (GEGLU,), (GELU,), (Attention,)


def _module_counts(model: nn.Module) -> dict[str, int]:
    """Count module instances by type. GroupNorm instances are reported as a total."""
    d_geglu, d_gelu, d_attn = _diffusers_types()
    c = dict.fromkeys(["groupnorm_total", "attention_self", "attention_cross", "geglu", "gelu", "conv", "linear"], 0)
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            c["groupnorm_total"] += 1
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) or (isinstance(m, edm2.MPConv) and m.weight.ndim == 4):
            c["conv"] += 1
        if isinstance(m, nn.Linear) or (isinstance(m, edm2.MPConv) and m.weight.ndim == 2):
            c["linear"] += 1
        if isinstance(m, (ldm.GEGLU, *d_geglu)):
            c["geglu"] += 1
        if isinstance(m, (nn.GELU, *d_gelu)):
            c["gelu"] += 1
        if isinstance(m, d_attn):
            c["attention_cross" if m.is_cross_attention else "attention_self"] += 1
        if isinstance(m, ldm.CrossAttention):
            c["attention_cross" if m.is_cross else "attention_self"] += 1
        if isinstance(m, ldm.AttentionBlock) or (isinstance(m, edm2.Block) and m.num_heads > 0):
            c["attention_self"] += 1
    return c


@pytest.mark.parametrize("name", NAMES)
def test_expected_counts_match_module_instances(name):
    _needs(name)
    model, *_ = _built(name)
    exp = zoo.get(name).expected()
    got = _module_counts(model)
    assert got["groupnorm_total"] == exp["groupnorm_silu"] + exp["groupnorm"]
    for key in ("attention_self", "attention_cross", "geglu", "gelu", "conv", "linear"):
        assert got[key] == exp[key], f"{name}: {key} modules {got[key]} != expected {exp[key]}"


class _PatternTrace(TorchFunctionMode):
    """Eager data-flow trace of the patterns, independent of fxpasses.

    * GroupNorm: every ``F.group_norm`` output is tagged with its call index; the tag survives
      ops a fused kernel can absorb between norm and activation (dtype casts, FiLM mul/add). A
      GroupNorm "feeds a SiLU" when a tagged tensor reaches ``F.silu``.
    * Attention: each softmax (over the key axis) or SDPA call is one attention; key length 77
      (the text context) and query length != 77 means cross, equal query/key length means self.
    * GELU: a ``F.gelu`` whose input is a ``chunk`` output is a GEGLU gate, otherwise standalone.
    """

    PASS_THROUGH = {"float", "type", "to", "__mul__", "mul", "__add__", "add"}

    def __init__(self):
        super().__init__()
        self.gn_calls = 0
        self.gn_to_silu: set[int] = set()
        self.attn_self = self.attn_cross = self.attn_other = 0
        self.gelu_gated = self.gelu_plain = 0
        self.conv_learned = 0
        self._tags: dict[int, set[int]] = {}
        self._chunks: set[int] = set()
        self._keep: list[torch.Tensor] = []  # keep tagged tensors alive so ids are not reused

    def _tag(self, t, origins):
        if isinstance(t, torch.Tensor) and origins:
            self._tags.setdefault(id(t), set()).update(origins)
            self._keep.append(t)

    def _origins(self, args, kwargs):
        out = set()
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                out |= self._tags.get(id(a), set())
        return out

    def _attention(self, lq: int, lk: int):
        if lk == lq:
            self.attn_self += 1
        elif lk == CONTEXT_TOKENS:
            self.attn_cross += 1
        else:
            self.attn_other += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func is F.group_norm:
            self._tag(out, {self.gn_calls})
            self.gn_calls += 1
        elif func is F.silu:
            self.gn_to_silu |= self._origins(args, kwargs)
        elif name in self.PASS_THROUGH:
            self._tag(out, self._origins(args, kwargs))
        elif name == "chunk":
            for t in out:
                self._chunks.add(id(t))
                self._keep.append(t)
        elif func is F.gelu:
            if id(args[0]) in self._chunks:
                self.gelu_gated += 1
            else:
                self.gelu_plain += 1
        elif name == "softmax":
            x = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
            dim = dim % x.ndim
            assert dim == x.ndim - 1, "attention softmax over the last (key) axis"
            self._attention(x.shape[-2], x.shape[-1])
        elif func is F.scaled_dot_product_attention:
            self._attention(args[0].shape[-2], args[1].shape[-2])
        elif func in (F.conv1d, F.conv2d):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            # Learned convs carry trainable weights (EDM2's MPConv derives them from a Parameter);
            # EDM2's fixed box-filter resampling conv does not.
            self.conv_learned += int(weight.requires_grad)
        return out


@pytest.mark.parametrize("name", NAMES)
def test_expected_counts_match_eager_dataflow(name):
    _needs(name)
    model, args, kwargs, _ = _built(name)
    exp = zoo.get(name).expected()
    trace = _PatternTrace()
    with torch.enable_grad(), trace:  # grad on so learned conv weights are recognisable
        model(*args, **kwargs)
    assert trace.gn_calls == exp["groupnorm_silu"] + exp["groupnorm"]
    assert len(trace.gn_to_silu) == exp["groupnorm_silu"]
    assert trace.attn_other == 0
    assert trace.attn_self == exp["attention_self"]
    assert trace.attn_cross == exp["attention_cross"]
    assert trace.gelu_gated == exp["geglu"]
    assert trace.gelu_plain == exp["gelu"]
    assert trace.conv_learned == exp["conv"], "each learned conv runs exactly once per forward"


# ---------------------------------------------------------------------------------------------
# Low precision and the optional diffusers dependency


def _cast_floats(x, dtype):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    if isinstance(x, dict):
        return {k: _cast_floats(v, dtype) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_cast_floats(v, dtype) for v in x)
    return x


@pytest.mark.parametrize("name", ["ldm", "edm2", "edm2plus"])  # dtype handling written here
def test_runs_in_bfloat16(name):
    model, args, kwargs = zoo.build(name)
    model = model.to(torch.bfloat16)
    if name == "ldm":  # GroupNorm32 keeps fp32 affine params (guided-diffusion's fp16 convention)
        assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, ldm.GroupNorm32))
    with torch.no_grad():
        out = zoo.output_tensor(model(*_cast_floats(args, torch.bfloat16), **_cast_floats(kwargs, torch.bfloat16)))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    _, _, _, ref = _built(name)
    # bf16 has an 8-bit mantissa; the whole net stays within a few percent of the fp32 output.
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_zoo_imports_and_builds_without_diffusers():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "from fusediff import zoo\n"
        "zoo.build('edm2')\n"
        "try:\n"
        "    zoo.build('sd15')\n"
        "except ImportError as e:\n"
        "    assert 'diffusers' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('building sd15 without diffusers should raise ImportError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
