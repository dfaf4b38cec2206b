"""A small trained diffusion model shipped with fusediff: DDPM U-Net on scikit-learn's digits.

The assets in ``fusediff/assets/`` were produced by ``examples/train_digits.py`` (see
``docs/digits.md``):

- ``digits_unet.pt``: a diffusers ``UNet2DModel`` (1 channel, 16x16, block_out_channels
  (32, 64, 64), one attention level, GroupNorm with 8 groups) trained as an epsilon-prediction
  DDPM (linear betas 1e-4..0.02, 1000 steps) on the 1797 sklearn digits, scaled to [-1, 1] and
  bilinearly upsampled from 8x8 to 16x16. Weights are stored in fp16 (halves the file) and loaded
  as fp32; the EMA weights are the ones shipped.
- ``digits_classifier.pt``: a small CNN on the same 16x16 digits. Its penultimate layer
  (:meth:`DigitsClassifier.features`, 64-d) is the feature space of the Fréchet distance used
  here, an FID analogue for this toy domain.

It gives the rest of fusediff a real, trained U-Net with GroupNorm->SiLU->Conv chains and
attention, so a rewrite can be judged on sample quality and on per-step latent drift, not only
on random weights. Nothing here downloads anything; diffusers and scikit-learn are imported
lazily (``pip install fusediff[dev]`` brings both).

Example:
    >>> from fusediff import digits
    >>> unet = digits.load_digits_unet()
    >>> x = digits.ddim_sample(unet, n=16, steps=50, seed=0)
    >>> digits.evaluate(x)["mean_confidence"] > 0.8
    True
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # diffusers is an optional dependency
    from diffusers import UNet2DModel

__all__ = [
    "ASSETS_DIR",
    "UNET_ASSET",
    "CLASSIFIER_ASSET",
    "DEFAULT_UNET_CONFIG",
    "DEFAULT_SCHEDULER_CONFIG",
    "DigitsClassifier",
    "build_unet",
    "load_digits_unet",
    "load_scheduler_config",
    "load_classifier",
    "digits_dataset",
    "real_digits",
    "alphas_cumprod",
    "ddim_timesteps",
    "ddim_sample",
    "classifier_features",
    "frechet_distance",
    "save_grid_png",
    "evaluate",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
UNET_ASSET = ASSETS_DIR / "digits_unet.pt"
CLASSIFIER_ASSET = ASSETS_DIR / "digits_classifier.pt"

IMAGE_SIZE = 16
NUM_CLASSES = 10

#: ``UNet2DModel(**DEFAULT_UNET_CONFIG)`` builds the shipped architecture (random weights).
DEFAULT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}

#: Keys understood by diffusers ``DDIMScheduler``/``DDPMScheduler.from_config``.
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
}

UnetFn = Callable[[Tensor, Tensor], Any]
StepCallback = Callable[[int, int, Tensor], None]
PathLike = Union[str, Path]


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """Small CNN for 16x16 digits in [-1, 1]: three 3x3 convs, two 2x2 pools, 64-d features.

    ``forward`` returns logits (N, 10); ``features`` returns the penultimate (post-ReLU)
    activations (N, ``feature_dim``) used by :func:`frechet_distance`.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.width = width
        self.feature_dim = feature_dim
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, NUM_CLASSES)
        self.dropout = nn.Dropout(0.25)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (N, feature_dim) of images (N, 1, 16, 16) in [-1, 1]."""
        _check_images(x, "x")
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 8x8
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 4x4
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, 10)."""
        return self.fc2(self.dropout(self.features(x)))


def build_unet(config: Optional[dict[str, Any]] = None) -> "UNet2DModel":
    """Build the digits ``UNet2DModel`` architecture with random weights.

    Args:
        config: ``UNet2DModel`` keyword arguments; ``DEFAULT_UNET_CONFIG`` when None.

    Returns:
        A freshly initialised ``UNet2DModel`` (train mode).
    """
    from diffusers import UNet2DModel

    cfg = dict(DEFAULT_UNET_CONFIG if config is None else config)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    return UNet2DModel(**cfg)


def _load_asset(path: Optional[PathLike], default: Path, what: str) -> dict[str, Any]:
    p = Path(default if path is None else path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{what} checkpoint not found at {p}; regenerate it with "
            "`python examples/train_digits.py --out fusediff/assets`"
        )
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{p} is not a fusediff {what} checkpoint (needs 'config' and 'state_dict')")
    return ckpt


