"""Kernel selection (timed decision, disk cache, policies) and verify mode (forced-failing kernel)."""
from __future__ import annotations

import json

import pytest
import torch

import fusediff
from fusediff.fxpasses.sites import Site
from fusediff.kernels import groupnorm as kgn
from fusediff.lowering import backend as lb
from fusediff.lowering.select import Selector
from tests.fxpasses.test_patterns import ResnetHalf
from tests.lowering.test_backend_transform import Block
from tests.tolerances import MODEL_TOL


def _gn_site():
    return Site("groupnorm_silu", ["gn"], "gn", "norm", shapes={"x": (2, 8, 4, 4)}, dtype="torch.float32",
                attrs={"silu": True, "num_groups": 4})


def test_selection_times_once_and_caches(tmp_path):
    calls = []

    def timer(fn):  # fake clock: the fused kernel (second call per pair) is slower
        calls.append(fn)
        return 1.0 if len(calls) % 2 == 1 else 2.0

    path = str(tmp_path / "sel.json")
    sel = Selector("time", timer=timer, path=path)
    s = _gn_site()
    keep, why = sel.decide(s, torch.device("cpu"))
    assert not keep and "original kept" in why and len(calls) == 2
    # a second selector reads the disk cache: no re-timing
    sel2 = Selector("time", timer=timer, path=path)
    assert sel2.decide(_gn_site(), torch.device("cpu"))[0] is False and len(calls) == 2
    assert len(json.load(open(path))) == 1
    # apply() unmatches the losing site and says why
    s = _gn_site()
    dropped = sel2.apply([s], torch.device("cpu"))
    assert dropped == [s] and not s.matched and "original kept" in s.reason


def test_selection_fused_wins_and_policies(tmp_path):
    clock = iter([2.0, 1.0])  # original 2 ms, fused 1 ms
    sel = Selector("time", timer=lambda fn: next(clock), path=str(tmp_path / "s.json"))
    keep, why = sel.decide(_gn_site(), torch.device("cpu"))
    assert keep and "fused" in why
    assert Selector("auto").decide(_gn_site(), torch.device("cpu")) == (True, "")  # CPU: policy
    assert Selector("never").decide(_gn_site(), torch.device("cpu"))[0] is False
    with pytest.raises(ValueError, match="policy"):
        Selector("fastest")


def test_selection_never_leaves_graph_unrewritten():
    m = ResnetHalf().eval()
    fast = fusediff.optimize(m, fusediff.OptimizeConfig(selection="never"))
    x = torch.randn(1, 24, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x))
    (res,) = fast.results
    assert res.rewritten == {} and "never" in res.sites[0].reason


def _broken_launch(x, *a, **k):
    return torch.zeros_like(x)  # a kernel bug: wrong numbers, right shape


@pytest.mark.parametrize("via", ["optimize", "backend"])
def test_verify_falls_back_from_failing_kernel(monkeypatch, via):
    monkeypatch.setattr(kgn, "_group_norm_silu_launch", _broken_launch)
    m = Block().eval()
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        ref = m(x)
    cfg = fusediff.OptimizeConfig(verify=True)
    with torch.no_grad():
        if via == "optimize":
            fast = fusediff.optimize(m, cfg)
            out = fast(x)
            failures = fast.verify_failures
            site = [s for s in fast.results[0].sites if s.pattern == "groupnorm_silu"][0]
            assert site.attrs.get("verify_failed") and "verify failed" in site.reason
        else:
            torch._dynamo.reset()
            lb.VERIFY_FAILURES.clear()
            out = torch.compile(m, backend=fusediff.backend(cfg, inner="eager"))(x)
            failures = lb.VERIFY_FAILURES
            torch._dynamo.reset()
    torch.testing.assert_close(out, ref, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])
    assert [f.op for f in failures] == ["fusediff.group_norm_silu.default"]
    assert failures[0].module_path == "res.norm"


def test_verify_passes_healthy_kernels():
    m = Block().eval()
    fast = fusediff.optimize(m, fusediff.OptimizeConfig(verify=True))
    with torch.no_grad():
        fast(torch.randn(2, 16, 5, 6))
    assert fast.verify_failures == []
    assert sum(fast.results[0].rewritten.values()) == 3


def test_broken_kernel_without_verify_is_wrong(monkeypatch):
    """Control: the forced failure really breaks the output when verify is off."""
    monkeypatch.setattr(kgn, "_group_norm_silu_launch", _broken_launch)
    m = ResnetHalf().eval()
    x = torch.randn(1, 24, 4, 4)
    with torch.no_grad():
        assert not torch.allclose(fusediff.optimize(m)(x), m(x), atol=1e-3)
