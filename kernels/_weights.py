"""Offline (host, plain torch) weight quantization and the INT4 weight format of the int8 GEMMs.

Quantizer (symmetric, zero point 0; MoDiff eq. 4-5 with z = 0 and round-to-nearest-even):

    qmax   = 2**(b-1) - 1                    # INT8: 127, INT4: 7 (symmetric: -128 / -8 never used)
    Q(w)   = clamp(round(w / s), -qmax, qmax)
    deQ(q) = s * q

Weights are quantized per output channel (dim 0), statically, with the scale chosen by an MSE grid
search over clipping ratios ``r`` in [0.5, 1.0] of the row's absmax (``s = r * absmax / qmax``;
``r = 1`` is min-max, so the search is never worse than min-max in MSE).

INT4 packing: a tensor is flattened to ``(Cout, K)`` (K = everything after dim 0, in memory order
of the flattened view; the conv/linear kernels document their K order), and two int4 values share
one uint8 byte along K: element ``2i`` in the LOW nibble, ``2i+1`` in the HIGH nibble, each nibble
in two's complement (-8..7). Odd K is padded with a 0 nibble. Packed shape ``(Cout, ceil(K / 2))``
uint8. ``kernels._int8_gemm._load_w_tile`` unpacks the same format in registers.

``kernels.quantize`` re-exports the public names (``qmax_for_bits``, ``quantize_weight``,
``pack_int4``, ``unpack_int4``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["qmax_for_bits", "check_bits", "quantize_weight", "pack_int4", "unpack_int4", "pack_weight",
           "unpack_weight"]

_BITS = (4, 8)


def check_bits(name: str, bits) -> None:
    """Raise unless ``bits`` is 4 or 8 (an int, not a bool)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _BITS:
        raise ValueError(f"fusediff: {name} must be 4 or 8, got {bits!r}")


def qmax_for_bits(bits: int) -> int:
    """Largest symmetric level: 127 for INT8, 7 for INT4."""
    check_bits("bits", bits)
    return (1 << (bits - 1)) - 1


def quantize_weight(
    w: torch.Tensor, bits: int, search: str = "mse", n_grid: int = 100, min_ratio: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric weight quantization (static, offline).

    Args:
        w: float weight, dim 0 = output channels (conv ``(Cout, Cin, kh, kw)``, linear ``(F, K)``).
        bits: 4 or 8.
        search: ``"mse"`` (grid search over ``n_grid`` clipping ratios in ``[min_ratio, 1]`` of the
            row absmax, minimizing the row's squared error) or ``"minmax"`` (ratio 1).
    Returns:
        ``(w_int, scale)``: ``w_int`` int8 with ``w``'s shape and values in ``[-qmax, qmax]``,
        ``scale`` fp32 ``(Cout,)`` with ``w ≈ scale[:, None, ...] * w_int``.
    Example:
        >>> w_int, s = quantize_weight(conv.weight, 8)
    """
    check_bits("bits", bits)
    if search not in ("mse", "minmax"):
        raise ValueError(f"fusediff: search must be 'mse' or 'minmax', got {search!r}")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"fusediff: w must be a float tensor, got {getattr(w, 'dtype', type(w))}")
    if w.dim() < 2:
        raise ValueError(f"fusediff: w must have an output-channel dim and at least one more, got shape {tuple(w.shape)}")
    if n_grid < 1 or not (0.0 < min_ratio <= 1.0):
        raise ValueError(f"fusediff: need n_grid >= 1 and 0 < min_ratio <= 1, got {n_grid}, {min_ratio}")
    qmax = float(qmax_for_bits(bits))
    w2 = w.detach().reshape(w.shape[0], -1).float()
    if not torch.isfinite(w2).all():
        raise ValueError("fusediff: w contains NaN/Inf; cannot quantize")
    absmax = w2.abs().amax(dim=1)
    base = torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / qmax  # zero rows: s = 1/qmax, q = 0

    def _err(s: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w2 / s[:, None]), -qmax, qmax)
        return (q * s[:, None] - w2).double().pow(2).sum(dim=1)

    if search == "minmax" or n_grid == 1:
        best = base
    else:
        ratios = [min_ratio + (1.0 - min_ratio) * i / (n_grid - 1) for i in range(n_grid)]
        ratios[-1] = 1.0  # min-max is always a candidate
        best, best_err = base, _err(base)
        for r in ratios[:-1]:
            s = base * r
            e = _err(s)
            better = e < best_err
            best = torch.where(better, s, best)
            best_err = torch.where(better, e, best_err)
    w_int = torch.clamp(torch.round(w2 / best[:, None]), -qmax, qmax).to(torch.int8).reshape(w.shape)
    return w_int, best.float().contiguous()


def pack_int4(w_int: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 tensor, values in [-8, 7]) two per byte along the flattened K axis.

    ``w_int`` is viewed as ``(Cout, K)``; element ``2i`` goes to the low nibble, ``2i+1`` to the
    high nibble (two's complement); odd K is padded with 0. Returns uint8 ``(Cout, ceil(K/2))``.
    """
    if not isinstance(w_int, torch.Tensor) or w_int.dtype != torch.int8:
        raise TypeError(f"fusediff: w_int must be an int8 tensor, got {getattr(w_int, 'dtype', type(w_int))}")
    if w_int.dim() < 1:
        raise ValueError("fusediff: w_int must have at least one dim")
    w2 = w_int.reshape(w_int.shape[0], -1).to(torch.int32)
    if w2.numel() and (w2.min() < -8 or w2.max() > 7):
        raise ValueError(f"fusediff: int4 values must lie in [-8, 7], got [{int(w2.min())}, {int(w2.max())}]")
    if w2.shape[1] % 2:
        w2 = F.pad(w2, (0, 1))
    lo = w2[:, 0::2] & 0xF
    hi = w2[:, 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(Cout, ceil(k/2))`` -> int8 ``(Cout, k)`` in [-8, 7]."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"fusediff: packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if packed.dim() != 2:
        raise ValueError(f"fusediff: packed must be 2-D (Cout, ceil(K/2)), got shape {tuple(packed.shape)}")
    if not isinstance(k, int) or (k + 1) // 2 != packed.shape[1]:
        raise ValueError(f"fusediff: k={k!r} does not match packed width {packed.shape[1]} (need ceil(k/2))")
    b = packed.to(torch.int32)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    both = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :k]
    return (both - ((both >> 3) << 4)).to(torch.int8)  # sign-extend the nibble


def pack_weight(w_mat: torch.Tensor, bits: int) -> torch.Tensor:
    """The GEMM weight ``w_q`` from an int8 ``(Cout, K)`` matrix: packed INT4, or the int8 matrix."""
    return pack_int4(w_mat) if bits == 4 else w_mat.contiguous()


def unpack_weight(w_q: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: the int8 ``(Cout, k)`` matrix of a GEMM weight ``w_q``."""
    return unpack_int4(w_q, k) if w_bits == 4 else w_q
