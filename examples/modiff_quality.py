"""MoDiff quality and DRAM-traffic study on the shipped digits DDPM (and an LDM-8-church-shaped U-Net).

Quality: DDIM with the same seed for FP32 and every quantized mode; per mode the Fréchet distance of
the shipped classifier's features against the 1797 real digits (``digits.evaluate``), the latent's
relative error against the FP32 trajectory at every step (mean over steps and final), and a PNG grid
of the first 64 samples (``docs/images/modiff_<mode>.png``).

DRAM: the analytic traffic of the conv/linear layers over one trajectory (batch 32, 200 DDIM steps,
the paper's Table 1 columns), from the layer shapes of one forward run on the ``meta`` device.

    python examples/modiff_quality.py --samples 256 --steps 50            # writes docs/modiff.md tables
    python examples/modiff_quality.py --samples 32 --steps 20 --no-docs   # quick look

On a CPU the ``fusediff::`` ops run their pure-torch references (the same math as the kernels;
TRITON_INTERPRET is forced to 0 here because the interpreter costs seconds per conv); on CUDA the
Triton kernels run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported (see the module docstring); CUDA runs Triton

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusediff import digits  # noqa: E402
from fusediff.fxpasses import modiff as md  # noqa: E402

MODES: dict[str, md.QuantConfig | None] = {
    "fp32": None,
    "baseline_w8a8": md.QuantConfig(mode="baseline", w_bits=8, a_bits=8),
    "modiff_w8a8": md.QuantConfig(mode="modiff", w_bits=8, a_bits=8),
    "baseline_w8a4": md.QuantConfig(mode="baseline", w_bits=8, a_bits=4),
    "modiff_w8a4": md.QuantConfig(mode="modiff", w_bits=8, a_bits=4),
    "baseline_w4a8": md.QuantConfig(mode="baseline", w_bits=4, a_bits=8),
    "modiff_w4a8": md.QuantConfig(mode="modiff", w_bits=4, a_bits=8),
    "baseline_w4a4": md.QuantConfig(mode="baseline", w_bits=4, a_bits=4),
    "modiff_w4a4": md.QuantConfig(mode="modiff", w_bits=4, a_bits=4),
}


def sample(unet, cfg: md.QuantConfig | None, n: int, steps: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """(final samples, latent after every step, seconds) for one mode; the model is quantized on a copy."""
    model = unet if cfg is None else md.quantize(unet, cfg, inplace=False)
    lat: list[torch.Tensor] = []
    t0 = time.perf_counter()
    with md.trajectory(model):  # no-op for the float model
        x = digits.ddim_sample(model, n=n, steps=steps, seed=seed, callback=lambda i, t, z: lat.append(z.clone()))
    return x, lat, time.perf_counter() - t0


def rel_errors(lat: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    return [float((a - b).norm() / b.norm()) for a, b in zip(lat, ref)]


def run_quality(n: int, steps: int, seed: int, modes: list[str], image_dir: Path | None) -> list[dict]:
    unet = digits.load_digits_unet()
    clf = digits.load_classifier()
    ref_x, ref_lat, ref_s = sample(unet, None, n, steps, seed)
    rows = []
    for name in modes:
        cfg = MODES[name]
        x, lat, secs = (ref_x, ref_lat, ref_s) if cfg is None else sample(unet, cfg, n, steps, seed)
        ev = digits.evaluate(x, clf)
        err = rel_errors(lat, ref_lat)
        row = {"mode": name, "label": "FP32" if cfg is None else cfg.label, "fd": ev["fd"],
               "mean_confidence": ev["mean_confidence"], "confident_frac": ev["confident_frac"],
               "err_mean": sum(err) / len(err), "err_final": err[-1], "err_per_step": err, "seconds": secs}
        rows.append(row)
        print(f"{row['label']:>16}: FD {row['fd']:8.2f}  conf {row['mean_confidence']:.3f}  latent err mean "
              f"{row['err_mean']:.4f} final {row['err_final']:.4f}  ({secs:.1f} s)", flush=True)
        if image_dir is not None:
            digits.save_grid_png(x[:64], image_dir / f"modiff_{name}.png", nrow=8, scale=3)
    return rows


# ------------------------------------------------------------------------------------------------
# DRAM traffic (paper Table 1)
# ------------------------------------------------------------------------------------------------


def church_unet():
    """LDM-8 LSUN-churches U-Net shape (CompVis configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml:
    model_channels 192, channel_mult [1,2,2,4,4], num_res_blocks 2, attention at ds 1,2,4,8 with 8
    heads, use_scale_shift_norm, resblock_updown; 32x32x4 latents, unconditional) on ``meta``."""
    from fusediff.zoo import ldm

    cfg = ldm.LDMConfig(image_size=32, in_channels=4, out_channels=4, model_channels=192,
                        channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2,
                        level_attention=("legacy", "legacy", "legacy", "legacy", None),
                        head_channels=(24, 48, 48, 96, 96), mid_attention="legacy", num_groups=32,
                        use_scale_shift_norm=True, resblock_updown=True)
    with torch.device("meta"):
        model = ldm.UNetModel(cfg).eval()
    return model


def dram_rows(model, args: tuple, kwargs: dict, steps: int) -> tuple[list[dict], int]:
    shapes = md.layer_shapes(model, args, kwargs)
    out = []
    for label, cfg in (("FP32", None),
                       ("Baseline INT8 (W8A8)", md.QuantConfig(mode="baseline", w_bits=8, a_bits=8)),
                       ("MoDiff INT8 (W8A8)", md.QuantConfig(mode="modiff", w_bits=8, a_bits=8)),
                       ("Baseline INT4 (W4A4)", md.QuantConfig(mode="baseline", w_bits=4, a_bits=4)),
                       ("MoDiff INT4 (W4A4)", md.QuantConfig(mode="modiff", w_bits=4, a_bits=4))):
        rep = None if cfg is None else md.plan(model, cfg, args, kwargs)
        for implemented in (False, True):
            t = md.dram_transfer(shapes, rep, steps, implemented=implemented)
            out.append({"mode": label, "implemented": implemented, **{k: v / 1e9 for k, v in t.items()}})
    n_params = sum(p.numel() for p in model.parameters())
    return out, n_params


def run_dram(batch: int, steps: int) -> dict:
    res = {}
    with torch.device("meta"):  # architecture only: the shapes do not depend on the weights
        unet = digits.build_unet().eval()
    x = torch.empty(batch, 1, 16, 16, device="meta")
    t = torch.full((batch,), 500, dtype=torch.int64, device="meta")
    res["digits"] = dram_rows(unet, (x, t), {}, steps)
    church = church_unet()
    x = torch.empty(batch, 4, 32, 32, device="meta")
    t = torch.full((batch,), 500, dtype=torch.int64, device="meta")
    res["ldm8_church"] = dram_rows(church, (x, t), {}, steps)
    return res


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def quality_md(rows: list[dict], n: int, steps: int, seed: int) -> str:
    lines = [f"Shipped digits DDPM, DDIM-{steps} (eta 0), {n} samples, seed {seed}, same noise for every mode. "
             "FD: Fréchet distance of the shipped classifier's 64-d features to all 1797 real digits "
             "(lower is better; FP32's own FD is the floor at this N). Latent error: "
             "‖x_q − x_fp32‖ / ‖x_fp32‖ of the DDIM latent after each step, over the whole batch.",
             "",
             "| mode | FD | mean conf. | confident | latent err (mean over steps) | latent err (final) | grid |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['fd']:.2f} | {r['mean_confidence']:.3f} | {r['confident_frac']:.3f} | "
                     f"{r['err_mean']:.4f} | {r['err_final']:.4f} | [png](images/modiff_{r['mode']}.png) |")
    return "\n".join(lines)


def dram_md(res: dict, batch: int, steps: int) -> str:
    lines = []
    titles = {"digits": "Shipped digits U-Net (16×16×1)", "ldm8_church": "LDM-8-church-shaped U-Net (32×32×4 latents)"}
    for key, (rows, n_params) in res.items():
        lines.append(f"**{titles[key]}**, {n_params / 1e6:.1f} M parameters, batch {batch}, {steps} DDIM steps, "
                     "conv/linear layers only, GB (1e9 B):")
        lines.append("")
        lines.append("| mode | Weight | Act | Output | Cache Rd | Cache Wr | Total | Ratio | as implemented: Total (Ratio) |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        ideal = [r for r in rows if not r["implemented"]]
        impl = {r["mode"]: r for r in rows if r["implemented"]}
        base = ideal[0]["total"]
        for r in ideal:
            i = impl[r["mode"]]
            lines.append(f"| {r['mode']} | {r['weight']:.2f} | {r['act']:.2f} | {r['output']:.2f} | {r['cache_rd']:.2f} | "
                         f"{r['cache_wr']:.2f} | {r['total']:.2f} | {100 * r['total'] / base:.1f}% | "
                         f"{i['total']:.2f} ({100 * i['total'] / base:.1f}%) |")
        lines.append("")
    return "\n".join(lines).rstrip()


def replace_block(text: str, tag: str, body: str) -> str:
    begin, end = f"<!-- BEGIN {tag} -->", f"<!-- END {tag} -->"
    if begin not in text:
        return text + f"\n{begin}\n{body}\n{end}\n"
    return re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: f"{begin}\n{body}\n{end}", text, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: robust on a shared CPU)")
    ap.add_argument("--dram-batch", type=int, default=32)
    ap.add_argument("--dram-steps", type=int, default=200)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/modiff.md or the PNG grids")
    ap.add_argument("--json", type=Path, default=None, help="also write all numbers to this JSON file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out: dict = {"samples": a.samples, "steps": a.steps, "seed": a.seed}
    if not a.skip_quality:
        if "fp32" not in a.modes:
            a.modes.insert(0, "fp32")
        out["quality"] = run_quality(a.samples, a.steps, a.seed, a.modes, None if a.no_docs else ROOT / "docs" / "images")
    out["dram"] = run_dram(a.dram_batch, a.dram_steps)
    print(dram_md(out["dram"], a.dram_batch, a.dram_steps))
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=1))
    if not a.no_docs:
        doc = ROOT / "docs" / "modiff.md"
        text = doc.read_text() if doc.exists() else "# MoDiff low-bit inference\n"
        if "quality" in out:
            text = replace_block(text, "modiff-quality", quality_md(out["quality"], a.samples, a.steps, a.seed))
        text = replace_block(text, "modiff-dram", dram_md(out["dram"], a.dram_batch, a.dram_steps))
        doc.write_text(text)
        print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
