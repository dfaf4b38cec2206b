"""Building blocks of the activation quantizers in ``kernels/quantize.py`` (``fusediff::quantize_act``,
``fusediff::modiff_quantize``, ``fusediff::group_norm_quantize``).

Quantizer (symmetric, zero point 0, round-to-nearest-even), with a dynamic absmax scale per sample
``(N,)`` or per tensor ``(1,)``:

    s      = absmax / qmax  (1 where absmax == 0)
    Q(d)   = clamp(round(d / s), -qmax, qmax)  (NaN -> 0; the NaN lives in s)
    MoDiff eq. 6 ("Real-Time On-Device Diffusion: Practical Acceleration via Fused Low-Bit Kernels"):
           Δ = a_t - â_{t+1};  q = Q(Δ);  â_t = deQ(q) + â_{t+1}    (first step: â_T = a_T, q = 0, s = 1)

Device helpers (``@triton.jit``): :func:`_quantize_levels` (Q as fp32 levels, bit-exact against
``torch.round``), :func:`_tile_absmax_bits` / :func:`_scale_from_amax_bits` (the per-sample absmax
travels as the int32 bits of a non-negative fp32 through ``atomic_max``: those bits order like the
floats, NaN above +Inf), :func:`_store_scale`, and :func:`_modiff_update` (eq. 6 on a tile: q
levels out, â updated in place).

Host helpers: the (N, C, S) view of 2-D / 3-D / 4-D activations, the q / scale outputs (q
channels_last for 4-D, so the implicit-GEMM conv reads channels contiguously), the tile heuristic,
``primed`` on the data's device, the argument checks, and the pure-torch Q / absmax of the
references.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common

if _common.HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import _store_cast


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------

if _common.HAS_TRITON:

    @triton.jit
    def _round_half_even(x):
        # x is already clamped to [-qmax, qmax] (|x| <= 127), where x + 0.5 is exact in fp32, so
        # floor(x + 0.5) is exact and ties are fixed up to even: matches torch.round bit for bit.
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _quantize_levels(d, scale, QMAX: tl.constexpr):
        """Q(d) as fp32 integer levels: clamp(round(d / s), -QMAX, QMAX); NaN -> 0."""
        v = tl.math.div_rn(d, scale)  # IEEE division, like torch (Triton's '/' is approximate on GPU)
        is_nan = v != v
        v = tl.minimum(tl.maximum(v, -QMAX * 1.0), QMAX * 1.0)
        v = _round_half_even(v)
        return tl.where(is_nan, 0.0, v)

    @triton.jit
    def _scale_from_amax_bits(
        amax_ptr,  # (N,) or (1,) int32: absmax bits (idx = n, or 0 per tensor)
        idx, QMAX: tl.constexpr,
    ):
        """s = absmax / qmax from the atomic buffer (bits of a non-negative fp32); absmax 0 -> 1."""
        absmax = tl.load(amax_ptr + idx).to(tl.float32, bitcast=True)
        return tl.where(absmax == 0.0, 1.0, tl.math.div_rn(absmax, QMAX * 1.0))

    @triton.jit
    def _tile_absmax_bits(d, valid):
        """Bits of max|d| over valid entries, NaN if any valid entry is NaN (tl.max may drop NaN)."""
        ad = tl.where(valid, tl.abs(d), 0.0)
        amax = tl.max(tl.max(ad, axis=1), axis=0)
        n_nan = tl.sum(tl.sum((valid & (d != d)).to(tl.int32), axis=1), axis=0)
        amax = tl.where(n_nan > 0, float("nan"), amax)
        return amax.to(tl.int32, bitcast=True)

    @triton.jit
    def _store_scale(
        scale_ptr,  # (N,) or (1,) fp32 out
        n, scale, first, PER_SAMPLE: tl.constexpr,
    ):
        """Store sample ``n``'s scale once: from the ``first`` program of the sample (of sample 0 per tensor)."""
        if PER_SAMPLE:
            if first:
                tl.store(scale_ptr + n, scale)
        else:
            if first & (n == 0):
                tl.store(scale_ptr, scale)

    @triton.jit
    def _modiff_update(
        a,  # [tile] fp32: a_t
        ah_ptrs,  # [tile] pointers into â (float): â_{t+1} in, â_t out
        mask, primed, scale, QMAX: tl.constexpr,
    ):
        """MoDiff eq. (6) on a tile: returns the levels of Q(a - â_{t+1}) and stores â_t = deQ(q) + â_{t+1};
        not primed (first step): levels 0 and â_T = a_T."""
        # (tl.where, not '&': the interpreter mis-types a bool tensor & a loaded bool scalar)
        ah = tl.load(ah_ptrs, mask=tl.where(primed, mask, False), other=0.0).to(tl.float32)
        v = tl.where(primed, _quantize_levels(a - ah, scale, QMAX), 0.0)
        ah_new = tl.where(primed, ah + scale * v, a)
        tl.store(ah_ptrs, _store_cast(ah_new, ah_ptrs), mask=mask)
        return v


# ------------------------------------------------------------------------------------------------
# Host helpers: layout, outputs, tiles
# ------------------------------------------------------------------------------------------------


