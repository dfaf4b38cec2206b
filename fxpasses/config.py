"""Typed, frozen configuration for the rewrite passes."""
from __future__ import annotations

from dataclasses import dataclass, field

_PATTERNS = ("groupnorm", "attention", "geglu", "gelu", "winograd")


@dataclass(frozen=True)
class RewriteConfig:
    """Which patterns the passes look for and which they rewrite.

    Args:
        patterns: pattern families to rewrite, any of
            ``("groupnorm", "attention", "geglu", "gelu", "winograd")``.
            Families left out are still *found* and reported, never rewritten.
        fuse_silu: fold a SiLU that follows a GroupNorm into the fused kernel.
        fuse_film: fold the scale-shift (FiLM) ``x * (1 + scale) + shift`` into the kernel.
        absorb_upcast: read a GroupNorm32-style ``x.float()`` input directly (the kernel keeps
            fp32 statistics and writes the original dtype).
        geglu_fuse_linear: rewrite ``linear -> chunk -> x*gelu(g)`` into one ``linear_geglu``
            matmul (the 2F projection is never written); off by default because cuBLAS + the
            standalone GEGLU kernel is usually faster for small token counts.
        attention_impl: ``"flash"`` (FlashAttention-style kernel; sites it cannot take fall back to
            the partially fused softmax) or ``"partial_softmax"`` (paper §3.2.1, the ablation row).
        winograd: ``"auto"`` (3x3 convs where fxpasses.costs.winograd.winograd_pays says it pays; never
            on CPU), ``"off"``, or ``"force"`` (every eligible 3x3 conv: tests, ablations).
        dtypes: input dtypes a site may have to be rewritten.
        exclude: module-path prefixes never rewritten (e.g. ``("conv_in", "time_embedding")``).
    """

    patterns: tuple[str, ...] = _PATTERNS
    fuse_silu: bool = True
    fuse_film: bool = True
    absorb_upcast: bool = True
    geglu_fuse_linear: bool = False
    attention_impl: str = "flash"
    winograd: str = "auto"
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        bad = [p for p in self.patterns if p not in _PATTERNS]
        if bad:
            raise ValueError(f"RewriteConfig.patterns: unknown {bad}; allowed values are {list(_PATTERNS)}")
        if self.attention_impl not in ("flash", "partial_softmax"):
            raise ValueError(f"RewriteConfig.attention_impl: {self.attention_impl!r}; allowed values are "
                             "['flash', 'partial_softmax']")
        if self.winograd not in ("auto", "off", "force"):
            raise ValueError(f"RewriteConfig.winograd: {self.winograd!r}; allowed values are ['auto', 'off', 'force']")
        okd = ("float32", "float16", "bfloat16")
        badd = [d for d in self.dtypes if d not in okd]
        if badd:
            raise ValueError(f"RewriteConfig.dtypes: unknown {badd}; allowed values are {list(okd)}")
        if not isinstance(self.exclude, tuple):
            raise TypeError("RewriteConfig.exclude must be a tuple of module-path prefixes")

    def allows_dtype(self, dtype) -> bool:
        return str(dtype).replace("torch.", "") in self.dtypes

    def excluded(self, module_path: str) -> bool:
        return any(module_path == p or module_path.startswith(p + ".") for p in self.exclude)

    def rejects(self, pattern: str, dtype, module_path: str) -> str | None:
        """The one gate every pattern family applies: the config's reason not to rewrite a site, or None.

        Same checks, same order, same words for every family: pattern disabled, dtype not enabled,
        module excluded. (Structural and kernel constraints are each family's own, checked after.)

        Args:
            pattern: the config pattern key of the site (``"groupnorm"``, ``"attention"``, ``"geglu"``,
                ``"gelu"``, ``"winograd"``).
            dtype: the site's input dtype.
            module_path: the site's owning module.
        """
        if pattern not in self.patterns:
            return f"pattern {pattern!r} disabled in config"
        if not self.allows_dtype(dtype):
            return f"dtype {dtype} not enabled in config"
        if self.excluded(module_path):
            return f"module {module_path!r} excluded by config"
        return None
