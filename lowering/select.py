"""Kernel selection: per site and shape, fused kernel or the original ops.

* On CUDA (policy ``"time"``): both are timed once on random inputs of the site's shape and dtype
  (``triton.testing.do_bench``); the result is cached on disk, keyed by device name, torch and
  triton versions, op and shape (``$FUSEDIFF_CACHE_DIR`` or ``~/.cache/fusediff/selection.json``).
  A fused kernel that loses is not used; the site is reported with both timings.
* Off CUDA, by policy: the fused op is kept (on CPU it runs the reference math or, under
  ``TRITON_INTERPRET=1``, the interpreted kernel — no speed claim is made there).
* ``"always"`` keeps every matched site, ``"never"`` rewrites nothing (report only).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable

import torch
import torch.nn.functional as F

from ..fxpasses.sites import Site

log = logging.getLogger("fusediff.lowering")

POLICIES = ("auto", "time", "always", "never")


def cache_path() -> str:
    d = os.environ.get("FUSEDIFF_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusediff")
    return os.path.join(d, "selection.json")


def _device_key(device: torch.device) -> str:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|torch {torch.__version__}|triton {triton.__version__}"


def _candidates(site: Site, device: torch.device) -> tuple[Callable, Callable] | None:
    """(original, fused) callables on random inputs of the site's shape, or None if not timeable."""
    dt = getattr(torch, site.dtype.replace("torch.", ""), None) if site.dtype else None
    if dt is None:
        return None
    ops = torch.ops.fusediff
    if site.pattern in ("groupnorm", "groupnorm_silu"):
        x = torch.randn(site.shapes["x"], device=device, dtype=dt)
        C, G = x.shape[1], site.attrs.get("num_groups", 32)
        w, b = torch.ones(C, device=device, dtype=dt), torch.zeros(C, device=device, dtype=dt)
        silu = site.attrs.get("silu", False)

        def orig():
            y = F.group_norm(x, G, w, b, 1e-5)
            return F.silu(y) if silu else y

        return orig, lambda: ops.group_norm_silu(x, w, b, None, None, G, 1e-5, silu)
    if site.pattern == "attention":
        qs, ks = site.shapes["q"], site.shapes["k"]
        q4 = (1,) * (4 - len(qs)) + tuple(qs)
        k4 = (1,) * (4 - len(ks)) + tuple(ks)
        q = torch.randn(q4, device=device, dtype=dt)
        k = torch.randn(k4, device=device, dtype=dt)
        v = torch.randn(k4, device=device, dtype=dt)
        if site.attrs.get("form") == "sdpa":
            def orig():
                return F.scaled_dot_product_attention(q, k, v)
        else:
            def orig():
                return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return orig, lambda: ops.flash_attention(q, k, v, None, None)
    if site.pattern == "geglu":
        x = torch.randn(site.shapes["x"], device=device, dtype=dt)

        def orig():
            h, g = x.chunk(2, dim=-1)
            return h * F.gelu(g)

        return orig, lambda: ops.geglu(x, "none")
    if site.pattern == "gelu":
        x = torch.randn(site.shapes["x"], device=device, dtype=dt)
        return (lambda: F.gelu(x)), (lambda: ops.gelu(x, "none"))
    return None


def _bench(fn: Callable) -> float:
    """Median milliseconds of ``fn`` (CUDA)."""
    import triton.testing

    r = triton.testing.do_bench(fn, quantiles=[0.5])
    return float(r[0] if isinstance(r, (list, tuple)) else r)


class Selector:
    """Decides per site; remembers timings in a JSON cache file."""

    def __init__(self, policy: str = "auto", device: torch.device | str | None = None,
                 timer: Callable[[Callable], float] | None = None, path: str | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"selection policy {policy!r}; allowed values are {list(POLICIES)}")
        self.policy = policy
        self.device = torch.device(device) if device is not None else None
        self.timer = timer or _bench
        self.path = path or cache_path()
        self._cache: dict[str, list[float]] | None = None

    def _load(self) -> dict[str, list[float]]:
        if self._cache is None:
            try:
                with open(self.path) as f:
                    self._cache = json.load(f)
            except (OSError, ValueError):
                self._cache = {}
        return self._cache

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self._cache, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def decide(self, site: Site, device: torch.device) -> tuple[bool, str]:
        """(keep fused, reason) for one matched site."""
        if self.policy == "never":
            return False, "selection policy 'never'"
        if self.policy == "always":
            return True, ""
        if self.policy == "auto" and device.type != "cuda":
            return True, ""
        made = _candidates(site, device)
        if made is None:
            return True, "selection: not timeable, fused kernel kept"
        key = f"{_device_key(device)}|{site.pattern}|{site.attrs.get('form', '')}|{sorted(site.shapes.items())}|{site.dtype}"
        cache = self._load()
        if key not in cache:
            orig, fused = made
            cache[key] = [self.timer(orig), self.timer(fused)]
            self._save()
        t_orig, t_fused = cache[key]
        if t_fused <= t_orig:
            return True, f"selection: fused {t_fused:.4f} ms <= original {t_orig:.4f} ms"
        return False, f"selection: fused {t_fused:.4f} ms > original {t_orig:.4f} ms: original kept"

    def apply(self, sites: list[Site], device: torch.device) -> list[Site]:
        """Unmatch the sites the fused kernel loses on; returns the sites that were dropped."""
        dropped = []
        for s in sites:
            if not s.matched or s.pattern == "winograd":
                continue
            keep, why = self.decide(s, device)
            if why:
                s.reason = (s.reason + "; " if s.reason else "") + why
            if not keep:
                s.matched = False
                dropped.append(s)
                log.info("fusediff selection: %s at %s not rewritten: %s", s.pattern, s.module_path, why)
        return dropped
