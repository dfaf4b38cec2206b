"""Real-shaped U-Nets for the end-to-end benchmarks (random weights, built from configs).

* SD-1.5-shaped diffusers UNet2DConditionModel (the diffusers default config is SD-1.5's:
  320/640/1280/1280 channels, 8 heads, 768-d context), 64x64 latent, batch 2 (CFG), 77 tokens.
* LDM-8-church-shaped openaimodel UNet (fusediff.zoo.ldm at the CompVis LSUN-churches widths),
  32x32 latent, batch 32.
"""
from __future__ import annotations

import torch


def sd15(batch: int = 2, device: str = "cuda", dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel().eval().to(device=device, dtype=dtype)
    x = torch.randn(batch, 4, 64, 64, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    ctx = torch.randn(batch, 77, 768, device=device, dtype=dtype)
    return unet, (x, t), {"encoder_hidden_states": ctx}


def ldm8_church(batch: int = 32, device: str = "cuda", dtype=torch.float32):
    """CompVis lsun_churches-ldm-kl-8 widths: 192 ch, mult (1,2,2,4,4), 2 res blocks, attention at
    ds 1/2/4 with 24-channel heads, 32 groups, 32x32x4 latents (MoDiff paper Table 3 shapes)."""
    from fusediff.zoo import ldm

    cfg = ldm.LDMConfig(image_size=32, model_channels=192, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2,
                        level_attention=("legacy", "legacy", "legacy", None, None), head_channels=(24,) * 5,
                        mid_attention="legacy", num_groups=32, context_dim=32)
    model = ldm.UNetModel(cfg).eval().to(device=device, dtype=dtype)
    x = torch.randn(batch, 4, 32, 32, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    ctx = torch.randn(batch, 77, 32, device=device, dtype=dtype)
    return model, (x, t, ctx), {}


MODELS = {"sd15": sd15, "ldm8_church": ldm8_church}
