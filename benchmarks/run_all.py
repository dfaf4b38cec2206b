"""Run every benchmark (GPU) in one command and write CSV + markdown under --out."""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib
import traceback

MODULES = ["bench_groupnorm", "bench_attention", "bench_softmax", "bench_geglu", "bench_winograd",
           "bench_quantize", "bench_conv_int8", "bench_linear_int8", "bench_ablation", "bench_unet"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    for name in a.only or MODULES:
        try:
            importlib.import_module(f"benchmarks.{name}").run(a.out)
            print(f"{name}: done")
        except SystemExit as e:
            print(f"{name}: {e}")
        except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            print(f"{name}: FAILED")
