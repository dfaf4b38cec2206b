"""MoDiff low-bit inference for a whole model, by module surgery (issue "MoDiff low-bit inference").

``quantize(model, QuantConfig(...))`` replaces the model's ``nn.Conv2d`` / ``nn.Linear`` (and
1x1 ``nn.Conv1d``; diffusers' ``LoRACompatible*`` subclasses too) by :class:`QuantConv2d` /
:class:`QuantLinear`, which call the ``fusediff::`` low-bit ops of ``kernels.quantize``,
``kernels.conv_int8`` and ``kernels.linear_int8``. Everything else (norms, attention matmuls,
activations) stays float and is still open to the float rewrites of ``fxpasses.match``.

Math ("Real-Time On-Device Diffusion: Practical Acceleration via Fused Low-Bit Kernels", eq. 4-7; symmetric, zero point 0), per quantized layer l:

    baseline:   o_t = s_a s_w (W_int ⊗ Q(a_t)) + b                           (fresh scale each call)
    MoDiff:     Δ   = Q(a_t - â_{t+1});   â_t = deQ(Δ) + â_{t+1}                 eq. (6)
                ô_t = deQ(W_int ⊗ Δ) + ô_{t+1}          (no bias: it lives in ô)  eq. (7)
    first step: â_T = a_T,  ô_T = deQ(W) * a_T + b       (float, in the cache dtype)

State: every :class:`QuantConv2d`/:class:`QuantLinear` in MoDiff mode owns three non-persistent
buffers: ``a_hat`` (â, the input's shape), ``o_hat`` (ô, the output's shape), both in
``QuantConfig.cache_dtype``, and ``primed``, a 0-d bool kept on the CPU (the conv/linear ops read
it on the host; a CPU flag costs no device sync). The caches are shaped lazily by the first call
of a trajectory, or up front by :func:`allocate` (do that before ``torch.compile`` so the graph
sees the buffers). :func:`reset` (``@torch.compiler.disable``) only writes ``primed = False``;
the next call takes the float first-step path and overwrites both caches. ``primed`` is read as a
tensor (never a Python bool), so a compiled model traces one graph for the whole trajectory:
3 calls, ``reset``, 3 calls compile once. A batch or shape change in the middle of a trajectory
raises a ``ValueError`` naming the layer and both shapes (``on_shape_change="error"``) or
re-seeds that layer's caches (``"reseed"``); a cache is never broadcast. After ``reset`` a new
shape simply re-sizes the caches.

Text-context K/V projections (linears whose input is the ``encoder_hidden_states`` / ``context``)
see the same input at every step; with ``context_kv_once`` they are computed once per trajectory
(first step) and served from ``o_hat`` afterwards, through ``torch.cond`` on ``primed`` (one
graph, no recompilation).

Layer policy (each decision is in the :class:`QuantReport` with its reason, see
:func:`quant_report`): time/class embeddings (``QuantConfig.exclude``) and the first and the
last conv of the model (found structurally: the first/last conv executed in an example forward,
or registered when no example is given) stay float; convs the kernels cannot run (groups,
dilation, non-square kernels, padding modes) stay float; ``include``,
``quantize_attention_proj`` and ``quantize_ff`` narrow the set further.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakTensorKeyDictionary

from ..kernels import quantize as _quantize_ops  # noqa: F401  (registers fusediff::quantize_act / modiff_quantize)
from ..kernels.conv_int8 import dequantize_conv_weight, prepare_conv_weight
from ..kernels.linear_int8 import dequantize_linear_weight, prepare_linear_weight

log = logging.getLogger("fusediff.fxpasses")

__all__ = [
    "DEFAULT_EXCLUDE",
    "QuantConfig",
    "LayerDecision",
    "QuantReport",
    "Calibration",
    "QuantConv2d",
    "QuantLinear",
    "plan",
    "quantize",
    "quant_report",
    "quant_layers",
    "allocate",
    "prepare",
    "reset",
    "trajectory",
    "preserve_state",
    "cache_bytes",
    "calibrate",
    "dequantized_copy",
    "LayerShape",
    "layer_shapes",
    "dram_transfer",
    "fuse_group_norm_quantize",
    "StateSlot",
    "ExplicitIO",
    "explicit_state",
    "state_slots",
    "ExplicitStateModel",
    "GainScaled",
    "register_graph_layers",
]

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
_CONTEXT_KWARGS = ("encoder_hidden_states", "context", "cond", "c_crossattn")
_CONTEXT_NAMES = ("to_k", "to_v", "add_k_proj", "add_v_proj")
_FF_CLASSES = ("FeedForward", "GEGLU", "GELU", "ApproximateGELU", "SwiGLU", "GLU")


# ------------------------------------------------------------------------------------------------
# Config and report
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Calibration (SmoothQuant)
# ------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Per-input-channel activation absmax of each conv/linear, from :func:`calibrate`."""

    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: int = 0


def _as_call(item: Any) -> tuple[tuple, dict]:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple) and isinstance(item[1], dict):
        return item[0], item[1]
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise TypeError(f"calibrate: inputs must yield tensors, tuples of args or (args, kwargs) pairs, got "
                    f"{type(item).__name__}")


def _in_channel_absmax(x: torch.Tensor, kind: str) -> torch.Tensor:
    x = x.detach().float()
    if kind == "linear":
        return x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
    return x.transpose(0, 1).reshape(x.shape[1], -1).abs().amax(dim=1)


@torch.no_grad()
def calibrate(model: nn.Module, inputs: Iterable[Any], steps: Optional[int] = None,
              progress: bool = True) -> Calibration:
    """Run the float ``model`` on calibration inputs and record per-input-channel activation absmax.

    Args:
        model: the float model (before :func:`quantize`).
        inputs: an iterable of model calls: tensors (one positional arg), tuples of args, or
            ``(args, kwargs)`` pairs -- e.g. the ``(x_t, t)`` of a float sampling trajectory.
        steps: how many calls to take from ``inputs`` (all when None); the progress bar's total.
        progress: show a tqdm progress bar.
    Returns:
        :class:`Calibration` for ``quantize(model, QuantConfig(smoothquant=True), calibration=...)``.
    Example:
        >>> cal = calibrate(unet, [((x_t, t), {}) for x_t, t in recorded], steps=len(recorded))
    """
    from tqdm.auto import tqdm

    cal = Calibration()
    hooks = []
    for path, mod in model.named_modules():
        kind = _kind(mod)
        if kind is None:
            continue

        def _hook(m, args, _path=path, _kind=kind):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            amax = _in_channel_absmax(args[0], _kind)
            old = cal.act_absmax.get(_path)
            cal.act_absmax[_path] = amax if old is None else torch.maximum(old, amax)

        hooks.append(mod.register_forward_pre_hook(_hook))
    try:
        it = iter(inputs)
        bar = tqdm(total=steps, desc="fusediff calibrate", disable=not progress)
        while steps is None or cal.calls < steps:
            try:
                item = next(it)
            except StopIteration:
                break
            args, kwargs = _as_call(item)
            model(*args, **kwargs)
            cal.calls += 1
            bar.update(1)
        bar.close()
    finally:
        for h in hooks:
            h.remove()
    if cal.calls == 0:
        raise ValueError("calibrate: inputs yielded no calls")
    return cal


