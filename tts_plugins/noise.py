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
    bits = splitmix64(_keys(seed, position, layer).unsqueeze(-1) ^ _mixed_columns(n, seed.device))
    return (_shr(bits, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def _keys(seed: torch.Tensor, position: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
    row = splitmix64(splitmix64(seed.to(torch.int64)) ^ position.to(torch.int64))
    if isinstance(layer, torch.Tensor):
        return splitmix64(row.unsqueeze(0) ^ layer.to(torch.int64).unsqueeze(1))  # [L, T]
    return splitmix64(row ^ int(layer))


def gumbel(seed: torch.Tensor, position: torch.Tensor, layer: int | torch.Tensor, n: int) -> torch.Tensor:
    """``[T, n]`` (or ``[L, T, n]`` for a tensor of layers) float32 Gumbel(0, 1) draws, reproducible from
    (seed, position, layer): ``-log(-log(u))`` with ``u`` the top 24 bits of the same hash as :func:`uniform`
    (centred in its cell, so ``u`` is in (0, 1); the draws lie within about (-2.8, 17.3), a truncation of
    probability 3e-8). Computed in place, a few buffers in all (the RoE step draws every MoE layer at once)."""
    key = _keys(seed, position, layer)
    z = key.unsqueeze(-1) ^ _mixed_columns(n, seed.device)  # the one int64 buffer, hashed in place
    tmp = torch.empty_like(z)

    def xorshift(s: int) -> None:
        torch.bitwise_right_shift(z, s, out=tmp)
        tmp.bitwise_and_((1 << (64 - s)) - 1)
        z.bitwise_xor_(tmp)

    z.add_(_GOLDEN)
    xorshift(30)
    z.mul_(_M1)
    xorshift(27)
    z.mul_(_M2)
    xorshift(31)
    torch.bitwise_right_shift(z, 40, out=tmp)
    tmp.bitwise_and_((1 << 24) - 1)
    u = tmp.to(torch.float32)
    u.add_(0.5).mul_(1.0 / (1 << 24))
    return u.log_().neg_().log_().neg_()
