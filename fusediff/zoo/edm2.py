"""An EDM2-style U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models"), modeled on the paper's Figure 21 and the structure of NVlabs/edm2
``training/networks_edm2.py``; re-implemented here (no download, no numpy).

What a graph matcher meets in this family, and why it is in the zoo:

* **No GroupNorm anywhere.** Normalisation is *pixel norm* (``normalize(x, dim=1)``: divide by
  the channel-vector norm, scaled by sqrt(C)) on the encoder's main path and on q/k/v.
* ``MPConv``: magnitude-preserving conv/linear with *forced weight normalisation*: in training the
  stored weight is re-normalised in place; every forward normalises it again and scales by
  gain/sqrt(fan_in). A 4-D weight is a conv (``F.conv2d``), a 2-D weight a linear layer
  (``x @ w.t()``, not ``F.linear``).
* Magnitude-preserving SiLU ``silu(x) / 0.596``; ``mp_sum`` (lerp / sqrt((1-t)^2 + t^2));
  ``mp_cat`` for skip connections; resampling by a fixed [1,1] box filter as a depthwise
  ``conv2d`` (down) / ``conv_transpose2d`` (up) -- these are not learned layers and are not
  counted as "conv".
* Cosine attention: q, k, v pixel-normalised over channels, ``einsum('nhcq,nhck->nhqk', q,
  k / sqrt(c)).softmax(dim=3)``, ``einsum('nhqk,nhck->nhcq', w, v)``.

Fixture init (documented in docs/zoo.md): the reference inits ``emb_gain`` and ``out_gain`` to 0,
which would zero the conditioning branch and the whole output of an untrained net; the builder
sets them to non-zero values so every branch reaches the output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusediff.zoo._common import Tally, input_generator, seeded

BATCH = 2


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scale ``x`` to unit RMS magnitude over ``dim`` (default: all but the first)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (EDM2 eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving sum (EDM2 eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation (EDM2 eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def resample(x: torch.Tensor, filt: torch.Tensor | None, mode: str = "keep") -> torch.Tensor:
    """Box-filter down/up-sampling by 2 as a fixed depthwise conv; ``filt`` is (1, 1, k, k), sum 1."""
    if mode == "keep":
        return x
    c = x.shape[1]
    pad = (filt.shape[-1] - 1) // 2
    w = filt.to(x.dtype)
    if mode == "down":
        return F.conv2d(x, w.tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
    return F.conv_transpose2d(x, (w * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)


def _resample_filter(taps) -> torch.Tensor:
    f = torch.tensor(taps, dtype=torch.float32)
    f = f / f.sum()
    return torch.outer(f, f)[None, None]


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features of the noise level (EDM2 eq. 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32)
        y = torch.outer(y, self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        y = y.cos() * math.sqrt(2)
        return y.to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving conv (kernel [k, k], optional ``groups``) or linear layer (kernel []),
    with forced weight normalisation (EDM2 eqs. 47, 66)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int], groups: int = 1):
        super().__init__()
        if in_channels % groups:
            raise ValueError(f"in_channels {in_channels} not divisible by groups {groups}")
        self.out_channels = out_channels
        self.groups = groups
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels // groups, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation
        w = normalize(w)  # traditional weight normalisation
        w = w * (gain / math.sqrt(w[0].numel()))  # magnitude-preserving scaling
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2, groups=self.groups)


class Block(nn.Module):
    """EDM2 encoder/decoder block (Figure 21) with optional cosine self-attention.

    Residual branch (paper eq. 2): ``conv(φ(conv(φ(x)) * (1 + emb_linear(c))))`` with φ = MP-SiLU.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter=(1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"resample_mode must be 'keep', 'up' or 'down', got {resample_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        if resample_mode != "keep":
            self.register_buffer("resample_filter", _resample_filter(resample_filter), persistent=False)
        else:
            self.resample_filter = None
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None
        self._build_residual(out_channels if flavor == "enc" else in_channels, out_channels, emb_channels)

    # The residual branch is what EDM2+ redesigns (see edm2plus.py).
    def _build_residual(self, cin: int, cout: int, emb_channels: int) -> None:
        self.conv_res0 = MPConv(cin, cout, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, cout, kernel=[])
        self.conv_res1 = MPConv(cout, cout, kernel=[3, 3])

    def _residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        return self.conv_res1(y)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Main branch.
        x = resample(x, self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self._residual(x, emb)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Cosine self-attention.
        if self.num_heads != 0:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)  # pixel norm & split
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x


@dataclass(frozen=True)
class EDM2Config:
    img_resolution: int = 16        # EDM2-img512 works on 64x64x4 latents
    img_channels: int = 4
    label_dim: int = 10             # ImageNet: 1000
    model_channels: int = 32        # EDM2-S: 192
    channel_mult: tuple[int, ...] = (1, 2, 2)   # EDM2: (1, 2, 3, 4)
    num_blocks: int = 1             # EDM2-S: 3
    attn_resolutions: tuple[int, ...] = (8, 4)  # EDM2: (16, 8)
    channels_per_head: int = 32     # EDM2: 64
    label_balance: float = 0.5
    concat_balance: float = 0.5


class UNet(nn.Module):
    """EDM2 U-Net: forward(x, noise_labels, class_labels) -> F_x (same shape as x)."""

    block_class = Block

    def __init__(self, cfg: EDM2Config = EDM2Config(), **block_kwargs):
        super().__init__()
        self.cfg = cfg
        cblock = [cfg.model_channels * m for m in cfg.channel_mult]
        cnoise = cblock[0]
        cemb = max(cblock)
        self.label_balance = cfg.label_balance
        self.concat_balance = cfg.concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        block_kwargs = {"channels_per_head": cfg.channels_per_head, **block_kwargs}
        blk = self.block_class

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(cfg.label_dim, cemb, kernel=[]) if cfg.label_dim else None

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = cfg.img_channels + 1
        for level, channels in enumerate(cblock):
            res = cfg.img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = blk(
                    cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs)
            for idx in range(cfg.num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = blk(
                    cin, cout, cemb, flavor="enc", attention=(res in cfg.attn_resolutions), **block_kwargs)

        # Decoder.
        self.dec = nn.ModuleDict()
        skips = [b.out_channels for b in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = cfg.img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = blk(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = blk(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = blk(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = blk(
                    cin, cout, cemb, flavor="dec", attention=(res in cfg.attn_resolutions), **block_kwargs)
        self.out_conv = MPConv(cout, cfg.img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)

        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


def init_fixture_gains(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-zero ``emb_gain`` (0.3..0.8) and ``out_gain`` (1) so conditioning and output are live."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("emb_gain"):
                p.fill_(0.3 + 0.5 * torch.rand((), generator=generator).item())
            elif name == "out_gain":
                p.fill_(1.0)
    return model


def example_inputs(cfg: EDM2Config, seed: int):
    gen = input_generator(seed)
    s = cfg.img_resolution
    x = torch.randn(BATCH, cfg.img_channels, s, s, generator=gen)
    sigma = torch.tensor([0.5, 5.0])
    noise_labels = sigma.log() / 4  # EDM c_noise
    labels = torch.randint(0, cfg.label_dim, (BATCH,), generator=gen)
    class_labels = F.one_hot(labels, cfg.label_dim).to(torch.float32)
    return (x, noise_labels, class_labels)


def build_edm2(seed: int = 0, cfg: EDM2Config = EDM2Config()):
    """(model in eval mode, (x, noise_labels, one-hot class_labels), {}) with batch 2."""
    with seeded(seed):
        model = UNet(cfg)
    init_fixture_gains(model, torch.Generator().manual_seed(seed))
    return model.eval(), example_inputs(cfg, seed), {}


def walk_blocks(cfg: EDM2Config):
    """Yield ``(in_channels, out_channels, has_attention)`` for every Block of ``UNet(cfg)``,
    following the constructor's encoder/decoder loops (shared by EDM2 and EDM2+ counts)."""
    cblock = [cfg.model_channels * m for m in cfg.channel_mult]

    def heads(attn: bool, cout: int) -> bool:
        return attn and cout // cfg.channels_per_head > 0

    skips = []
    cout = cfg.img_channels + 1
    for level, channels in enumerate(cblock):
        res = cfg.img_resolution >> level
        if level == 0:
            cout = channels          # the input MPConv, not a Block
        else:
            yield cout, cout, False  # _down
        skips.append(cout)
        for _ in range(cfg.num_blocks):
            cin, cout = cout, channels
            yield cin, cout, heads(res in cfg.attn_resolutions, cout)
            skips.append(cout)
    for level, channels in reversed(list(enumerate(cblock))):
        res = cfg.img_resolution >> level
        if level == len(cblock) - 1:
            yield cout, cout, heads(True, cout)   # _in0 always has attention
            yield cout, cout, False              # _in1
        else:
            yield cout, cout, False              # _up
        for _ in range(cfg.num_blocks + 1):
            cin, cout = cout + skips.pop(), channels
            yield cin, cout, heads(res in cfg.attn_resolutions, cout)


def expected_edm2(cfg: EDM2Config = EDM2Config()) -> dict[str, int]:
    t = Tally()                              # no GroupNorm, no GEGLU/GELU in EDM2
    t.add("linear", 1 + (cfg.label_dim != 0))  # emb_noise, emb_label (MPConv, kernel=[])
    t.add("conv", 2)                         # input MPConv 3x3, out_conv 3x3
    for cin, cout, attn in walk_blocks(cfg):  # each Block:
        t.add("conv", 2 + (cin != cout))     # conv_res0, conv_res1 (3x3), conv_skip 1x1 if channels change
        t.add("linear", 1)                   # emb_linear
        if attn:
            t.add("conv", 2)                 # attn_qkv, attn_proj (1x1)
            t.attn(self_attn=1)              # cosine attention
    return t.result()
