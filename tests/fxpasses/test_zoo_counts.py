"""Every fixture U-Net, captured both ways: the pattern counts equal the counts computed from
its architecture (fusediff.zoo expected()), and the rewritten graph matches eager."""
from __future__ import annotations

import collections

import pytest
import torch

from fusediff import zoo
from fusediff.fxpasses.capture import capture_dynamo, capture_export
from fusediff.fxpasses.pipeline import run_passes
from tests.tolerances import MODEL_TOL

NAMES = zoo.names()


def _counts(sites) -> dict[str, int]:
    c = collections.Counter()
    for s in sites:
        if not s.matched:
            continue
        c[s.pattern] += 1
        if s.pattern == "attention":
            c["attention_" + s.attrs["kind"]] += 1
    return c


def _expected(name: str) -> dict[str, int]:
    e = zoo.get(name).expected()
    keys = ("groupnorm_silu", "groupnorm", "attention", "attention_self", "attention_cross", "geglu", "gelu")
    return {k: e[k] for k in keys}


@pytest.mark.parametrize("how", ["export", "dynamo"])
@pytest.mark.parametrize("name", NAMES)
def test_counts_match_architecture(name, how):
    model, args, kwargs = zoo.build(name)
    if how == "export":
        gm = capture_export(model, args, kwargs)
    else:
        gm, _ = capture_dynamo(model, args, kwargs)
    res = run_passes(gm, rewrite=False)
    rejected = [(s.pattern, s.module_path, s.reason) for s in res.sites if not s.matched]
    assert rejected == [], rejected
    got = _counts(res.sites)
    assert {k: got.get(k, 0) for k in _expected(name)} == _expected(name)
    # every site knows its module
    assert all(s.module_path for s in res.sites if s.pattern != "attention" or s.attrs.get("form") == "sdpa")


# Fixtures whose rewritten graph runs the *interpreted Triton kernels* (they cover every attention
# form, FiLM, GroupNorm32 upcasts, GEGLU and GELU between them); the others run the fused ops'
# CPU reference path, which checks the rewrite itself at a fraction of the interpreter's cost.
INTERPRETED = {"sd15_baddbmm", "ldm", "edm2"}


@pytest.mark.parametrize("name", NAMES)
def test_rewritten_fixture_matches_eager(name, monkeypatch):
    if name not in INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, args, kwargs = zoo.build(name)
    with torch.no_grad():
        ref = zoo.output_tensor(model(*args, **kwargs))
    gm = capture_export(model, args, kwargs)
    res = run_passes(gm)
    assert sum(res.rewritten.values()) == sum(v for k, v in _expected(name).items() if not k.startswith("attention_"))
    with torch.no_grad():
        out = gm(*args, **kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else zoo.output_tensor(out)
    torch.testing.assert_close(out, ref, atol=MODEL_TOL[0] * 10, rtol=MODEL_TOL[1] * 10)
