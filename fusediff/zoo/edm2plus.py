"""An EDM2+-style U-Net ("EDM2+: Exploring Efficient Diffusion Model Architectures for Visual
Generation", an anonymous ICLR submission under review): EDM2's macro-architecture
with every block's two 3x3 convolutions replaced by the paper's CONFIG G* block (its final EDM2+
design, Figure 3), eq. (9):

    o = dwconv( φ( pwconv( φ( pwconv( dwconv( φ(x) ) ) ) ) × ϕ(c) ) ) + γ(x)

read inside out: MP-SiLU -> depthwise 3x3 -> pointwise expand (x e, e = 4 as in D*/G*) with *no*
activation in between (linear bottleneck, eq. 5) -> MP-SiLU -> pointwise contract -> multiply by
the condition embedding on the *narrow* features ("embed bottleneck", eq. 9: the embedding
linear maps to out_channels, not e*out_channels) -> MP-SiLU -> depthwise 3x3 -> magnitude-
preserving residual sum. Like EDM2 there is no GroupNorm; self-attention (which the paper keeps
from EDM2 and does not discuss) is EDM2's cosine attention; pixel norm, MP-SiLU, mp_sum/mp_cat and
forced weight normalisation are EDM2's. The paper's code is unreleased, so this follows the
equations; depthwise convs are MPConv with ``groups=channels`` (per-filter weight norm over 1x3x3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusediff.zoo._common import Tally, seeded
from fusediff.zoo.edm2 import (
    Block,
    EDM2Config,
    MPConv,
    UNet,
    example_inputs,
    init_fixture_gains,
    mp_silu,
    walk_blocks,
)


class BlockPlus(Block):
    """EDM2 block whose residual branch is the EDM2+ CONFIG G* depthwise/pointwise stack."""

    def __init__(self, *args, expansion: int = 4, dw_kernel: int = 3, **kwargs):
        self.expansion = expansion
        self.dw_kernel = dw_kernel
        super().__init__(*args, **kwargs)

    def _build_residual(self, cin: int, cout: int, emb_channels: int) -> None:
        k, wide = self.dw_kernel, self.expansion * cout
        self.dwconv0 = MPConv(cin, cin, kernel=[k, k], groups=cin)       # spatial mixing, input width
        self.pwconv_expand = MPConv(cin, wide, kernel=[1, 1])           # channel mixing, -> wide
        self.pwconv_contract = MPConv(wide, cout, kernel=[1, 1])        # wide -> narrow
        self.emb_linear = MPConv(emb_channels, cout, kernel=[])         # embed bottleneck (narrow)
        self.dwconv1 = MPConv(cout, cout, kernel=[k, k], groups=cout)   # spatial mixing at the end

    def _residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.dwconv0(mp_silu(x))
        y = self.pwconv_expand(y)                 # linear bottleneck: no φ between dwconv and pwconv
        y = self.pwconv_contract(mp_silu(y))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        return self.dwconv1(y)


class UNetPlus(UNet):
    block_class = BlockPlus


@dataclass(frozen=True)
class EDM2PlusConfig(EDM2Config):
    # EDM2+ trades spatial for channel mixing at lower cost, so the tiny net can be a little wider.
    model_channels: int = 48
    channel_mult: tuple[int, ...] = (1, 1, 2)   # 48, 48, 96 channels at 16, 8, 4 pixels
    attn_resolutions: tuple[int, ...] = (4,)
    channels_per_head: int = 48                 # 2 heads of 48 at the 4x4 level
    expansion: int = 4                          # CONFIG D*/G*: e4


def build_edm2plus(seed: int = 0, cfg: EDM2PlusConfig = EDM2PlusConfig()):
    """(model in eval mode, (x, noise_labels, one-hot class_labels), {}) with batch 2."""
    with seeded(seed):
        model = UNetPlus(cfg, expansion=cfg.expansion)
    init_fixture_gains(model, torch.Generator().manual_seed(seed))
    return model.eval(), example_inputs(cfg, seed), {}


def expected_edm2plus(cfg: EDM2PlusConfig = EDM2PlusConfig()) -> dict[str, int]:
    t = Tally()                              # no GroupNorm, no GEGLU/GELU in EDM2+
    t.add("linear", 1 + (cfg.label_dim != 0))  # emb_noise, emb_label
    t.add("conv", 2)                         # input MPConv 3x3, out_conv 3x3
    for cin, cout, attn in walk_blocks(cfg):  # each BlockPlus (eq. 9):
        t.add("conv", 4 + (cin != cout))     # dwconv0, pwconv_expand, pwconv_contract, dwconv1, conv_skip
        t.add("linear", 1)                   # emb_linear (narrow)
        if attn:
            t.add("conv", 2)                 # attn_qkv, attn_proj
            t.attn(self_attn=1)
    return t.result()
