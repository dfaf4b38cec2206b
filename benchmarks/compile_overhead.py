"""Compile-time overhead of the fusediff backend over plain inductor (runs on CPU or GPU).

For each model: wall time of the first call (dynamo trace + passes + inductor compile + run) with
``backend="inductor"`` and with ``backend="fusediff"``, plus the fusediff passes alone (capture
excluded). Compile time is a property of the host, not the GPU, so a CPU figure is meaningful;
the table records the device.

    python benchmarks/compile_overhead.py --models zoo:ddpm zoo:sd15 --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Measure cold compiles: no inductor graph/autograd caches carried from one provider to the next.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import Row, write_results  # noqa: E402


def _first_call(model, args, kwargs, backend) -> float:
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend)
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(out_dir: str, models=("zoo:ddpm", "zoo:sd15")) -> list[Row]:
    from fusediff.fxpasses.capture import capture_dynamo
    from fusediff.fxpasses.pipeline import run_passes
    from fusediff.lowering.models import resolve

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for spec in models:
        model, args, kwargs = resolve(spec)
        model = model.to(dev)
        args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        gm, _ = capture_dynamo(model, args, kwargs)
        t0 = time.perf_counter()
        run_passes(gm)
        passes = time.perf_counter() - t0
        fd = _first_call(model, args, kwargs, "fusediff")  # fusediff first: any warm-up favours inductor
        ind = _first_call(model, args, kwargs, "inductor")
        for prov, s in (("inductor", ind), ("fusediff", fd), ("fusediff passes only", passes)):
            rows.append(Row("compile", spec, str(next(iter(model.parameters())).dtype).replace("torch.", ""), prov,
                            s * 1e3, float("nan"), float("nan"), "x inductor", s / ind, float("nan"),
                            extra={"device": dev}))
    write_results(rows, out_dir, f"compile_overhead_{dev}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--models", nargs="+", default=["zoo:ddpm", "zoo:sd15"])
    a = ap.parse_args()
    for r in run(a.out, a.models):
        print(f"{r.shape:12s} {r.provider:22s} {r.ms / 1e3:8.2f} s  ({r.value:.2f}x inductor)")
