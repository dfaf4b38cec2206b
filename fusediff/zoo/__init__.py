"""The zoo: tiny diffusion U-Nets "from the wild" that every test and the demo run on.

Each entry builds a small model (channels 32-120, 16x16 inputs, CPU forward well under a second)
deterministically from a seed, in eval mode, with example inputs (batch 2), and knows how many of
each fusable pattern it contains -- computed from its architecture, not from any matcher.

Example:
    >>> from fusediff import zoo
    >>> model, args, kwargs = zoo.build("sd15")
    >>> out = zoo.output_tensor(model(*args, **kwargs))
    >>> zoo.get("sd15").expected()["groupnorm_silu"]
    23

The diffusers fixtures need the optional ``diffusers`` package (imported when built); the LDM,
EDM2 and EDM2+ fixtures are plain torch. docs/zoo.md describes what each fixture covers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from fusediff.zoo import diffusers_unets, edm2, edm2plus, ldm
from fusediff.zoo._common import PATTERN_KEYS, output_tensor

__all__ = ["ZooEntry", "ZOO", "PATTERN_KEYS", "get", "build", "names", "output_tensor"]


@dataclass(frozen=True)
class ZooEntry:
    """One fixture.

    Attributes:
        name: registry key.
        build: ``build(seed=0) -> (model in eval mode, args, kwargs)``; call ``model(*args, **kwargs)``.
            The same seed gives identical parameters and inputs; the global RNG is left untouched.
        expected: ``() -> dict[str, int]`` over :data:`PATTERN_KEYS`, computed from the configuration.
        description: what the fixture is and which code forms it exercises.
    """

    name: str
    build: Callable[..., tuple[nn.Module, tuple, dict]]
    expected: Callable[[], dict[str, int]]
    description: str


_ENTRIES = (
    ZooEntry(
        "ddpm",
        diffusers_unets.build_ddpm,
        diffusers_unets.expected_ddpm,
        "diffusers UNet2DModel, DDPM-like (32/64 ch, 3x16x16 pixels): ResnetBlock2D GroupNorm->SiLU->conv "
        "with additive time embedding, single-head pixel self-attention (GroupNorm -> SDPA) at 8x8 and in "
        "the mid block, conv down/upsampling.",
    ),
    ZooEntry(
        "ddpm_scale_shift",
        diffusers_unets.build_ddpm_scale_shift,
        diffusers_unets.expected_ddpm_scale_shift,
        "ddpm with resnet_time_scale_shift='scale_shift': norm2 -> x*(1+scale)+shift -> SiLU (FiLM between "
        "GroupNorm and SiLU); the mid-block attention then has no GroupNorm.",
    ),
    ZooEntry(
        "sd15",
        diffusers_unets.build_sd15,
        diffusers_unets.expected_sd15,
        "diffusers UNet2DConditionModel shrunk from SD-1.5 (40/48/64 ch, 4x16x16 latents, 77x32 context): "
        "CrossAttnDownBlock2D x2 + DownBlock2D, Transformer2DModel with conv proj_in/out, self + cross "
        "attention via SDPA, GEGLU feed-forward, head dims 40/24/32, 5-8 channels per group.",
    ),
    ZooEntry(
        "sd15_baddbmm",
        diffusers_unets.build_sd15_baddbmm,
        diffusers_unets.expected_sd15,
        "sd15 with set_attn_processor(AttnProcessor()): attention as baddbmm(empty, q, k^T, beta=0, "
        "alpha=scale) -> softmax -> bmm with head_to_batch_dim reshapes instead of SDPA.",
    ),
    ZooEntry(
        "sdxl",
        diffusers_unets.build_sdxl,
        diffusers_unets.expected_sdxl,
        "diffusers UNet2DConditionModel shrunk from SDXL (32/48 ch): no attention at the first level, "
        "2-layer transformers below it and in the mid block, Linear proj_in/out (use_linear_projection), "
        "head dim 24, 'text_time' added conditioning (text_embeds + time_ids in added_cond_kwargs).",
    ),
    ZooEntry(
        "ldm",
        ldm.build_ldm,
        ldm.expected_ldm,
        "CompVis openaimodel/LDM-style UNetModel written here (40/80/120 ch, 4x16x16 latents, 77x32 "
        "context): GroupNorm32 fp32 up/downcast, FiLM ResBlocks (use_scale_shift_norm) incl. up/down "
        "ResBlocks that resample between SiLU and conv, AttentionBlock with QKVAttentionLegacy (16x16) and "
        "QKVAttention (8x8), SpatialTransformer with einsum CrossAttention + GEGLU (4x4, head dim 24), "
        "and a plain Linear->GELU MLP transformer in the middle block.",
    ),
    ZooEntry(
        "edm2",
        edm2.build_edm2,
        edm2.expected_edm2,
        "EDM2-style U-Net (32/64/64 ch, 4x16x16, class-conditional): no GroupNorm; MPConv with forced "
        "weight normalisation, MP-SiLU (silu/0.596), pixel norm, mp_sum/mp_cat, box-filter resampling, "
        "cosine attention (einsum 'nhcq,nhck->nhqk' softmax einsum) at 8x8 and 4x4.",
    ),
    ZooEntry(
        "edm2plus",
        edm2plus.build_edm2plus,
        edm2plus.expected_edm2plus,
        "EDM2+-style U-Net (48/48/96 ch): EDM2 macro-architecture with CONFIG G* blocks (paper eq. 9): "
        "depthwise 3x3 -> pointwise expand x4 -> MP-SiLU -> pointwise contract -> embedding on the "
        "narrow features -> MP-SiLU -> depthwise 3x3; no GroupNorm; cosine attention at 4x4.",
    ),
)

ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def names() -> list[str]:
    """Registered fixture names, in registry order."""
    return list(ZOO)


def get(name: str) -> ZooEntry:
    """The entry called ``name``; KeyError listing the known names otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple, dict]:
    """``(model in eval mode, args, kwargs)`` for fixture ``name``; call ``model(*args, **kwargs)``."""
    return get(name).build(seed=seed)
