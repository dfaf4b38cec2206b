"""The MoDiff trajectory lifecycle of a quantized model: caches, reset, state snapshots.

The â/ô caches and the ``primed`` flag of every quantized layer ("Real-Time On-Device Diffusion:
Practical Acceleration via Fused Low-Bit Kernels", eq. 6-7) are shaped lazily by the first call
of a trajectory, or up front by :func:`allocate` (do that before
``torch.compile`` so the graph sees the buffers). :func:`reset` (``@torch.compiler.disable``) only
writes ``primed = False``; the next call takes the float first-step path and overwrites both
caches, so a compiled model runs 3 calls, ``reset``, 3 calls on one compilation.
``with trajectory(model):`` resets on entry; :func:`preserve_state` snapshots and restores the
state around calls that must not advance it; :func:`cache_bytes` sizes it. After ``reset`` a new
shape simply re-sizes the caches (the per-layer shape/batch guard is in
:mod:`fxpasses.modiff.layers`; across compiled graphs, :func:`fxpasses.modiff.graph.guard_trajectory`).

Layers built inside compiled graphs (``backend(quant=...)``) are registered under the model's
weight tensors (:func:`register_graph_layers`), so :func:`quant_layers` and :func:`reset` reach
them from the model.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn
from torch.utils.weak import WeakTensorKeyDictionary

from .layers import _QuantLayer

__all__ = ["register_graph_layers", "quant_layers", "reset", "trajectory", "allocate", "prepare", "preserve_state",
           "cache_bytes"]


#: Quantized layers that live in compiled graphs (``fxpasses.modiff.graph``), under the weight
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
