"""The GPU benchmarks' CPU-checkable parts: they refuse to run without CUDA (no misleading CPU
numbers), results files carry every column, and the end-to-end U-Net providers build and run
(inductor replaced by the eager inner backend) so a GPU session never spends its time on a crash."""
from __future__ import annotations

import csv
import glob
import importlib
import os

import pytest
import torch

import fusediff
from fusediff import zoo
from benchmarks import bench_unet
from benchmarks.common import Row, write_results
from fusediff.fxpasses import modiff as md
from tests.tolerances import MODEL_TOL, SQNR_DB, assert_close, sqnr_db

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-machine refusal")
@pytest.mark.parametrize("name", BENCH)
def test_benchmarks_refuse_to_run_without_cuda(name, tmp_path):
    mod = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit, match="CUDA"):
        mod.run(str(tmp_path))
    assert not list(tmp_path.iterdir())  # nothing written


def test_results_carry_extra_columns_and_environment(tmp_path):
    rows = [Row("unet", "(2, 4, 64, 64)", "bfloat16", "eager", 2.0, 1.9, 2.1, "x vs eager", 1.0,
                extra={"compile_s": 0.5}),
            Row("unet", "(2, 4, 64, 64)", "bfloat16", "fusediff", 1.0, 0.9, 1.1, "x vs eager", 2.0,
                extra={"compile_s": 9.0, "peak_MiB": 12.5})]
    csv_path, md_path = write_results(rows, str(tmp_path), "t")
    with open(csv_path) as f:
        got = list(csv.DictReader(f))
    assert [r["provider"] for r in got] == ["eager", "fusediff"]
    assert [r["compile_s"] for r in got] == ["0.5", "9.0"] and [r["peak_MiB"] for r in got] == ["", "12.5"]
    assert all(r["git_sha"] and r["torch"] == torch.__version__ for r in got)
    assert "peak_MiB" in open(md_path).read()


def test_a_benchmark_cut_short_keeps_its_rows(tmp_path):
    """benchmarks/gpu_session.sh runs each benchmark under `timeout`: on SIGTERM the rows measured so
    far are written (``<name>_partial.csv``) instead of lost."""
    import subprocess
    import sys

    code = ("import os, signal\n"
            "from benchmarks.common import Row\n"
            "Row('op', 's', 'bf16', 'eager', 1.5, 1.4, 1.6)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "import time; time.sleep(30)\n")
    env = dict(os.environ, FUSEDIFF_BENCH_PARTIAL=str(tmp_path / "bench_x"), PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert p.returncode == 124, p.stderr
    with open(tmp_path / "bench_x_partial.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["op"], r["ms"]) for r in rows] == [("op", "1.5")]


@pytest.fixture
def reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fusediff ops on their torch references (fast on CPU)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("provider", [p for p in bench_unet.PROVIDERS if p.startswith("fusediff")
                                      and p != "fusediff-max-autotune"])  # = "fusediff" without inductor
def test_unet_providers_run(provider, reference_path):
    """Each fusediff provider of bench_unet on the zoo LDM: the float ones match eager, the
    quantized ones time integer steps (every layer primed after the warm-up) near the float model."""
    model, args, kwargs = zoo.build("ldm")
    with torch.no_grad():
        ref = zoo.output_tensor(model(*args, **kwargs))
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            step = bench_unet.warm(provider, bench_unet.make(provider, model, torch.float32, inner="eager"),
                                   model, args, kwargs)
            out = zoo.output_tensor(step())
        layers = md.quant_layers(model)
        if provider.endswith("-w8a8"):
            stateful = [m for m in layers if m.state_kinds()]  # MoDiff layers; baseline: the context K/V
            assert stateful and all(bool(m.primed) for m in stateful)
            assert all(m.mode == provider.split("-")[1] for m in layers)
            assert sqnr_db(ref, out) > SQNR_DB["int8"]
        else:
            assert not layers
            assert_close(out, ref, {torch.float32: MODEL_TOL})
    finally:
        layers = None
        torch._dynamo.reset()


def test_unet_unknown_provider_and_mode():
    with pytest.raises(ValueError, match="unknown provider"):
        bench_unet.make("fusediff-w3", torch.nn.Identity(), torch.float32)
    with pytest.raises(ValueError, match="mode"):
        fusediff.backend(mode="fastest")
