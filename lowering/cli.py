"""The ``fusediff`` command line.

    fusediff inspect zoo:sd15 --out out/sd15        # tables + DOT/SVG/HTML pictures
    fusediff inspect digits --capture dynamo
    fusediff zoo                                     # list fixture U-Nets
    fusediff export-onnx digits --out out/digits.onnx --opset 23 --check
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _cmd_inspect(a: argparse.Namespace) -> int:
    import torch

    from ..fxpasses.api import inspect_model
    from .models import resolve

    model, args, kwargs = resolve(a.model)
    model.eval()
    insp = inspect_model(model, args, kwargs, capture=a.capture, rewrite=not a.no_rewrite,
                         out_dir=a.out, title=a.model)
    if a.format == "json":
        print(json.dumps(insp.report.to_dict(), indent=1, default=str))
    else:
        print(insp.report.to_text())
    if a.out:
        print("\nwrote:")
        for k, v in sorted(insp.files.items()):
            print(f"  {k}: {v}")
    if a.check:
        with torch.no_grad():
            ref = model(*args, **kwargs)
            got = insp.gm(*args, **kwargs)
        r = ref[0] if isinstance(ref, (tuple, list)) else getattr(ref, "sample", ref)
        g = got[0] if isinstance(got, (tuple, list)) else getattr(got, "sample", got)
        err = (r - g).abs().max().item()
        print(f"\nrewritten graph vs eager: max abs error {err:.3e}")
    return 0


def _cmd_zoo(a: argparse.Namespace) -> int:
    from ..zoo import ZOO

    for name, e in ZOO.items():
        print(f"{name:20s} {e.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fusediff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log every decision (site skipped, fallback, ...)")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="find/rewrite patterns in a model and report")
    i.add_argument("model", help="zoo:<name> | digits | package.module:function")
    i.add_argument("--capture", choices=("export", "dynamo"), default="export")
    i.add_argument("--out", default=None, help="directory for pictures and report files")
    i.add_argument("--format", choices=("text", "json"), default="text")
    i.add_argument("--no-rewrite", action="store_true", help="only find, do not rewrite")
    i.add_argument("--check", action="store_true", help="run the rewritten graph and compare with eager")
    i.set_defaults(fn=_cmd_inspect)
    z = sub.add_parser("zoo", help="list the fixture U-Nets")
    z.set_defaults(fn=_cmd_zoo)
    from .onnx.cli import add_cli

    add_cli(sub)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if a.cmd == "inspect" and a.out:
        os.makedirs(a.out, exist_ok=True)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
