"""End-to-end U-Net step: eager fp32, eager fp16/bf16, inductor, inductor max-autotune, fusediff.

Same run, same inputs; reports median ms per U-Net evaluation, ratios vs eager and vs inductor
max-autotune, and compile times. GPU only.

    python benchmarks/bench_unet.py --out docs/benchmarks [--models sd15 ldm8_church]
"""
from __future__ import annotations

import argparse
import time

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import Row, bench_ms, require_cuda, write_results
from benchmarks.unets import MODELS


def _providers(dtype):
    import fusediff

    return {
        "eager": lambda m: m,
        "inductor": lambda m: torch.compile(m),
        "inductor-max-autotune": lambda m: torch.compile(m, mode="max-autotune-no-cudagraphs"),
        "fusediff": lambda m: torch.compile(m, backend="fusediff"),
    }


def run(out_dir: str, models=("sd15", "ldm8_church"), dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> list[Row]:
    require_cuda()
    rows: list[Row] = []
    for name in models:
        for dtype in dtypes:
            model, args, kwargs = MODELS[name](dtype=dtype)
            base = None
            for prov, make in _providers(dtype).items():
                torch._dynamo.reset()
                fn = make(model)
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    fn(*args, **kwargs)
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - t0
                    torch.cuda.reset_peak_memory_stats()
                    ms, lo, hi = bench_ms(lambda: fn(*args, **kwargs))
                    peak = torch.cuda.max_memory_allocated() / 2**20
                base = base or ms
                rows.append(Row(name, str(tuple(args[0].shape)), str(dtype).replace("torch.", ""), prov, ms, lo, hi,
                                "x vs eager", base / ms, float("nan"),
                                extra={"compile_s": compile_s, "peak_MiB": peak}))
            del model
            torch.cuda.empty_cache()
    write_results(rows, out_dir, "bench_unet")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    a = ap.parse_args()
    run(a.out, a.models)
