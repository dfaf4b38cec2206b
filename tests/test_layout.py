"""One import name: everything installs and imports as ``fusediff.*`` (fusediff/_layout.py).

Guards against the clash that broke a fresh ``make test``: Hugging Face's ``kernels`` (a
``transformers`` dependency) and the checkout's ``kernels/`` folder must both keep working, from the
checkout's root (on ``sys.path`` there) and from outside it, editable and as a built wheel.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("kernels", "fxpasses", "lowering")
BIN = Path(sys.executable).parent


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_hf_kernels = pytest.mark.skipif(
    not _hf_kernels_installed(),
    reason="Hugging Face's `kernels` is not installed here (transformers < 5.2x does not pull it); "
           "the locked set has it (test_lock_pins_hf_kernels)")


def _py(code: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=e, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr[-4000:]}"
    return out


def _ops_declared() -> set[str]:
    names = set()
    for f in (ROOT / "kernels").glob("*.py"):
        names |= set(re.findall(r'custom_op\(\s*"fusediff::(\w+)"', f.read_text()))
    return names


def test_folders_are_not_top_level_packages():
    # A regular package at the checkout root shadows any other `kernels`/`lowering` on sys.path.
    for name in SUBPACKAGES:
        assert (ROOT / name).is_dir()
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py makes `import {name}` ours"


def test_import_fusediff_registers_every_op_family():
    import fusediff

    families = {f.stem for f in (ROOT / "kernels").glob("*.py") if not f.stem.startswith("_")}
    assert set(fusediff.KERNEL_FAMILIES) == families
    declared = _ops_declared()
    assert len(declared) >= 15
    # A fresh interpreter: nothing but `import fusediff` may be needed for every fusediff:: op.
    out = _py("import fusediff, torch; print(sorted(n for n in dir(torch.ops.fusediff) if not n.startswith('_')))",
              cwd=ROOT)
    registered = set(eval(out.stdout.strip().splitlines()[-1]))  # noqa: S307 (our own repr)
    assert declared <= registered, f"not registered by `import fusediff`: {sorted(declared - registered)}"


def test_subpackages_resolve_to_the_checkout_folders():
    import fusediff
    import fusediff.fxpasses.patterns.groupnorm as pg
    import fusediff.kernels.groupnorm as kg
    import fusediff.lowering.backend as lb

    assert fusediff.LAYOUT in ("checkout", "wheel")
    for mod, folder in ((kg, "kernels"), (pg, "fxpasses/patterns"), (lb, "lowering")):
        if fusediff.LAYOUT == "checkout":
            assert Path(mod.__file__).parent == ROOT / folder
        assert mod.__name__.startswith("fusediff.")
    # None of our files ever runs under a bare top-level name (a second copy of every op registration).
    # (An empty namespace module `kernels` may exist: transformers' availability probe imports the
    # root's namespace portion when Hugging Face's package is absent, and then ignores it.)
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in SUBPACKAGES and getattr(mod, "__file__", None):
            assert not Path(mod.__file__).resolve().is_relative_to(ROOT / name.split(".")[0]), \
                f"{name} imported from the checkout under its bare name"


def test_lock_pins_hf_kernels():
    # The locked environment contains the package that collided; the guards below run against it.
    lock = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^kernels==\S+", lock, re.M), "constraints.txt should pin Hugging Face's kernels"
    assert re.search(r"^transformers==\S+", lock, re.M)


@needs_hf_kernels
def test_hf_kernels_wins_inside_this_process():
    # pytest put the checkout root on sys.path (tests/ is a package): `kernels` is still Hugging Face's.
    assert str(ROOT) in [str(Path(p).resolve()) for p in sys.path if p]
    import kernels

    assert Path(kernels.__file__).resolve().parent != ROOT / "kernels"
    assert hasattr(kernels, "CUDAProperties")


@needs_hf_kernels
def test_checkout_root_imports_diffusers_and_hf_kernels():
    # `python -c` at the root puts the root first on sys.path: the case that broke every diffusers import.
    code = ("import kernels, fusediff; from pathlib import Path; "
            "from kernels import CUDAProperties; "
            "from diffusers import UNet2DConditionModel; "
            "print(Path(kernels.__file__).resolve()); print(fusediff.LAYOUT)")
    out = _py(code, cwd=ROOT)
    kfile, layout = out.stdout.strip().splitlines()[-2:]
    assert Path(kfile).parent != ROOT / "kernels", kfile
    assert layout == "checkout"


HF = _hf_kernels_installed()
_COMPILE = """
import torch, torch.nn as nn, torch.nn.functional as F
""" + ("import kernels  # Hugging Face's, imported first\n" if HF else "") + """
from fusediff.lowering import backend as lb

