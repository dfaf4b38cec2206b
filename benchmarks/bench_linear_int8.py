"""Benchmark fusediff::int8_linear (INT8 / INT4 weights, optional fused GEGLU) against cuBLAS and inductor.

Shapes: the SD-1.5 transformer feed-forward at 512^2 from ``benchmarks.shapes.GEGLU`` (tokens T,
inner dim F): the GEGLU projection x (B, T, K=F/4) @ W (2F, K) -> h * gelu(g) (B, T, F)
(``geglu=True``) and the output projection (B, T, F) @ W (F/4, F) (``geglu=False``), at batch
1/2/8/32. Metric: TFLOP/s (float) / TOP/s (integer) as 2 * B * T * K * F_total, and % of the
measured dense matmul roofline in the same arithmetic (``torch._int_mm`` for INT8).

Providers:
  eager         F.linear (+ chunk, F.gelu, mul for GEGLU) in ``--dtype`` (cuBLAS)
  inductor      the same function through torch.compile(mode="max-autotune-no-cudagraphs")
  fusediff_w8   baseline W8A8 (per-token scales, q precomputed), GEGLU fused in the epilogue
  fusediff_w4   baseline W4A8
  modiff_w8     MoDiff epilogue: + ô_{t+1} (pre-gate cache), ô_t stored, then the gate
  modiff_w4     MoDiff W4A8

Usage (CUDA machine): ``python benchmarks/bench_linear_int8.py --out docs/benchmarks``.
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
from benchmarks.bench_conv_int8 import measured_int8_tops  # noqa: E402

OP = "int8_linear"
PROVIDERS = ("eager", "inductor", "fusediff_w8", "fusediff_w4", "modiff_w8", "modiff_w4")
DEVICE = "cuda"  # module constant so a CPU smoke run can retarget it


def _eager(x, w, b, geglu: bool):
    y = F.linear(x, w, b)
    if geglu:
        h, g = y.chunk(2, dim=-1)
        return h * F.gelu(g)
    return y


def _problems():
    """(name, tokens, K, F_total, geglu) per feed-forward shape."""
    out = []
    for name, tokens, inner in shapes.GEGLU:
        dim = inner // 4  # diffusers FeedForward(mult=4)
        out.append((f"{name}_proj_geglu", tokens, dim, 2 * inner, True))
        out.append((f"{name}_ff_out", tokens, inner, dim, False))
    return out


def run(out_dir: str, dtype: str = "float16", batches: Sequence[int] = shapes.BATCHES,
        providers: Sequence[str] = PROVIDERS, name: Optional[str] = None) -> list[common.Row]:
    """Time every feed-forward problem x batch x provider; write ``<name>.csv``/``.md``."""
    common.require_cuda()
    from fusediff.kernels import linear_int8 as LN
    from fusediff.kernels import quantize as Q

    torch_dtype = getattr(torch, dtype)
    peak_f = common.measured_matmul_tflops(torch_dtype)
    peak_i = measured_int8_tops()
    rows: list[common.Row] = []
    for pname, tokens, k, f_total, geglu in _problems():
        w = torch.randn(f_total, k, device=DEVICE) / k**0.5
        b = torch.randn(f_total, device=DEVICE) * 0.1
        prep = {bits: LN.prepare_linear_weight(w, bits) for bits in (8, 4)}
        w_lp, b_lp = w.to(torch_dtype), b.to(torch_dtype)
        for batch in batches:
            tag = f"{pname}_b{batch}"
            x = torch.randn(batch, tokens, k, device=DEVICE)
            try:
                x_lp = x.to(torch_dtype)
                q, s = Q.quantize_act(x.reshape(-1, k), 8, True)  # per token
                q = q.view(x.shape)
                o_hat = torch.zeros(batch, tokens, f_total, device=DEVICE)
                a_hat = torch.zeros_like(x)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            primed = torch.tensor(True)  # host flag: no device sync
            flops = 2.0 * batch * tokens * k * f_total
            with torch.inference_mode():
                out8 = torch.ops.fusediff.int8_linear_baseline(q, s, prep[8]["w_q"], prep[8]["w_scale"], b, 8, geglu)
                ref8 = LN.int8_linear_ref(q, s, prep[8]["w_q"], prep[8]["w_scale"], b, None, None, None, 8, geglu)
                err = (out8 - ref8).abs().max().item()
                del out8, ref8
                fns = {"eager": lambda: _eager(x_lp, w_lp, b_lp, geglu)}
                for bits in (8, 4):
                    pw = prep[bits]
                    fns[f"fusediff_w{bits}"] = (lambda pw=pw, bits=bits: torch.ops.fusediff.int8_linear_baseline(
                        q, s, pw["w_q"], pw["w_scale"], b, bits, geglu))  # what baseline layers call
                    fns[f"modiff_w{bits}"] = (lambda pw=pw, bits=bits: torch.ops.fusediff.int8_linear(
                        q, s, pw["w_q"], pw["w_scale"], None, o_hat, a_hat, primed, bits, geglu))
                for provider in providers:
                    if provider == "inductor":
                        torch._dynamo.reset()
                        comp = common.compile_inductor(lambda xx, ww, bb: _eager(xx, ww, bb, geglu))
                        fn = lambda comp=comp: comp(x_lp, w_lp, b_lp)
                    elif provider in fns:
                        fn = fns[provider]
                    else:
                        raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
                    try:
                        ms, p20, p80 = common.bench_ms(fn)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        nan = float("nan")
                        rows.append(common.Row(op=OP, shape=tag, dtype=dtype, provider=provider, ms=nan, ms_p20=nan,
                                               ms_p80=nan, extra={"error": "out of memory"}))
                        continue
                    integer = provider not in ("eager", "inductor")
                    rate = flops / (ms * 1e-3) / 1e12
                    rows.append(common.Row(
                        op=OP, shape=tag, dtype="int8" if integer else dtype, provider=provider, ms=ms, ms_p20=p20,
                        ms_p80=p80, metric="TOP/s" if integer else "TFLOP/s", value=rate,
                        pct_roofline=100.0 * rate / (peak_i if integer else peak_f),
                        extra={"max_err_vs_ref": err, "B": batch, "T": tokens, "K": k, "F_total": f_total, "geglu": geglu},
                    ))
            del x, x_lp, q, s, o_hat, a_hat
            torch.cuda.empty_cache()
    common.write_results(rows, out_dir, name or f"bench_linear_int8_{dtype}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks", help="results folder")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=list(shapes.BATCHES))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    a = ap.parse_args(argv)
    rows = run(a.out, a.dtype, a.batches, a.providers)
    for r in rows:
        print(f"{r.shape:36s} {r.provider:12s} {r.ms:9.4f} ms {r.value:8.1f} {r.metric:8s} {r.pct_roofline:5.1f}%")


if __name__ == "__main__":
    main()
