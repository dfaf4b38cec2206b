"""The quantized layers of MoDiff: :class:`QuantConv2d`, :class:`QuantLinear`, :class:`GainScaled`.

:class:`QuantConv2d` / :class:`QuantLinear` replace ``nn.Conv2d`` / ``nn.Linear`` (and 1x1
``nn.Conv1d``; diffusers' ``LoRACompatible*`` subclasses too) and call the ``fusediff::`` low-bit
ops of ``kernels.quantize``, ``kernels.conv_int8`` and ``kernels.linear_int8``.

Math ("Real-Time On-Device Diffusion: Practical Acceleration via Fused Low-Bit Kernels", eq. 4-7;
symmetric, zero point 0), per quantized layer l:

    baseline:   o_t = s_a s_w (W_int ⊗ Q(a_t)) + b                           (fresh scale each call)
    MoDiff:     Δ   = Q(a_t - â_{t+1});   â_t = deQ(Δ) + â_{t+1}                 eq. (6)
                ô_t = deQ(W_int ⊗ Δ) + ô_{t+1}          (no bias: it lives in ô)  eq. (7)
    first step: â_T = a_T,  ô_T = deQ(W) * a_T + b       (float, in the cache dtype)

State: every layer in MoDiff mode owns three non-persistent buffers: ``a_hat`` (â, the input's
shape), ``o_hat`` (ô, the output's shape), both in ``QuantConfig.cache_dtype``, and ``primed``, a
0-d bool kept on the CPU (the conv/linear ops read it on the host; a CPU flag costs no device
sync). ``primed`` is read as a tensor (never a Python bool), so a compiled model traces one graph
for the whole trajectory. The per-layer shape/batch guard lives here (``_check_state``): a batch
or shape change in the middle of a trajectory raises a ``ValueError`` naming the layer and both
shapes (``on_shape_change="error"``) or re-seeds that layer's caches (``"reseed"``); a cache is
never broadcast. The model-wide lifecycle (``allocate``, ``reset``, ``trajectory``) is
:mod:`fxpasses.modiff.lifecycle`.

Text-context K/V projections (linears whose input is the ``encoder_hidden_states`` / ``context``)
see the same input at every step; with ``context_kv_once`` they are computed once per trajectory
(first step) and served from ``o_hat`` afterwards, through ``torch.cond`` on ``primed`` (one
graph, no recompilation).

:class:`GainScaled` wraps a quantized EDM2 ``MPConv`` (weight normalization folded into the
quantized weight, the gain applied to the output); :func:`_kind` names the float layers a
quantized layer can replace.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from ...kernels import quantize as _quantize_ops  # noqa: F401  (registers fusediff::quantize_act / modiff_quantize)
from ...kernels.conv_int8 import dequantize_conv_weight, prepare_conv_weight
from ...kernels.linear_int8 import dequantize_linear_weight, prepare_linear_weight
from .config import QuantConfig

if TYPE_CHECKING:
    from .explicit import ExplicitIO

log = logging.getLogger("fusediff.fxpasses")

__all__ = ["QuantConv2d", "QuantLinear", "GainScaled"]


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
        reaches memory; the graph-level pass (:mod:`fxpasses.modiff.graph`) passes it.
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
