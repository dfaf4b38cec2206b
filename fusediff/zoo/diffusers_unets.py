"""Tiny diffusers U-Nets: DDPM-like ``UNet2DModel`` and SD-1.5 / SDXL-like ``UNet2DConditionModel``.

The configurations below are shrunk copies of the real ones (channels 32-64, 16x16 samples,
``norm_num_groups=8`` so groups hold 4-8 channels), small enough for a CPU forward well under a
second. The ``expected_*`` functions compute each fixture's pattern counts by walking the *config*
the same way the diffusers constructors do (blocks -> layers), never by inspecting the
instantiated module or a matcher's output; ``tests/test_zoo.py`` cross-checks them against the
module instances and an eager data-flow trace.

diffusers is an optional dependency: it is imported inside the builders, so ``fusediff.zoo``
imports without it and building one of these fixtures raises a clear ImportError.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fusediff.zoo._common import Tally, input_generator, randomize_norm_affine, seeded

BATCH = 2
CONTEXT_TOKENS = 77  # CLIP text length; keeps cross-attention K/V length awkward (not a power of two)

# DDPM-like pixel-space model (google/ddpm-* style): attention at the low-resolution level only,
# single-head attention (attention_head_dim=None -> head dim = channels), conv up/down sampling.
DDPM_CONFIG: dict[str, Any] = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=None,
    resnet_time_scale_shift="default",
)
# Same model, FiLM conditioning: norm2 -> x * (1 + scale) + shift -> SiLU in every ResnetBlock2D.
# Note diffusers then builds the *mid-block* attention without a GroupNorm (attn_groups=None).
DDPM_SCALE_SHIFT_CONFIG: dict[str, Any] = {**DDPM_CONFIG, "resnet_time_scale_shift": "scale_shift"}

# SD-1.5-like: CrossAttnDownBlock2D x2 + DownBlock2D, UNetMidBlock2DCrossAttn, mirrored up blocks,
# conv proj_in/proj_out, 77-token context. attention_head_dim is the head *count* (diffusers quirk):
# heads (1, 2, 2) over channels (40, 48, 64) give head dims 40 (as in real SD-1.5's first level),
# 24 and 32 (mid block). Group size 5/6/8 channels.
SD15_CONFIG: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(40, 48, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=(1, 2, 2),
    transformer_layers_per_block=1,
    use_linear_projection=False,
)

# SDXL-like: no attention at the first level, a deeper transformer below it (real SDXL: 1, 2, 10
# layers over three levels; here 1, 2 over two, and 2 in the mid block, the last block's depth),
# Linear proj_in/proj_out, and the "text_time" additional embedding (pooled text embeds + 6
# micro-conditioning time ids). Heads (1, 2) over 48 channels: head dim 24.
SDXL_TEXT_EMBED_DIM = 32
SDXL_CONFIG: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 48),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=(1, 2),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + SDXL_TEXT_EMBED_DIM,  # 6 time ids + pooled text
)


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra installed
        raise ImportError(
            "this zoo fixture needs diffusers: pip install 'fusediff[diffusers]' (or diffusers>=0.30)"
        ) from e
    return diffusers


def _finish(model: nn.Module, seed: int) -> nn.Module:
    randomize_norm_affine(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _timesteps(gen: torch.Generator) -> torch.Tensor:
    # Two different integer timesteps so per-sample bugs (batch mixing) show up.
    return torch.randint(1, 1000, (BATCH,), generator=gen)


# ----------------------------------------------------------------------------------------------
# Builders: (model in eval mode, args, kwargs); batch 2; return_dict=False so outputs are tuples.

def build_ddpm(seed: int = 0, config: dict[str, Any] | None = None):
    diffusers = _require_diffusers()
    cfg = dict(DDPM_CONFIG if config is None else config)
    with seeded(seed):
        model = diffusers.UNet2DModel(**cfg)
    gen = input_generator(seed)
    s = cfg["sample_size"]
    args = (torch.randn(BATCH, cfg["in_channels"], s, s, generator=gen), _timesteps(gen))
    return _finish(model, seed), args, {"return_dict": False}


def build_ddpm_scale_shift(seed: int = 0):
    return build_ddpm(seed, DDPM_SCALE_SHIFT_CONFIG)


def _build_condition_unet(cfg: dict[str, Any], seed: int):
    diffusers = _require_diffusers()
    with seeded(seed):
        model = diffusers.UNet2DConditionModel(**cfg)
    gen = input_generator(seed)
    s = cfg["sample_size"]
    sample = torch.randn(BATCH, cfg["in_channels"], s, s, generator=gen)
    context = torch.randn(BATCH, CONTEXT_TOKENS, cfg["cross_attention_dim"], generator=gen)
    return _finish(model, seed), (sample, _timesteps(gen), context), gen


def build_sd15(seed: int = 0):
    model, args, _ = _build_condition_unet(SD15_CONFIG, seed)
    return model, args, {"return_dict": False}


def build_sd15_baddbmm(seed: int = 0):
    """SD-1.5 fixture with diffusers' classic ``AttnProcessor``: baddbmm(scale) -> softmax -> bmm."""
    from diffusers.models.attention_processor import AttnProcessor

    model, args, kwargs = build_sd15(seed)
    model.set_attn_processor(AttnProcessor())
    return model, args, kwargs


