"""Canonicalization sees through algebraic spellings of SiLU and FiLM (fxpasses/canonicalize.py).

Third-party U-Nets spell SiLU ``x * torch.sigmoid(x)`` / ``torch.sigmoid(x) * x`` and the scale-shift
FiLM ``torch.addcmul(shift, x, 1 + scale)`` or ``x * scale + shift`` (the ``+1`` folded into the
embedding). The fixture below writes every spelling once; its counts follow from the architecture
(one GroupNorm per block, every one followed by a spelled SiLU, three with a FiLM).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusediff.fxpasses.canonicalize import canonicalize, reading
from fusediff.fxpasses.capture import capture_dynamo, capture_export
from fusediff.fxpasses.pipeline import run_passes
from tests.tolerances import MODEL_TOL

SILU_SPELLINGS = ("mul_sigmoid", "sigmoid_mul", "F.silu")
FILM_SPELLINGS = (None, "one_plus", "addcmul", "folded")


def _silu(x, how):
    if how == "mul_sigmoid":
        return x * torch.sigmoid(x)
    if how == "sigmoid_mul":
        return torch.sigmoid(x) * x
    return F.silu(x)


def _film(h, scale, shift, how):
    if how == "one_plus":
        return h * (1 + scale) + shift
    if how == "addcmul":
        return torch.addcmul(shift, h, 1 + scale)
    if how == "folded":  # the +1 lives in the embedding: scale is already 1 + s
        return h * scale + shift
    return h


class SpelledBlock(nn.Module):
    """GroupNorm -> [FiLM, spelled] -> SiLU (spelled) -> conv3x3, with a time-embedding FiLM."""

    def __init__(self, c: int, emb: int, silu: str, film: str | None):
        super().__init__()
        self.norm = nn.GroupNorm(4, c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * c) if film else None
        self.silu, self.film = silu, film

    def forward(self, x, e):
        h = self.norm(x)
        if self.emb is not None:
            scale, shift = self.emb(e)[:, :, None, None].chunk(2, dim=1)
            if self.film == "folded":
                scale = scale + 1.0  # computed with the embedding, not next to the GroupNorm
            h = _film(h, scale, shift, self.film)
        return x + self.conv(_silu(h, self.silu))


class SpelledNet(nn.Module):
    """One block per (SiLU spelling, FiLM spelling) pair below: 6 GroupNorm sites, 4 with a FiLM,
    5 spelled SiLUs."""

    PAIRS = (("mul_sigmoid", None), ("sigmoid_mul", None), ("F.silu", "addcmul"),
             ("mul_sigmoid", "one_plus"), ("sigmoid_mul", "folded"), ("mul_sigmoid", "addcmul"))

    def __init__(self, c: int = 16, emb: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(SpelledBlock(c, emb, s, f) for s, f in self.PAIRS)

    def forward(self, x, e):
        for b in self.blocks:
            x = b(x, e)
        return x


EXPECTED = {"groupnorm_silu": len(SpelledNet.PAIRS),
            "film": sum(f is not None for _, f in SpelledNet.PAIRS)}


def _inputs():
    return torch.randn(2, 16, 6, 5), torch.randn(2, 8)


@pytest.mark.parametrize("capture", ["export", "dynamo"])
def test_spellings_fuse_like_canonical_ops(capture):
    torch.manual_seed(0)
    m = SpelledNet().eval()
    x, e = _inputs()
    with torch.no_grad():
        ref = m(x, e)
    if capture == "export":
        gm, call_args = capture_export(m, (x, e)), (x, e)
    else:
        gm, call_args = capture_dynamo(m, (x, e))  # a dynamo graph takes the flat inputs, parameters too
    res = run_passes(gm)
    gn = [s for s in res.sites if s.family == "groupnorm"]
    assert res.rewritten == {"groupnorm_silu": EXPECTED["groupnorm_silu"]}, [(s.module_path, s.reason) for s in gn]
    assert sum(s.attrs["film"] for s in gn) == EXPECTED["film"]
    by_block = {s.module_path: s for s in gn}
    for i, (_, film) in enumerate(SpelledNet.PAIRS):
        assert by_block[f"blocks.{i}.norm"].attrs["film"] == (film is not None), i
    # the spelled ops are gone: no sigmoid, addcmul or GroupNorm left in the rewritten graph
    names = " ".join(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
    for gone in ("sigmoid", "addcmul", "group_norm("):
        assert gone not in names.replace("group_norm_silu", ""), (gone, names)
    with torch.no_grad():
        out = gm(*call_args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, ref, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])


def test_readings_are_alternatives_not_replacements():
    """The mul/add nodes keep their own reading (other patterns still see a mul); the spelled op is an
    alternative reading whose ``covers`` hold the spanned nodes."""
    m = SpelledNet().eval()
    x, e = _inputs()
    gm = capture_export(m, (x, e))
    stats = canonicalize(gm)
    spelled_silu = sum(s != "F.silu" for s, _ in SpelledNet.PAIRS)
    assert stats.spellings == {"silu": spelled_silu, "film": EXPECTED["film"]}
    for n in gm.graph.nodes:
        r = reading(n, "silu")
        if r is not None and n.meta["fusediff"].op == "mul":
            assert [c.meta["fusediff"].op for c in r.covers] == ["sigmoid"]


class NotSilu(nn.Module):
    """x * sigmoid(y) with y != x, and a FiLM-shaped product whose scale varies over space."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(4, 16)
        self.gate = nn.Conv2d(16, 16, 1)
        self.scale = nn.Parameter(torch.randn(1, 16, 6, 5))

    def forward(self, x):
        h = self.norm(x)
        h = h * self.scale + 1.0      # per-pixel scale: not a FiLM
        return h * torch.sigmoid(self.gate(h))  # a gate, not a SiLU


class SharedSigmoid(nn.Module):
    """The sigmoid of a spelled SiLU is read elsewhere too: the GroupNorm is fused alone."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(4, 16)

    def forward(self, x):
        h = self.norm(x)
        s = torch.sigmoid(h)
        return h * s, s


def test_spelling_negatives():
    x = torch.randn(2, 16, 6, 5)
    gm = capture_export(NotSilu().eval(), (x,))
    res = run_passes(gm)
    (s,) = [s for s in res.sites if s.family == "groupnorm"]
    assert s.pattern == "groupnorm" and not s.attrs["film"] and not s.attrs["silu"]
    m = SharedSigmoid().eval()
    gm = capture_export(m, (x,))
    res = run_passes(gm)
    (s,) = [s for s in res.sites if s.family == "groupnorm"]
    assert s.pattern == "groupnorm" and s.matched and "SiLU left unfused" in s.reason
    with torch.no_grad():
        for a, b in zip(gm(x), m(x)):
            torch.testing.assert_close(a, b, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])