def load_digits_unet(
    path: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> "UNet2DModel":
    """Load the shipped (or a given) digits U-Net, in eval mode, without any download.

    Args:
        path: checkpoint path; ``fusediff/assets/digits_unet.pt`` when None.
        device: device to move the model to.
        dtype: parameter dtype (the stored weights are fp16 and upcast exactly to fp32).

    Returns:
        ``diffusers.UNet2DModel`` in eval mode with ``requires_grad`` off.

    Example:
        >>> unet = load_digits_unet()
        >>> unet(torch.randn(2, 1, 16, 16), 500).sample.shape
        torch.Size([2, 1, 16, 16])
    """
    ckpt = _load_asset(path, UNET_ASSET, "digits U-Net")
    unet = build_unet(ckpt["config"])
    state = {k: v.float() for k, v in ckpt["state_dict"].items()}
    unet.load_state_dict(state, strict=True)
    # Only pass dtype when it changes: diffusers warns on every ModelMixin.to(dtype=...).
    unet.to(device=device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    unet.eval().requires_grad_(False)
    return unet


def load_scheduler_config(path: Optional[PathLike] = None) -> dict[str, Any]:
    """The noise-schedule config stored with the U-Net (``DDIMScheduler.from_config`` accepts it)."""
    ckpt = _load_asset(path, UNET_ASSET, "digits U-Net")
    return dict(ckpt.get("scheduler", DEFAULT_SCHEDULER_CONFIG))


def load_classifier(
    path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu"
) -> DigitsClassifier:
    """Load the digits classifier (eval mode); ``.features(x)`` gives the 64-d FD features.

    Args:
        path: checkpoint path; ``fusediff/assets/digits_classifier.pt`` when None.
        device: device to move the model to.
    """
    ckpt = _load_asset(path, CLASSIFIER_ASSET, "digits classifier")
    model = DigitsClassifier(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
_DATASET_CACHE: dict[str, tuple[Tensor, Tensor]] = {}


def digits_dataset() -> tuple[Tensor, Tensor]:
    """All 1797 sklearn digits as (images (N, 1, 16, 16) float32 in [-1, 1], labels (N,) int64).

    The 8x8 images (values 0..16) are scaled to [-1, 1] and upsampled bilinearly
    (``align_corners=False``) to 16x16. Needs scikit-learn (the data ships inside it; no download).
    """
    if "all" not in _DATASET_CACHE:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("fusediff.digits needs scikit-learn for the digits data") from exc
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        y = torch.tensor(data.target, dtype=torch.int64)
        _DATASET_CACHE["all"] = (x.clamp(-1.0, 1.0).contiguous(), y)
    x, y = _DATASET_CACHE["all"]
    return x.clone(), y.clone()


def real_digits(n: int, seed: int = 0) -> Tensor:
    """``n`` real digits (N, 1, 16, 16) in [-1, 1], drawn reproducibly by ``seed``.

    Drawn without replacement while ``n`` <= 1797 (the dataset size), with replacement beyond.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    x, _ = digits_dataset()
    g = torch.Generator().manual_seed(int(seed))
    if n <= x.shape[0]:
        idx = torch.randperm(x.shape[0], generator=g)[:n]
    else:
        idx = torch.randint(0, x.shape[0], (n,), generator=g)
    return x[idx]


# ----------------------------------------------------------------------------------------------
# DDIM sampling
# ----------------------------------------------------------------------------------------------
def alphas_cumprod(scheduler_config: Optional[dict[str, Any]] = None) -> Tensor:
    """ᾱ_t (float32, length num_train_timesteps) for a linear beta schedule, as diffusers builds it."""
    cfg = {**DEFAULT_SCHEDULER_CONFIG, **(scheduler_config or {})}
    if cfg["beta_schedule"] != "linear":
        raise ValueError(f"scheduler_config['beta_schedule'] must be 'linear', got {cfg['beta_schedule']!r}")
    betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Descending DDIM timesteps with diffusers' "leading" spacing (e.g. 50 -> 980, 960, ..., 0)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be an int in [1, {num_train_timesteps}], got {steps!r}")
    ratio = num_train_timesteps // steps
    return [i * ratio for i in range(steps)][::-1]


def _as_tensor_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"unet_fn must return a Tensor, an object with .sample or a tuple; got {type(out).__name__}")


@torch.no_grad()
def ddim_sample(
    unet: Optional[nn.Module],
    n: int,
    steps: int = 50,
    seed: int = 0,
    callback: Optional[StepCallback] = None,
    unet_fn: Optional[UnetFn] = None,
    scheduler_config: Optional[dict[str, Any]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Deterministic DDIM (eta = 0) sampling of ``n`` digits, the whole batch at once.

    Per step t -> t_prev (DDIM, Song et al. 2021, eq. 12 with sigma = 0)::

        x0   = clip((x_t - sqrt(1 - ᾱ_t) * eps) / sqrt(ᾱ_t), -1, 1)
        x_t' = sqrt(ᾱ_prev) * x0 + sqrt(1 - ᾱ_prev) * eps        (ᾱ_prev = 1 after the last step)

    which is what diffusers ``DDIMScheduler`` (default config, "leading" spacing, clip_sample)
    computes, so ``DDIMPipeline`` with the same seed gives the same images (see docs/digits.md).
    The latent is kept in fp32; the model is called in ``dtype``.

    Args:
        unet: the denoiser (``UNet2DModel``); may be None when ``unet_fn`` is given.
        n: number of samples.
        steps: DDIM steps.
        seed: the initial noise is ``torch.randn`` from a CPU ``torch.Generator`` seeded with
            ``seed``, then moved to ``device``, so a seed gives the same noise on every device.
        callback: ``callback(step, t, x)`` after each step; ``x`` is the latent after step
            ``step`` (0-based) taken from timestep ``t`` (fp32, do not modify in place).
        unet_fn: ``unet_fn(x, t) -> eps`` replacing ``unet(x, t).sample``, e.g. a fusediff-optimized
            or compiled model; ``x`` is (n, 1, 16, 16) in ``dtype``, ``t`` an int64 (n,) tensor.
            It may return a Tensor, an object with ``.sample`` or a tuple.
        scheduler_config: noise schedule; ``DEFAULT_SCHEDULER_CONFIG`` when None.
        device, dtype: where/how to run the model; default to the first parameter of ``unet``
            (CPU/fp32 when ``unet`` is None).

    Returns:
        Samples (n, 1, 16, 16), fp32, on ``device``; approximately in [-1, 1].
    """
    if unet is None and unet_fn is None:
        raise ValueError("ddim_sample needs unet or unet_fn")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    cfg = {**DEFAULT_SCHEDULER_CONFIG, **(scheduler_config or {})}
    if cfg["prediction_type"] != "epsilon":
        raise ValueError(f"scheduler_config['prediction_type'] must be 'epsilon', got {cfg['prediction_type']!r}")
    timesteps = ddim_timesteps(steps, cfg["num_train_timesteps"])
    ratio = cfg["num_train_timesteps"] // steps
    ac = alphas_cumprod(cfg)
    final_ac = torch.tensor(1.0) if cfg["set_alpha_to_one"] else ac[0]

    param = next(unet.parameters(), None) if unet is not None else None
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = dtype if dtype is not None else (param.dtype if param is not None else torch.float32)
    if unet_fn is None:
        unet_fn = lambda x, t: unet(x, t).sample  # noqa: E731

    channels = int(getattr(getattr(unet, "config", None), "in_channels", 1)) if unet is not None else 1
    size = getattr(getattr(unet, "config", None), "sample_size", IMAGE_SIZE) if unet is not None else IMAGE_SIZE
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, channels, size, size, generator=g, dtype=torch.float32).to(device)
    ac = ac.to(device)
    final_ac = final_ac.to(device)
    clip = float(cfg["clip_sample_range"])
    for i, t in enumerate(timesteps):
        t_batch = torch.full((n,), t, dtype=torch.int64, device=device)
        eps = _as_tensor_output(unet_fn(x.to(dtype), t_batch)).float()
        a_t = ac[t]
        a_prev = ac[t - ratio] if t - ratio >= 0 else final_ac
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if cfg["clip_sample"]:
            x0 = x0.clamp(-clip, clip)
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        if callback is not None:
            callback(i, t, x)
    return x


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{name} must have shape (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(x.shape)}")


@torch.no_grad()
def classifier_features(
    x: Tensor, classifier: Optional[DigitsClassifier] = None, batch_size: int = 512
) -> tuple[Tensor, Tensor]:
    """(features (N, 64) float64, probabilities (N, 10) float64) of images in [-1, 1] (clamped)."""
    _check_images(x, "x")
    clf = classifier if classifier is not None else load_classifier()
    dev = next(clf.parameters()).device
    feats, probs = [], []
    for chunk in x.detach().float().clamp(-1, 1).split(batch_size):
        f = clf.features(chunk.to(dev))
        feats.append(f.double().cpu())
        probs.append(torch.softmax(clf.fc2(f), dim=1).double().cpu())
    return torch.cat(feats), torch.cat(probs)


def _sqrtm_psd(a: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``FD = |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2))`` with unbiased covariances.
    Computed in float64 without scipy: ``C_a C_b`` is similar to the symmetric PSD matrix
    ``S = C_a^(1/2) C_b C_a^(1/2)`` (``C_a^(1/2)`` from ``eigh``), so
    ``tr((C_a C_b)^(1/2)) = sum(sqrt(eig(S)))`` with ``eigh`` on ``S`` and tiny negative
    eigenvalues from round-off clamped to 0. The result is clamped at 0.

    Args:
        feats_a, feats_b: (N, D) and (M, D) features, N, M >= 2.

    Returns:
        The distance as a Python float (0 for identical sets, symmetric up to round-off).
    """
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        if not isinstance(f, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be (N, D) with N >= 2, got {tuple(f.shape)}")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dims differ: feats_a has {feats_a.shape[1]}, feats_b has {feats_b.shape[1]}")
    a = feats_a.detach().double().cpu()
    b = feats_b.detach().double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = torch.cov(a.T).reshape(a.shape[1], a.shape[1])
    cb = torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    sa = _sqrtm_psd(ca)
    s = sa @ cb @ sa
    s = (s + s.T) / 2
    tr_covmean = torch.linalg.eigvalsh(s).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(ca) + torch.trace(cb) - 2 * tr_covmean
    return max(float(fd), 0.0)


@torch.no_grad()
def evaluate(
    samples: Tensor,
    classifier: Optional[DigitsClassifier] = None,
    reference: Optional[Tensor] = None,
    confident_threshold: float = 0.9,
) -> dict[str, Any]:
    """Score generated digits with the shipped classifier.

    Args:
        samples: (N, 1, 16, 16) images in [-1, 1] (clamped before scoring), N >= 2.
        classifier: defaults to :func:`load_classifier`.
        reference: real images to compare with; all 1797 digits when None.
        confident_threshold: max-probability above which a sample counts as confidently classified.

    Returns:
        ``{"n", "fd" (Fréchet distance of classifier features to the reference),
        "mean_confidence" (mean max softmax probability), "confident_frac",
        "class_counts" (list of 10 ints, argmax histogram)}``.
    """
    _check_images(samples, "samples")
    clf = classifier if classifier is not None else load_classifier()
    ref = reference if reference is not None else digits_dataset()[0]
    fs, ps = classifier_features(samples, clf)
    fr, _ = classifier_features(ref, clf)
    conf = ps.max(dim=1).values
    counts = torch.bincount(ps.argmax(dim=1), minlength=NUM_CLASSES)
    return {
        "n": int(samples.shape[0]),
        "fd": frechet_distance(fs, fr),
        "mean_confidence": float(conf.mean()),
        "confident_frac": float((conf > confident_threshold).double().mean()),
        "class_counts": [int(c) for c in counts],
    }


# ----------------------------------------------------------------------------------------------
# PNG
# ----------------------------------------------------------------------------------------------
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def save_grid_png(
    x: Tensor, path: PathLike, nrow: Optional[int] = None, scale: int = 2, padding: int = 1
) -> Path:
    """Write images as one 8-bit grayscale PNG grid, in pure Python (zlib, no PIL).

    Args:
        x: (N, 1, H, W) or (N, H, W) images in [-1, 1] (clamped; -1 -> black, 1 -> white).
        path: output file; parent directories are created.
        nrow: images per row; ``ceil(sqrt(N))`` when None.
        scale: integer nearest-neighbour upscaling factor per pixel.
        padding: pixels of black between tiles (before scaling).

    Returns:
        The path written.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"x must have one channel, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 3 or x.shape[0] == 0:
        raise ValueError(f"x must be (N, 1, H, W) or (N, H, W) with N >= 1, got {tuple(x.shape)}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    n, h, w = x.shape
    nrow = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    ncol_tiles, nrow_tiles = nrow, math.ceil(n / nrow)
    pix = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.zeros(
        nrow_tiles * (h + padding) + padding, ncol_tiles * (w + padding) + padding, dtype=torch.uint8
    )
    for i in range(n):
        r, c = divmod(i, ncol_tiles)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = pix[i]
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    height, width = grid.shape
    rows = b"".join(b"\x00" + bytes(row.tolist()) for row in grid)  # filter type 0 per scanline
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows, 9))
    png += _png_chunk(b"IEND", b"")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    return out
