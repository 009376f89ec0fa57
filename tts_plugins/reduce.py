"""Row reductions over a vocabulary for the hot path, faster than torch's on CPUs and exact: top-k and argmax.

Both read each row once for the maxima of groups of ``GROUP`` columns (a fast, vectorized reduction), then look
only inside the few groups that can hold the answer. Scratch buffers come from a
:class:`~tts_plugins.slots.Workspace`, so a step allocates nothing of the vocabulary's size.
"""

from __future__ import annotations

import torch

from tts_plugins.slots import Workspace

__all__ = ["GROUP", "argmax_rows", "topk_rows"]

GROUP = 64  # columns per group of the two-pass reductions


def _group_maxima(x: torch.Tensor, g: int, scratch: Workspace | None) -> tuple[torch.Tensor, bool]:
    """The maxima of ``x``'s groups of ``g`` columns (the last ``vocab % g`` columns are not in any), and whether
    the groups are strided (group j: columns j, j + w, j + 2w, ... with w = vocab // g) rather than contiguous
    (group j: columns j*g .. j*g + g - 1). float32 reduces contiguous groups fastest; half precision, whose
    reductions are slow on CPUs, takes the elementwise maximum of the two halves of the columns log2(g) times
    (into ``scratch``'s reused buffer), which leaves the strided groups."""
    n, vocab = x.shape
    w = vocab // g
    if x.dtype == torch.float32 or g & (g - 1):
        return x[:, : w * g].view(n, w, g).amax(-1), False
    size = n * w * g // 2
    flat = scratch.get("topk_halves", 1, size + size // 2, x.dtype)[0] if scratch is not None else x.new_empty(size + size // 2)
    bufs = (flat[:size], flat[size:])  # ping-pong: each level writes a contiguous [n, width] (no copy behind an out= view)
    cur, width, turn = x, w * g, 0
    while width > w:
        width //= 2
        out = bufs[turn][: n * width].view(n, width)
        torch.maximum(cur[:, :width], cur[:, width : 2 * width], out=out)
        cur, turn = out, 1 - turn
    return cur, True


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
    gmax, strided = _group_maxima(x, g, scratch)
    tail = vocab - w * g
    if tail:  # the last vocab % g columns: one more, shorter group (index w)
        gmax = torch.cat([gmax, x[:, w * g :].amax(-1, keepdim=True)], 1)
    if rows is not None:
        gmax = gmax.index_select(0, rows)
    groups = gmax.topk(min(k, gmax.shape[1]), dim=-1).indices  # [n, k]
    offs = torch.arange(g, device=x.device)
    last = groups == w
    if strided:
        first = torch.where(last, w * g, groups).unsqueeze(-1)
        cols = first + torch.where(last, 1, w).unsqueeze(-1) * offs
    else:
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
