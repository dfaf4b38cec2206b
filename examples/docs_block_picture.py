"""Redraw docs/images/blocks_example.svg (and .png), the block-view picture in docs/visualization.md.

The picture is the block view (``collapse(depth=3)``) of ``DownBlock``, the miniature
CrossAttnDownBlock2D defined in tests/fxpasses/test_visualize.py, with the sites that test builds
by hand; ``test_docs_example_picture`` checks what it shows. Graphviz ``dot`` draws it when it is
on PATH (else the built-in layout); ``rsvg-convert`` writes the PNG when it is installed.

    python examples/docs_block_picture.py                 # writes docs/images/blocks_example.{svg,png}
    python examples/docs_block_picture.py --out /tmp/pic  # somewhere else
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fusediff.fxpasses import viz  # noqa: E402
from tests.fxpasses.test_visualize import DownBlock, block_args, docs_block_view, hand_sites  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for blocks_example.{svg,png}")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gm = torch.export.export(DownBlock().eval(), block_args()).module()
    b = docs_block_view(gm, hand_sites(gm))
    svg = out / "blocks_example.svg"
    files = {"svg": str(svg), "renderer": viz.write_svg(b, svg)}
    if shutil.which("rsvg-convert"):
        png = out / "blocks_example.png"
        subprocess.run(["rsvg-convert", "-b", "white", "-o", str(png), str(svg)], check=True)
        files["png"] = str(png)
    print(files)
    return files


if __name__ == "__main__":
    main()
