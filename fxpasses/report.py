"""What the passes found and what it is worth: pattern counts, sites, costs and DRAM traffic.

:func:`build_report` reads a graph and its :class:`~fxpasses.sites.Site` list and returns a
:class:`Report` whose tables follow the papers' layout:

* ``counts_table``: per pattern, found / matched / rejected / rewritten;
* ``sites_table``: every site with its module path, shapes, dtype, and why it was not matched;
* ``cost_table``: Mparams and GFLOPs per U-Net evaluation, split by op class (the form of the
  EDM2+ paper's scaling tables: Architecture | Mparams | GFLOPs);
* ``traffic_table``: estimated DRAM transfer in MB (10^6 bytes) unfused vs fused, split into
  weight / activation / output / cache read / cache write as in the MoDiff paper's Table 1.

Counting conventions are those of :mod:`fxpasses.costs`. Example::

    report = build_report(gm, sites, model=unet, title="SD-1.5 UNet, 512x512, batch 2")
    print(report.to_text())
    report.to_json("out/report.json")
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.fx as fx
from tabulate import tabulate

from .costs import OP_CLASSES, TRAFFIC_COLUMNS, flops_by_class, graph_params, is_compute, target_name, traffic
from .sites import PATTERNS, Site

log = logging.getLogger("fusediff.fxpasses")

MB = 1e6
GFLOP = 1e9
_TRAFFIC_HEADERS = {
    "weights": "Weight MB", "activations": "Act MB", "outputs": "Output MB",
    "cache_read": "Cache Rd MB", "cache_write": "Cache Wr MB",
}


def format_shape(shape: Any) -> str:
    """``(2, 64, 16, 16)`` -> ``"2x64x16x16"``; scalars and unknown values as ``str``."""
    if isinstance(shape, (tuple, list)) and all(isinstance(s, int) for s in shape):
        return "x".join(str(s) for s in shape) if shape else "scalar"
    return str(shape)


def format_shapes(shapes: dict[str, Any]) -> str:
    return " ".join(f"{k}={format_shape(v)}" for k, v in shapes.items())


def site_status(site: Site) -> str:
    """``"matched"``, ``"rewritten"`` or ``"rejected: <reason>"`` (notes of matched sites in
    parentheses)."""
    if site.matched:
        s = "rewritten" if site.rewritten else "matched"
        return f"{s} ({site.reason})" if site.reason else s
    return f"rejected: {site.reason or 'no reason recorded'}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    return str(v)


def _family(pattern: str) -> str:
    return PATTERNS.get(pattern, "")


def _cell(x: Any, fmt: str) -> Any:
    if isinstance(x, str) and fmt in ("github", "pipe"):
        return x.replace("|", "\\|")
    return x


@dataclass
class Report:
    """Everything :func:`build_report` measured. Tables render with ``tabulate``.

    Attributes:
        title: what was measured (model, resolution, batch); the cost table's row label.
        sites: the sites, in graph order.
        params: parameter count.
        flops: FLOPs of one evaluation per op class (:data:`fxpasses.costs.OP_CLASSES`).
        traffic: :func:`fxpasses.costs.traffic` of the graph and sites.
        n_nodes: nodes in the graph.
        n_compute: compute nodes (not views, placeholders, get_attr or output).
        fused_ops: ``fusediff::`` op name -> count in the graph.
    """

    title: str
    sites: list[Site]
    params: int
    flops: dict[str, int]
    traffic: dict[str, Any]
    n_nodes: int = 0
    n_compute: int = 0
    fused_ops: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived numbers
    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def gflops(self) -> float:
        return self.total_flops / GFLOP

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    def site_saved_bytes(self, index: int) -> int:
        """DRAM bytes site ``index`` keeps on chip (0 for rejected sites)."""
        return int(self.traffic.get("per_site_saved", {}).get(index, 0))

    # ------------------------------------------------------------------ rows
    def counts_rows(self) -> tuple[list[str], list[list[Any]]]:
        headers = ["pattern", "family", "found", "matched", "rejected", "rewritten"]
        names = list(PATTERNS) + sorted({s.pattern for s in self.sites} - set(PATTERNS))
        rows = []
        for p in names:
            mine = [s for s in self.sites if s.pattern == p]
            rows.append([p, _family(p), len(mine), sum(s.matched for s in mine),
                         sum(not s.matched for s in mine), sum(s.rewritten for s in mine)])
        rows.append(["total", "", len(self.sites), sum(s.matched for s in self.sites),
                     sum(not s.matched for s in self.sites), sum(s.rewritten for s in self.sites)])
        return headers, rows

    def sites_rows(self) -> tuple[list[str], list[list[Any]]]:
        headers = ["#", "module", "pattern", "shapes", "dtype", "saved MB", "status"]
        rows = []
        for i, s in enumerate(self.sites):
            rows.append([i, s.module_path or "(top level)", s.pattern, format_shapes(s.shapes),
                         s.dtype.replace("torch.", ""), round(self.site_saved_bytes(i) / MB, 3),
                         site_status(s)])
        return headers, rows

    def cost_rows(self) -> tuple[list[str], list[list[Any]]]:
        headers = ["Architecture", "Mparams", "GFLOPs"] + [f"{c} GFLOPs" for c in OP_CLASSES]
        total = self.total_flops
        row = [self.title or "model", round(self.mparams, 3), round(self.gflops, 3)]
        row += [round(self.flops.get(c, 0) / GFLOP, 3) for c in OP_CLASSES]
        share = ["share", "", "100%" if total else "-"]
        share += [f"{100 * self.flops.get(c, 0) / total:.1f}%" if total else "-" for c in OP_CLASSES]
        return headers, [row, share]

    def traffic_rows(self) -> tuple[list[str], list[list[Any]]]:
        headers = ["Mode"] + [_TRAFFIC_HEADERS[c] for c in TRAFFIC_COLUMNS] + ["Total MB", "Ratio"]
        unf, fus = self.traffic["unfused"], self.traffic["fused"]
        rows = []
        for name, d in (("unfused", unf), ("fused", fus)):
            ratio = d["total"] / unf["total"] if unf["total"] else 1.0
            rows.append([name] + [round(d[c] / MB, 3) for c in TRAFFIC_COLUMNS]
                        + [round(d["total"] / MB, 3), f"{100 * ratio:.1f}%"])
        return headers, rows

    # ------------------------------------------------------------------ tables
    def _table(self, hr: tuple[list[str], list[list[Any]]], fmt: str) -> str:
        headers, rows = hr
        rows = [[_cell(x, fmt) for x in r] for r in rows]
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)

    def counts_table(self, fmt: str = "github") -> str:
        """Per pattern: found / matched / rejected / rewritten."""
        return self._table(self.counts_rows(), fmt)

    def sites_table(self, fmt: str = "github") -> str:
        """One row per site: module path, pattern, shapes, dtype, bytes saved, status/reason."""
        return self._table(self.sites_rows(), fmt)

    def cost_table(self, fmt: str = "github") -> str:
        """Mparams and GFLOPs per evaluation, split by op class (papers' scaling-table form)."""
        return self._table(self.cost_rows(), fmt)

    def traffic_table(self, fmt: str = "github") -> str:
        """Estimated DRAM MB unfused vs fused (MoDiff Table 1 columns) and the ratio."""
        return self._table(self.traffic_rows(), fmt)

    def to_text(self, fmt: str = "github") -> str:
        """All tables as text (``fmt``: any tabulate format; ``"github"`` or ``"simple"``)."""
        parts = []
        if self.title:
            parts.append(f"# {self.title}" if fmt == "github" else self.title)
        parts.append(f"graph: {self.n_nodes} nodes ({self.n_compute} compute)"
                     + (", fused ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.fused_ops.items()))
                        if self.fused_ops else ""))
        for name, table in (("Patterns", self.counts_table(fmt)), ("Cost per evaluation", self.cost_table(fmt)),
                            ("DRAM traffic per evaluation (estimate)", self.traffic_table(fmt)),
                            ("Sites", self.sites_table(fmt) if self.sites else "(no sites)")):
            parts.append(f"## {name}" if fmt == "github" else f"{name}:")
            parts.append(table)
        return "\n\n".join(parts) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-serializable data."""
        sites = []
        for i, s in enumerate(self.sites):
            d = dataclasses.asdict(s)
            d["family"] = _family(s.pattern)
            d["saved_bytes"] = self.site_saved_bytes(i)
            sites.append(d)
        _, counts = self.counts_rows()
        return _jsonable({
            "title": self.title,
            "graph": {"nodes": self.n_nodes, "compute_nodes": self.n_compute, "fused_ops": self.fused_ops},
            "params": self.params,
            "mparams": self.mparams,
            "flops": dict(self.flops),
            "gflops": self.gflops,
            "traffic": {k: v for k, v in self.traffic.items()},
            "counts": [dict(zip(["pattern", "family", "found", "matched", "rejected", "rewritten"], r))
                       for r in counts],
            "sites": sites,
        })

    def to_json(self, path: str | os.PathLike) -> str:
        """Write :meth:`to_dict` to ``path`` (directories created); returns the path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    def __str__(self) -> str:
        return self.to_text()


def build_report(gm: fx.GraphModule, sites: Sequence[Site], *, model: Any = None, title: str = "") -> Report:
    """Measure ``gm`` and summarize ``sites``.

    Args:
        gm: the graph the sites were found in (nodes carry ``meta["val"]``); for the traffic
            estimate pass the canonical graph before rewriting, or a rewritten graph whose
            ``fusediff::`` ops then count as fused (see :func:`fxpasses.costs.traffic`).
        sites: sites from the matcher, matched and rejected.
        model: the ``nn.Module``; when given, parameters are counted from it.
        title: row label of the cost table (model, resolution, batch).

    Returns:
        A :class:`Report`.
    """
    sites = list(sites)
    n_nodes = n_compute = 0
    fused_ops: dict[str, int] = {}
    for n in gm.graph.nodes:
        n_nodes += 1
        if is_compute(n):
            n_compute += 1
            name = target_name(n)
            if name.startswith("fusediff::"):
                fused_ops[name] = fused_ops.get(name, 0) + 1
    report = Report(
        title=title,
        sites=sites,
        params=graph_params(gm, model),
        flops=flops_by_class(gm),
        traffic=traffic(gm, sites),
        n_nodes=n_nodes,
        n_compute=n_compute,
        fused_ops=fused_ops,
    )
    matched = sum(s.matched for s in sites)
    log.info("report%s: %d sites (%d matched, %d rejected); %.3f Mparams, %.3f GFLOPs; "
             "DRAM estimate fused/unfused = %.1f%%", f" {title!r}" if title else "", len(sites), matched,
             len(sites) - matched, report.mparams, report.gflops, 100 * report.traffic["ratio"])
    for s in sites:
        if not s.matched:
            log.debug("report: %s at %r rejected: %s", s.pattern, s.module_path, s.reason)
    return report
