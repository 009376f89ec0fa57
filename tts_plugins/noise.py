"""Counter-based random numbers on the device: draws that are a pure function of (seed, position, layer, column).

No generator state, so the draws do not depend on batch composition, chunking, preemption or which rank computes
them, and a reference loop can reproduce them exactly. RoE's routing noise and the RoE roster's sampling both use
them; splitmix64 is the mixing function (Steele, Lea and Flood, "Fast splittable pseudorandom number generators").
"""

from __future__ import annotations

import torch

__all__ = ["gumbel", "splitmix64", "uniform"]

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer over int64 tensors (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


_COLUMNS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _mixed_columns(n: int, device: torch.device) -> torch.Tensor:
    """``splitmix64(arange(n))``, computed once per width and device (the hot path asks for the same ones every step)."""
    cols = _COLUMNS.get((n, device))
    if cols is None:
        cols = _COLUMNS[(n, device)] = splitmix64(torch.arange(n, dtype=torch.int64, device=device))
    return cols


def uniform(seed: torch.Tensor, position: torch.Tensor, layer: int | torch.Tensor, n: int) -> torch.Tensor:
    """``[T, n]`` float64 uniforms in (0, 1), a pure function of (seed, position, layer, column).

    ``layer`` an int, or an int64 tensor ``[L]`` of layers: then ``[L, T, n]``, row ``l`` the same draws as
    ``uniform(seed, position, layer[l], n)`` (one pass for every layer of a step)."""
    row = splitmix64(splitmix64(seed.to(torch.int64)) ^ position.to(torch.int64))
    if isinstance(layer, torch.Tensor):
        key = splitmix64(row.unsqueeze(0) ^ layer.to(torch.int64).unsqueeze(1))  # [L, T]
    else:
        key = splitmix64(row ^ int(layer))
    bits = splitmix64(key.unsqueeze(-1) ^ _mixed_columns(n, seed.device))
    return (_shr(bits, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def gumbel(seed: torch.Tensor, position: torch.Tensor, layer: int | torch.Tensor, n: int) -> torch.Tensor:
    """``[T, n]`` (or ``[L, T, n]`` for a tensor of layers) Gumbel(0, 1) draws, reproducible from (seed, position, layer)."""
    return -torch.log(-torch.log(uniform(seed, position, layer, n)))