def _smooth_factors(w: torch.Tensor, act_absmax: torch.Tensor, alpha: float, kind: str) -> torch.Tensor:
    """SmoothQuant s_j = amax_x_j^α / amax_w_j^(1-α) per input channel (clamped; 1 where unseen)."""
    wf = w.detach().float()
    w_in = wf.abs().amax(dim=0) if kind == "linear" else wf.transpose(0, 1).reshape(wf.shape[1], -1).abs().amax(dim=1)
    ax = act_absmax.to(w_in.device).float().clamp_min(1e-5)
    s = ax.pow(alpha) / w_in.clamp_min(1e-5).pow(1.0 - alpha)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.clamp(1e-2, 1e2)


# ------------------------------------------------------------------------------------------------
# Quantized modules
# ------------------------------------------------------------------------------------------------


class _QuantLayer(nn.Module):
    """Shared state and cache handling of :class:`QuantConv2d` and :class:`QuantLinear`."""

    #: Set by :func:`explicit_state` while a caller (the ONNX export) passes the caches in and out.
    _explicit: Optional["ExplicitIO"] = None

    def __init__(self, src: nn.Module, cfg: QuantConfig, path: str, role: str,
                 smooth: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.path = path
        self.mode = cfg.mode
        self.w_bits = cfg.w_bits
        self.a_bits = cfg.a_bits
        self.per_sample = cfg.per_sample
        self.cache_dtype = cfg.cache_dtype
        self.on_shape_change = cfg.on_shape_change
        self.role = role
        self.orig_dtype = src.weight.dtype
        dev = src.weight.device
        bias = src.bias.detach().clone() if src.bias is not None else None
        self.register_buffer("bias", bias)
        # SmoothQuant: the activation is divided by s per input channel, the weight multiplied by it.
        self.register_buffer("smooth_inv", None if smooth is None else (1.0 / smooth).float().to(dev))
        # MoDiff state (and the context K/V cache): sized lazily or by allocate().
        self.register_buffer("a_hat", torch.empty(0, dtype=cfg.cache_dtype, device=dev), persistent=False)
        self.register_buffer("o_hat", torch.empty(0, dtype=cfg.cache_dtype, device=dev), persistent=False)
        self.register_buffer("primed", torch.zeros((), dtype=torch.bool), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Keep the invariants the ops need across .to()/.half(): primed a CPU bool (read on the
        # host without a device sync), scales fp32, caches in the configured dtype.
        if self._buffers["primed"].device.type != "cpu":
            self._buffers["primed"] = self._buffers["primed"].cpu()
        for name in ("w_scale", "smooth_inv"):
            t = self._buffers.get(name)
            if t is not None and t.dtype != torch.float32:
                self._buffers[name] = t.float()
        for name in ("a_hat", "o_hat"):
            t = self._buffers[name]
            if t.dtype != self.cache_dtype:
                self._buffers[name] = t.to(self.cache_dtype)
        return self

    def _smoothed(self, a: torch.Tensor, channel_dim: int) -> torch.Tensor:
        if self.smooth_inv is None:
            return a
        shape = [1] * a.dim()
        shape[channel_dim] = -1
        return a * self.smooth_inv.view(shape).to(a.dtype)

    def _check_state(self, a: torch.Tensor, out_shape: tuple[int, ...]) -> None:
        # Static under torch.compile (shapes are guarded); the handler runs only on a change.
        need_a = self.mode == "modiff" and self.role != "context"
        if tuple(self.o_hat.shape) != tuple(out_shape) or (need_a and tuple(self.a_hat.shape) != tuple(a.shape)):
            self._resize_state(a, tuple(out_shape))

    @torch.compiler.disable
    def _resize_state(self, a: torch.Tensor, out_shape: tuple[int, ...]) -> None:
        uses_a = self.mode == "modiff" and self.role != "context"
        what, old = ("â (input)", tuple(self.a_hat.shape)) if uses_a else ("ô (output)", tuple(self.o_hat.shape))
        new = tuple(a.shape) if uses_a else out_shape
        fresh = self.o_hat.dim() == 1 and self.o_hat.numel() == 0
        if not fresh and bool(self.primed):
            if self.on_shape_change == "error":
                raise ValueError(
                    f"fusediff MoDiff: layer '{self.path}' got an input of shape {tuple(a.shape)} in the middle of a "
                    f"trajectory, but its {what} cache has shape {old} (this call needs {new}); MoDiff caches are "
                    "never broadcast. Call fxpasses.modiff.reset(model) (or use `with trajectory(model):`) before a "
                    "new batch/shape, or quantize with QuantConfig(on_shape_change='reseed')."
                )
            log.warning("MoDiff layer %s: cache shape %s -> %s mid-trajectory; re-seeding it (float step)",
                        self.path, old, new)
        self._allocate(a, out_shape)
        self.primed.fill_(False)

    def _allocate(self, a: torch.Tensor, out_shape: tuple[int, ...]) -> None:
        fmt = torch.channels_last if (a.dim() == 4 and not a.is_contiguous()
                                      and a.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format
        # Normal (non-inference) tensors, so reset() may write them outside inference_mode.
        with torch.inference_mode(False):
            if self.mode == "modiff" and self.role != "context":
                self._buffers["a_hat"] = torch.empty(a.shape, dtype=self.cache_dtype, device=a.device,
                                                     memory_format=fmt)
            self._buffers["o_hat"] = torch.empty(out_shape, dtype=self.cache_dtype, device=a.device,
                                                 memory_format=fmt if len(out_shape) == 4 else torch.contiguous_format)

    def cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a_hat, self.o_hat))

    def state_kinds(self) -> tuple[str, ...]:
        """The caches this layer carries across the steps of a trajectory (``()``: stateless)."""
        if self.role == "context":
            return ("o_hat",)
        return ("a_hat", "o_hat") if self.mode == "modiff" else ()

    def _explicit_modiff(self, a: torch.Tensor, int_out, float_out) -> torch.Tensor:
        """MoDiff eq. (6)-(7) with â/ô taken from and returned to :class:`ExplicitIO` (no mutation).

        ``int_out(q, s)`` is the layer's pure integer op (``int8_*_baseline``: ``s_a s_w (W ⊗ q)``,
        no bias), ``float_out(â)`` its float first step (``deQ(W) * â + b`` in the cache dtype): the
        arithmetic of ``modiff_quantize`` + ``int8_conv2d``/``int8_linear`` with their caches, as
        pure functions of their inputs.
        """
        io = self._explicit
        cd = self.cache_dtype
        if io.first_step:  # â_T = a_T;  ô_T = deQ(W) * â_T + b
            a_new = a.to(cd).contiguous()
            o_new = float_out(a_new).to(cd).contiguous()
        else:
            ap = io.cache(self.path, "a_hat").float()
            q, s = torch.ops.fusediff.quantize_act(a.float() - ap, self.a_bits, self.per_sample)  # Q(a_t - â_{t+1})
            a_new = (ap + s.reshape((-1,) + (1,) * (a.dim() - 1)) * q.float()).to(cd).contiguous()  # eq. (6)
            o_new = (int_out(q, s) + io.cache(self.path, "o_hat").float()).to(cd).contiguous()  # eq. (7)
        io.put(self.path, "a_hat", a_new)
        io.put(self.path, "o_hat", o_new)
        return o_new


class QuantConv2d(_QuantLayer):
    """Low-bit replacement of ``nn.Conv2d`` (groups 1, square kernel) and of 1x1 ``nn.Conv1d``.

    Baseline: ``quantize_act`` + ``int8_conv2d``. MoDiff: ``modiff_quantize`` (updates â) +
    ``int8_conv2d`` with ô (first step: float conv with deQ(W), bias included). A 1x1 ``Conv1d``
    runs as a 1x1 conv on the ``(N, C, L, 1)`` view.
    """

    def __init__(self, conv: nn.Module, cfg: QuantConfig, path: str = "", role: str = "act",
                 smooth: Optional[torch.Tensor] = None) -> None:
        super().__init__(conv, cfg, path, role, smooth)
        self.is_1d = isinstance(conv, nn.Conv1d)
        w = conv.weight.detach()
        if self.is_1d:
            w = w.unsqueeze(-1)
        if smooth is not None:
            w = w * smooth.to(w.device, torch.float32).view(1, -1, 1, 1).to(w.dtype)
        p = prepare_conv_weight(w.float(), cfg.w_bits, cfg.weight_search)
        self.register_buffer("w_q", p["w_q"])
        self.register_buffer("w_scale", p["w_scale"])
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.k_size = int(p["k_size"])
        self.stride = int(conv.stride[0])
        self.padding = _int_padding(conv)
        self.kernel_size = conv.kernel_size

    def _deq_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """deQ(W) as the float first step uses it (no SmoothQuant factor: the input is smoothed)."""
        return dequantize_conv_weight(self.w_q, self.w_scale, self.w_bits, self.k_size, self.in_channels).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """deQ(W) (times 1/s with SmoothQuant) in the original dtype, computed on access."""
        w = dequantize_conv_weight(self.w_q, self.w_scale, self.w_bits, self.k_size, self.in_channels)
        if self.smooth_inv is not None:
            w = w * self.smooth_inv.view(1, -1, 1, 1)
        w = w.to(self.orig_dtype)
        return w.squeeze(-1) if self.is_1d else w

    def _out_shape(self, a: torch.Tensor) -> tuple[int, int, int, int]:
        k, s, p = self.k_size, self.stride, self.padding
        return (a.shape[0], self.out_channels, (a.shape[2] + 2 * p - k) // s + 1, (a.shape[3] + 2 * p - k) // s + 1)

    def forward(self, x: torch.Tensor, scale: float = 1.0, norm: Optional[tuple] = None) -> torch.Tensor:
        """``x``: (N, C, H, W) (or (N, C, L) for a Conv1d). ``scale`` is accepted for diffusers'
        LoRACompatibleConv call sites and ignored (fuse LoRA weights before quantizing).

        ``norm``: the arguments of ``fusediff::group_norm_silu`` after ``x`` (weight, bias, scale,
        shift, num_groups, eps, apply_silu): ``x`` is then the GroupNorm's *input* and the layer
        convolves ``[silu](GN(x))``. In MoDiff mode the norm runs inside the quantizer
        (``fusediff::group_norm_quantize``, paper Fig. 1 left), so the normalized activation never
        reaches memory; the graph-level pass (:mod:`fxpasses.modiff_graph`) passes it.
        """
        want = 3 if self.is_1d else 4
        if x.dim() != want:
            raise ValueError(f"fusediff MoDiff: layer '{self.path}' expects a {want}-D batched input, got {tuple(x.shape)}")
        ops = torch.ops.fusediff
        fuse_norm = norm is not None and self.mode == "modiff" and self._explicit is None and self.smooth_inv is None
        if norm is not None and not fuse_norm:
            x = ops.group_norm_silu(x, *norm)
        a = self._smoothed(x.unsqueeze(-1) if self.is_1d else x, 1)
        if self.mode == "modiff" and self._explicit is not None:
            out = self._explicit_modiff(
                a,
                lambda q, s: ops.int8_conv2d_baseline(q, s, self.w_q, self.w_scale, None, self.stride, self.padding,
                                                      self.w_bits, self.k_size),
                lambda ah: F.conv2d(ah, self._deq_weight(ah.dtype), None if self.bias is None else self.bias.to(ah.dtype),
                                    stride=self.stride, padding=self.padding))
        elif self.mode == "baseline":
            q, s = ops.quantize_act(a, self.a_bits, self.per_sample)
            out = ops.int8_conv2d_baseline(q, s, self.w_q, self.w_scale, self.bias, self.stride, self.padding,
                                           self.w_bits, self.k_size)
        else:
            self._check_state(a, self._out_shape(a))
            if fuse_norm:  # eq. (6) on [silu](GN(x)), normalized in registers
                q, s = ops.group_norm_quantize(a, *norm, self.a_hat, self.primed, self.a_bits, self.per_sample)
            else:
                q, s = ops.modiff_quantize(a, self.a_hat, self.primed, self.a_bits, self.per_sample)  # eq. (6)
            out = ops.int8_conv2d(q, s, self.w_q, self.w_scale, self.bias, self.o_hat, self.a_hat, self.primed,
                                  self.stride, self.padding, self.w_bits, self.k_size)  # eq. (7)
            self.primed.fill_(True)
        if self.is_1d:  # back to (N, Cout, L), contiguous like the Conv1d it replaces
            return out.to(x.dtype).squeeze(-1).contiguous()
        # Same memory format as the input (the baseline op returns channels_last): code after a
        # conv may .view() its output, as it could with F.conv2d.
        fmt = torch.channels_last if (not x.is_contiguous()
                                      and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format
        return out.to(dtype=x.dtype, memory_format=fmt)

    def extra_repr(self) -> str:
        kind = "conv1d" if self.is_1d else "conv2d"
        return (f"{kind} {self.in_channels}->{self.out_channels}, k={self.k_size}, stride={self.stride}, "
                f"padding={self.padding}, {self.mode} W{self.w_bits}A{self.a_bits}, role={self.role}")


class QuantLinear(_QuantLayer):
    """Low-bit replacement of ``nn.Linear``: baseline, MoDiff, or a once-per-trajectory context K/V."""

    def __init__(self, linear: nn.Linear, cfg: QuantConfig, path: str = "", role: str = "act",
                 smooth: Optional[torch.Tensor] = None) -> None:
        super().__init__(linear, cfg, path, role, smooth)
        w = linear.weight.detach()
        if smooth is not None:
            w = w * smooth.to(w.device, torch.float32).view(1, -1).to(w.dtype)
        p = prepare_linear_weight(w.float(), cfg.w_bits, cfg.weight_search)
        self.register_buffer("w_q", p["w_q"])
        self.register_buffer("w_scale", p["w_scale"])
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.per_token = cfg.per_token

    def _deq_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """deQ(W) as the float first step uses it (no SmoothQuant factor: the input is smoothed)."""
        return dequantize_linear_weight(self.w_q, self.w_scale, self.w_bits, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """deQ(W) (times 1/s with SmoothQuant) in the original dtype, computed on access."""
        w = dequantize_linear_weight(self.w_q, self.w_scale, self.w_bits, self.in_features)
        if self.smooth_inv is not None:
            w = w * self.smooth_inv.view(1, -1)
        return w.to(self.orig_dtype)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``x``: (..., K) with a leading batch dim. ``scale``: see :meth:`QuantConv2d.forward`."""
        if x.dim() < 2:
            raise ValueError(f"fusediff MoDiff: layer '{self.path}' expects a batched (N, ..., K) input, got {tuple(x.shape)}")
        a = x if x.dim() <= 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        if self.per_token:  # per-sample quantization of the (T, K) view = one scale per token
            a = a.reshape(-1, a.shape[-1])
        a = self._smoothed(a, a.dim() - 1)
        out_shape = tuple(a.shape[:-1]) + (self.out_features,)
        ops = torch.ops.fusediff
        if self.role == "context":
            out = self._context_forward(a, out_shape)
        elif self.mode == "modiff" and self._explicit is not None:
            out = self._explicit_modiff(
                a,
                lambda q, s: ops.int8_linear_baseline(q, s, self.w_q, self.w_scale, None, self.w_bits, False),
                lambda ah: F.linear(ah, self._deq_weight(ah.dtype),
                                    None if self.bias is None else self.bias.to(ah.dtype)))
        elif self.mode == "baseline":
            q, s = ops.quantize_act(a, self.a_bits, self.per_sample)
            out = ops.int8_linear_baseline(q, s, self.w_q, self.w_scale, self.bias, self.w_bits, False)
        else:
            self._check_state(a, out_shape)
            q, s = ops.modiff_quantize(a, self.a_hat, self.primed, self.a_bits, self.per_sample)  # eq. (6)
            out = ops.int8_linear(q, s, self.w_q, self.w_scale, self.bias, self.o_hat, self.a_hat, self.primed,
                                  self.w_bits, False)  # eq. (7)
            self.primed.fill_(True)
        return out.to(x.dtype).reshape(tuple(x.shape[:-1]) + (self.out_features,))

    def _context_forward(self, a: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
        """Step-invariant K/V of the text context: computed on the first step, then read from ô.

        Eager: a host branch on the CPU ``primed`` (no sync). Compiled/exported: ``torch.cond`` on
        ``primed``, so one graph serves the whole trajectory.
        """
        bias = self.bias if self.bias is not None else self.w_scale  # placeholder operand
        if self._explicit is not None:  # ô from and to the caller (ONNX export): first step computes
            io = self._explicit
            if io.first_step:  # the cache is not read: an empty tensor carries its dtype
                out = self._ctx_miss(a, a.new_empty(0, dtype=self.cache_dtype), self.w_q, self.w_scale, bias)
            else:
                out = self._ctx_hit(a, io.cache(self.path, "o_hat"), self.w_q, self.w_scale, bias)
            io.put(self.path, "o_hat", out.contiguous())
            return out
        self._check_state(a, out_shape)
        operands = (a, self.o_hat, self.w_q, self.w_scale, bias)
        if not (torch.compiler.is_compiling() or is_fake(self.primed)):  # (aot_autograd traces outside dynamo too)
            if bool(self.primed):
                return self.o_hat.clone()
            out = self._ctx_miss(*operands)
        else:
            out = torch.cond(self.primed, self._ctx_hit, self._ctx_miss, operands)
        self.o_hat.copy_(out)
        self.primed.fill_(True)
        return out

    def _ctx_hit(self, a, o_hat, w_q, w_scale, bias):
        return o_hat.clone()

    def _ctx_miss(self, a, o_hat, w_q, w_scale, bias):
        b = bias if self.bias is not None else None
        if self.mode == "baseline":  # the pure op: it may sit in a torch.cond branch
            q, s = torch.ops.fusediff.quantize_act(a, self.a_bits, self.per_sample)
            o = torch.ops.fusediff.int8_linear_baseline(q, s, w_q, w_scale, b, self.w_bits, False)
        else:  # exactly the MoDiff first step: â = a, ô = â @ deQ(W)ᵀ + b in the cache dtype
            cd = o_hat.dtype
            w = dequantize_linear_weight(w_q, w_scale, self.w_bits, self.in_features).to(cd)
            o = F.linear(a.to(cd), w, b.to(cd) if b is not None else None)
        return o.to(o_hat.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.mode} "
                f"W{self.w_bits}A{self.a_bits}, role={self.role}")


def _int_padding(conv: nn.Module) -> int:
    p = conv.padding
    if isinstance(p, str):
        if p == "valid":
            return 0
        return (conv.kernel_size[0] - 1) // 2  # "same" (odd kernel, stride 1: checked by _conv_support)
    return int(p[0])


# ------------------------------------------------------------------------------------------------
# Planning (which layers, and why)
# ------------------------------------------------------------------------------------------------


def _is_mpconv(mod: nn.Module) -> bool:
    """EDM2's magnitude-preserving conv/linear (``networks_edm2.MPConv`` and the zoo's copy): a
    weight only, ``forward(x, gain=1)``, the weight normalized on every call (EDM2 eq. 47, 66)."""
    w = getattr(mod, "weight", None)
    return type(mod).__name__ == "MPConv" and isinstance(w, torch.Tensor) and w.dim() in (2, 4)


def _mp_weight(w: torch.Tensor) -> torch.Tensor:
    """The weight an eval-mode MPConv computes with, for gain 1: ``normalize(w) / sqrt(fan_in)``."""
    w = w.detach().float()
    norm = torch.linalg.vector_norm(w, dim=list(range(1, w.dim())), keepdim=True)
    norm = 1e-4 + norm * math.sqrt(norm.numel() / w.numel())  # EDM2 normalize(), eps 1e-4
    return w / norm / math.sqrt(w[0].numel())


def _standard_layer(mod: nn.Module) -> nn.Module:
    """``mod`` itself, or for a weight-normalized layer the plain ``nn.Conv2d``/``nn.Linear`` it
    computes at inference with gain 1 (the gain multiplies the output: :class:`GainScaled`)."""
    if not _is_mpconv(mod):
        return mod
    w = _mp_weight(mod.weight)
    if w.dim() == 2:
        std = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
    else:
        groups, k = int(getattr(mod, "groups", 1)), w.shape[-1]
        std = nn.Conv2d(w.shape[1] * groups, w.shape[0], k, padding=k // 2, groups=groups, bias=False, device=w.device)
    with torch.no_grad():
        std.weight.copy_(w)
    return std.eval()


class GainScaled(nn.Module):
    """A quantized EDM2 ``MPConv``: ``inner(x) * gain`` with the MPConv call signature.

    The weight normalization is folded into ``inner``'s quantized weight; the gain (a constant or
    a learned scalar) scales the output, so MoDiff's ô caches hold the gain-free ``W ⊗ a``.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, gain: Any = 1) -> torch.Tensor:
        y = self.inner(x)
        return y if isinstance(gain, (int, float)) and gain == 1 else y * gain


def _kind(mod: nn.Module) -> Optional[str]:
    if isinstance(mod, _QuantLayer):
        return None
    if _is_mpconv(mod):
        return "linear" if mod.weight.dim() == 2 else "conv2d"
    if isinstance(mod, nn.Conv2d):
        return "conv2d"
    if isinstance(mod, nn.Conv1d):
        return "conv1d"
    if isinstance(mod, nn.Linear):
        return "linear"
    return None


def _conv_support(conv: nn.Module, kind: str) -> Optional[str]:
    """None when the int8 conv kernel can run this conv, else the reason it cannot."""
    if conv.groups != 1:
        return f"groups={conv.groups} (kernel supports groups=1)"
    if any(d != 1 for d in conv.dilation):
        return f"dilation={tuple(conv.dilation)} (kernel supports 1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (kernel supports 'zeros')"
    if kind == "conv1d":
        if conv.kernel_size != (1,) or conv.stride != (1,) or conv.padding not in ((0,), "valid"):
            return f"Conv1d with kernel {conv.kernel_size}, stride {conv.stride} (only 1x1 Conv1d is supported)"
        return None
    kh, kw = conv.kernel_size
    if kh != kw:
        return f"non-square kernel {conv.kernel_size}"
    if conv.stride[0] != conv.stride[1]:
        return f"stride {tuple(conv.stride)} differs per axis"
    if isinstance(conv.padding, str):
        if conv.padding == "same" and (kh % 2 == 0 or conv.stride[0] != 1):
            return "padding='same' with an even kernel or stride > 1"
    elif conv.padding[0] != conv.padding[1]:
        return f"padding {tuple(conv.padding)} differs per axis"
    return None


def _matches(path: str, pattern: str) -> bool:
    if path == pattern or path.startswith(pattern + ".") or pattern in path.split("."):
        return True
    return any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(path, pattern)


def _owner_classes(model: nn.Module, path: str) -> list[nn.Module]:
    """The non-container ancestors of ``path``, nearest first."""
    parts = path.split(".")
    mods = [model]
    cur = model
    for p in parts[:-1]:
        cur = getattr(cur, p)
        mods.append(cur)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return [m for m in reversed(mods) if not isinstance(m, containers)]


def _is_attention(m: nn.Module) -> bool:
    name = type(m).__name__
    return "Attention" in name or "Attn" in name


def _is_ff(owners: list[nn.Module]) -> bool:
    return any(type(m).__name__ in _FF_CLASSES or "FeedForward" in type(m).__name__ for m in owners)


def _structural_context(owners: list[nn.Module], name: str) -> bool:
    if not owners or name not in _CONTEXT_NAMES:
        return False
    att = owners[0]
    return _is_attention(att) and bool(getattr(att, "is_cross_attention", getattr(att, "is_cross", False)))


@torch.no_grad()
def _trace(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[str], set[str]]:
    """Execution order of conv/linear modules and the linears fed directly by a context input."""
    ctx = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 3]
    ctx += [v for v in args[1:] if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 3]
    order: list[str] = []
    fed: set[str] = set()
    hooks = []

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a is b:
            return True
        if a.device.type == "meta" or b.device.type == "meta":
            return False
        return a.shape == b.shape and a.dtype == b.dtype and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()

    for path, mod in model.named_modules():
        kind = _kind(mod)
        if kind is None:
            continue

        def _hook(m, a, _path=path, _kind=kind):
            if _path not in order:
                order.append(_path)
            if _kind == "linear" and a and isinstance(a[0], torch.Tensor) and any(same(a[0], c) for c in ctx):
                fed.add(_path)

        hooks.append(mod.register_forward_pre_hook(_hook))
    try:
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return order, fed


def plan(model: nn.Module, config: Optional[QuantConfig] = None, example_args: tuple = (),
         example_kwargs: Optional[dict] = None, calibration: Optional[Calibration] = None) -> QuantReport:
    """Decide, without changing ``model``, which conv/linear layers :func:`quantize` would replace.

    With example inputs the float model is run once (works on the ``meta`` device) to find the
    first/last conv by execution order and the linears fed by the text context; without, the
    first/last registered convs and attention-module structure (``is_cross_attention``) are used.
    """
    cfg = config or QuantConfig()
    kwargs = example_kwargs or {}
    traced = bool(example_args or kwargs)
    order, fed = _trace(model, tuple(example_args), kwargs) if traced else ([], set())
    cands = [(p, m, _kind(m)) for p, m in model.named_modules() if _kind(m) is not None]
    convs = [p for p, m, k in cands if k in ("conv2d", "conv1d")]
    run_convs = [p for p in order if p in set(convs)] if traced else convs
    first_last = {run_convs[0]: "first", run_convs[-1]: "last"} if run_convs else {}
    report = QuantReport(config=cfg)
    for path, mod, kind in cands:
        name = path.rsplit(".", 1)[-1]
        owners = _owner_classes(model, path)
        shape = tuple(mod.weight.shape)
        mod = _standard_layer(mod)
        reason, role = "", "act"
        excl = next((p for p in cfg.exclude if _matches(path, p)), None)
        if getattr(mod, "lora_layer", None) is not None:
            reason = "LoRA layer attached (fuse LoRA into the weight first)"
        elif excl is not None:
            reason = f"excluded by pattern {excl!r} (kept float)"
        elif cfg.include and not any(_matches(path, p) for p in cfg.include):
            reason = "not matched by QuantConfig.include"
        elif cfg.keep_first_last and path in first_last:
            reason = f"{first_last[path]} conv of the model (kept float)"
        elif kind != "linear" and (why := _conv_support(mod, kind)) is not None:
            reason = f"unsupported conv: {why}"
        elif owners and _is_attention(owners[0]) and not cfg.quantize_attention_proj:
            reason = "attention projection (QuantConfig.quantize_attention_proj=False)"
        elif kind == "linear" and _is_ff(owners) and not cfg.quantize_ff:
            reason = "feed-forward (QuantConfig.quantize_ff=False)"
        elif traced and path not in order:
            reason = "not executed by the example forward (kept float)"
        elif cfg.smoothquant and (calibration is None or path not in calibration.act_absmax):
            reason = "smoothquant=True but no calibration statistics for this layer (kept float)"
        if reason:
            report.layers.append(LayerDecision(path, kind, False, reason, "", shape))
            continue
        is_ctx = kind == "linear" and cfg.context_kv_once and (path in fed if traced else _structural_context(owners, name))
        if is_ctx:
            role = "context"
            reason = "quantized; context K/V computed once per trajectory"
        else:
            reason = "quantized"
        report.layers.append(LayerDecision(path, kind, True, reason, role, shape))
    return report


# ------------------------------------------------------------------------------------------------
# Surgery and lifecycle
# ------------------------------------------------------------------------------------------------


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def quantize(model: nn.Module, config: Optional[QuantConfig] = None, *, example_args: tuple = (),
             example_kwargs: Optional[dict] = None, calibration: Optional[Calibration] = None,
             inplace: bool = True) -> nn.Module:
    """Replace ``model``'s conv/linear layers by low-bit MoDiff (or baseline) modules.

    Args:
        model: a float model in eval mode (diffusers U-Nets, LDM/openaimodel nets, plain modules).
        config: :class:`QuantConfig` (default: MoDiff W8A8).
        example_args / example_kwargs: optional example call. The float model is run once to find
            the first/last conv and the context-fed linears structurally, then (MoDiff) once more
            quantized to size the caches (:func:`allocate`); the trajectory is reset afterwards.
        calibration: from :func:`calibrate`; required when ``config.smoothquant``.
        inplace: modify ``model`` (default, no second copy of the weights) or a deep copy.
    Returns:
        The quantized model (``model`` itself when ``inplace``); :func:`quant_report` gives the
        per-layer decisions.
    Example:
        >>> q = quantize(unet, QuantConfig(mode="modiff", w_bits=8, a_bits=4), example_args=(x, t))
        >>> with trajectory(q):
        ...     for t in timesteps:
        ...         eps = q(x, t).sample
    """
    cfg = config or QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"quantize: config must be a QuantConfig, got {type(cfg).__name__}")
    if cfg.smoothquant and not isinstance(calibration, Calibration):
        raise ValueError("QuantConfig.smoothquant=True needs calibration=calibrate(model, inputs, steps)")
    if not inplace:
        model = copy.deepcopy(model)
    if any(isinstance(m, _QuantLayer) for m in model.modules()):
        raise ValueError("quantize: the model already holds quantized layers; quantize the float model once")
    report = plan(model, cfg, example_args, example_kwargs, calibration)
    for d in report.layers:
        if not d.quantized:
            log.info("MoDiff: %s (%s) kept float: %s", d.path, d.kind, d.reason)
            continue
        orig = model.get_submodule(d.path)
        src = _standard_layer(orig)
        smooth = None
        if cfg.smoothquant:
            smooth = _smooth_factors(src.weight, calibration.act_absmax[d.path], float(cfg.smoothquant_alpha), d.kind)
        new = (QuantLinear if d.kind == "linear" else QuantConv2d)(src, cfg, d.path, d.role, smooth)
        if src is not orig:
            new = GainScaled(new)
        new.train(orig.training)
        _set_submodule(model, d.path, new)
    model._fusediff_quant_report = report  # plain attribute (not a module/buffer)
    log.info("MoDiff: quantized %d of %d conv/linear layers (%s)", len(report.quantized), len(report.layers), cfg.label)
    if example_args or example_kwargs:
        allocate(model, example_args, example_kwargs)
    return model


def quant_report(model: nn.Module) -> QuantReport:
    """The :class:`QuantReport` of a model returned by :func:`quantize`."""
    rep = getattr(model, "_fusediff_quant_report", None)
    if rep is None:
        raise ValueError("quant_report: model was not quantized by fxpasses.modiff.quantize")
    return rep


#: Quantized layers that live in compiled graphs (``fxpasses.modiff_graph``), under the weight
#: tensor they were made from: :func:`quant_layers` / :func:`reset` reach them from the model.
_GRAPH_LAYERS = WeakTensorKeyDictionary()  # by identity: a Tensor key's == is elementwise


def register_graph_layers(weight: torch.Tensor, layers: list["_QuantLayer"]) -> None:
    """Attach quantized layers made from ``weight`` outside the model (a compiled graph) to it.

    Held weakly: a layer lives as long as the compiled graph that holds it (dynamo's cache, and the
    backend's ``LAST_RESULTS`` for the 16 newest graphs); once those let go of the graph it leaves
    :func:`quant_layers`."""
    refs = [r for r in _GRAPH_LAYERS.get(weight, []) if r() is not None]
    _GRAPH_LAYERS[weight] = refs + [weakref.ref(m) for m in layers]


def quant_layers(model: nn.Module, graphs: bool = True) -> list[_QuantLayer]:
    """Every :class:`QuantConv2d` / :class:`QuantLinear` of ``model``: its modules (module order),
    then (``graphs``) the layers compiled graphs made from its parameters (``backend(quant=...)``)."""
    out = [m for m in model.modules() if isinstance(m, _QuantLayer)]
    if graphs and _GRAPH_LAYERS:
        seen = {id(m) for m in out}
        for p in model.parameters():
            for r in _GRAPH_LAYERS.get(p, ()):
                m = r()
                if m is not None and id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
    return out


@torch.compiler.disable
def reset(model: nn.Module) -> None:
    """Start a new trajectory: ``primed = False`` in every quantized layer (tensor contents only).

    The next call takes the float first-step path and overwrites â and ô, so nothing of the
    previous trajectory leaks. Never recompiles a compiled model (no Python state changes).
    """
    for m in quant_layers(model):
        m.primed.fill_(False)


@contextlib.contextmanager
def trajectory(model: nn.Module) -> Iterator[nn.Module]:
    """``with trajectory(model):`` resets the MoDiff state on entry (one sampling run per block)."""
    reset(model)
    yield model


@torch.no_grad()
def allocate(model: nn.Module, example_args: tuple = (), example_kwargs: Optional[dict] = None) -> int:
    """Size every MoDiff cache for this input signature by running one call, then :func:`reset`.

    Call it before ``torch.compile`` / ``fusediff.optimize`` so the graph sees the final buffers
    (a cache created inside a compiled call would recompile). Returns :func:`cache_bytes`.
    """
    reset(model)
    model(*tuple(example_args), **(example_kwargs or {}))
    reset(model)
    return cache_bytes(model)


#: Alias of :func:`allocate` (``fusediff.prepare(model, args, kwargs)``).
prepare = allocate


@contextlib.contextmanager
def preserve_state(model: nn.Module) -> Iterator[nn.Module]:
    """Run calls that must not advance the trajectory (e.g. a tracing/template call).

    Snapshots every quantized layer's â, ô and ``primed`` and restores them on exit.
    """
    saved = [(m, m.a_hat.clone(), m.o_hat.clone(), m.primed.clone()) for m in quant_layers(model)]
    try:
        yield model
    finally:
        for m, a, o, p in saved:
            if m.a_hat.shape == a.shape and m.a_hat.dtype == a.dtype:
                m.a_hat.copy_(a)
            else:
                m._buffers["a_hat"] = a
            if m.o_hat.shape == o.shape and m.o_hat.dtype == o.dtype:
                m.o_hat.copy_(o)
            else:
                m._buffers["o_hat"] = o
            m.primed.copy_(p)


def cache_bytes(model: nn.Module, per_layer: bool = False) -> Union[int, dict[str, int]]:
    """Bytes held by the MoDiff caches (â + ô) of ``model``, in total or per layer path."""
    sizes = {m.path: m.cache_nbytes() for m in quant_layers(model)}
    return sizes if per_layer else sum(sizes.values())


# ------------------------------------------------------------------------------------------------
# Explicit state: the caches as inputs and outputs of a call (ONNX export, like an LLM's KV cache)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateSlot:
    """One cache a quantized layer carries from step to step.

    Attributes:
        layer: module path of the layer. kind: ``"a_hat"`` (â) or ``"o_hat"`` (ô).
        shape, dtype: of the cache for the signature it was sized with.
    """

    layer: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.kind}"


