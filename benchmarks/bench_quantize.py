"""Benchmark the MoDiff activation quantizers: fusediff::group_norm_quantize and fusediff::modiff_quantize.

Shapes: ``benchmarks.shapes.GROUPNORM`` (SD-1.5 at 512^2 and LDM-8 church at 256^2 GroupNorm
inputs) at batch 1/2/8/32; x in ``--dtype``, â in fp32, INT8 per-sample scales, primed step.
Metric: GB/s over the MINIMUM traffic of one MoDiff step (read x and â once, write q (1 B) and â
once) and % of the measured copy bandwidth. The kernels move more than that (group_norm_quantize
reads x three times and â twice, modiff_quantize reads a and â twice: dynamic per-sample scales
need the whole sample before any element is quantized), so 100% is not reachable by design; see
docs/kernels/modiff_kernels.md.

Providers:
  eager      the same math as torch ops (GroupNorm, SiLU, Δ, absmax, round, clamp, â update)
  inductor   that function through torch.compile(mode="max-autotune-no-cudagraphs")
  fusediff   the fused Triton kernels (2 launches + a 4-byte-per-sample memset)

Usage (CUDA machine): ``python benchmarks/bench_quantize.py --out docs/benchmarks``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, shapes  # noqa: E402

PROVIDERS = ("eager", "inductor", "fusediff")
DEVICE = "cuda"  # module constant so a CPU smoke run can retarget it
QMAX = 127


def _eager_modiff(a: torch.Tensor, a_hat: torch.Tensor):
    """Primed MoDiff step (eq. 6) in plain torch ops, per-sample INT8 scales; mutates a_hat."""
    d = a.float() - a_hat
    absmax = d.flatten(1).abs().amax(1)
    s = torch.where(absmax == 0, torch.ones_like(absmax), absmax / QMAX)
    v = torch.round(torch.clamp(d / s.view(-1, 1, 1, 1), -QMAX, QMAX))
    a_hat.add_(s.view(-1, 1, 1, 1) * v)
    return v.to(torch.int8), s


def _eager_gn_modiff(x, w, b, a_hat, groups: int):
    a = F.silu(F.group_norm(x.float(), groups, w, b, 1e-5))
    return _eager_modiff(a, a_hat)


def run(out_dir: str, dtype: str = "float16", batches: Sequence[int] = shapes.BATCHES,
        providers: Sequence[str] = PROVIDERS, name: Optional[str] = None) -> list[common.Row]:
    """Time both quantizers on every GROUPNORM shape x batch x provider; write ``<name>.csv``/``.md``."""
    common.require_cuda()
    from fusediff.kernels import quantize as Q  # registers the ops

    torch_dtype = getattr(torch, dtype)
    peak = common.measured_bandwidth_gbs()
    rows: list[common.Row] = []
    for shape_name, c, h, w_, groups in shapes.GROUPNORM:
        weight = torch.randn(c, device=DEVICE)
        bias = torch.randn(c, device=DEVICE)
        for batch in batches:
            x = torch.randn(batch, c, h, w_, device=DEVICE, dtype=torch_dtype)
            a_hat = torch.randn(batch, c, h, w_, device=DEVICE)
            primed = torch.tensor(True, device=DEVICE)
            n = x.numel()
            min_bytes = n * (x.element_size() + 4 + 1 + 4)  # x, â read; q, â written
            with torch.inference_mode():
                q, s = Q.group_norm_quantize(x, weight, bias, None, None, groups, 1e-5, True, a_hat.clone(), primed, 8, True)
                q_r, s_r = Q.group_norm_quantize_ref(x, weight, bias, None, None, groups, 1e-5, True, a_hat.clone(),
                                                     primed, 8, True)
                err = (q.int() - q_r.int()).abs().max().item()
                cases = {
                    "group_norm_quantize": (
                        lambda: _eager_gn_modiff(x, weight, bias, a_hat, groups),
                        lambda: torch.ops.fusediff.group_norm_quantize(x, weight, bias, None, None, groups, 1e-5, True,
                                                                       a_hat, primed, 8, True),
                    ),
                    "modiff_quantize": (
                        lambda: _eager_modiff(x, a_hat),
                        lambda: torch.ops.fusediff.modiff_quantize(x, a_hat, primed, 8, True),
                    ),
                }
                for op, (eager_fn, fused_fn) in cases.items():
                    for provider in providers:
                        if provider == "eager":
                            fn = eager_fn
                        elif provider == "inductor":
                            torch._dynamo.reset()
                            fn = common.compile_inductor(eager_fn)
                        elif provider == "fusediff":
                            fn = fused_fn
                        else:
                            raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
                        ms, p20, p80 = common.bench_ms(fn)
                        gbs = min_bytes / (ms * 1e-3) / 1e9
                        rows.append(common.Row(
                            op=op, shape=f"{shape_name}_b{batch}", dtype=dtype, provider=provider, ms=ms, ms_p20=p20,
                            ms_p80=p80, metric="GB/s", value=gbs, pct_roofline=100.0 * gbs / peak,
                            extra={"min_bytes": min_bytes, "max_q_diff_vs_ref": err},
                        ))
            del x, a_hat
            torch.cuda.empty_cache()
    common.write_results(rows, out_dir, name or f"bench_quantize_{dtype}")
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
        print(f"{r.op:20s} {r.shape:28s} {r.provider:9s} {r.ms:9.4f} ms {r.value:8.1f} GB/s {r.pct_roofline:5.1f}%")


if __name__ == "__main__":
    main()