class Half(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.conv = nn.GroupNorm(4, 16), nn.Conv2d(16, 16, 3, padding=1)
    def forward(self, x):
        return self.conv(F.silu(self.norm(x)))

m, x = Half().eval(), torch.randn(2, 16, 6, 5)
with torch.no_grad():
    ref = m(x)
    out = torch.compile(m, backend="fusediff", fullgraph=True)(x)   # the entry point, by name
torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
print(lb.LAST_RESULTS[-1].rewritten)
""" + ("print(kernels.__name__, hasattr(kernels, 'CUDAProperties'))\n" if HF else "")


def test_outside_checkout_compile_and_cli(tmp_path):
    out = _py(_COMPILE, cwd=tmp_path)
    assert "'groupnorm_silu': 1" in out.stdout, out.stdout
    if HF:
        assert out.stdout.strip().endswith("kernels True"), out.stdout
    # the console script where pip installed one (editable install), else the module
    cmd = [str(BIN / "fusediff")] if (BIN / "fusediff").exists() else [sys.executable, "-m", "fusediff.lowering.cli"]
    cli = subprocess.run([*cmd, "inspect", "digits"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-4000:]
    assert "group_norm_silu" in cli.stdout or "groupnorm" in cli.stdout.lower(), cli.stdout[:2000]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a clean copy: setuptools' build/ folder in the checkout would carry stale files
    # (a module deleted since the last build) into the wheel.
    src = tmp_path_factory.mktemp("src") / "fusediff"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "out", ".whl",
                                                             "__pycache__", ".pytest_cache"))
    d = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(d),
                    str(src)], check=True, capture_output=True, text=True, timeout=600)
    (whl,) = d.glob("fusediff-*.whl")
    return whl


def test_wheel_installs_only_fusediff(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fusediff", next(t for t in tops if t.endswith(".dist-info"))}, sorted(tops)
    for must in ("fusediff/kernels/groupnorm.py", "fusediff/fxpasses/patterns/groupnorm.py",
                 "fusediff/lowering/backend.py", "fusediff/zoo/__init__.py",
                 "fusediff/assets/digits_unet.pt", "fusediff/_layout.py"):
        assert must in names, must
    for name in SUBPACKAGES:  # the wheel puts the folders inside fusediff, still without __init__.py
        assert f"fusediff/{name}/__init__.py" not in names
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "fusediff = fusediff.lowering.backend:fusediff_backend" in text
    assert "fusediff = fusediff.lowering.cli:main" in text


def test_wheel_install_beside_hf_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=600)
    assert not (site / "kernels").exists() and not (site / "lowering").exists()
    code = ("import fusediff, torch; from pathlib import Path; "
            "assert fusediff.LAYOUT == 'wheel', fusediff.LAYOUT; "
            f"assert Path(fusediff.__file__).resolve().parent == Path({str(site / 'fusediff')!r}).resolve(); "
            + ("import kernels; assert hasattr(kernels, 'CUDAProperties'); " if HF else "") +
            "assert hasattr(torch.ops.fusediff, 'int8_linear'); "
            "import fusediff.kernels.groupnorm as g; print(g.__file__)")
    out = _py(code, cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert out.stdout.strip().startswith(str(site))
    # ... and the compile path works from the wheel too.
    out = _py(_COMPILE, cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert "'groupnorm_silu': 1" in out.stdout, out.stdout
