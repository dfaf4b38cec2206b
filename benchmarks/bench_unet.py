"""End-to-end U-Net step: eager, inductor, inductor max-autotune, fusediff, fusediff MoDiff W8A8.

Same run, same inputs; reports median ms per U-Net evaluation, the ratio vs eager and vs inductor
max-autotune (same model and dtype), first-call (compile) time and peak memory. GPU only.

Providers (``--providers``):

* ``eager``, ``inductor``, ``inductor-max-autotune`` (``mode="max-autotune-no-cudagraphs"``);
* ``fusediff`` / ``fusediff-max-autotune``: ``backend=fusediff.backend(mode=...)``, the float rewrites
  plus inductor for the rest (the issue-4 target: fusediff bf16 >= 1.15x inductor max-autotune bf16);
* ``fusediff-modiff-w8a8`` / ``fusediff-baseline-w8a8``: ``backend=fusediff.backend(quant=...)``,
  MoDiff (paper eq. 6-7) or plain dynamic W8A8 (the issue-5 target: MoDiff W8A8 step >= 1.35x
  inductor bf16). Timed on the integer steps of a trajectory: the first call (the float first step,
  which also compiles) is the warm-up; caches in the model's dtype.

    python benchmarks/bench_unet.py --out docs/benchmarks [--models sd15 ldm8_church] [--dtypes bfloat16]
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import Row, bench_ms, require_cuda, write_results
from benchmarks.unets import MODELS

AUTOTUNE = "max-autotune-no-cudagraphs"
PROVIDERS = ("eager", "inductor", "inductor-max-autotune", "fusediff", "fusediff-max-autotune",
             "fusediff-modiff-w8a8", "fusediff-baseline-w8a8")


def _quant(mode: str, dtype: torch.dtype):
    import fusediff

    return fusediff.QuantConfig(mode=mode, w_bits=8, a_bits=8,
                                cache_dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32)


def make(provider: str, model: torch.nn.Module, dtype: torch.dtype, inner: str = "inductor") -> Callable:
    """The callable a provider times (``inner="eager"`` skips inductor: CPU smoke tests)."""
    import fusediff

    if provider == "eager":
        return model
    if provider == "inductor":
        return torch.compile(model)
    if provider == "inductor-max-autotune":
        return torch.compile(model, mode=AUTOTUNE)
    mode = AUTOTUNE if provider == "fusediff-max-autotune" else None
    quant = None
    if provider.startswith("fusediff-") and provider.endswith("-w8a8"):
        quant = _quant(provider.split("-")[1], dtype)
    elif provider not in ("fusediff", "fusediff-max-autotune"):
        raise ValueError(f"bench_unet: unknown provider {provider!r}; known: {PROVIDERS}")
    return torch.compile(model, backend=fusediff.backend(quant=quant, inner=inner, mode=mode))


def warm(provider: str, fn: Callable, model: torch.nn.Module, args: tuple, kwargs: dict) -> Callable[[], Any]:
    """First call (compiles; a quantized provider's float first step), then the step to time."""
    import fusediff

    if provider.endswith("-w8a8"):
        fusediff.reset(model)  # a fresh trajectory: call 1 seeds the caches, later calls are integer steps
    fn(*args, **kwargs)
    return lambda: fn(*args, **kwargs)


def run(out_dir: str, models=("sd15", "ldm8_church"), dtypes=(torch.bfloat16, torch.float16, torch.float32),
        providers=PROVIDERS) -> list[Row]:
    require_cuda()
    rows: list[Row] = []
    for name in models:
        for dtype in dtypes:
            model, args, kwargs = MODELS[name](dtype=dtype)
            times: dict[str, float] = {}
            for prov in providers:
                torch._dynamo.reset()
                try:
                    with torch.inference_mode():
                        t0 = time.perf_counter()
                        step = warm(prov, make(prov, model, dtype), model, args, kwargs)
                        torch.cuda.synchronize()
                        compile_s = time.perf_counter() - t0
                        torch.cuda.reset_peak_memory_stats()
                        ms, lo, hi = bench_ms(step)
                        peak = torch.cuda.max_memory_allocated() / 2**20
                except Exception as e:  # noqa: BLE001 - one failing provider must not hide the others
                    print(f"bench_unet {name} {dtype} {prov}: FAILED {type(e).__name__}: {e}")
                    continue
                times[prov] = ms
                rows.append(Row(name, str(tuple(args[0].shape)), str(dtype).replace("torch.", ""), prov, ms, lo, hi,
                                "x vs eager", times.get("eager", float("nan")) / ms, float("nan"),
                                extra={"compile_s": compile_s, "peak_MiB": peak}))
            for r in rows:  # same-run ratio against inductor max-autotune (same model and dtype)
                if r.op == name and r.dtype == str(dtype).replace("torch.", ""):
                    r.extra["x_vs_inductor_max_autotune"] = times.get("inductor-max-autotune", float("nan")) / r.ms
                    r.extra["x_vs_inductor"] = times.get("inductor", float("nan")) / r.ms
            del model
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    write_results(rows, out_dir, "bench_unet")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"],
                    choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    a = ap.parse_args()
    run(a.out, a.models, [getattr(torch, d) for d in a.dtypes], a.providers)