class ExplicitIO:
    """The state of one call made explicit: whether it is the trajectory's first step, the caches
    in, and the updated caches out (filled by the layers in :func:`explicit_state` mode)."""

    def __init__(self, first_step: bool, caches: dict[str, torch.Tensor]) -> None:
        self.first_step = bool(first_step)
        self.inputs = caches
        self.outputs: dict[str, torch.Tensor] = {}

    def cache(self, layer: str, kind: str) -> torch.Tensor:
        key = f"{layer}.{kind}"
        if key not in self.inputs:
            raise KeyError(f"fusediff MoDiff: no cache input for {key!r} (state_slots() names the caches)")
        return self.inputs[key]

    def put(self, layer: str, kind: str, value: torch.Tensor) -> None:
        key = f"{layer}.{kind}"
        if key in self.outputs:
            raise RuntimeError(f"fusediff MoDiff: layer {layer!r} ran twice in one call; its {kind} cache would be "
                               "overwritten (a module reused within one forward cannot carry MoDiff state)")
        self.outputs[key] = value


@contextlib.contextmanager
def explicit_state(model: nn.Module, io: ExplicitIO) -> Iterator[ExplicitIO]:
    """Within the block, quantized layers read their caches from ``io`` and write the new ones to
    it instead of mutating their buffers (which stay untouched); ``io.first_step`` picks the float
    first step or the integer step."""
    layers = quant_layers(model, graphs=False)
    for m in layers:
        m._explicit = io
    try:
        yield io
    finally:
        for m in layers:
            m._explicit = None


