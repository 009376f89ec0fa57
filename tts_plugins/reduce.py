"""Row reductions over a vocabulary for the hot path, faster than torch's on CPUs and exact: top-k and argmax.

Both read each row once for the maxima of groups of ``GROUP`` columns (a fast, vectorized reduction), then look
only inside the few groups that can hold the answer. Scratch buffers come from a
:class:`~tts_plugins.slots.Workspace`, so a step allocates nothing of the vocabulary's size.
"""

from __future__ import annotations

import torch

from tts_plugins.slots import Workspace

__all__ = ["GROUP", "argmax_rows", "row_max", "topk_rows"]

GROUP = 64  # columns per group of the two-pass reductions


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}  # half precision and its bits as signed integers


def _from_bits(hi: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The floating-point maxima of sets of half-precision values, from the maxima ``hi`` and minima ``lo`` of their
    bits read as signed integers. The formats are sign and magnitude: every value with a clear sign bit reads as a
    non-negative integer, in the values' order, above every negative value; negative values read in reverse order
    (a larger magnitude is a larger integer). So a set's maximum is its integer maximum when that is >= 0 (the set
    holds a value with a clear sign bit), else its integer minimum (all negative: the smallest magnitude). Exact, bit
    for bit; a NaN with its sign bit set is passed over where torch's maximum would return it. ``out``: where to
    write (``lo`` itself may be it)."""
    return torch.where(hi >= 0, hi, lo, out=out).view(dtype)


def _half_on_cpu(x: torch.Tensor) -> bool:
    """Half precision on a CPU, whose reductions over it are slow (of short runs: ~8x a copy) while those over the
    same bits as 16-bit integers run at memory speed."""
    return x.device.type == "cpu" and x.dtype in _BITS and x.stride(-1) == 1


def row_max(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(-1, keepdim=True)`` of ``x[n, V]``; on a CPU, half precision reads its bits as integers (two reads
    of a quarter to a half of a copy's cost each, against one at a copy's cost)."""
    if not _half_on_cpu(x):
        return x.amax(-1, keepdim=True)
    bits = x.view(_BITS[x.dtype])
    return _from_bits(bits.amax(-1, keepdim=True), bits.amin(-1, keepdim=True), x.dtype)


def _group_maxima(x: torch.Tensor, g: int, scratch: Workspace | None) -> torch.Tensor:
    """The maxima ``[n, w]`` of ``x``'s contiguous groups of ``g`` columns (group j: columns j*g .. j*g + g - 1;
    w = vocab // g, the last ``vocab % g`` columns are not in any). Half precision on a CPU reduces its bits as
    integers (:func:`_from_bits`), into ``scratch``'s reused buffers."""
    n, vocab = x.shape
    w = vocab // g
    if not _half_on_cpu(x):
        return x[:, : w * g].view(n, w, g).amax(-1)
    bits = x.view(_BITS[x.dtype])[:, : w * g].view(n, w, g)
    hi = torch.amax(bits, -1, out=scratch.get("group_hi", n, w, bits.dtype) if scratch is not None else None)
    lo = torch.amin(bits, -1, out=scratch.get("group_lo", n, w, bits.dtype) if scratch is not None else None)
    return _from_bits(hi, lo, x.dtype, out=lo)


def topk_rows(x: torch.Tensor, k: int, rows: torch.Tensor | None = None, scratch: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[rows].topk(k, -1)`` (values, ids) without sorting or copying the whole rows: exact, in two passes.

    Pass one reads each row once for the maxima of its groups of ``GROUP`` columns; pass two takes the top-k
    of the columns of the k groups with the largest maxima. That holds the top-k: a group left out has a maximum
    no larger than each of k kept groups' maxima, so k kept values are at least any value it holds. Equal values
    may be told apart differently than ``torch.topk`` does (the values are the same). ``rows``: the rows of ``x``
    to take (device indices), or None for all; the result is in the order of ``rows``. ``scratch``: where the
    first pass keeps its buffer from step to step.
    """
    n_all, vocab = x.shape
    n = n_all if rows is None else rows.shape[0]
    g = GROUP
    if vocab < 8 * g * k or n == 0:  # small rows: the plain top-k is as cheap
        src = x if rows is None else x.index_select(0, rows)
        return src.topk(k, dim=-1)
    # a quarter of the rows or fewer: copying them is cheaper than reading every row for the group maxima
    if rows is not None and 4 * n <= n_all:
        out = scratch.get("topk_rows", n, vocab, x.dtype) if scratch is not None else None
        x, rows = torch.index_select(x, 0, rows, out=out) if out is not None else x.index_select(0, rows), None
    w = vocab // g
    gmax = _group_maxima(x, g, scratch)
    tail = vocab - w * g
    if tail:  # the last vocab % g columns: one more, shorter group (index w)
        gmax = torch.cat([gmax, x[:, w * g :].amax(-1, keepdim=True)], 1)
    if rows is not None:
        gmax = gmax.index_select(0, rows)
    groups = gmax.topk(min(k, gmax.shape[1]), dim=-1).indices  # [n, k]
    offs = torch.arange(g, device=x.device)
    last = groups == w
    cols = (groups * g).unsqueeze(-1) + offs
    cols = cols.view(n, -1)  # [n, k * g]
    past = (last.unsqueeze(-1) & (offs >= tail)).view(n, -1)  # columns of the shorter group that do not exist
    safe = cols.clamp_max(vocab - 1)
    cand = x.gather(1, safe) if rows is None else x[rows.unsqueeze(1), safe]
    cand = cand.masked_fill(past, float("-inf"))
    vals, at = cand.topk(k, dim=-1)
    return vals, safe.gather(1, at)


def argmax_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x.argmax(-1)`` of a float32 ``x[n, V]`` (the first index of each row's maximum, as torch's), in two passes:
    the maxima of contiguous groups of ``GROUP`` columns, the first group holding the row's maximum, then the first
    maximum inside it. ``out``: an int64 ``[n]`` to write into."""
    n, vocab = x.shape
    g = GROUP
    w = vocab // g
    if x.dtype != torch.float32 or w < 4 or not x.is_contiguous():
        return torch.argmax(x, -1, out=out) if out is not None else torch.argmax(x, -1)
    gmax = x[:, : w * g].view(n, w, g).amax(-1)
    if w * g < vocab:  # the last, shorter group: after every other, so a tie goes to the earlier columns
        gmax = torch.cat([gmax, x[:, w * g :].amax(-1, keepdim=True)], 1)
    first = gmax.argmax(-1)  # the first group holding the maximum
    cols = (first * g).unsqueeze(-1) + torch.arange(g, device=x.device)
    past = cols >= vocab
    inside = x.gather(1, cols.clamp_max(vocab - 1)).masked_fill(past, float("-inf")).argmax(-1)
    found = first * g + inside
    return out.copy_(found) if out is not None else found
