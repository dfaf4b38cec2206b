"""Helpers shared by the zoo modules: pattern-count tallies, seeding, fixture initialisation.

Nothing here imports diffusers, fxpasses or kernels, so ``import fusediff.zoo`` stays cheap and
works on a bare torch install.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

# The pattern-count keys every ``expected()`` dict carries (0 where the model has none).
PATTERN_KEYS: tuple[str, ...] = (
    "groupnorm_silu",   # GroupNorm whose output (after FiLM and/or an fp32 up/downcast) feeds a SiLU
    "groupnorm",        # GroupNorm not followed by a SiLU (attention / transformer input norms)
    "attention",        # softmax(Q K^T) V computations, whatever the form (SDPA, baddbmm, einsum)
    "attention_self",   # ... of which keys/values come from the feature map itself
    "attention_cross",  # ... of which keys/values come from the text context
    "geglu",            # GEGLU gates: proj -> chunk(2) -> x * gelu(gate)
    "gelu",             # standalone GELUs (Linear -> GELU MLPs), not part of a GEGLU
    "conv",             # learned Conv1d/Conv2d layers (EDM2's MPConv with a spatial kernel included)
    "linear",           # learned Linear layers (EDM2's MPConv with kernel=[] included)
)


class Tally(dict):
    """A ``dict[str, int]`` over :data:`PATTERN_KEYS`, all starting at 0."""

    def __init__(self) -> None:
        super().__init__((k, 0) for k in PATTERN_KEYS)

    def add(self, key: str, n: int = 1) -> None:
        if key not in PATTERN_KEYS:
            raise KeyError(f"unknown pattern key {key!r}; expected one of {PATTERN_KEYS}")
        self[key] += int(n)

    def attn(self, *, self_attn: int = 0, cross_attn: int = 0) -> None:
        """Count attention computations, keeping ``attention == attention_self + attention_cross``."""
        self["attention_self"] += self_attn
        self["attention_cross"] += cross_attn
        self["attention"] += self_attn + cross_attn

    def result(self) -> dict[str, int]:
        return dict(self)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's global RNG seeded to ``seed``, restoring the caller's RNG state after.

    Module constructors draw from the global RNG, so this is how a builder makes its parameter init
    depend on ``seed`` only, without disturbing the caller's random stream.
    """
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_norm_affine(model: nn.Module, generator: torch.Generator, spread: float = 0.2) -> nn.Module:
    """Give every GroupNorm/LayerNorm a non-trivial affine (weight ~ 1 + spread*N(0,1), bias ~ spread*N(0,1)).

    Default init (weight 1, bias 0) would let a fused kernel that forgets gamma/beta pass every
    parity test; fixtures must make each parameter matter.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(1.0 + spread * torch.randn(m.weight.shape, generator=generator))
                if m.bias is not None:
                    m.bias.copy_(spread * torch.randn(m.bias.shape, generator=generator))
    return model


def input_generator(seed: int) -> torch.Generator:
    """CPU generator for example inputs (offset from the parameter seed so inputs differ from weights)."""
    return torch.Generator().manual_seed(10_007 + seed)


def output_tensor(out) -> torch.Tensor:
    """The sample tensor of a zoo model's output: a Tensor, a ``(sample,)`` tuple, or a diffusers output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")