def ncs_strides(t: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """Strides of ``t`` viewed as (N, C, S): 4-D merges H and W into S when memory allows."""
    if t.dim() == 2:  # (N, K): C = 1
        return t.stride(0), 0, t.stride(1)
    if t.dim() == 3:  # (N, L, K)
        return t.stride(0), t.stride(1), t.stride(2)
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if w == 1:
        return sn, sc, sh
    if h == 1 or sh == w * sw:
        return sn, sc, sw
    return None


def ncs_dims(t: torch.Tensor) -> tuple[int, int, int]:
    if t.dim() == 2:
        return t.shape[0], 1, t.shape[1]
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.shape[2]
    return t.shape[0], t.shape[1], t.shape[2] * t.shape[3]


def ncs_view(a: torch.Tensor, a_hat: Optional[torch.Tensor]) -> tuple[torch.Tensor, tuple, tuple]:
    """``(a, strides of a, strides of â)`` as (N, C, S); a is copied dense when its spatial dims do not
    merge, â (updated in place) must merge; absent â: zero strides."""
    sa = ncs_strides(a)
    if sa is None:
        a = a.contiguous()
        sa = ncs_strides(a)
    sh = ncs_strides(a_hat) if a_hat is not None else (0, 0, 0)
    if sh is None:
        raise ValueError("fusediff: a_hat must be contiguous or channels_last (it is updated in place)")
    return a, sa, sh


def new_q(a: torch.Tensor) -> torch.Tensor:
    """The q output: int8, a's shape, channels_last when 4-D (the conv reads channels contiguously)."""
    if a.dim() == 4:
        return torch.empty(a.shape, dtype=torch.int8, device=a.device, memory_format=torch.channels_last)
    return torch.empty(a.shape, dtype=torch.int8, device=a.device)


def new_scale(a: torch.Tensor, per_sample: bool) -> torch.Tensor:
    return torch.empty((a.shape[0] if per_sample else 1,), dtype=torch.float32, device=a.device)


def tile_blocks(C: int, S: int, block_c_max: Optional[int] = 32) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_S, num_warps)`` of a [channels, positions] tile within the element budget."""
    block_c = _common.next_pow2(C) if block_c_max is None else min(_common.next_pow2(C), block_c_max)
    budget = 8192 if _common.interpret_mode() else 4096
    block_s = max(16, min(_common.next_pow2(S), max(1, budget // block_c)))
    num_warps = 8 if block_c * block_s >= 4096 else 4
    return block_c, block_s, num_warps


_PRIMED_TRUE: dict[torch.device, torch.Tensor] = {}


def primed_on(primed: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``primed`` on the data's device (kernels read it in-kernel, no host sync)."""
    if primed is None:
        if device not in _PRIMED_TRUE:
            _PRIMED_TRUE[device] = torch.ones((), dtype=torch.bool, device=device)
        return _PRIMED_TRUE[device]
    return primed if primed.device == device else primed.to(device)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def check_act(name: str, a: torch.Tensor) -> None:
    _common.check_float(name, a)
    if a.dim() not in (2, 3, 4):
        raise ValueError(f"fusediff: {name} must be 2-D (N, K), 3-D (N, L, K) or 4-D (N, C, H, W), got {tuple(a.shape)}")


def check_per_sample(per_sample) -> None:
    if not isinstance(per_sample, bool):
        raise TypeError(f"fusediff: per_sample must be a bool, got {type(per_sample).__name__}")


def check_primed(primed: torch.Tensor) -> None:
    if not isinstance(primed, torch.Tensor) or primed.dtype != torch.bool or primed.dim() != 0:
        raise TypeError(
            "fusediff: primed must be a 0-d bool tensor (False on the first step of a trajectory), got "
            f"{getattr(primed, 'dtype', type(primed))} with shape {tuple(getattr(primed, 'shape', ()))}"
        )


def check_cache(a: torch.Tensor, a_hat: torch.Tensor, what: str = "a") -> None:
    _common.check_float("a_hat", a_hat)
    if tuple(a_hat.shape) != tuple(a.shape):
        raise ValueError(
            f"fusediff: a_hat shape {tuple(a_hat.shape)} != {what} shape {tuple(a.shape)}; the MoDiff cache is per "
            "sample and never broadcast: re-seed the trajectory (reset the caches) after a batch/shape change"
        )
    if a_hat.device != a.device:
        raise ValueError(f"fusediff: a_hat is on {a_hat.device} but {what} is on {a.device}")


# ------------------------------------------------------------------------------------------------
# Pure-torch pieces of the references
# ------------------------------------------------------------------------------------------------


def absmax_scale_ref(d: torch.Tensor, qmax: int, per_sample: bool) -> torch.Tensor:
    """fp32 scale (N,) or (1,): absmax / qmax (NaN propagates), 1 where absmax == 0."""
    flat = d.reshape(d.shape[0], -1) if per_sample else d.reshape(1, -1)
    absmax = flat.abs().amax(dim=1) if flat.shape[1] else torch.zeros(flat.shape[0], device=d.device)
    return torch.where(absmax == 0, torch.ones_like(absmax), absmax / qmax).float()


def quantize_levels_ref(d: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Q(d) with a per-sample (or (1,)) scale broadcast over dims 1..; NaN -> 0. Returns fp32 levels."""
    s = scale.reshape((-1,) + (1,) * (d.dim() - 1))
    v = d / s
    is_nan = torch.isnan(v)
    v = torch.round(torch.clamp(v, -qmax, qmax))
    return torch.where(is_nan, torch.zeros_like(v), v)