@torch.no_grad()
def state_slots(model: nn.Module, example_args: tuple = (), example_kwargs: Optional[dict] = None) -> list[StateSlot]:
    """The caches of ``model`` for the signature of ``example_args``/``example_kwargs``, in module order.

    The model is run once on its float first step to size them; its own state (buffers and
    ``primed``) is restored afterwards, so a trajectory in progress is not disturbed.
    """
    layers = [m for m in quant_layers(model, graphs=False) if m.state_kinds()]
    if layers and (example_args or example_kwargs):
        with preserve_state(model):
            reset(model)
            model(*tuple(example_args), **(example_kwargs or {}))
            sized = [(m, {k: (tuple(getattr(m, k).shape), getattr(m, k).dtype) for k in m.state_kinds()})
                     for m in layers]
    else:
        sized = [(m, {k: (tuple(getattr(m, k).shape), getattr(m, k).dtype) for k in m.state_kinds()}) for m in layers]
    slots = []
    for m, kinds in sized:
        for kind, (shape, dtype) in kinds.items():
            if len(shape) == 1 and shape[0] == 0:
                raise ValueError(f"fusediff MoDiff: layer {m.path!r} did not run in the example call, so its {kind} "
                                 "cache has no shape; pass example inputs that reach every quantized layer")
            slots.append(StateSlot(m.path, kind, shape, dtype))
    return slots


