"""Verify mode: check every rewritten region against the original math on the first call.

``verify_graph(gm, inputs)`` interprets the rewritten graph once; at each ``fusediff::`` node it
also evaluates the op's pure-torch reference (the original ops' math, ``kernels.<family>.<op>_ref``)
on the very same inputs. A node whose output is outside tolerance (or non-finite where the
reference is finite) is switched to the reference in place — the region falls back to the
original computation — and the reason is logged and returned. Off by default; on in tests.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

log = logging.getLogger("fusediff.lowering")

# max |fused - reference| allowed, relative to max(1, |reference|max), per output dtype
VERIFY_TOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _refs() -> dict[Any, Callable]:
    from ..kernels import attention, geglu, groupnorm, winograd

    ops = torch.ops.fusediff
    return {
        ops.group_norm_silu.default: groupnorm.group_norm_silu_ref,
        ops.flash_attention.default: attention.flash_attention_ref,
        ops.geglu.default: geglu.geglu_ref,
        ops.gelu.default: geglu.gelu_ref,
        ops.linear_geglu.default: geglu.linear_geglu_ref,
        ops.winograd_conv2d.default: winograd.winograd_conv2d_ref,
    }


@dataclass
class VerifyFailure:
    node: str
    op: str
    module_path: str
    max_err: float
    bound: float
    reason: str


def _compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float, float, str]:
    tol = VERIFY_TOL.get(ref.dtype, 1e-3)
    ref32, out32 = ref.float(), out.float()
    finite = torch.isfinite(ref32)
    if not torch.equal(torch.isfinite(out32), finite):
        return False, float("inf"), tol, "non-finite values where the original is finite (or vice versa)"
    if not finite.any():
        return True, 0.0, tol, ""
    err = (out32 - ref32)[finite].abs().max().item()
    bound = tol * max(1.0, ref32[finite].abs().max().item())
    return err <= bound, err, bound, "" if err <= bound else f"max error {err:.3e} > {bound:.3e}"


def verify_graph(gm: fx.GraphModule, inputs: list[Any]) -> list[VerifyFailure]:
    """Run ``gm`` once on ``inputs``; swap failing fusediff nodes to their references (in place)."""
    refs = _refs()
    failures: list[VerifyFailure] = []

    class _Check(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            out = super().call_function(target, args, kwargs)
            ref_fn = refs.get(target)
            if ref_fn is not None and isinstance(out, torch.Tensor):
                ref = ref_fn(*args, **kwargs)
                ok, err, bound, why = _compare(out, ref)
                if not ok:
                    n = self.current_node
                    failures.append(VerifyFailure(n.name, str(target), n.meta.get("fusediff_module", ""), err, bound, why))
                    return ref  # downstream regions are checked on correct inputs
            return out

        def run_node(self, n):
            self.current_node = n
            return super().run_node(n)

    with torch.no_grad():
        _Check(gm).run(*inputs)
    if failures:
        by_name = {n.name: n for n in gm.graph.nodes}
        for f in failures:
            node = by_name[f.node]
            node.target = refs[node.target]  # fall back to the original math for this region
            log.warning("fusediff verify: %s at %s failed (%s); falling back to the original ops",
                        f.op, f.module_path or f.node, f.reason)
        gm.recompile()
    return failures
