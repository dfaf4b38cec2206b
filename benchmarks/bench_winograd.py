"""Winograd F(4x4,3x3) conv (kernels/winograd.py) vs direct 3x3 conv.

Providers: ``eager`` (F.conv2d, cuDNN), ``inductor`` (max-autotune-no-cudagraphs), ``fusediff``
(the fusediff::winograd_conv2d op as dispatched, default variant) and the other variant of the
Winograd kernels (``fusediff_fused`` or ``fusediff_3kernel``, see FUSED_OUTPUT_TRANSFORM). The weight
transform is done once outside the timed region, as the rewrite does. Shapes:
benchmarks.shapes.CONV3X3 (padding 1) at batch 1/2/8/32.

TFLOP/s counts direct-conv flops for every provider (2 N Cout Cin 9 H W), so Winograd's 4x fewer
multiplications show up as a higher effective rate; % is of measured_matmul_tflops(dtype).
A second table (bench_winograd_error) holds max|err| / max|y| of Winograd and of direct conv
against a float64 direct conv, plus what winograd_pays (fxpasses/costs/winograd.py) decided.

    python benchmarks/bench_winograd.py --out docs/benchmarks [--dtypes bf16,fp16] [--batches 1,2,8,32]
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Row,
    bench_ms,
    compile_inductor,
    measured_matmul_tflops,
    require_cuda,
    write_results,
)
from benchmarks.shapes import BATCHES, CONV3X3  # noqa: E402
from fusediff.fxpasses.costs.winograd import winograd_error_report, winograd_pays  # noqa: E402
from fusediff.kernels import winograd  # noqa: E402

OP = "winograd_conv2d"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _alt_name() -> str:
    return "fusediff_3kernel" if winograd.FUSED_OUTPUT_TRANSFORM else "fusediff_fused"


def run(
    out_dir: str,
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16),
    batches: tuple[int, ...] = BATCHES,
    providers: tuple[str, ...] | None = None,
) -> list[Row]:
    """Time every provider on every CONV3X3 shape and batch; write CSV + markdown; return the rows."""
    require_cuda()
    providers = providers or ("eager", "inductor", "fusediff", _alt_name())
    torch.manual_seed(0)
    rows: list[Row] = []
    err_rows: list[Row] = []
    nan = float("nan")
    with torch.no_grad():
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            peak = measured_matmul_tflops(dtype)
            for name, cin, cout, h, w in CONV3X3:
                weight = torch.randn(cout, cin, 3, 3, device="cuda") / (9 * cin) ** 0.5
                bias = torch.randn(cout, device="cuda")
                u = winograd.winograd_weight_transform(weight)  # once, as at rewrite time
                wl, bl = weight.to(dtype), bias.to(dtype)
                for n in batches:
                    x = torch.randn(n, cin, h, w, device="cuda", dtype=dtype)
                    shape = f"{name}_b{n}"
                    flops = 2.0 * n * cout * cin * 9 * h * w
                    pays, why = winograd_pays(tuple(x.shape), tuple(weight.shape), "cuda", dtype=dtype)
                    fns = {
                        "eager": lambda: F.conv2d(x, wl, bl, padding=1),
                        "fusediff": lambda: torch.ops.fusediff.winograd_conv2d(x, u, bl, 1),
                        "fusediff_fused": lambda: winograd._launch(x, u, bl, 1, fused=True),
                        "fusediff_3kernel": lambda: winograd._launch(x, u, bl, 1, fused=False),
                    }
                    if "inductor" in providers:
                        torch._dynamo.reset()  # static shapes per batch, no automatic-dynamic recompiles
                        compiled = compile_inductor(lambda inp: F.conv2d(inp, wl, bl, padding=1))
                        fns["inductor"] = lambda: compiled(x)
                    for prov in providers:
                        fn = fns[prov]
                        fn()  # compile / autotune outside the timing
                        ms, p20, p80 = bench_ms(fn)
                        tflops = flops / (ms * 1e-3) / 1e12
                        rows.append(Row(OP, shape, dname, prov, ms, p20, p80, "TFLOP/s", tflops, 100.0 * tflops / peak,
                                        extra={"pays": pays, "why": why}))
                        print(f"{dname} {shape:28s} {prov:17s} {ms:8.4f} ms {tflops:7.1f} TFLOP/s", flush=True)
                    if n == batches[0]:  # error barely depends on batch; measure once per shape
                        rep = winograd_error_report(x, wl, bl, 1)
                        for prov, key in (("fusediff", "winograd"), ("eager", "direct")):
                            err_rows.append(Row("winograd_error", shape, dname, prov, nan, nan, nan,
                                                "max_abs_err/max|y|", rep[f"{key}_rel"], nan, extra=rep))
                        err_rows.append(Row("winograd_error", shape, "float32", "fusediff", nan, nan, nan,
                                            "max_abs_err/max|y|", rep["winograd_fp32_rel"], nan, extra=rep))
                    pays_row = Row("winograd_pays", shape, dname, "fusediff", nan, nan, nan, f"pays={pays}: {why}")
                    err_rows.append(pays_row)
    write_results(rows, out_dir, "bench_winograd")
    write_results(err_rows, out_dir, "bench_winograd_error")
    return rows + err_rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16, fp16, fp32")
    ap.add_argument("--batches", default=",".join(str(b) for b in BATCHES))
    ap.add_argument("--providers", default=None, help="comma list; default eager,inductor,fusediff,<other variant>")
    args = ap.parse_args(argv)
    dtypes = tuple(_DTYPES[d.strip()] for d in args.dtypes.split(","))
    batches = tuple(int(b) for b in args.batches.split(","))
    providers = tuple(p.strip() for p in args.providers.split(",")) if args.providers else None
    run(args.out, dtypes, batches, providers)


if __name__ == "__main__":
    main()
