"""Benchmark harness shared by every ``benchmarks/bench_<op>.py``.

Timing: ``triton.testing.do_bench`` quantiles (0.5, 0.2, 0.8) on CUDA. Results are CSV rows with
GPU name, torch/triton versions, git sha and timestamp (see :func:`env_info`). Benchmarks need a
GPU; on a CPU machine they refuse to run rather than print misleading numbers.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

PROVIDERS_DEFAULT = ("eager", "inductor", "fusediff")


def env_info() -> dict[str, str]:
    import triton

    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        sha = "unknown"
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_sha": sha,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def require_cuda() -> None:
    """The first line of a benchmark that needs CUDA: without a GPU, nothing is measured.

    Under ``FUSEDIFF_GPU_DRY_RUN=1`` (``make gpu-session-dry``) reaching it on a CPU machine is the
    success of a dry run (imports and arguments checked): exit 0.
    """
    if torch.cuda.is_available():
        return
    if os.environ.get("FUSEDIFF_GPU_DRY_RUN") == "1":
        import sys

        print(f"dry run: {os.path.basename(sys.argv[0])} reached its first line that needs CUDA")
        raise SystemExit(0)
    raise SystemExit("benchmarks need a CUDA GPU; nothing measured (write 'not measured' in docs)")


def bench_ms(fn: Callable[[], object]) -> tuple[float, float, float]:
    """Median, p20, p80 in milliseconds."""
    import triton.testing

    q = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return float(q[0]), float(q[1]), float(q[2])


def compile_inductor(fn: Callable) -> Callable:
    return torch.compile(fn, mode="max-autotune-no-cudagraphs")


_PEAK_BW: dict[str, float] = {}


def measured_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (GB/s): the roofline for memory-bound kernels."""
    key = torch.cuda.get_device_name()
    if key not in _PEAK_BW:
        n = 1 << 28
        a = torch.empty(n, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        ms, _, _ = bench_ms(lambda: b.copy_(a))
        _PEAK_BW[key] = 2 * n / (ms * 1e-3) / 1e9
    return _PEAK_BW[key]


_PEAK_FLOPS: dict[tuple[str, torch.dtype], float] = {}


def measured_matmul_tflops(dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul TFLOP/s (the compute roofline) for ``dtype``."""
    key = (torch.cuda.get_device_name(), dtype)
    if key not in _PEAK_FLOPS:
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        ms, _, _ = bench_ms(lambda: a @ b)
        _PEAK_FLOPS[key] = 2 * n**3 / (ms * 1e-3) / 1e12
    return _PEAK_FLOPS[key]


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    provider: str
    ms: float
    ms_p20: float
    ms_p80: float
    metric: str = ""  # "GB/s" or "TFLOP/s"
    value: float = float("nan")
    pct_roofline: float = float("nan")
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _JOURNAL.append(self)


#: Every row measured in this process, so a run cut short keeps what it measured (below).
_JOURNAL: list[Row] = []


def _write_partial(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    """SIGTERM (``timeout`` ran out): write the rows measured so far to ``$FUSEDIFF_BENCH_PARTIAL``."""
    path = os.environ.get("FUSEDIFF_BENCH_PARTIAL")
    if path and _JOURNAL:
        write_results(_JOURNAL, os.path.dirname(path) or ".", os.path.basename(path) + "_partial")
    raise SystemExit(124)


if os.environ.get("FUSEDIFF_BENCH_PARTIAL"):
    import signal

    signal.signal(signal.SIGTERM, _write_partial)


def write_results(rows: Iterable[Row], out_dir: str, name: str) -> tuple[str, str]:
    """Write ``<name>.csv`` and ``<name>.md`` under ``out_dir``; return their paths."""
    rows = list(rows)
    os.makedirs(out_dir, exist_ok=True)
    env = env_info()
    csv_path = os.path.join(out_dir, f"{name}.csv")
    md_path = os.path.join(out_dir, f"{name}.md")
    cols = ["op", "shape", "dtype", "provider", "ms", "ms_p20", "ms_p80", "metric", "value", "pct_roofline"]
    extra = list(dict.fromkeys(k for r in rows for k in r.extra))  # e.g. compile_s, peak_MiB

    def cells(r: Row) -> list:
        return [getattr(r, c) for c in cols] + [r.extra.get(k, "") for k in extra]

    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + extra + list(env))
        for r in rows:
            w.writerow(cells(r) + list(env.values()))
    from tabulate import tabulate

    with open(md_path, "w") as f:
        f.write(f"# {name}\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n")
        f.write(tabulate([cells(r) for r in rows], headers=cols + extra, tablefmt="github", floatfmt=".4g"))
        f.write("\n")
    return csv_path, md_path
