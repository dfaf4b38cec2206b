"""FLOP, byte and parameter counting on FX graphs, the fused-vs-unfused DRAM traffic model, and
the Winograd cost model.

Modules: :mod:`.meta` (tensor metadata, target names, argument access), :mod:`.flops` (FLOP
formulas and conventions), :mod:`.ops` (the :class:`OpCost` table, ``fusediff::`` ops included),
:mod:`.counts` (weights, parameters, per-node and per-graph FLOPs), :mod:`.dram` (bytes per node
and the traffic model), :mod:`.winograd` (whether Winograd F(4x4, 3x3) pays, its error report).
Everything public is importable from this package (``from fusediff.fxpasses import costs;
costs.traffic(gm, sites)``).

Works on every vocabulary a graph can arrive in: dynamo/canonical torch functions
(``F.conv2d``, ``torch.conv2d``, ``F.scaled_dot_product_attention``), ``call_method`` nodes
(``x.softmax(-1)``), ``torch.export`` aten overloads (``aten.conv2d.default``,
``aten.convolution.default``, ``aten.addmm.default``), ``call_module`` leaves from
``torch.fx.symbolic_trace`` (``nn.Conv2d``, ``nn.Linear``, ...) and the ``fusediff::`` custom ops.
Every target is reduced to a *name* (``"conv2d"``, ``"linear"``, ``"fusediff::geglu"``) and looked
up in one table of :class:`OpCost` entries; :func:`register_op_cost` adds entries for new ops.

Counting conventions (the papers' scaling tables, e.g. EDM2+ Tables 1-3, count the same way):

* FLOPs = 2 x multiply-accumulates for contractions; bias adds and the softmax inside an
  attention kernel are not counted.

  - conv: ``2 * N * Cout * Hout * Wout * (Cin / groups) * kh * kw`` (= ``2 * out.numel() *
    weight[0].numel()``); transposed conv: ``2 * in.numel() * weight[0].numel()``.
  - linear / addmm: ``2 * out.numel() * K``; matmul / bmm / baddbmm / mm: ``2 * out.numel() * K``.
  - einsum: contracted pairwise left to right, ``2 * prod(sizes of the indices involved)`` per pair.
  - scaled_dot_product_attention: ``2*B*H*Lq*Lk*D + 2*B*H*Lq*Lk*Dv`` (= ``4*B*H*Lq*Lk*D``).
* Norms and pointwise ops are counted per output element so the per-class breakdown shows them
  (they are small next to the contractions): GroupNorm/LayerNorm ``NORM_FLOPS_PER_ELEMENT`` (7:
  sum, sum of squares, subtract-and-scale, affine), softmax ``SOFTMAX_FLOPS_PER_ELEMENT`` (5: max,
  subtract, exp, sum, divide), other pointwise ops (add, mul, silu, gelu, ...) 1.
  Data movement (views, cat, interpolate, pad, copies) costs 0 FLOPs. Unknown ops cost 0 FLOPs.
* A ``fusediff::`` op costs the FLOPs of the ops it replaces (``group_norm_silu`` = group_norm +
  silu, ``linear_geglu`` = linear + geglu, ``winograd_conv2d`` = the direct 3x3 conv, ...).
* Bytes: a node reads each distinct tensor input once (weights included) and writes its outputs;
  views (reshape, permute, chunk, getitem, ...) read and write nothing. A ``node.meta`` entry
  ``"fusediff_flops"`` (int) overrides the FLOP model. Cache traffic (MoDiff's â/ô caches, the
  cache columns) comes from ``node.meta["fusediff_cache_bytes"] = (read, write)`` when set, else
  from the op schema: a tensor argument the op mutates (``Tensor(a!) o_hat``) is read and written
  once per call; a read-only ``*_hat`` argument (first step only) is not counted.

DRAM traffic model (:func:`traffic`, the MoDiff paper's Table 1 columns: weight, activation,
output, cache read, cache write): every compute node reads its inputs from DRAM and writes its
outputs to DRAM. In the *fused* estimate, inside a matched :class:`~fxpasses.sites.Site` an
intermediate produced and consumed by the site's own nodes is neither written nor read again
(a value that also leaves the site is still written). No cache reuse between nodes is modelled.
For a graph that already holds ``fusediff::`` ops the *unfused* column adds back what each fused
op keeps on chip (:func:`fused_away_bytes`: ``node.meta["fusediff_fused_away"] = (read, write)``
when the rewrite set it, else the op entry's ``fused_away``), so the comparison also works after
rewriting. Nodes without ``meta["val"]`` (e.g. inserted by a rewrite that did not set it) count
0 FLOPs and 0 bytes.
"""
from __future__ import annotations

from .counts import flops_by_class, graph_flops, graph_params, is_weight, node_class, node_flops
from .dram import TRAFFIC_COLUMNS, fused_away_bytes, node_bytes, node_cache_bytes, traffic
from .flops import (NORM_FLOPS_PER_ELEMENT, OP_CLASSES, POINTWISE_FLOPS_PER_ELEMENT, SOFTMAX_FLOPS_PER_ELEMENT,
                    einsum_flops, sdpa_flops)
from .meta import bound_args, dtype_of, node_module_path, output_bytes, shape_of, target_name, tensors_of, value
from .ops import OP_COSTS, OpCost, is_compute, is_view, op_cost, register_op_cost
from .winograd import winograd_error_report, winograd_pays

__all__ = [
    "NORM_FLOPS_PER_ELEMENT", "OP_CLASSES", "OP_COSTS", "POINTWISE_FLOPS_PER_ELEMENT", "SOFTMAX_FLOPS_PER_ELEMENT",
    "TRAFFIC_COLUMNS", "OpCost",
    "bound_args", "dtype_of", "einsum_flops", "flops_by_class", "fused_away_bytes", "graph_flops", "graph_params",
    "is_compute", "is_view", "is_weight", "node_bytes", "node_cache_bytes", "node_class", "node_flops",
    "node_module_path", "op_cost", "output_bytes", "register_op_cost", "sdpa_flops", "shape_of", "target_name",
    "tensors_of", "traffic", "value", "winograd_error_report", "winograd_pays",
]
