"""MoDiff configuration and report: :class:`QuantConfig`, :class:`LayerDecision`, :class:`QuantReport`.

:class:`QuantConfig` holds the options of :func:`fxpasses.modiff.quantize` and
``backend(quant=...)``: the mode (baseline dynamic quantization, or MoDiff's quantized temporal
difference against the â/ô caches, "Real-Time On-Device Diffusion: Practical Acceleration via
Fused Low-Bit Kernels", eq. 6-7), the weight/activation bit widths (W8/W4, A8/A4), the scale
granularity, the cache dtype and the layer policy knobs
(:mod:`fxpasses.modiff.policy`). :class:`QuantReport` records what the policy decided for every
conv/linear layer, with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DEFAULT_EXCLUDE", "QuantConfig", "LayerDecision", "QuantReport"]

#: Module-path patterns kept float by default: time embeddings (and the per-block projections of
#: the time embedding), class/label and added-condition embeddings. A pattern matches a path
#: when it equals the path, is a dotted prefix of it, equals one of its components, or matches
#: it as a glob (``fnmatch``).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "time_embedding", "time_embed", "time_proj", "time_emb_proj", "emb_layers", "emb",
    "class_embedding", "label_emb", "add_embedding", "add_time_proj",
    "emb_noise", "emb_label", "emb_linear",  # EDM2: noise/class embeddings and per-block projections
)

_MODES = ("baseline", "modiff")
_BITS = (4, 8)
_SEARCH = ("mse", "minmax")
_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ON_SHAPE = ("error", "reseed")


@dataclass(frozen=True)
class QuantConfig:
    """Options of :func:`quantize`.

    Args:
        mode: ``"baseline"`` (dynamic quantization of every activation) or ``"modiff"``
            (quantize the temporal difference against the â/ô caches, eq. 6-7).
        w_bits: weight bits, 8 or 4 (per output channel, static).
        a_bits: activation bits, 8 or 4 (dynamic absmax, fresh every call).
        per_sample: one activation scale per sample (default: classifier-free-guidance halves
            get separate grids) or one for the whole tensor (False).
        per_token: linears get one activation scale per token (row of their ``(T, K)`` input), which
            isolates outlier tokens; convs keep ``per_sample`` (per-pixel scales cannot be folded
            into the implicit-GEMM epilogue). The linears' caches are then ``(T, K)``/``(T, F)``.
        weight_search: ``"mse"`` (clipping-ratio grid search) or ``"minmax"``.
        cache_dtype: dtype of â and ô (fp32 default; fp16/bf16 halve cache memory and traffic).
        exclude: module-path patterns kept float (see :data:`DEFAULT_EXCLUDE` for the matching
            rule); the defaults keep time/class embeddings float.
        keep_first_last: keep the first and the last conv of the model float (found
            structurally, not by name).
        include: when non-empty, only layers matching one of these patterns are quantized.
        quantize_attention_proj: quantize the q/k/v/out projections of attention modules.
        quantize_ff: quantize the feed-forward (GEGLU/GELU MLP) linears.
        context_kv_once: compute linears fed by the text context once per trajectory and reuse them.
        on_shape_change: what a MoDiff layer does when the input shape changes mid-trajectory:
            ``"error"`` (raise, naming the layer and both shapes) or ``"reseed"`` (restart its
            caches with a float step).
        smoothquant: migrate activation outliers into the weights (SmoothQuant, needs a
            :class:`Calibration` from :func:`calibrate` passed to :func:`quantize`).
        smoothquant_alpha: migration strength in [0, 1] (``s = amax_x^α / amax_w^(1-α)``).
    Example:
        >>> cfg = QuantConfig(mode="modiff", w_bits=8, a_bits=4)
    """

    mode: str = "modiff"
    w_bits: int = 8
    a_bits: int = 8
    per_sample: bool = True
    per_token: bool = False
    weight_search: str = "mse"
    cache_dtype: torch.dtype = torch.float32
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    keep_first_last: bool = True
    include: tuple[str, ...] = ()
    quantize_attention_proj: bool = True
    quantize_ff: bool = True
    context_kv_once: bool = True
    on_shape_change: str = "error"
    smoothquant: bool = False
    smoothquant_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"QuantConfig.mode: {self.mode!r}; allowed values are {list(_MODES)}")
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or v not in _BITS:
                raise ValueError(f"QuantConfig.{name}: {v!r}; allowed values are {list(_BITS)}")
        for name in ("per_sample", "per_token", "keep_first_last", "quantize_attention_proj", "quantize_ff",
                     "context_kv_once", "smoothquant"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.weight_search not in _SEARCH:
            raise ValueError(f"QuantConfig.weight_search: {self.weight_search!r}; allowed values are {list(_SEARCH)}")
        if self.cache_dtype not in _CACHE_DTYPES:
            raise ValueError(f"QuantConfig.cache_dtype: {self.cache_dtype!r}; allowed values are "
                             f"{[str(d) for d in _CACHE_DTYPES]}")
        for name in ("exclude", "include"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not all(isinstance(p, str) for p in v):
                raise TypeError(f"QuantConfig.{name} must be a tuple of module-path patterns (str), got {v!r}")
        if self.on_shape_change not in _ON_SHAPE:
            raise ValueError(f"QuantConfig.on_shape_change: {self.on_shape_change!r}; allowed values are {list(_ON_SHAPE)}")
        a = self.smoothquant_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"QuantConfig.smoothquant_alpha: {a!r}; allowed values are floats in [0, 1]")

    @property
    def label(self) -> str:
        """Short name, e.g. ``"modiff W8A4"``."""
        return f"{self.mode} W{self.w_bits}A{self.a_bits}"


@dataclass
class LayerDecision:
    """What :func:`quantize` decided for one conv/linear.

    Attributes:
        path: module path (``down_blocks.0.resnets.0.conv1``).
        kind: ``"conv2d"``, ``"conv1d"`` or ``"linear"``.
        quantized: whether it was replaced by a quantized module.
        reason: why not (or how: ``"quantized"``, ``"quantized; context K/V computed once"``).
        role: ``"act"`` (quantized input), ``"context"`` (text-context K/V) or ``""`` (float).
        weight_shape: the float weight's shape.
    """

    path: str
    kind: str
    quantized: bool
    reason: str
    role: str = ""
    weight_shape: tuple[int, ...] = ()


@dataclass
class QuantReport:
    """Per-layer decisions of :func:`quantize` (``print(report)`` shows a table)."""

    config: QuantConfig
    layers: list[LayerDecision] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.quantized]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.layers if not d.quantized]

    def get(self, path: str) -> LayerDecision:
        for d in self.layers:
            if d.path == path:
                return d
        raise KeyError(f"no conv/linear at {path!r} in the report")

    def table(self) -> str:
        from tabulate import tabulate

        rows = [(d.path, d.kind, "x".join(map(str, d.weight_shape)), "yes" if d.quantized else "no", d.reason)
                for d in self.layers]
        return tabulate(rows, headers=["layer", "kind", "weight", "quantized", "reason"], tablefmt="github")

    def __str__(self) -> str:
        return (f"MoDiff quantization ({self.config.label}): {len(self.quantized)} of {len(self.layers)} "
                f"conv/linear layers quantized\n{self.table()}")
