"""Analytic DRAM traffic of the conv/linear layers over a trajectory (paper Table 1 columns).

:func:`layer_shapes` records each conv/linear call of one forward (run it on ``meta``);
:func:`dram_transfer` counts the bytes the weights, activations, outputs and MoDiff caches move
over a ``steps``-step trajectory, float, baseline or MoDiff, per the Fig. 1 design of
"Real-Time On-Device Diffusion: Practical Acceleration via Fused Low-Bit Kernels" (eq. 6-7 for
the cache reads and writes), optionally with what fusediff's separate kernels move on top.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .config import QuantReport
from .layers import _kind

__all__ = ["LayerShape", "layer_shapes", "dram_transfer"]


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
