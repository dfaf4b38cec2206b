"""Benchmark fusediff::group_norm_silu against eager and inductor (GroupNorm -> [FiLM] -> SiLU).

Shapes: ``benchmarks.shapes.GROUPNORM`` (SD-1.5 at 512^2, LDM-8 church at 256^2) at batch
1/2/8/32. The op is memory-bound, so the metric is GB/s with bytes = read x + write y (the
minimum traffic; parameters and FiLM vectors are negligible) and % of the measured copy bandwidth.

Usage (CUDA machine): ``python benchmarks/bench_groupnorm.py --out docs/benchmarks``
(``--film`` adds use_scale_shift_norm scale/shift, ``--channels-last``, ``--dtype bfloat16``).
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

OP = "group_norm_silu"
EPS = 1e-5


def _eager(x, w, b, scale, shift, groups: int):
    y = F.group_norm(x, groups, w, b, EPS)
    if scale is not None:
        y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(y)


def _fusediff(x, w, b, scale, shift, groups: int):
    return torch.ops.fusediff.group_norm_silu(x, w, b, scale, shift, groups, EPS, True)


def run(out_dir: str, dtype: str = "float16", film: bool = False, channels_last: bool = False,
        batches: Sequence[int] = shapes.BATCHES, providers: Sequence[str] = common.PROVIDERS_DEFAULT,
        name: Optional[str] = None) -> list[common.Row]:
    """Time every GROUPNORM shape x batch x provider; write ``<name>.csv``/``.md`` under ``out_dir``.

    Args:
        out_dir: results folder (e.g. ``docs/benchmarks``).
        dtype: ``float16``, ``bfloat16`` or ``float32``.
        film: include FiLM scale/shift of shape (N, C) (ADM/LDM use_scale_shift_norm).
        channels_last: benchmark channels_last inputs.
        batches, providers: subsets to run.
        name: results file stem; defaults to ``bench_groupnorm`` plus the options.

    Returns:
        The rows written.
    """
    common.require_cuda()
    import fusediff.kernels.groupnorm as gn  # registers fusediff::group_norm_silu

    torch_dtype = getattr(torch, dtype)
    peak = common.measured_bandwidth_gbs()
    rows: list[common.Row] = []
    for shape_name, C, H, W, G in shapes.GROUPNORM:
        for batch in batches:
            x = torch.randn(batch, C, H, W, device="cuda", dtype=torch_dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            w = torch.randn(C, device="cuda", dtype=torch_dtype)
            b = torch.randn(C, device="cuda", dtype=torch_dtype)
            scale = torch.randn(batch, C, device="cuda", dtype=torch_dtype) * 0.1 if film else None
            shift = torch.randn(batch, C, device="cuda", dtype=torch_dtype) * 0.1 if film else None
            args = (x, w, b, scale, shift, G)

            # Sanity check before timing: fusediff against the fp32 reference.
            ref = gn.group_norm_silu_ref(x, w, b, scale, shift, G, EPS, True)
            err = (_fusediff(*args).float() - ref.float()).abs().max().item()
            variant, splits, _ = gn._plan_launch(batch * G, (C // G) * H * W, gn._sm_count(x.device))

            nbytes = 2 * x.numel() * x.element_size()  # read x + write y
            for provider in providers:
                if provider == "eager":
                    fn = _eager
                elif provider == "inductor":
                    torch._dynamo.reset()  # one fresh compile per shape (no recompile limit, no dynamic dims)
                    fn = common.compile_inductor(_eager)
                elif provider == "fusediff":
                    fn = _fusediff
                else:
                    raise ValueError(f"unknown provider {provider!r}; choose from eager, inductor, fusediff")
                with torch.inference_mode():
                    ms, p20, p80 = common.bench_ms(lambda: fn(*args))
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(common.Row(
                    op=OP, shape=f"{shape_name}_b{batch}", dtype=dtype, provider=provider,
                    ms=ms, ms_p20=p20, ms_p80=p80, metric="GB/s", value=gbs, pct_roofline=100.0 * gbs / peak,
                    extra={"variant": variant, "splits": splits, "max_err_vs_ref": err,
                           "film": film, "channels_last": channels_last},
                ))
    if name is None:
        name = "bench_groupnorm" + ("_film" if film else "") + ("_cl" if channels_last else "") + f"_{dtype}"
    common.write_results(rows, out_dir, name)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks", help="results folder")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--film", action="store_true", help="add FiLM scale/shift (use_scale_shift_norm)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last inputs")
    ap.add_argument("--batches", type=int, nargs="+", default=list(shapes.BATCHES))
    ap.add_argument("--providers", nargs="+", default=list(common.PROVIDERS_DEFAULT))
    a = ap.parse_args(argv)
    rows = run(a.out, a.dtype, a.film, a.channels_last, a.batches, a.providers)
    for r in rows:
        print(f"{r.shape:28s} {r.provider:9s} {r.ms:8.4f} ms {r.value:8.1f} GB/s {r.pct_roofline:5.1f}%")


if __name__ == "__main__":
    main()
