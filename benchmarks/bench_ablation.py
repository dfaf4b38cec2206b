"""Ablation in the form of the GPU-aware-optimizations paper's Table 1: one U-Net step with each
optimization switched on in turn (partially fused softmax -> + GroupNorm/GELU fusion -> flash
attention instead of the partial softmax -> + Winograd), latency and peak memory per row.
Rows run the rewritten graph eagerly (``fusediff.optimize``) so each row isolates the kernels.

    python benchmarks/bench_ablation.py --out docs/benchmarks [--model sd15] [--dtype float16]
"""
from __future__ import annotations

import argparse

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import Row, bench_ms, require_cuda, write_results
from benchmarks.unets import MODELS

ROWS = [
    ("baseline (eager PyTorch)", None),
    ("+ partially fused softmax", dict(patterns=("attention",), attention_impl="partial_softmax", winograd="off")),
    ("+ GroupNorm/GELU fusion", dict(patterns=("attention", "groupnorm", "geglu", "gelu"), attention_impl="partial_softmax", winograd="off")),
    ("+ flash attention", dict(patterns=("attention", "groupnorm", "geglu", "gelu"), attention_impl="flash", winograd="off")),
    ("+ Winograd (where it pays)", dict(patterns=("attention", "groupnorm", "geglu", "gelu", "winograd"), attention_impl="flash", winograd="auto")),
]


def run(out_dir: str, model_name: str = "sd15", dtype=torch.float16) -> list[Row]:
    require_cuda()
    import fusediff

    model, args, kwargs = MODELS[model_name](dtype=dtype)
    rows: list[Row] = []
    base = None
    for label, cfg in ROWS:
        fn = model if cfg is None else fusediff.optimize(model, fusediff.RewriteConfig(**cfg))
        with torch.inference_mode():
            fn(*args, **kwargs)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms, lo, hi = bench_ms(lambda: fn(*args, **kwargs))
            peak = torch.cuda.max_memory_allocated() / 2**20
        base = base or ms
        rows.append(Row("unet_step", f"{model_name} {tuple(args[0].shape)}", str(dtype).replace("torch.", ""), label,
                        ms, lo, hi, "speedup", base / ms, float("nan"), extra={"peak_MiB": peak}))
    write_results(rows, out_dir, f"bench_ablation_{model_name}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--model", default="sd15", choices=list(MODELS))
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    a = ap.parse_args()
    run(a.out, a.model, getattr(torch, a.dtype))
