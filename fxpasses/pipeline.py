"""The one pass pipeline: canonicalize -> find -> select -> rewrite -> post-passes -> verify.

Every entry point runs :class:`Pipeline` and chooses its steps explicitly:

=========================  =======================  =========  ==========================  ========
entry point                select                   rewrite    post-passes                 verify
=========================  =======================  =========  ==========================  ========
``backend`` (torch.compile) timing (lowering.select) yes        GroupNorm -> quantizer      optional
``optimize``                timing (lowering.select) yes        GroupNorm -> quantizer      optional
ONNX export                 none (no timing)         yes        GroupNorm -> quantizer      no
``inspect``                 none                     optional   none                        no
=========================  =======================  =========  ==========================  ========

``inspect`` runs :meth:`Pipeline.find`, builds its report on the canonical graph with the sites
marked, then :meth:`Pipeline.rewrite`; the others call :meth:`Pipeline.run`. The steps that live in
``lowering`` (timing selection, verify) are handed in as callables, so imports still flow
lowering -> fxpasses -> kernels.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.fx as fx

from .canonicalize import CanonStats, canonicalize
from .config import RewriteConfig
from .match import find_sites, rewrite_sites
from .sites import Site

log = logging.getLogger("fusediff.fxpasses")


class Failure(Protocol):
    """What a verify step reports per region it sent back to the original ops."""

    module_path: str
    reason: str


#: select(sites, device): unmatch the sites whose fused kernel should not be used (with a reason).
Select = Callable[[list[Site], torch.device], Any]
#: a graph pass run after the rewrite (e.g. GroupNorm -> MoDiff quantizer fusion).
PostPass = Callable[[fx.GraphModule], Any]
#: verify(gm): check the rewritten regions, fall back where they fail; returns the failures.
Verify = Callable[[fx.GraphModule], Sequence[Failure]]


@dataclass
class PassResult:
    """What the pipeline found and did to one graph."""

    sites: list[Site] = field(default_factory=list)
    canon: CanonStats | None = None
    failures: list = field(default_factory=list)

    def counts(self, *, matched_only: bool = False) -> dict[str, int]:
        c: collections.Counter[str] = collections.Counter()
        for s in self.sites:
            if matched_only and not s.matched:
                continue
            c[s.pattern] += 1
        return dict(c)

    @property
    def rewritten(self) -> dict[str, int]:
        return dict(collections.Counter(s.pattern for s in self.sites if s.rewritten))


@dataclass(frozen=True)
class Pipeline:
    """The steps one entry point runs (see the module docstring for who runs which).

    Args:
        config: which patterns to find and rewrite.
        select: the selection step (``None``: every matched site is rewritten).
        post_passes: graph passes after the rewrite, in order.
        verify: the verify step (``None``: no check).
    """

    config: RewriteConfig = field(default_factory=RewriteConfig)
    select: Select | None = None
    post_passes: tuple[PostPass, ...] = ()
    verify: Verify | None = None

    def find(self, gm: fx.GraphModule, device: torch.device | None = None) -> PassResult:
        """canonicalize -> find -> select (when a device is given): the graph is annotated, not changed."""
        res = PassResult(canon=canonicalize(gm))
        res.sites = find_sites(gm, self.config)
        if self.select is not None and device is not None:
            self.select(res.sites, device)
        return res

    def rewrite(self, gm: fx.GraphModule, res: PassResult) -> PassResult:
        """rewrite -> post-passes -> verify on the sites :meth:`find` returned for ``gm``."""
        rewrite_sites(gm, res.sites)
        for p in self.post_passes:
            p(gm)
        if self.verify is not None:
            res.failures = list(self.verify(gm))
            for f in res.failures:
                for s in res.sites:
                    if s.rewritten and s.module_path == f.module_path:
                        s.reason = (s.reason + "; " if s.reason else "") + \
                            f"verify failed ({f.reason}): original ops used"
                        s.attrs["verify_failed"] = True
        return finish(res)

    def run(self, gm: fx.GraphModule, *, device: torch.device | None = None, rewrite: bool = True) -> PassResult:
        """The whole pipeline on ``gm`` (in place); ``rewrite=False`` stops after select."""
        res = self.find(gm, device)
        return self.rewrite(gm, res) if rewrite else finish(res)


def finish(res: PassResult) -> PassResult:
    """Drop the rewrite plans (graph references) from the sites and log the outcome."""
    for s in res.sites:
        s.plan = None
        if not s.matched:
            log.info("site %s at %s not rewritten: %s", s.pattern, s.module_path or s.anchor, s.reason)
    log.info("fusediff passes: found %s, rewritten %s", res.counts(), res.rewritten)
    return res


def run_passes(gm: fx.GraphModule, cfg: RewriteConfig | None = None, *, rewrite: bool = True) -> PassResult:
    """``Pipeline(cfg).run(gm, rewrite=rewrite)``: find and rewrite, no selection, post-passes or verify."""
    return Pipeline(cfg or RewriteConfig()).run(gm, rewrite=rewrite)
