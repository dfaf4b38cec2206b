"""torch.compile backend and the optimize() transform on small U-Net blocks."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusediff
from fusediff.lowering import backend as lb
from tests.fxpasses.test_patterns import FiLMBlock, ResnetHalf, SDPAAttn
from tests.tolerances import MODEL_TOL


class Block(nn.Module):
    """ResNet half + self-attention + GEGLU: one site of each family."""

    def __init__(self, c=16):
        super().__init__()
        self.res = ResnetHalf(c, 4)
        self.attn = SDPAAttn(c, 2)
        self.proj = nn.Linear(c, 2 * c)

    def forward(self, x):
        h = self.res(x)
        B, C, H, W = h.shape
        t = h.flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        a, g = self.proj(t).chunk(2, dim=-1)
        t = t + a * F.gelu(g)
        return t.transpose(1, 2).reshape(B, C, H, W)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])


def test_entry_point_registered_without_import():
    code = ("import torch; from torch._dynamo.backends.registry import lookup_backend; "
            "fn = lookup_backend('fusediff'); print(fn.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fusediff.lowering.backend"


def test_backend_eager_inner_rewrites_and_matches():
    torch._dynamo.reset()
    m = Block().eval()
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        ref = m(x)
        out = torch.compile(m, backend=fusediff.backend(inner="eager"), fullgraph=True)(x)
    _close(out, ref)
    assert lb.LAST_RESULTS[-1].rewritten == {"groupnorm_silu": 1, "attention": 1, "geglu": 1}


def test_backend_inductor_compiles_the_rest():
    torch._dynamo.reset()
    m = FiLMBlock().eval()
    args = (torch.randn(2, 16, 6, 5), torch.randn(2, 8))
    with torch.no_grad():
        ref = m(*args)
        out = torch.compile(m, backend="fusediff", fullgraph=True)(*args)
    _close(out, ref)
    assert lb.LAST_RESULTS[-1].rewritten == {"groupnorm_silu": 1}


def test_backend_batch_change_recompiles():
    torch._dynamo.reset()
    m = ResnetHalf().eval()
    inner = fusediff.backend(inner="eager")
    compiled: list[int] = []  # the batch size of every graph the backend compiled

    def counting(gm, example_inputs):
        (x,) = [x for x in example_inputs if isinstance(x, torch.Tensor) and tuple(x.shape[1:]) == (24, 4, 4)]
        compiled.append(int(x.shape[0]))
        return inner(gm, example_inputs)

    cm = torch.compile(m, backend=counting)
    with torch.no_grad():
        for b in (1, 3, 3):
            x = torch.randn(b, 24, 4, 4)
            _close(cm(x), m(x))
            assert lb.LAST_RESULTS[-1].rewritten == {"groupnorm_silu": 1}
    # one compile for batch 1, one recompile for batch 3 (static or symbolic batch), none for the repeat
    assert compiled == [1, 3], compiled


def test_backend_grad_enabled_raises_clear_error():
    torch._dynamo.reset()
    m = ResnetHalf().eval()
    with pytest.raises(Exception, match="autograd enabled"):
        torch.compile(m, backend=fusediff.backend(inner="eager"))(torch.randn(1, 24, 4, 4))
    torch._dynamo.reset()


def test_optimize_matches_and_shares_weights():
    m = Block().eval()
    fast = fusediff.optimize(m)
    assert list(fast.state_dict()) == list(m.state_dict())
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        _close(fast(x), m(x))
        assert fast.results[0].rewritten == {"groupnorm_silu": 1, "attention": 1, "geglu": 1}
        # swap a weight in place (what a LoRA merge does): takes effect without re-optimizing
        m.res.conv.weight.add_(0.5)
        after = fast(x)
        _close(after, m(x))
        assert len(fast.graph_modules) == 1
        # load_state_dict through the optimized module updates the shared parameters
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        sd["res.conv.bias"] += 1.0
        fast.load_state_dict(sd)
        _close(fast(x), m(x))
        # a new batch size is captured once more; the old one stays cached
        x3 = torch.randn(3, 16, 5, 6)
        _close(fast(x3), m(x3))
        assert len(fast.graph_modules) == 2


def test_optimize_grad_and_training_modes():
    m = ResnetHalf().eval()
    x = torch.randn(1, 24, 4, 4)
    fast = fusediff.optimize(m, fusediff.OptimizeConfig(on_grad="error"))
    with pytest.raises(RuntimeError, match="no backward"):
        fast(x)
    fb = fusediff.optimize(m)  # default: fall back to the original model
    out = fb(x)
    assert out.requires_grad and fb.graph_modules == []
    fb.train()
    with torch.no_grad():
        fb(x)
    assert fb.graph_modules == [] and m.training
    fb.eval()
    with torch.no_grad():
        fb(x)
    assert len(fb.graph_modules) == 1


def test_optimize_config_validation():
    with pytest.raises(ValueError, match="on_grad"):
        fusediff.OptimizeConfig(on_grad="ignore")
    with pytest.raises(ValueError, match="max_signatures"):
        fusediff.OptimizeConfig(max_signatures=0)
    with pytest.raises(TypeError, match="rewrite"):
        fusediff.OptimizeConfig(rewrite="all")
    with pytest.raises(TypeError, match="config"):
        fusediff.optimize(ResnetHalf(), config="fast")


def test_backend_dynamic_true_keeps_groupnorm():
    """dynamic=True lifts GroupNorm's eps into a graph input: it is passed through, not rejected."""
    torch._dynamo.reset()
    m = Block().eval()
    cm = torch.compile(m, backend=fusediff.backend(inner="eager"), dynamic=True)
    with torch.no_grad():
        for b in (2, 3):
            x = torch.randn(b, 16, 5, 6)
            _close(cm(x), m(x))
    assert lb.LAST_RESULTS[-1].rewritten == {"groupnorm_silu": 1, "attention": 1, "geglu": 1}
    torch._dynamo.reset()