class ExplicitStateModel(nn.Module):
    """One step of a quantized model as a pure function of its inputs and its MoDiff state.

    ``first=True``: ``forward(args, kwargs) -> (output, caches)``, the float first step of a
    trajectory (â = a, ô = deQ(W) * a + b). ``first=False``: ``forward(args, kwargs, caches) ->
    (output, new_caches)``, an integer step (eq. 6-7). ``caches`` are tuples ordered like
    ``slots``; the wrapped model's buffers are never written. The ONNX export captures both and
    joins them under one ``If`` on a ``first_step`` input (``lowering.onnx.stateful``), so the caches
    become graph inputs/outputs the way LLM exports carry their KV cache. (A ``torch.cond`` per
    layer or around the model would do the same in one capture, but tracing a cond costs ~0.2 s
    per layer and trace phase, and a cond branch may not switch the layers' mode.)
    """

    def __init__(self, model: nn.Module, slots: list[StateSlot], first: bool) -> None:
        super().__init__()
        self.model = model
        self.slots = list(slots)
        self.first = bool(first)

    def forward(self, args: tuple, kwargs: dict,
                caches: tuple[torch.Tensor, ...] = ()) -> tuple[Any, tuple[torch.Tensor, ...]]:
        want = 0 if self.first else len(self.slots)
        if len(caches) != want:
            raise ValueError(f"ExplicitStateModel(first={self.first}): {want} caches expected, got {len(caches)}")
        io = ExplicitIO(self.first, {s.key: c for s, c in zip(self.slots, caches)})
        with explicit_state(self.model, io):
            out = self.model(*args, **kwargs)
        missing = [s.key for s in self.slots if s.key not in io.outputs]
        if missing:
            raise RuntimeError(f"ExplicitStateModel: layers {missing} did not run in this call")
        return out, tuple(io.outputs[s.key] for s in self.slots)


