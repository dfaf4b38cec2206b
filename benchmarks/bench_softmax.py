"""Benchmark the partially fused softmax (paper §3.2.1) against eager and inductor.

Shapes: ``benchmarks.shapes.ATTENTION`` at batch 1/2/8/32, two measurements per shape:

* ``softmax_matmul`` -- the stage the paper fuses, given the scores ``s`` (B*H, Lq, Lk) and ``v``:
  eager ``torch.softmax(s, -1) @ v``; inductor (the same function compiled,
  max-autotune-no-cudagraphs); fusediff ``softmax_stats`` + ``softmax_matmul``. Memory-bound, so
  GB/s with bytes = read s + read v + write out (the minimum traffic; fusediff reads s twice, once
  per kernel) and % of the measured copy bandwidth.
* ``partial_softmax_attention`` -- the whole attention, q/k/v in: eager
  ``softmax(q k^T * scale) v``; inductor of that; fusediff ``partial_softmax_attention``.
  TFLOP/s with flops = 4*B*H*Lq*Lk*D and % of the measured matmul TFLOP/s.

``extra["peak_mb"]`` records the peak extra memory of one call (the paper's "Tensor" column:
fusediff never materializes the probability matrix).

Usage (CUDA machine): ``python benchmarks/bench_softmax.py --out docs/benchmarks``
(``--dtype bfloat16``, ``--batches 1 2``, ``--stages softmax_matmul``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, shapes  # noqa: E402

STAGES = ("softmax_matmul", "partial_softmax_attention")


def _eager_stage(s, v):
    return torch.softmax(s, dim=-1) @ v


def _fusediff_stage(s, v):
    stats = torch.ops.fusediff.softmax_stats(s.reshape(-1, s.shape[-1]))
    return torch.ops.fusediff.softmax_matmul(s, stats, v)


def _eager_attention(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1) @ v


def _peak_mb(fn: Callable[[], object]) -> float:
    """Peak memory allocated during one call beyond what was live before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _provider_fn(stage: str, provider: str) -> Callable:
    from fusediff.kernels.softmax import partial_softmax_attention

    eager = _eager_stage if stage == "softmax_matmul" else _eager_attention
    if provider == "eager":
        return eager
    if provider == "inductor":
        torch._dynamo.reset()  # fresh compile per shape: no recompile limit, static dims
        return common.compile_inductor(eager)
    if provider == "fusediff":
        return _fusediff_stage if stage == "softmax_matmul" else partial_softmax_attention
    raise ValueError(f"unknown provider {provider!r}; choose from eager, inductor, fusediff")


def run(out_dir: str, dtype: str = "float16", batches: Sequence[int] = shapes.BATCHES,
        providers: Sequence[str] = common.PROVIDERS_DEFAULT, stages: Sequence[str] = STAGES,
        name: Optional[str] = None) -> list[common.Row]:
    """Time every ATTENTION shape x batch x stage x provider; write ``<name>.csv``/``.md``.

    Args:
        out_dir: results folder (e.g. ``docs/benchmarks``).
        dtype: ``float16``, ``bfloat16`` or ``float32``.
        batches, providers, stages: subsets to run.
        name: results file stem; defaults to ``bench_softmax_<dtype>``.

    Returns:
        The rows written.
    """
    common.require_cuda()
    import fusediff.kernels.softmax  # noqa: F401  registers fusediff::softmax_stats / softmax_matmul

    torch_dtype = getattr(torch, dtype)
    peak_bw = common.measured_bandwidth_gbs()
    peak_tflops = common.measured_matmul_tflops(torch_dtype)
    rows: list[common.Row] = []
    nan = float("nan")
    for shape_name, heads, lq, lk, d in shapes.ATTENTION:
        for batch in batches:
            tag = f"{shape_name}_b{batch}"
            bh = batch * heads
            for stage in stages:
                try:
                    if stage == "softmax_matmul":
                        s = torch.randn(bh, lq, lk, device="cuda", dtype=torch_dtype).mul_(2.0)  # logit-like spread
                        args = (s, torch.randn(bh, lk, d, device="cuda", dtype=torch_dtype))
                        del s
                        esize = args[0].element_size()
                        work, metric, roof = (bh * lq * lk + bh * lk * d + bh * lq * d) * esize / 1e9, "GB/s", peak_bw
                    elif stage == "partial_softmax_attention":
                        args = tuple(
                            torch.randn(batch, heads, n, d, device="cuda", dtype=torch_dtype) for n in (lq, lk, lk)
                        )
                        work, metric, roof = 4.0 * bh * lq * lk * d / 1e12, "TFLOP/s", peak_tflops
                    else:
                        raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    for provider in providers:
                        rows.append(common.Row(stage, tag, dtype, provider, nan, nan, nan,
                                               extra={"error": "out of memory (inputs)"}))
                    continue
                with torch.inference_mode():
                    for provider in providers:
                        fn = _provider_fn(stage, provider)
                        try:
                            ms, p20, p80 = common.bench_ms(lambda: fn(*args))
                            peak_mb = _peak_mb(lambda: fn(*args))
                        except torch.cuda.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            rows.append(common.Row(stage, tag, dtype, provider, nan, nan, nan, metric,
                                                   extra={"error": "out of memory"}))
                            continue
                        value = work / (ms * 1e-3)
                        rows.append(common.Row(
                            op=stage, shape=tag, dtype=dtype, provider=provider, ms=ms, ms_p20=p20, ms_p80=p80,
                            metric=metric, value=value, pct_roofline=100.0 * value / roof,
                            extra={"peak_mb": peak_mb, "B": batch, "H": heads, "Lq": lq, "Lk": lk, "D": d},
                        ))
                del args
                torch.cuda.empty_cache()
    common.write_results(rows, out_dir, name or f"bench_softmax_{dtype}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks", help="results folder")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--batches", type=int, nargs="+", default=list(shapes.BATCHES))
    ap.add_argument("--providers", nargs="+", default=list(common.PROVIDERS_DEFAULT))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    a = ap.parse_args(argv)
    rows = run(a.out, a.dtype, a.batches, a.providers, a.stages)
    for r in rows:
        print(f"{r.op:26s} {r.shape:32s} {r.provider:9s} {r.ms:9.4f} ms {r.value:8.1f} {r.metric:8s} "
              f"{r.pct_roofline:5.1f}%")


if __name__ == "__main__":
    main()
