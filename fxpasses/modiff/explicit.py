"""The MoDiff state made explicit: caches as inputs and outputs of a call (ONNX export).

:class:`ExplicitStateModel` is one step of a quantized model as a pure function of its inputs and
its â/ô caches ("Real-Time On-Device Diffusion: Practical Acceleration via Fused Low-Bit
Kernels", eq. 6-7), like an LLM export's KV cache: ``first=True`` is the float first step
(â = a, ô = deQ(W) * a + b), ``first=False`` an integer step. :func:`state_slots`
names and sizes the caches (:class:`StateSlot`); within :func:`explicit_state` the layers read
and write an :class:`ExplicitIO` instead of their buffers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from .lifecycle import preserve_state, quant_layers, reset

__all__ = ["StateSlot", "ExplicitIO", "explicit_state", "state_slots", "ExplicitStateModel"]


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