@torch.no_grad()
def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float copy of a quantized model: every quantized layer back to ``nn.Conv2d/Conv1d/Linear``
    holding deQ(W). The MoDiff first step of ``model`` equals this copy's forward (the reference
    for tests and error studies)."""
    out = copy.deepcopy(model)
    for path, m in [(p, m) for p, m in out.named_modules() if isinstance(m, _QuantLayer)]:
        w = m.weight
        b = m.bias
        if isinstance(m, QuantLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=b is not None, device=w.device, dtype=w.dtype)
        elif m.is_1d:
            new = nn.Conv1d(m.in_channels, m.out_channels, 1, bias=b is not None, device=w.device, dtype=w.dtype)
        else:
            new = nn.Conv2d(m.in_channels, m.out_channels, m.k_size, stride=m.stride, padding=m.padding,
                            bias=b is not None, device=w.device, dtype=w.dtype)
        if m.smooth_inv is not None:
            raise ValueError("dequantized_copy: SmoothQuant layers scale the activation; no plain float equivalent")
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
        _set_submodule(out, path, new.eval())
    if hasattr(out, "_fusediff_quant_report"):
        del out._fusediff_quant_report
    return out


# ------------------------------------------------------------------------------------------------
# Graph pass: GroupNorm(+FiLM)(+SiLU) -> MoDiff quantizer in one kernel (paper Fig. 1 left)
# ------------------------------------------------------------------------------------------------


def _is_target(n: Any, *targets: Any) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in targets


def _is_unsqueeze_last(n: Any) -> bool:
    if not isinstance(n, torch.fx.Node):
        return False
    if n.op == "call_method" and n.target == "unsqueeze":
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    elif n.op == "call_function" and n.target in (torch.unsqueeze, torch.ops.aten.unsqueeze.default):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    else:
        return False
    return dim in (-1, 3)


def is_group_norm_silu(n: Any) -> bool:
    """Whether ``n`` calls ``fusediff::group_norm_silu`` (OpOverload or packet)."""
    return _is_target(n, torch.ops.fusediff.group_norm_silu.default, torch.ops.fusediff.group_norm_silu)


def group_norm_args(node: torch.fx.Node) -> dict[str, Any]:
    """The arguments of a ``fusediff::group_norm_silu`` call by name, in the op's order."""
    names = ("x", "weight", "bias", "scale", "shift", "num_groups", "eps", "apply_silu")
    gn = dict(zip(names, node.args))
    gn.update({k: v for k, v in node.kwargs.items() if k in names})
    return {k: gn.get(k) for k in names}


