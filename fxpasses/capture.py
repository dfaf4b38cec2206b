"""Capture a model as an FX graph: from dynamo (what a backend receives) or ``torch.export``.

Both keep ``nn_module_stack`` so sites report module paths. ``symbolic_trace`` is not offered:
it fails on diffusers' UNet2DConditionModel (it iterates ``sample.shape``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


class CaptureError(RuntimeError):
    pass


def capture_dynamo(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None,
                   *, dynamic: bool | None = False) -> tuple[fx.GraphModule, list[Any]]:
    """The single graph dynamo hands a backend for ``model(*args, **kwargs)`` (fullgraph).

    Returns ``(gm, example_inputs)``. Raises :class:`CaptureError` on graph breaks.
    """
    kwargs = kwargs or {}
    got: list[tuple[fx.GraphModule, list]] = []

    def _backend(gm, example_inputs):
        got.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=_backend, fullgraph=True, dynamic=dynamic)(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise CaptureError(f"dynamo could not capture {type(model).__name__} in one graph: {e}") from e
    finally:
        torch._dynamo.reset()
    if len(got) != 1:
        raise CaptureError(f"expected one graph, dynamo produced {len(got)}")
    return got[0]


def capture_export(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> fx.GraphModule:
    """``torch.export`` the model and return the runnable (unlifted) GraphModule.

    Parameters/buffers become ``get_attr`` nodes; node metadata (``val``, ``nn_module_stack``)
    is kept.
    """
    kwargs = kwargs or {}
    try:
        with torch.no_grad():
            ep = torch.export.export(model, tuple(args), kwargs)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"torch.export failed on {type(model).__name__}: {e}") from e
    return ep.module()
