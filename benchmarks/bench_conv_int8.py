"""Benchmark fusediff::int8_conv2d (INT8 / INT4-weight implicit GEMM) against cuDNN and inductor.

Shapes: ``benchmarks.shapes.MODIFF_TABLE3``, the MoDiff paper's Table 3 LDM-8 conv layers
(Cin, Cout, k) at the spatial size where they occur (8x8 .. 32x32), stride 1, padding k // 2, at
batch 32 (the paper's setting) and 1/2/8. Metric: TFLOP/s for float providers and TOP/s for the
integer ones, both as 2 * N * Hout * Wout * Cout * Cin * k * k, and % of the measured dense matmul
roofline in the same arithmetic (``--dtype`` matmul for float, ``torch._int_mm`` for INT8).

Providers:
  eager            F.conv2d in ``--dtype`` (cuDNN), channels_last
  inductor         the same conv through torch.compile(mode="max-autotune-no-cudagraphs")
  eager_fp32       F.conv2d in fp32 (the paper's FP32 column; TF32 as torch's default allows)
  fusediff_w8      baseline W8A8: s_a s_w (W ⊗ q) + bias (q precomputed, conv alone timed)
  fusediff_w4      baseline W4A8 (INT4 weights unpacked in registers)
  modiff_w8        MoDiff W8A8 epilogue: + ô_{t+1}, ô_t written to the cache and the output
  modiff_w4        MoDiff W4A8
  modiff_w8_e2e    fusediff::modiff_quantize + int8_conv2d (the activation quantizer included)

Usage (CUDA machine): ``python benchmarks/bench_conv_int8.py --out docs/benchmarks``
(``--dtype bfloat16``, ``--batches 32``, ``--providers eager fusediff_w8``).
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

OP = "int8_conv2d"
PROVIDERS = ("eager", "inductor", "eager_fp32", "fusediff_w8", "fusediff_w4", "modiff_w8", "modiff_w4", "modiff_w8_e2e")
BATCHES = (32, 1, 2, 8)
DEVICE = "cuda"  # module constant so a CPU smoke run can retarget it

_PEAK_INT8: dict[str, float] = {}


def measured_int8_tops() -> float:
    """Measured dense INT8 matmul TOP/s (torch._int_mm, cuBLASLt IMMA); NaN where unavailable."""
    key = torch.cuda.get_device_name()
    if key not in _PEAK_INT8:
        n = 8192
        try:
            a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=DEVICE)
            b = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=DEVICE)
            ms, _, _ = common.bench_ms(lambda: torch._int_mm(a, b))
            _PEAK_INT8[key] = 2 * n**3 / (ms * 1e-3) / 1e12
        except Exception:  # pragma: no cover - depends on the torch build
            _PEAK_INT8[key] = float("nan")
    return _PEAK_INT8[key]


def conv_flops(n: int, cin: int, cout: int, k: int, hout: int, wout: int) -> float:
    return 2.0 * n * hout * wout * cout * cin * k * k


def _nan_row(shape: str, dtype: str, provider: str, err: str) -> common.Row:
    nan = float("nan")
    return common.Row(op=OP, shape=shape, dtype=dtype, provider=provider, ms=nan, ms_p20=nan, ms_p80=nan,
                      metric="TFLOP/s", extra={"error": err})


def run(out_dir: str, dtype: str = "float16", batches: Sequence[int] = BATCHES,
        providers: Sequence[str] = PROVIDERS, name: Optional[str] = None) -> list[common.Row]:
    """Time every MODIFF_TABLE3 shape x batch x provider; write ``<name>.csv``/``.md`` under ``out_dir``.

    Args:
        out_dir: results folder (e.g. ``docs/benchmarks``).
        dtype: float baseline dtype, ``float16`` or ``bfloat16``.
        batches, providers: subsets to run.
        name: results file stem; defaults to ``bench_conv_int8_<dtype>``.
    Returns:
        The rows written.
    """
    common.require_cuda()
    from fusediff.kernels import conv_int8 as CV
    from fusediff.kernels import quantize as Q

    torch_dtype = getattr(torch, dtype)
    peak_f = common.measured_matmul_tflops(torch_dtype)
    peak_i = measured_int8_tops()
    rows: list[common.Row] = []
    for (cin, cout, k), count, hw in shapes.MODIFF_TABLE3:
        pad = k // 2
        w = torch.randn(cout, cin, k, k, device=DEVICE) * (1.0 / (cin * k * k) ** 0.5)
        b = torch.randn(cout, device=DEVICE) * 0.1
        prep = {bits: CV.prepare_conv_weight(w, bits) for bits in (8, 4)}
        w_lp = w.to(torch_dtype).contiguous(memory_format=torch.channels_last)
        b_lp = b.to(torch_dtype)
        for batch in batches:
            tag = f"ldm8_c{cin}_{cout}_k{k}_{hw}x{hw}_b{batch}"
            x = torch.randn(batch, cin, hw, hw, device=DEVICE).contiguous(memory_format=torch.channels_last)
            x_lp = x.to(torch_dtype)
            flops = conv_flops(batch, cin, cout, k, hw, hw)
            a_hat = x + 0.05 * torch.randn_like(x)
            q, s = Q.modiff_quantize(x, a_hat.clone(), torch.tensor(True, device=DEVICE), 8, True)
            o_hat = torch.zeros(batch, cout, hw, hw, device=DEVICE).contiguous(memory_format=torch.channels_last)
            primed = torch.tensor(True)  # on the host: no device sync in the op
            primed_dev = torch.tensor(True, device=DEVICE)
            with torch.inference_mode():
                ref = F.conv2d(x, w, b, padding=pad)
                out8 = torch.ops.fusediff.int8_conv2d_baseline(q, s, prep[8]["w_q"], prep[8]["w_scale"], b, 1, pad, 8, k)
                deq_ref = CV.int8_conv2d_ref(q, s, prep[8]["w_q"], prep[8]["w_scale"], b, None, None, None, 1, pad, 8, k)
                err = (out8 - deq_ref).abs().max().item()
                del ref
                fns = {
                    "eager": lambda: F.conv2d(x_lp, w_lp, b_lp, padding=pad),
                    "eager_fp32": lambda: F.conv2d(x, w, b, padding=pad),
                }
                for bits in (8, 4):
                    pw = prep[bits]
                    fns[f"fusediff_w{bits}"] = (lambda pw=pw, bits=bits: torch.ops.fusediff.int8_conv2d_baseline(
                        q, s, pw["w_q"], pw["w_scale"], b, 1, pad, bits, k))  # what baseline layers call
                    fns[f"modiff_w{bits}"] = (lambda pw=pw, bits=bits: torch.ops.fusediff.int8_conv2d(
                        q, s, pw["w_q"], pw["w_scale"], None, o_hat, a_hat, primed, 1, pad, bits, k))

                def _e2e(pw=prep[8]):
                    qq, ss = torch.ops.fusediff.modiff_quantize(x, a_hat, primed_dev, 8, True)
                    return torch.ops.fusediff.int8_conv2d(qq, ss, pw["w_q"], pw["w_scale"], None, o_hat, a_hat, primed,
                                                          1, pad, 8, k)

                fns["modiff_w8_e2e"] = _e2e
                for provider in providers:
                    if provider == "inductor":
                        torch._dynamo.reset()
                        conv = common.compile_inductor(lambda xx, ww, bb: F.conv2d(xx, ww, bb, padding=pad))
                        fn = lambda conv=conv: conv(x_lp, w_lp, b_lp)
                    elif provider in fns:
                        fn = fns[provider]
                    else:
                        raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
                    try:
                        ms, p20, p80 = common.bench_ms(fn)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        rows.append(_nan_row(tag, dtype, provider, "out of memory"))
                        continue
                    integer = provider.startswith(("fusediff", "modiff"))
                    rate = flops / (ms * 1e-3) / 1e12
                    peak = peak_i if integer else (common.measured_matmul_tflops(torch.float32)
                                                   if provider == "eager_fp32" else peak_f)
                    rows.append(common.Row(
                        op=OP, shape=tag, dtype="int8" if integer else ("float32" if provider == "eager_fp32" else dtype),
                        provider=provider, ms=ms, ms_p20=p20, ms_p80=p80, metric="TOP/s" if integer else "TFLOP/s",
                        value=rate, pct_roofline=100.0 * rate / peak,
                        extra={"max_err_vs_ref": err, "count_in_ldm8": count, "N": batch, "Cin": cin, "Cout": cout,
                               "k": k, "HW": hw},
                    ))
            del x, x_lp, q, s, a_hat, o_hat
            torch.cuda.empty_cache()
    common.write_results(rows, out_dir, name or f"bench_conv_int8_{dtype}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks", help="results folder")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    a = ap.parse_args(argv)
    rows = run(a.out, a.dtype, a.batches, a.providers)
    for r in rows:
        print(f"{r.shape:36s} {r.provider:14s} {r.ms:9.4f} ms {r.value:8.1f} {r.metric:8s} {r.pct_roofline:5.1f}%")


if __name__ == "__main__":
    main()