def fuse_group_norm_quantize(gm: torch.fx.GraphModule) -> int:
    """Fuse ``fusediff::group_norm_silu -> [unsqueeze(-1)] -> fusediff::modiff_quantize`` into
    ``fusediff::group_norm_quantize`` (the normalized activation never reaches memory).

    Run it on a graph of a MoDiff-quantized model after ``fxpasses.match.run_passes`` (which turns
    GroupNorm(+FiLM)(+SiLU) into ``group_norm_silu``); only chains whose intermediate has a single
    user are fused (a resample or a second reader between them keeps them apart). Works on export
    graphs (``.default`` overloads) and dynamo graphs. Returns the number of fused pairs.
    """
    mq = (torch.ops.fusediff.modiff_quantize.default, torch.ops.fusediff.modiff_quantize)
    g = gm.graph
    fused = 0
    for node in list(g.nodes):
        if not _is_target(node, *mq):
            continue
        a = node.args[0] if node.args else node.kwargs.get("a")
        view = None
        if _is_unsqueeze_last(a) and len(a.users) == 1:
            view, a = a, a.args[0]
        if not is_group_norm_silu(a) or len(a.users) != 1:
            continue
        gn = group_norm_args(a)
        qnames = ("a", "a_hat", "primed", "bits", "per_sample")
        qa = dict(zip(qnames, node.args))
        qa.update({k: v for k, v in node.kwargs.items() if k in qnames})
        with g.inserting_before(node):
            x = gn["x"]
            if view is not None:
                x = g.call_function(torch.ops.aten.unsqueeze.default, (x, -1))
                if "val" in view.meta:
                    x.meta["val"] = view.meta["val"]
            # MoDiff eq. (6) fused into the norm: q = Q([silu](GN(x)) - â), â updated in place
            new = g.call_function(torch.ops.fusediff.group_norm_quantize.default,
                                  (x, *list(gn.values())[1:], qa["a_hat"], qa["primed"], qa["bits"],
                                   qa["per_sample"]))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(new)
        g.erase_node(node)
        if view is not None:
            g.erase_node(view)
        g.erase_node(a)
        fused += 1
    if fused:
        g.lint()
        gm.recompile()
    log.info("MoDiff: fused %d GroupNorm -> quantizer pairs into fusediff::group_norm_quantize", fused)
    return fused


