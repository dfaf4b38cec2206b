"""One call from a model to what fusediff finds in it: capture, passes, report, pictures."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx

from .capture import capture_dynamo, capture_export
from .config import RewriteConfig
from .pipeline import PassResult, Pipeline, finish
from .report import Report, build_report
from .sites import Site

log = logging.getLogger("fusediff.fxpasses")


@dataclass
class Inspection:
    """Result of :func:`inspect_model`.

    Attributes:
        gm: the graph (rewritten when ``rewrite=True``).
        result: sites and counts.
        report: tables (counts, sites, params/GFLOPs, DRAM traffic unfused vs fused).
        files: paths of pictures written (``visualize``), by name.
    """

    gm: fx.GraphModule
    result: PassResult
    report: Report
    files: dict[str, str] = field(default_factory=dict)

    @property
    def sites(self) -> list[Site]:
        return self.result.sites


def inspect_model(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
                  capture: Literal["export", "dynamo"] = "export", config: RewriteConfig | None = None,
                  rewrite: bool = True, out_dir: str | None = None, title: str = "") -> Inspection:
    """Capture ``model(*args, **kwargs)``, find and (optionally) rewrite patterns, and report.

    Args:
        model: the U-Net (eval mode).
        args, kwargs: example inputs.
        capture: ``"export"`` (torch.export) or ``"dynamo"`` (the graph a backend receives).
        config: which patterns to rewrite.
        rewrite: apply the rewrites (the report's "rewritten" column) or only find.
        out_dir: when given, write DOT/SVG/HTML pictures and ``report.txt``/``report.json`` there.
        title: label for the report (defaults to the model's class name and input shape).
    Returns:
        An :class:`Inspection`.
    """
    cfg = config or RewriteConfig()
    kwargs = kwargs or {}
    if capture == "export":
        gm = capture_export(model, args, kwargs)
    elif capture == "dynamo":
        gm, _ = capture_dynamo(model, args, kwargs)
    else:
        raise ValueError(f"inspect_model: capture must be 'export' or 'dynamo', got {capture!r}")
    if not title:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        title = type(model).__name__ + (f" {tuple(x.shape)}" if x is not None else "")
    pipeline = Pipeline(cfg)  # inspect: no selection, no post-passes, no verify
    res = pipeline.find(gm)
    # Measure and draw the canonical graph with the sites marked (before the rewrite).
    report = build_report(gm, res.sites, model=model, title=title)
    files: dict[str, str] = {}
    if out_dir is not None:
        from .viz import visualize

        files = visualize(gm, res.sites, out_dir, report=report, title=title)
    if rewrite:
        pipeline.rewrite(gm, res)
    else:
        finish(res)
    if out_dir is not None:
        import os

        with open(os.path.join(out_dir, "report.txt"), "w") as f:
            f.write(report.to_text() + "\n")
        report.to_json(os.path.join(out_dir, "report.json"))
        files["report.txt"] = os.path.join(out_dir, "report.txt")
        files["report.json"] = os.path.join(out_dir, "report.json")
    return Inspection(gm=gm, result=res, report=report, files=files)
