"""Benchmark fusediff::flash_attention against eager math, inductor and SDPA.

Shapes: ``benchmarks.shapes.ATTENTION`` (SD-1.5 at 512^2: self-attention over 4096/1024/256/64
tokens and cross-attention over the 77-token text context, head dims 40/80/160; LDM-8 church at
256^2, head dim 32) at batch 1/2/8/32. Metric: TFLOP/s with flops = 4*B*H*Lq*Lk*D (the two
GEMMs; softmax not counted) and % of the measured dense-matmul TFLOP/s in the same dtype.

Providers:
  eager     softmax(q k^T * scale) v as three torch ops (materializes the (Lq, Lk) scores)
  inductor  the eager function through torch.compile(mode="max-autotune-no-cudagraphs")
  sdpa      F.scaled_dot_product_attention (torch picks flash / mem-efficient / cuDNN)
  fusediff  torch.ops.fusediff.flash_attention

Batch 32 of the 4096-token shapes needs ~17 GB for eager's fp16 scores and probabilities; a
provider that runs out of memory gets a row with NaN timings and ``extra["error"]``.

Usage (CUDA machine): ``python benchmarks/bench_attention.py --out docs/benchmarks``
(``--dtype bfloat16``, ``--batches 1 2``, ``--providers sdpa fusediff``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, shapes  # noqa: E402

OP = "flash_attention"
PROVIDERS = ("eager", "inductor", "sdpa", "fusediff")


def _eager(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1) @ v


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _fusediff(q, k, v):
    return torch.ops.fusediff.flash_attention(q, k, v, None, None)


def attention_flops(batch: int, heads: int, lq: int, lk: int, d: int) -> float:
    """4*B*H*Lq*Lk*D: q k^T and p v, one multiply-add = 2 flops each."""
    return 4.0 * batch * heads * lq * lk * d


def _nan_row(shape: str, dtype: str, provider: str, err: str) -> common.Row:
    nan = float("nan")
    return common.Row(op=OP, shape=shape, dtype=dtype, provider=provider, ms=nan, ms_p20=nan, ms_p80=nan,
                      metric="TFLOP/s", extra={"error": err})


def run(out_dir: str, dtype: str = "float16", batches: Sequence[int] = shapes.BATCHES,
        providers: Sequence[str] = PROVIDERS, name: Optional[str] = None) -> list[common.Row]:
    """Time every ATTENTION shape x batch x provider; write ``<name>.csv``/``.md`` under ``out_dir``.

    Args:
        out_dir: results folder (e.g. ``docs/benchmarks``).
        dtype: ``float16``, ``bfloat16`` or ``float32``.
        batches, providers: subsets to run.
        name: results file stem; defaults to ``bench_attention_<dtype>``.

    Returns:
        The rows written.
    """
    common.require_cuda()
    import fusediff.kernels.attention as attn  # registers fusediff::flash_attention

    torch_dtype = getattr(torch, dtype)
    peak = common.measured_matmul_tflops(torch_dtype)
    rows: list[common.Row] = []
    for shape_name, heads, lq, lk, d in shapes.ATTENTION:
        for batch in batches:
            tag = f"{shape_name}_b{batch}"
            q = torch.randn(batch, heads, lq, d, device="cuda", dtype=torch_dtype)
            k = torch.randn(batch, heads, lk, d, device="cuda", dtype=torch_dtype)
            v = torch.randn(batch, heads, lk, d, device="cuda", dtype=torch_dtype)
            flops = attention_flops(batch, heads, lq, lk, d)
            with torch.inference_mode():
                # Sanity check before timing (reference only where its fp32 scores fit easily).
                err = float("nan")
                if batch * heads * lq * lk <= (1 << 28):
                    ref = attn.flash_attention_ref(q, k, v)
                    err = (_fusediff(q, k, v).float() - ref.float()).abs().max().item()
                    del ref
                for provider in providers:
                    if provider == "eager":
                        fn = _eager
                    elif provider == "inductor":
                        torch._dynamo.reset()  # fresh compile per shape: no recompile limit, static dims
                        fn = common.compile_inductor(_eager)
                    elif provider == "sdpa":
                        fn = _sdpa
                    elif provider == "fusediff":
                        fn = _fusediff
                    else:
                        raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
                    try:
                        ms, p20, p80 = common.bench_ms(lambda: fn(q, k, v))
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        rows.append(_nan_row(tag, dtype, provider, "out of memory"))
                        continue
                    tflops = flops / (ms * 1e-3) / 1e12
                    rows.append(common.Row(
                        op=OP, shape=tag, dtype=dtype, provider=provider, ms=ms, ms_p20=p20, ms_p80=p80,
                        metric="TFLOP/s", value=tflops, pct_roofline=100.0 * tflops / peak,
                        extra={"max_err_vs_ref": err, "B": batch, "H": heads, "Lq": lq, "Lk": lk, "D": d},
                    ))
            del q, k, v
            torch.cuda.empty_cache()
    common.write_results(rows, out_dir, name or f"bench_attention_{dtype}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks", help="results folder")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--batches", type=int, nargs="+", default=list(shapes.BATCHES))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    a = ap.parse_args(argv)
    rows = run(a.out, a.dtype, a.batches, a.providers)
    for r in rows:
        print(f"{r.shape:32s} {r.provider:9s} {r.ms:9.4f} ms {r.value:8.1f} TFLOP/s {r.pct_roofline:5.1f}%")


if __name__ == "__main__":
    main()