def build_sdxl(seed: int = 0):
    model, args, gen = _build_condition_unet(SDXL_CONFIG, seed)
    added = {
        "text_embeds": torch.randn(BATCH, SDXL_TEXT_EMBED_DIM, generator=gen),
        # (orig_h, orig_w, crop_top, crop_left, target_h, target_w), as SDXL pipelines pass them.
        "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0], [96.0, 128.0, 16.0, 0.0, 128.0, 128.0]]),
    }
    return model, args, {"added_cond_kwargs": added, "return_dict": False}


# ----------------------------------------------------------------------------------------------
# Expected pattern counts, walked from the config.

def _resnet(t: Tally, cin: int, cout: int) -> None:
    """diffusers ResnetBlock2D: norm1 -> SiLU -> conv1; (+temb) norm2 [-> FiLM] -> SiLU -> dropout -> conv2."""
    t.add("groupnorm_silu", 2)          # norm1 -> SiLU, norm2 (-> FiLM) -> SiLU
    t.add("conv", 2 + (cin != cout))    # conv1, conv2, 1x1 conv_shortcut when channels change
    t.add("linear", 1)                  # time_emb_proj


def _pixel_attention(t: Tally, has_norm: bool) -> None:
    """diffusers Attention over pixels (UNet2DModel blocks): [GroupNorm] -> q/k/v -> SDPA -> to_out."""
    t.add("groupnorm", int(has_norm))   # attn.group_norm feeds to_q/to_k/to_v, not a SiLU
    t.attn(self_attn=1)
    t.add("linear", 4)                  # to_q, to_k, to_v, to_out[0]


def _transformer2d(t: Tally, layers: int, linear_projection: bool) -> None:
    """diffusers Transformer2DModel: GroupNorm -> proj_in -> BasicTransformerBlock x layers -> proj_out."""
    t.add("groupnorm", 1)               # self.norm feeds proj_in
    t.add("linear" if linear_projection else "conv", 2)  # proj_in, proj_out (Linear or 1x1 Conv2d)
    for _ in range(layers):             # each BasicTransformerBlock:
        t.attn(self_attn=1, cross_attn=1)   # attn1 (self), attn2 (cross, 77-token context)
        t.add("geglu", 1)               # ff.net[0] = GEGLU
        t.add("linear", 4 + 4 + 2)      # attn1 q/k/v/out, attn2 q/k/v/out, GEGLU proj + ff out


