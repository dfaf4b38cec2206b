"""fusediff demo: the main job of `make demo`.

Takes the embedded default U-Net (the shipped trained digits DDPM, no downloads), captures it,
finds and rewrites GroupNorm->SiLU->Conv, attention and GEGLU patterns into fusediff kernels,
checks the rewritten graph against eager PyTorch, prints the report tables and writes the graph
pictures (DOT/SVG/HTML) and report files.

    python examples/demo.py --out out/demo [--model zoo:sd15]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import fusediff
from fusediff.lowering.models import resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits", help="digits (default) | zoo:<name> | module:function")
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--capture", choices=("export", "dynamo"), default="export")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, args, kwargs = resolve(a.model)
    model.eval()
    t0 = time.perf_counter()
    insp = fusediff.inspect(model, args, kwargs, capture=a.capture, out_dir=a.out, title=a.model)
    t1 = time.perf_counter()
    print(insp.report.to_text())
    with torch.no_grad():
        ref = model(*args, **kwargs)
        got = insp.gm(*args, **kwargs)
    r = ref[0] if isinstance(ref, (tuple, list)) else getattr(ref, "sample", ref)
    g = got[0] if isinstance(got, (tuple, list)) else getattr(got, "sample", got)
    err = (r - g).abs().max().item()
    print(f"\ncapture + passes + report + pictures: {t1 - t0:.1f} s")
    print(f"rewritten graph vs eager PyTorch: max abs error {err:.3e} (output scale {r.abs().max().item():.3f})")
    print("\nfiles written:")
    for k, v in sorted(insp.files.items()):
        print(f"  {k:12s} {v}")
    if err > 1e-3 * max(1.0, r.abs().max().item()):
        raise SystemExit("rewritten graph disagrees with eager PyTorch")


if __name__ == "__main__":
    main()
