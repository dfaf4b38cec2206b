"""``fusediff.optimize(model, config)``: the model transform (no ``torch.compile`` needed).

The returned :class:`OptimizedModule` runs the rewritten graph eagerly. It shares the original
model's parameters and buffers (same ``Parameter`` objects, same ``state_dict`` keys), so
swapping a weight in place (a LoRA merge, ``load_state_dict``) takes effect without
re-optimizing. A new input signature (batch size, resolution, dtype) is captured and rewritten
once more, like a recompile.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..fxpasses.capture import capture_export
from ..fxpasses.config import RewriteConfig
from ..fxpasses.modiff import QuantConfig
from ..fxpasses.patterns.gn_quant import fuse_group_norm_quantize
from ..fxpasses.pipeline import PassResult, Pipeline
from .select import POLICIES, Selector
from .verify import VerifyFailure, verify_graph

log = logging.getLogger("fusediff.lowering")


@dataclass(frozen=True)
class OptimizeConfig:
    """Options of :func:`optimize`.

    Args:
        rewrite: the pattern/rewrite options (:class:`fxpasses.config.RewriteConfig`).
        on_grad: what to do when called with autograd enabled or in training mode:
            ``"error"`` (raise) or ``"fallback"`` (run the original model, logged once).
        max_signatures: how many input signatures (shapes/dtypes) to keep rewritten graphs for.
        selection: ``"auto"`` (time fused vs original once per shape on CUDA, cached on disk; keep
            fused elsewhere), ``"time"``, ``"always"``, ``"never"`` (see lowering/select.py).
        verify: on the first call of each signature, check every rewritten region against the
            original math and fall back (with a logged reason) where it is out of tolerance.
        quant: MoDiff/baseline low-bit quantization (:class:`fxpasses.modiff.QuantConfig`) applied
            by :func:`optimize` before the rewrite, to a copy of the model; None: float.
    """

    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    on_grad: str = "fallback"
    max_signatures: int = 8
    selection: str = "auto"
    verify: bool = False
    quant: QuantConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rewrite, RewriteConfig):
            raise TypeError("OptimizeConfig.rewrite must be a fxpasses.config.RewriteConfig")
        if self.on_grad not in ("error", "fallback"):
            raise ValueError(f"OptimizeConfig.on_grad must be 'error' or 'fallback', got {self.on_grad!r}")
        if not isinstance(self.max_signatures, int) or self.max_signatures < 1:
            raise ValueError(f"OptimizeConfig.max_signatures must be an int >= 1, got {self.max_signatures!r}")
        if self.selection not in POLICIES:
            raise ValueError(f"OptimizeConfig.selection must be one of {list(POLICIES)}, got {self.selection!r}")
        if not isinstance(self.verify, bool):
            raise TypeError(f"OptimizeConfig.verify must be a bool, got {self.verify!r}")
        if self.quant is not None and not isinstance(self.quant, QuantConfig):
            raise TypeError(f"OptimizeConfig.quant must be a fxpasses.modiff.QuantConfig or None, got {self.quant!r}")


def first_device(args: tuple, kwargs: dict) -> torch.device:
    for x in pytree.tree_leaves((args, kwargs)):
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def pipeline(config: "OptimizeConfig", inputs: list | None = None) -> Pipeline:
    """The pipeline ``optimize()`` and the ``torch.compile`` backend run: selection by ``config.selection``,
    the GroupNorm -> MoDiff-quantizer fusion (paper Fig. 1; MoDiff graphs only) as post-pass, and verify
    on ``inputs`` when ``config.verify`` (stateful buffers such as MoDiff caches are restored after the
    check run)."""
    verify = None
    if config.verify and inputs is not None:
        def verify(gm: fx.GraphModule) -> list[VerifyFailure]:
            saved = {k: b.clone() for k, b in gm.named_buffers()}
            try:
                return verify_graph(gm, inputs)
            finally:
                with torch.no_grad():
                    for k, b in gm.named_buffers():
                        b.copy_(saved[k])

    return Pipeline(config.rewrite, select=Selector(config.selection).apply,
                    post_passes=(fuse_group_norm_quantize,), verify=verify)


def _restore(out: Any, template: Any) -> Any:
    """Give the flat export output the original's type back (diffusers' ``UNet2DOutput``...)."""
    if template is None or isinstance(out, torch.Tensor) or isinstance(template, (tuple, list, torch.Tensor)):
        return out
    keys = list(template.keys()) if hasattr(template, "keys") else None
    if keys is not None and isinstance(out, (tuple, list)) and len(out) == len(keys):
        return type(template)(**dict(zip(keys, out)))
    return out


def _signature(args: tuple, kwargs: dict) -> tuple:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sig = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            sig.append(("T", tuple(x.shape), x.dtype, x.device.type))
        else:
            sig.append(("C", repr(x)))
    return (str(spec), tuple(sig))


class OptimizedModule(torch.nn.Module):
    """The original model with its forward replaced by rewritten graphs (one per input signature)."""

    def __init__(self, model: torch.nn.Module, config: OptimizeConfig) -> None:
        super().__init__()
        object.__setattr__(self, "_fd_model", model)
        object.__setattr__(self, "_fd_config", config)
        object.__setattr__(self, "_fd_graphs", {})
        object.__setattr__(self, "_fd_warned", False)
        object.__setattr__(self, "_fd_failures", [])
        # Share parameters, buffers and submodules: state_dict() equals the model's.
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.training = model.training

    @property
    def original(self) -> torch.nn.Module:
        return self._fd_model

    @property
    def results(self) -> list[PassResult]:
        """Pass results for each captured signature (what was found and rewritten)."""
        return [r for _, r, _ in self._fd_graphs.values()]

    @property
    def graph_modules(self) -> list[fx.GraphModule]:
        return [g for g, _, _ in self._fd_graphs.values()]

    @property
    def verify_failures(self) -> list[VerifyFailure]:
        """Regions verify mode switched back to the original ops (with reasons)."""
        return list(self._fd_failures)

    def __getattr__(self, name: str) -> Any:
        # diffusers pipelines read unet.config, unet.dtype, unet.device, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_fd_model"], name)

    def capture(self, *args: Any, **kwargs: Any) -> tuple[fx.GraphModule, PassResult]:
        """Capture and rewrite for this input signature (cached)."""
        gm, res, _ = self._entry(args, kwargs)
        return gm, res

    def _entry(self, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, PassResult, Any]:
        key = _signature(args, kwargs)
        hit = self._fd_graphs.get(key)
        if hit is not None:
            return hit
        model = self._fd_model
        was_training = model.training
        model.eval()
        try:
            from ..fxpasses.modiff import preserve_state

            # output structure (and dtype) to give back; MoDiff caches are restored afterwards
            with torch.no_grad(), preserve_state(model):
                template = model(*args, **kwargs)
            gm = capture_export(model, args, kwargs)
        finally:
            model.train(was_training)
        flat = None
        if self._fd_config.verify:
            import torch.fx._pytree as fx_pytree

            flat = fx_pytree.tree_flatten_spec((args, kwargs), gm._in_spec)
        res = pipeline(self._fd_config, flat).run(gm, device=first_device(args, kwargs))
        self._fd_failures.extend(res.failures)
        if len(self._fd_graphs) >= self._fd_config.max_signatures:
            self._fd_graphs.pop(next(iter(self._fd_graphs)))
        self._fd_graphs[key] = (gm, res, None if isinstance(template, torch.Tensor) else template)
        log.info("fusediff.optimize: new signature captured; rewritten %s", res.rewritten)
        return self._fd_graphs[key]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() or self.training:
            why = "autograd enabled" if torch.is_grad_enabled() else "module in training mode"
            if self._fd_config.on_grad == "error":
                raise RuntimeError(f"fusediff: optimized module called with {why}; the fused ops have no "
                                   "backward. Use torch.no_grad()/inference_mode() and .eval().")
            if not self._fd_warned:
                log.warning("fusediff: %s -> running the original model (no fused kernels)", why)
                object.__setattr__(self, "_fd_warned", True)
            return self._fd_model(*args, **kwargs)
        gm, _, template = self._entry(args, kwargs)
        return _restore(gm(*args, **kwargs), template)

    def train(self, mode: bool = True) -> "OptimizedModule":
        self._fd_model.train(mode)
        self.training = mode
        return self


def optimize(model: torch.nn.Module, config: OptimizeConfig | RewriteConfig | QuantConfig | None = None, *,
             example_args: tuple = (), example_kwargs: dict | None = None) -> OptimizedModule:
    """Rewrite ``model``'s U-Net patterns into fusediff kernels; returns an eager module.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture (diffusers U-Nets, LDM/EDM2 nets).
        config: :class:`OptimizeConfig`, or just a :class:`RewriteConfig`, or a
            :class:`fxpasses.modiff.QuantConfig` (= ``OptimizeConfig(quant=...)``): then a copy of
            ``model`` is quantized first (``model`` itself stays float) and the result carries the
            MoDiff state; start each sampling run with ``fusediff.reset(result)`` or
            ``with fusediff.trajectory(result):``.
        example_args / example_kwargs: optional inputs to capture right away (else on first call).
    Returns:
        :class:`OptimizedModule` sharing ``model``'s parameters (its quantized copy's with ``quant``).
    Example:
        >>> fast = fusediff.optimize(unet.eval())
        >>> with torch.no_grad():
        ...     out = fast(latents, t, encoder_hidden_states=ctx)
        >>> q = fusediff.optimize(unet.eval(), fusediff.QuantConfig(mode="modiff", a_bits=4), example_args=(latents, t))
    """
    if isinstance(config, RewriteConfig):
        config = OptimizeConfig(rewrite=config)
    elif isinstance(config, QuantConfig):
        config = OptimizeConfig(quant=config)
    config = config or OptimizeConfig()
    if not isinstance(config, OptimizeConfig):
        raise TypeError(f"optimize: config must be OptimizeConfig, RewriteConfig or QuantConfig, got "
                        f"{type(config).__name__}")
    if config.quant is not None:
        from ..fxpasses.modiff import quantize

        model = quantize(model, config.quant, example_args=tuple(example_args), example_kwargs=example_kwargs,
                         inplace=False)
    om = OptimizedModule(model, config)
    if example_args or example_kwargs:
        with torch.no_grad():
            om.capture(*example_args, **(example_kwargs or {}))
    return om
