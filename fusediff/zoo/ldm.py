"""An openaimodel / LDM-style U-Net (CompVis latent-diffusion), written here so no download is needed.

Modeled on ``ldm/modules/diffusionmodules/openaimodel.py`` and ``ldm/modules/attention.py`` (the
code behind LDM-8 LSUN-church, the MoDiff paper's model), keeping the forms a graph matcher meets
in that code base:

* ``GroupNorm32``: ``super().forward(x.float()).type(x.dtype)`` -- an fp32 upcast/downcast around
  every ResBlock/AttentionBlock norm (eps 1e-5); the SpatialTransformer's ``Normalize`` is a plain
  ``nn.GroupNorm`` with eps 1e-6.
* ``ResBlock`` with ``use_scale_shift_norm=True``: in_layers = norm -> SiLU -> conv; out_layers =
  norm -> FiLM ``h * (1 + scale) + shift`` -> SiLU -> Dropout -> conv. With ``resblock_updown``
  the down/up-sampling ResBlocks resample *between* SiLU and the conv (``updown`` path).
* ``AttentionBlock``: norm -> one ``qkv`` Conv1d -> ``QKVAttentionLegacy`` (heads split before
  q/k/v, scale sqrt(sqrt(d)) on both q and k, einsum + fp32 softmax + einsum) or the newer
  ``QKVAttention`` (q/k/v split before heads) -> ``proj_out`` Conv1d -> residual.
* ``SpatialTransformer``: norm -> 1x1 ``proj_in`` -> BasicTransformerBlock (LayerNorm ->
  CrossAttention self; LayerNorm -> CrossAttention over the 77-token context; LayerNorm ->
  FeedForward) -> 1x1 ``proj_out`` -> residual. CrossAttention is the einsum form
  ``'b i d, b j d -> b i j'`` * scale, softmax, ``'b i j, b j d -> b i d'``. FeedForward is GEGLU
  (``gated_ff=True``: Linear -> chunk(2) -> x * F.gelu(gate)) or Linear -> nn.GELU.

Deliberate differences from CompVis (all documented in docs/zoo.md):
* ``zero_module`` is not applied: zero-initialised out-convs would make whole branches (and the
  final output) vanish, hiding any error a rewrite makes there. Gradient checkpointing and einops
  are dropped (inference fixture; reshape/permute instead of ``rearrange``).
* Attention kind is chosen per level (CompVis picks one kind for the whole net) so one tiny net
  covers legacy + new QKV attention and the spatial transformer; GroupNorm groups are a parameter
  (CompVis hard-codes 32) so channels stay tiny.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusediff.zoo._common import Tally, input_generator, randomize_norm_affine, seeded

BATCH = 2
CONTEXT_TOKENS = 77

ATTENTION_KINDS = (None, "legacy", "new", "transformer")


@dataclass(frozen=True)
class LDMConfig:
    """Tiny LDM U-Net configuration (names follow openaimodel.UNetModel)."""

    image_size: int = 16            # latent side (LDM-8 church: 32)
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 40        # LDM-8 church: 192
    channel_mult: tuple[int, ...] = (1, 2, 3)   # ds = 1, 2, 4 -> 16, 8, 4 pixels; 40, 80, 120 channels
    num_res_blocks: int = 1         # LDM-8 church: 2
    # Attention after each ResBlock of a level (input and output side), per level:
    # None, "legacy" (QKVAttentionLegacy), "new" (QKVAttention) or "transformer" (SpatialTransformer).
    # (LDM-8 church attends at every level, with one attention kind for the whole net.)
    level_attention: tuple[str | None, ...] = ("legacy", "new", "transformer")
    head_channels: tuple[int, ...] = (40, 40, 24)  # per level: 1 head of 40, 2 of 40, 5 of 24
    mid_attention: str = "transformer"
    gated_ff: bool = True           # GEGLU feed-forward in the level transformers (CompVis default)
    mid_gated_ff: bool = False      # the mid-block transformer uses a plain Linear -> GELU MLP
    transformer_depth: int = 1
    context_dim: int = 32           # text-encoder width (SD-1.x: 768)
    num_groups: int = 8             # CompVis: 32
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True      # only used when resblock_updown is False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.channel_mult)
        if len(self.level_attention) != n or len(self.head_channels) != n:
            raise ValueError(
                f"level_attention ({len(self.level_attention)}) and head_channels ({len(self.head_channels)}) "
                f"need one entry per channel_mult level ({n})"
            )
        for kind in (*self.level_attention, self.mid_attention):
            if kind not in ATTENTION_KINDS:
                raise ValueError(f"attention kind {kind!r} not in {ATTENTION_KINDS}")
        for level, (mult, hc) in enumerate(zip(self.channel_mult, self.head_channels)):
            ch = mult * self.model_channels
            if ch % hc:
                raise ValueError(f"level {level}: channels {ch} not divisible by head_channels {hc}")
            if ch % self.num_groups:
                raise ValueError(f"level {level}: channels {ch} not divisible by num_groups {self.num_groups}")


# ----------------------------------------------------------------------------------------------
# util.py pieces

class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (openaimodel's ``normalization``).

    Its affine parameters stay fp32 when the model is cast (``model.half()``), as in
    guided-diffusion's ``convert_to_fp16``, which converts convs only: the norm then sees an fp32
    input with fp32 parameters, the fp16 -> fp32 -> fp16 sandwich fused kernels must absorb.
    """

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for p in (self.weight, self.bias):
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int, groups: int) -> GroupNorm32:
    return GroupNorm32(groups, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


# ----------------------------------------------------------------------------------------------
# attention.py pieces (SpatialTransformer)

class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention, einsum form; self-attention when ``context`` is None."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.is_cross = context_dim is not None
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, hd = t.shape  # 'b n (h d) -> (b h) n d'
        return t.reshape(b, n, self.heads, hd // self.heads).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.heads
        q = self.to_q(x)
        context = x if context is None else context
        k = self.to_k(context)
        v = self.to_v(context)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        bh, n, d = out.shape  # '(b h) n d -> b n (h d)'
        out = out.reshape(bh // h, h, n, d).permute(0, 2, 1, 3).reshape(bh // h, n, h * d)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)  # self
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """norm -> 1x1 proj_in -> (h w) tokens -> transformer blocks -> 1x1 proj_out -> + input."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, groups: int = 32, gated_ff: bool = True):
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                   gated_ff=gated_ff) for _ in range(depth)]
        )
        self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # 'b c h w -> b (h w) c'
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # 'b (h w) c -> b c h w'
        x = self.proj_out(x)
        return x + x_in


# ----------------------------------------------------------------------------------------------
# openaimodel.py pieces

class TimestepBlock(nn.Module):
    """Marker: forward(x, emb) takes the timestep embedding."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(self.channels, self.out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False, groups: int = 32):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels, groups),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False)
            self.x_upd = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),  # CompVis: zero_module(...)
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)  # norm -> SiLU -> resample -> conv
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift  # FiLM between the norm and the SiLU
            h = out_rest(h)
        else:
            h = h + emb_out
            h = self.out_layers(h)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """qkv (N, H*3*C, T): heads split first, then q/k/v."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # more stable in f16 than dividing after
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v)
        return a.reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """qkv (N, 3*H*C, T): q/k/v split first, then heads."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum(
            "bct,bcs->bts",
            (q * scale).view(bs * self.n_heads, ch, length),
            (k * scale).view(bs * self.n_heads, ch, length),
        )
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * self.n_heads, ch, length))
        return a.reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Pixel self-attention: norm -> qkv Conv1d -> QKV attention -> proj_out Conv1d -> + x."""

    def __init__(self, channels: int, num_head_channels: int, use_new_attention_order: bool = False,
                 groups: int = 32):
        super().__init__()
        self.channels = channels
        self.num_heads = channels // num_head_channels
        self.norm = normalization(channels, groups)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)  # CompVis: zero_module(...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.attention(qkv)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The LDM U-Net: input blocks, middle block, output blocks with skip concatenation."""

    def __init__(self, cfg: LDMConfig = LDMConfig()):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.num_groups
        self.model_channels = mc
        time_embed_dim = mc * 4
        self.time_embed = nn.Sequential(
            nn.Linear(mc, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        def res(cin, cout, **kw):
            return ResBlock(cin, time_embed_dim, cfg.dropout, out_channels=cout,
                            use_scale_shift_norm=cfg.use_scale_shift_norm, groups=groups, **kw)

        def attn(kind, ch, head_channels, gated_ff):
            if kind == "transformer":
                return SpatialTransformer(ch, ch // head_channels, head_channels, depth=cfg.transformer_depth,
                                          dropout=cfg.dropout, context_dim=cfg.context_dim, groups=groups,
                                          gated_ff=gated_ff)
            return AttentionBlock(ch, head_channels, use_new_attention_order=(kind == "new"), groups=groups)

        def down(ch):
            return res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, cfg.conv_resample)

        def up(ch):
            return res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        input_block_chans = [mc]
        ch = mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            kind, hc = cfg.level_attention[level], cfg.head_channels[level]
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if kind is not None:
                    layers.append(attn(kind, ch, hc, cfg.gated_ff))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(down(ch)))
                input_block_chans.append(ch)

        mid_layers: list[nn.Module] = [res(ch, ch)]
        if cfg.mid_attention is not None:
            mid_layers.append(attn(cfg.mid_attention, ch, cfg.head_channels[-1], cfg.mid_gated_ff))
        mid_layers.append(res(ch, ch))
        self.middle_block = TimestepEmbedSequential(*mid_layers)

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            kind, hc = cfg.level_attention[level], cfg.head_channels[level]
            for i in range(cfg.num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res(ch + ich, mc * mult)]
                ch = mc * mult
                if kind is not None:
                    layers.append(attn(kind, ch, hc, cfg.gated_ff))
                if level and i == cfg.num_res_blocks:
                    layers.append(up(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, groups),
            nn.SiLU(),
            nn.Conv2d(mc, cfg.out_channels, 3, padding=1),  # CompVis: zero_module(...)
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        hs = []
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # fp32 sinusoids -> model dtype
        h = x.type(self.input_blocks[0][0].weight.dtype)  # CompVis: x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        h = h.type(x.dtype)
        return self.out(h)


# ----------------------------------------------------------------------------------------------

def build_ldm(seed: int = 0, cfg: LDMConfig = LDMConfig()):
    """(model in eval mode, (x, timesteps, context), {}) with batch 2 and a 77-token context."""
    with seeded(seed):
        model = UNetModel(cfg)
    randomize_norm_affine(model, torch.Generator().manual_seed(seed))
    gen = input_generator(seed)
    s = cfg.image_size
    x = torch.randn(BATCH, cfg.in_channels, s, s, generator=gen)
    timesteps = torch.randint(1, 1000, (BATCH,), generator=gen)
    context = torch.randn(BATCH, CONTEXT_TOKENS, cfg.context_dim, generator=gen)
    return model.eval(), (x, timesteps, context), {}


def _resblock(t: Tally, cin: int, cout: int) -> None:
    """ResBlock (also the up/down ResBlocks): two GroupNorm32 -> SiLU chains."""
    t.add("groupnorm_silu", 2)          # in_layers: norm -> SiLU; out_layers: norm -> FiLM -> SiLU
    t.add("conv", 2 + (cin != cout))    # in conv, out conv, 1x1 skip_connection when channels change
    t.add("linear", 1)                  # emb_layers: SiLU -> Linear


def _attention(t: Tally, kind: str | None, cfg: LDMConfig, gated_ff: bool) -> None:
    if kind is None:
        return
    if kind in ("legacy", "new"):       # AttentionBlock
        t.add("groupnorm", 1)           # norm feeds the qkv conv
        t.add("conv", 2)                # qkv Conv1d, proj_out Conv1d
        t.attn(self_attn=1)
        return
    t.add("groupnorm", 1)               # SpatialTransformer.norm feeds proj_in
    t.add("conv", 2)                    # proj_in, proj_out (1x1 Conv2d)
    for _ in range(cfg.transformer_depth):  # BasicTransformerBlock:
        t.attn(self_attn=1, cross_attn=1)   # attn1 over pixels, attn2 over the context
        t.add("geglu" if gated_ff else "gelu", 1)
        t.add("linear", 4 + 4 + 2)      # attn1/attn2 to_q, to_k, to_v, to_out[0]; ff in + out


def expected_ldm(cfg: LDMConfig = LDMConfig()) -> dict[str, int]:
    """Pattern counts of ``UNetModel(cfg)``, walking its blocks like the constructor does."""
    t = Tally()
    mc = cfg.model_channels
    t.add("conv", 1)                    # input conv
    t.add("linear", 2)                  # time_embed: Linear -> SiLU -> Linear

    def resample():
        if cfg.resblock_updown:
            _resblock(t, ch, ch)
        elif cfg.conv_resample:
            t.add("conv", 1)

    chans = [mc]
    ch = mc
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            _resblock(t, ch, mult * mc)
            ch = mult * mc
            _attention(t, cfg.level_attention[level], cfg, cfg.gated_ff)
            chans.append(ch)
        if level != last:
            resample()                  # down
            chans.append(ch)

    _resblock(t, ch, ch)                # middle: ResBlock, attention, ResBlock
    _attention(t, cfg.mid_attention, cfg, cfg.mid_gated_ff)
    _resblock(t, ch, ch)

    for level in reversed(range(len(cfg.channel_mult))):
        mult = cfg.channel_mult[level]
        for i in range(cfg.num_res_blocks + 1):
            _resblock(t, ch + chans.pop(), mult * mc)
            ch = mult * mc
            _attention(t, cfg.level_attention[level], cfg, cfg.gated_ff)
            if level and i == cfg.num_res_blocks:
                resample()              # up
    t.add("groupnorm_silu", 1)          # out: norm -> SiLU -> conv
    t.add("conv", 1)
    return t.result()
