"""Shared helpers for the kernel families: dispatch policy and the proof-of-path counters.

Dispatch (see docs/architecture.md): CUDA tensors run the Triton kernel; CPU tensors run the
Triton kernel *interpreted* when ``TRITON_INTERPRET=1`` was set before triton was imported, and
the pure-torch reference otherwise. Every launch records which path ran in ``DISPATCH_COUNTS`` so
tests can prove the Triton path (not the reference) produced their numbers.
"""
from __future__ import annotations

import collections
import os
from typing import Literal

import torch

try:  # triton is optional at import time (macOS, Windows); the reference path still works.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

Path = Literal["triton", "reference"]


def _interpreter_numpy_compat() -> bool:
    """Let triton < 3.7's interpreter run under numpy >= 2.5 (CPU tier only; no GPU effect).

    Those interpreters turn a scalar kernel argument into a Python int with ``int(a)`` on a shape-(1,)
    array, which numpy 2.5 refuses ("only 0-dimensional arrays can be converted to Python scalars"),
    so every ``range(0, n, BLOCK)`` over a runtime ``n`` fails. Triton 3.7 squeezes first; this applies
    the same one-line change to older interpreters (the GPU image's triton 3.6 + numpy 2.5.2, met by
    ``make matrix-gpu-image``). Returns whether it patched.
    """
    if not (HAS_TRITON and interpret_mode()):
        return False
    import numpy as np

    try:
        int(np.zeros((1,), dtype=np.int32))
        return False  # this numpy still converts size-1 arrays: nothing to do
    except TypeError:
        pass
    import triton.runtime.interpreter as interp

    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_fusediff_compat", False):
        return False
    import inspect

    if "squeeze()" in inspect.getsource(orig):
        return False  # a fixed interpreter (triton >= 3.7)

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._fusediff_compat = True
    interp._patch_lang_tensor = patched
    return True

#: ``DISPATCH_COUNTS[(op_name, path)]`` counts launches per op and path.
DISPATCH_COUNTS: collections.Counter[tuple[str, str]] = collections.Counter()


def interpret_mode() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRETER_PATCHED = _interpreter_numpy_compat()


def choose_path(*tensors: torch.Tensor) -> Path:
    """Pick the implementation for tensors on one device: ``"triton"`` or ``"reference"``."""
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"fusediff: tensors on several devices {sorted(devices)}; move them to one device")
    dev = devices.pop() if devices else "cpu"
    if not HAS_TRITON:
        return "reference"
    if dev == "cuda":
        return "triton"
    if dev == "cpu" and interpret_mode():
        return "triton"
    return "reference"


def record(op: str, path: Path) -> None:
    """Count one launch of ``op`` on ``path``."""
    DISPATCH_COUNTS[(op, path)] += 1


def dispatch(name: str, tensors, launch, reference):
    """Run ``launch()`` (the Triton kernel) or ``reference()`` as :func:`choose_path` picks for
    ``tensors`` (None entries skipped), counting the launch under ``name``."""
    path = choose_path(*(t for t in tensors if t is not None))
    record(name, path)
    return launch() if path == "triton" else reference()


def reset_counts() -> None:
    DISPATCH_COUNTS.clear()


#: The float dtypes activations, caches and parameters may have (the default of :func:`check_float`).
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor, allowed=FLOATS) -> None:
    """Raise a clear error when ``t`` has a dtype the kernel does not take."""
    if t.dtype not in allowed:
        raise TypeError(f"fusediff: {name} must be one of {[str(d) for d in allowed]}, got {t.dtype}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpret_bf16(dtype: torch.dtype) -> bool:
    """Value of ``INTERPRET_BF16``, the one name of the interpreter-bf16 constexpr: interpreter + bf16.

    The interpreter's ``tl.dot`` multiplies bf16's uint16 storage as integers and its fp32 -> bf16
    cast truncates; kernels with this flag widen bf16 tiles to fp32 before a dot (exact) and round
    to nearest even before a bf16 store (:func:`_dot`, :func:`_to_dtype`). Always False on the GPU.
    """
    return interpret_mode() and dtype == torch.bfloat16


#: The one tile the int8 GEMMs use under the interpreter: CPU tests must not autotune; small
#: enough that tests cover several M/N tiles and K blocks, int8 dot minimums kept.
INTERPRET_GEMM_TILE = (64, 16, 32, 4, 1)


def gemm_configs(tiles: list[tuple[int, int, int, int, int]], group_m: int = 8) -> list:
    """``triton.Config`` list from ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` tiles;
    a single :data:`INTERPRET_GEMM_TILE` config (GROUP_M 4) under the interpreter."""
    if interpret_mode():
        tiles, group_m = [INTERPRET_GEMM_TILE], 4
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in tiles]


# ----------------------------------------------------------------------------- shared @triton.jit helpers
if HAS_TRITON:
    @triton.jit
    def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
        """acc + a @ b with fp32 accumulation.

        INTERPRET_BF16 (Triton interpreter and bf16 only): the interpreter's dot multiplies bf16's
        uint16 storage as integers, so operands already rounded to bf16 are widened to fp32 (exact)
        and multiplied in fp32 -- the same numbers a bf16 tensor-core dot accumulates.
        """
        if INTERPRET_BF16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _to_dtype(x, DTYPE: tl.constexpr, INTERPRET_BF16: tl.constexpr):
        """fp32 -> DTYPE with round-to-nearest-even, as on the GPU.

        INTERPRET_BF16: the interpreter (3.9) truncates fp32 -> bf16 instead of rounding, which
        would double the bf16 error the CPU tests see; round the fp32 bits to nearest-even first
        so the final conversion is exact. NaN/Inf survive (NaN's quiet bit lies above bit 16).
        """
        if INTERPRET_BF16:
            x = _round_to_bf16(x)
        return x.to(DTYPE)

    @triton.jit
    def _round_to_bf16(x):
        """fp32 ``x`` rounded to the nearest-even bf16 value, still fp32, so a later ``.to(bf16)`` is
        exact under the interpreter too (which truncates; GPUs and torch round to nearest even)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN

    @triton.jit
    def _store_cast(x, ptr):
        """fp32 -> the pointee dtype of ``ptr``, round-to-nearest-even for every target.

        bf16 is rounded in integer bits first: the Triton interpreter truncates fp32 -> bf16 while
        the GPU rounds to nearest even; pre-rounding makes both (and torch) agree bit for bit.
        """
        if ptr.dtype.element_ty == tl.bfloat16:
            x = _round_to_bf16(x)
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """Program id -> (pid_m, pid_n) in grouped order (Triton matmul tutorial): GROUP_M row tiles
        sweep the columns together, so the column (weight) tiles they share stay in L2."""
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_n
