"""GEGLU benchmarks: fusediff::geglu (memory bound) and fusediff::linear_geglu (matmul + epilogue).

Shapes: ``benchmarks.shapes.GEGLU`` (SD-1.5 transformer feed-forwards at 512^2: tokens x inner dim)
at batch 1/2/8/32; the projection input dim is inner // 4 (diffusers ``FeedForward(mult=4)``).

* ``geglu``: x (B, T, 2F) -> (B, T, F). Providers: ``eager`` (chunk + F.gelu + mul, as diffusers),
  ``inductor`` (the same function compiled, max-autotune-no-cudagraphs), ``fusediff``. Metric:
  GB/s over the minimum traffic (read 2F + write F per row) and % of the measured copy bandwidth.
* ``linear_geglu``: x (B, T, K), W (2F, K), b (2F,) -> (B, T, F). Providers: ``eager`` (F.linear +
  GEGLU), ``inductor``, ``linear+fusediff_geglu`` (cuBLAS projection, then fusediff::geglu: the
  unfused rewrite), ``fusediff`` (fusediff::linear_geglu). Metric: TFLOP/s (2 * M * K * 2F) and % of
  the measured dense matmul TFLOP/s for the dtype.

Usage (CUDA machine): ``python benchmarks/bench_geglu.py --out docs/benchmarks``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import shapes  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Row,
    bench_ms,
    compile_inductor,
    measured_bandwidth_gbs,
    measured_matmul_tflops,
    require_cuda,
    write_results,
)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _eager_geglu(x: torch.Tensor) -> torch.Tensor:
    h, g = x.chunk(2, dim=-1)
    return h * F.gelu(g)


def _eager_linear_geglu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _eager_geglu(F.linear(x, w, b))


def _fresh_inductor(fn):
    # Reset dynamo so each shape compiles static (no automatic-dynamic kernel after the 2nd shape).
    torch._dynamo.reset()
    return compile_inductor(fn)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def bench_geglu(dtype: torch.dtype, batches=shapes.BATCHES) -> list[Row]:
    import fusediff.kernels.geglu  # noqa: F401  (registers fusediff::geglu)

    peak = measured_bandwidth_gbs()
    rows: list[Row] = []
    for name, tokens, inner in shapes.GEGLU:
        for batch in batches:
            x = torch.randn(batch, tokens, 2 * inner, device="cuda", dtype=dtype)
            nbytes = 3 * batch * tokens * inner * x.element_size()
            compiled = _fresh_inductor(_eager_geglu)
            providers = {
                "eager": lambda: _eager_geglu(x),
                "inductor": lambda: compiled(x),
                "fusediff": lambda: torch.ops.fusediff.geglu(x, "none"),
            }
            ref = providers["eager"]()
            shape = f"{name} b{batch} ({batch}, {tokens}, {2 * inner})"
            for provider, fn in providers.items():
                err = _max_err(fn(), ref)  # also warms up / autotunes / compiles
                ms, p20, p80 = bench_ms(fn)
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(
                    Row("geglu", shape, str(dtype).replace("torch.", ""), provider, ms, p20, p80, "GB/s", gbs,
                        100.0 * gbs / peak, {"batch": batch, "max_err_vs_eager": err})
                )  # fmt: skip
            del x, ref
    return rows


def bench_linear_geglu(dtype: torch.dtype, batches=shapes.BATCHES) -> list[Row]:
    import fusediff.kernels.geglu  # noqa: F401  (registers fusediff::linear_geglu)

    peak = measured_matmul_tflops(dtype)
    rows: list[Row] = []
    for name, tokens, inner in shapes.GEGLU:
        dim = inner // 4
        w = (torch.randn(2 * inner, dim, device="cuda") / dim**0.5).to(dtype)
        b = torch.randn(2 * inner, device="cuda", dtype=dtype)
        for batch in batches:
            x = torch.randn(batch, tokens, dim, device="cuda", dtype=dtype)
            flops = 2.0 * batch * tokens * dim * 2 * inner
            compiled = _fresh_inductor(_eager_linear_geglu)
            providers = {
                "eager": lambda: _eager_linear_geglu(x, w, b),
                "inductor": lambda: compiled(x, w, b),
                "linear+fusediff_geglu": lambda: torch.ops.fusediff.geglu(F.linear(x, w, b), "none"),
                "fusediff": lambda: torch.ops.fusediff.linear_geglu(x, w, b, "none"),
            }
            ref = providers["eager"]()
            shape = f"{name} b{batch} M={batch * tokens} K={dim} 2F={2 * inner}"
            for provider, fn in providers.items():
                err = _max_err(fn(), ref)
                ms, p20, p80 = bench_ms(fn)
                tflops = flops / (ms * 1e-3) / 1e12
                rows.append(
                    Row("linear_geglu", shape, str(dtype).replace("torch.", ""), provider, ms, p20, p80, "TFLOP/s",
                        tflops, 100.0 * tflops / peak, {"batch": batch, "max_err_vs_eager": err})
                )  # fmt: skip
            del x, ref
    return rows


def run(out_dir: str, dtypes=("float16",), ops=("geglu", "linear_geglu"), batches=shapes.BATCHES) -> list[Row]:
    """Run the GEGLU benchmarks and write ``geglu.csv`` / ``geglu.md`` under ``out_dir``."""
    require_cuda()
    rows: list[Row] = []
    with torch.inference_mode():
        for name in dtypes:
            dtype = _DTYPES[name]
            if "geglu" in ops:
                rows += bench_geglu(dtype, batches)
            if "linear_geglu" in ops:
                rows += bench_linear_geglu(dtype, batches)
    write_results(rows, out_dir, "geglu")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/benchmarks", help="directory for geglu.csv / geglu.md")
    p.add_argument("--dtypes", nargs="+", default=["float16"], choices=sorted(_DTYPES))
    p.add_argument("--ops", nargs="+", default=["geglu", "linear_geglu"], choices=["geglu", "linear_geglu"])
    p.add_argument("--batches", nargs="+", type=int, default=list(shapes.BATCHES))
    args = p.parse_args(argv)
    rows = run(args.out, tuple(args.dtypes), tuple(args.ops), tuple(args.batches))
    for r in rows:
        print(f"{r.op:13s} {r.shape:45s} {r.dtype:9s} {r.provider:22s} {r.ms:8.4f} ms "
              f"{r.value:9.2f} {r.metric:7s} {r.pct_roofline:5.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