def expected_unet2d(cfg: dict[str, Any]) -> dict[str, int]:
    """Pattern counts of a ``UNet2DModel`` built from ``cfg`` (conv up/downsampling, positional time)."""
    t = Tally()
    boc = cfg["block_out_channels"]
    lpb = cfg["layers_per_block"]
    scale_shift = cfg.get("resnet_time_scale_shift", "default")
    t.add("conv", 1)                    # conv_in
    t.add("linear", 2)                  # time_embedding: linear_1 -> SiLU -> linear_2

    out_ch = boc[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        in_ch, out_ch = out_ch, boc[i]
        for j in range(lpb):
            _resnet(t, in_ch if j == 0 else out_ch, out_ch)
            if kind == "AttnDownBlock2D":
                _pixel_attention(t, has_norm=True)
        if i != len(boc) - 1:
            t.add("conv", 1)            # Downsample2D(use_conv=True)

    # UNetMidBlock2D: resnet, attention, resnet. Its attention has a GroupNorm only for the
    # "default" time-embedding norm (attn_groups = resnet_groups if default else None).
    _resnet(t, boc[-1], boc[-1])
    _pixel_attention(t, has_norm=(scale_shift == "default"))
    _resnet(t, boc[-1], boc[-1])

    rev = list(reversed(boc))
    out_ch = rev[0]
    for i, kind in enumerate(cfg["up_block_types"]):
        prev_out, out_ch = out_ch, rev[i]
        in_ch = rev[min(i + 1, len(boc) - 1)]
        n = lpb + 1
        for j in range(n):
            skip = in_ch if j == n - 1 else out_ch
            _resnet(t, (prev_out if j == 0 else out_ch) + skip, out_ch)
            if kind == "AttnUpBlock2D":
                _pixel_attention(t, has_norm=True)
        if i != len(boc) - 1:
            t.add("conv", 1)            # Upsample2D(use_conv=True): nearest x2 -> conv

    t.add("groupnorm_silu", 1)          # conv_norm_out -> conv_act (SiLU)
    t.add("conv", 1)                    # conv_out
    return t.result()


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


def expected_unet2d_condition(cfg: dict[str, Any]) -> dict[str, int]:
    """Pattern counts of a ``UNet2DConditionModel`` built from ``cfg`` (SD/SDXL family)."""
    t = Tally()
    boc = cfg["block_out_channels"]
    nblk = len(boc)
    lpb = cfg["layers_per_block"]
    tlpb = _per_block(cfg.get("transformer_layers_per_block", 1), nblk)
    linear_proj = cfg.get("use_linear_projection", False)

    t.add("conv", 1)                    # conv_in
    t.add("linear", 2)                  # time_embedding: linear_1 -> SiLU -> linear_2
    if cfg.get("addition_embed_type") == "text_time":
        t.add("linear", 2)              # add_embedding (TimestepEmbedding over [text_embeds, time ids])

    out_ch = boc[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        in_ch, out_ch = out_ch, boc[i]
        for j in range(lpb):
            _resnet(t, in_ch if j == 0 else out_ch, out_ch)
            if kind == "CrossAttnDownBlock2D":
                _transformer2d(t, tlpb[i], linear_proj)
        if i != nblk - 1:
            t.add("conv", 1)            # Downsample2D(use_conv=True)

    # UNetMidBlock2DCrossAttn: resnet, Transformer2DModel (depth = last block's), resnet.
    _resnet(t, boc[-1], boc[-1])
    _transformer2d(t, tlpb[-1], linear_proj)
    _resnet(t, boc[-1], boc[-1])

    rev = list(reversed(boc))
    rev_tlpb = list(reversed(tlpb))
    out_ch = rev[0]
    for i, kind in enumerate(cfg["up_block_types"]):
        prev_out, out_ch = out_ch, rev[i]
        in_ch = rev[min(i + 1, nblk - 1)]
        n = lpb + 1
        for j in range(n):
            skip = in_ch if j == n - 1 else out_ch
            _resnet(t, (prev_out if j == 0 else out_ch) + skip, out_ch)
            if kind == "CrossAttnUpBlock2D":
                _transformer2d(t, rev_tlpb[i], linear_proj)
        if i != nblk - 1:
            t.add("conv", 1)            # Upsample2D(use_conv=True)

    t.add("groupnorm_silu", 1)          # conv_norm_out -> conv_act (SiLU)
    t.add("conv", 1)                    # conv_out
    return t.result()


def expected_ddpm() -> dict[str, int]:
    return expected_unet2d(DDPM_CONFIG)


def expected_ddpm_scale_shift() -> dict[str, int]:
    return expected_unet2d(DDPM_SCALE_SHIFT_CONFIG)


def expected_sd15() -> dict[str, int]:
    return expected_unet2d_condition(SD15_CONFIG)


def expected_sdxl() -> dict[str, int]:
    return expected_unet2d_condition(SDXL_CONFIG)
