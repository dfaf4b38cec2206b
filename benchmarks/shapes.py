"""One registry of real U-Net layer shapes for every benchmark.

SD-1.5 at 512x512 (64x64 latent, channels 320/640/1280/1280, 8 heads, head dims 40/80/160,
77-token text context) and LDM-8 LSUN-church at 256x256 (32x32 latent, channels 192/384/768,
head dim 32 per the CompVis config) at batch 1/2/8/32, plus the MoDiff paper's Table 3 conv shapes.
"""
from __future__ import annotations

BATCHES = (1, 2, 8, 32)

# (name, C, H, W, groups) GroupNorm inputs.
GROUPNORM = [
    ("sd15_64x64_c320", 320, 64, 64, 32),
    ("sd15_32x32_c640", 640, 32, 32, 32),
    ("sd15_16x16_c1280", 1280, 16, 16, 32),
    ("sd15_8x8_c1280", 1280, 8, 8, 32),
    ("ldm8_32x32_c192", 192, 32, 32, 32),
    ("ldm8_16x16_c384", 384, 16, 16, 32),
    ("ldm8_8x8_c768", 768, 8, 8, 32),
]

# (name, heads, Lq, Lk, head_dim) attention problems (per sample).
ATTENTION = [
    ("sd15_self_4096_d40", 8, 4096, 4096, 40),
    ("sd15_cross_4096x77_d40", 8, 4096, 77, 40),
    ("sd15_self_1024_d80", 8, 1024, 1024, 80),
    ("sd15_cross_1024x77_d80", 8, 1024, 77, 80),
    ("sd15_self_256_d160", 8, 256, 256, 160),
    ("sd15_self_64_d160", 8, 64, 64, 160),
    ("ldm8_self_1024_d32", 6, 1024, 1024, 32),
    ("ldm8_self_256_d32", 12, 256, 256, 32),
]

# (name, tokens, inner_dim) GEGLU inputs: projection output is (tokens, 2*inner).
GEGLU = [
    ("sd15_64x64_d1280", 4096, 1280),
    ("sd15_32x32_d2560", 1024, 2560),
    ("sd15_16x16_d5120", 256, 5120),
]

# (name, Cin, Cout, H, W) 3x3 stride-1 convs for Winograd.
CONV3X3 = [
    ("sd15_64x64_c320", 320, 320, 64, 64),
    ("sd15_32x32_c640", 640, 640, 32, 32),
    ("ldm8_32x32_c192", 192, 192, 32, 32),
    ("ldm8_16x16_c384", 384, 384, 16, 16),
]

# MoDiff paper Table 3: (Cin, Cout, K, count in LDM-8) with the spatial size where they occur.
MODIFF_TABLE3 = [
    ((1536, 768, 3), 5, 8),
    ((768, 768, 3), 23, 8),
    ((384, 384, 3), 21, 16),
    ((192, 192, 3), 9, 32),
    ((576, 192, 3), 1, 32),
    ((768, 384, 1), 4, 16),
    ((384, 192, 1), 2, 32),
]