# ------------------------------------------------------------------------------------------------
# Analytic DRAM traffic (paper Table 1 columns)
# ------------------------------------------------------------------------------------------------


@dataclass
class LayerShape:
    """One conv/linear call of a forward: element counts of its weight, input and output."""

    path: str
    kind: str
    weight_numel: int
    out_channels: int
    has_bias: bool
    in_numel: int
    out_numel: int


@torch.no_grad()
def layer_shapes(model: nn.Module, example_args: tuple, example_kwargs: Optional[dict] = None) -> list[LayerShape]:
    """Shapes of every conv/linear call in one forward (run the model on ``meta`` to allocate nothing)."""
    rows: list[LayerShape] = []
    hooks = []
    for path, mod in model.named_modules():
        kind = _kind(mod)
        if kind is None:
            continue

        def _hook(m, args, out, _path=path, _kind=kind):
            rows.append(LayerShape(_path, _kind, m.weight.numel(), m.weight.shape[0], getattr(m, "bias", None) is not None,
                                   args[0].numel(), out.numel()))

        hooks.append(mod.register_forward_hook(_hook))
    try:
        model(*tuple(example_args), **(example_kwargs or {}))
    finally:
        for h in hooks:
            h.remove()
    return rows


_COLUMNS = ("weight", "act", "output", "cache_rd", "cache_wr")


def dram_transfer(shapes: list[LayerShape], report: Optional[QuantReport], steps: int,
                  act_bytes: int = 4, cache_bytes_per_el: int = 4, implemented: bool = False) -> dict[str, float]:
    """Analytic DRAM bytes of the conv/linear layers over one ``steps``-step trajectory.

    Per quantized layer and step (the paper's Fig. 1 design; ``report`` None = all float):
      weight: W bytes (fp32 4 B/el; INT8 1 B; INT4 0.5 B) + fp32 scales + bias;
      act: the GEMM's input (float ``act_bytes``/el, or the 1-byte q); output: the float output;
      cache_rd: MoDiff â_{t+1} and ô_{t+1}; cache_wr: â_t and ô_t (``cache_bytes_per_el`` each).
    The MoDiff first step is a float step (float weights and input, caches written only); context
    K/V layers compute on the first step and afterwards read ô once and write the output.
    ``implemented=True`` counts what fusediff's separate kernels move on top of that: the
    quantizer reads a (and â) twice and writes q (1 B); the MoDiff conv/linear stores ô twice
    (cache + the op's fresh output); the baseline conv's fp32 channels_last output is copied back
    to the model's NCHW layout.
    Layers kept float cost the float row in every mode. Returns bytes per column and ``total``.
    """
    dec = {d.path: d for d in report.layers} if report is not None else {}
    cfg = report.config if report is not None else None
    tot = dict.fromkeys(_COLUMNS, 0.0)

    def add(col: str, v: float) -> None:
        tot[col] += v

    for s in shapes:
        d = dec.get(s.path)
        a, o, w = s.in_numel, s.out_numel, s.weight_numel
        bias = 4 * s.out_channels if s.has_bias else 0
        fw = 4 * w + bias
        if d is None or not d.quantized:
            add("weight", steps * fw)
            add("act", steps * act_bytes * a)
            add("output", steps * act_bytes * o)
            continue
        qw = w * cfg.w_bits / 8 + 4 * s.out_channels + bias
        c = cache_bytes_per_el
        if d.role == "context":
            add("weight", qw)
            add("act", act_bytes * a if cfg.mode == "modiff" else a)
            add("output", steps * act_bytes * o)
            add("cache_wr", steps * c * o)
            add("cache_rd", (steps - 1) * c * o)
            continue
        if cfg.mode == "baseline":
            add("weight", steps * qw)
            add("act", steps * a)  # int8 q (INT4 activations are stored as int8 levels too)
            add("output", steps * act_bytes * o)
            if implemented:  # quantize_act: two reads of a, one q write; the op's fp32 channels_last
                add("act", steps * (2 * act_bytes * a + a))  # output is copied back to NCHW
                if s.kind != "linear":
                    add("output", steps * 2 * act_bytes * o)
            continue
        # MoDiff: first step float (writes â = a and ô), then steps - 1 integer steps.
        add("weight", fw + (steps - 1) * qw)
        add("act", act_bytes * a + (steps - 1) * a)
        add("output", steps * act_bytes * o)
        add("cache_wr", steps * c * (a + o))
        add("cache_rd", (steps - 1) * c * (a + o))
        if implemented:
            add("act", act_bytes * a + (steps - 1) * (2 * act_bytes * a + a))  # quantizer: a (x2 when primed), q
            add("cache_rd", (steps - 1) * c * a)  # â read twice (absmax pass + quantize pass)
            add("cache_wr", (steps - 1) * c * o)  # ô stored twice (cache and the op's fresh output)
    tot["total"] = sum(tot[k] for k in _COLUMNS)
    return tot
