"""What the matcher finds: one :class:`Site` per pattern occurrence (matched or rejected).

Sites are plain data so reports, visualization, the lowering layer and tests share one view of
what was found, where (module path from ``nn_module_stack``), on which shapes/dtypes, and why a
candidate was not rewritten. The one exception is :attr:`Site.plan`: the graph nodes a pattern's
``find`` hands its ``rewrite`` (a typed :class:`Plan` per family), set by ``find`` and cleared by
the pipeline once the graph is rewritten (never compared, printed or serialized).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Pattern families and the names of the patterns within them.
FAMILY_NORM = "groupnorm"  # GroupNorm -> [FiLM] -> [SiLU] -> [dropout] -> [resample] -> Conv/Linear
FAMILY_ATTENTION = "attention"  # SDPA / matmul+softmax+matmul / baddbmm / einsum / legacy qkv / cosine
FAMILY_GELU = "gelu"  # GELU (erf/tanh) and GEGLU
FAMILY_CONV = "conv"  # 3x3 conv -> Winograd F(4x4, 3x3) where it pays

PATTERNS: dict[str, str] = {
    "groupnorm_silu": FAMILY_NORM,  # GroupNorm -> SiLU (-> conv/linear context)
    "groupnorm": FAMILY_NORM,  # GroupNorm without SiLU (e.g. before attention proj_in / qkv)
    "attention": FAMILY_ATTENTION,
    "geglu": FAMILY_GELU,
    "gelu": FAMILY_GELU,
    "winograd": FAMILY_CONV,
}


class Plan:
    """Base of the per-family rewrite plans (``GroupNormPlan``, ``SdpaPlan``, ... in ``patterns/``):
    the graph nodes and constants a pattern's ``rewrite`` needs, found by its ``find``."""

    __slots__ = ()


@dataclass
class Site:
    """One candidate occurrence of a pattern in a canonical graph.

    Attributes:
        pattern: key of :data:`PATTERNS` (e.g. ``"groupnorm_silu"``).
        nodes: names of the FX nodes the pattern covers, in topological order.
        anchor: name of the node that defines the site (the GroupNorm, the softmax/SDPA, ...).
        module_path: dotted path of the owning module (from ``nn_module_stack``), or ``""``.
        matched: True when the site satisfies the kernel's constraints and may be rewritten.
        reason: why it was not matched (``matched=False``) or notes (e.g. "consumer: conv3x3").
        shapes: input/output shapes by role, e.g. ``{"x": (2, 64, 16, 16)}``.
        dtype: the input dtype as a string (``"torch.float32"``).
        attrs: pattern-specific facts: ``silu``, ``film``, ``upcast``, ``consumer``, ``form``
            (sdpa/matmul/bmm/einsum/baddbmm/qkv_legacy/cosine), ``kind`` (self/cross),
            ``heads``, ``head_dim``, ``approximate`` ...
        rewritten: set by the rewrite pass once the graph was changed.
        plan: the family's :class:`Plan` from ``find`` to ``rewrite`` (graph nodes; cleared after).
    """

    pattern: str
    nodes: list[str]
    anchor: str
    module_path: str = ""
    matched: bool = True
    reason: str = ""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtype: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    rewritten: bool = False
    plan: Plan | None = field(default=None, repr=False, compare=False)

    @property
    def family(self) -> str:
        return PATTERNS[self.pattern]
