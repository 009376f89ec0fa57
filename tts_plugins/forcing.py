"""The forced-token primitive every technique that dictates tokens shares (think steering, group stop, trimming).

``force_kernel`` turns the rows whose slot has a forced token into one-hot
rows (every other logit ``-inf``, the forced token 0); other rows are not
touched. ``putter`` writes single elements through a flat ``index_put_``:
``scatter_`` on a CPU bf16 tensor rewrites the whole tensor (about 16x slower
than a copy).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tts_plugins.slots import HostMirror, Workspace


def putter(logits: torch.Tensor):
    """``put(cols[n, k], values[n, k], rows=None)``: ``logits[rows[i], cols[i, j]] = values[i, j]``."""
    if not logits.is_contiguous():

        def put_scatter(cols, values, rows=None):
            if rows is None:
                logits.scatter_(1, cols, values)
            else:
                logits[rows[:, None], cols] = values

        return put_scatter
    flat, width = logits.view(-1), logits.shape[1]

    def put(cols, values, rows=None):
        base = (torch.arange(cols.shape[0], device=cols.device) if rows is None else rows) * width
        flat.index_put_(((base[:, None] + cols).reshape(-1),), values.reshape(-1))

    return put


def force_kernel(
    logits: torch.Tensor,
    row_slots: torch.Tensor,
    force_tok: torch.Tensor,
    force_rows: torch.Tensor | None = None,
    put=None,
    keep_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Force ``force_tok[slot]`` (>= 0) on each row; -1 leaves the row alone.

    ``force_rows``: the rows to force when the caller knows them without a
    device sync (then only they are written); otherwise every row is masked.
    ``keep_rows``: with ``force_rows``, the other rows, when they are few:
    filling the whole tensor and restoring them beats a scattered row fill.
    """
    put = put or putter(logits)
    neg_inf = float("-inf")
    if force_rows is None:
        f = force_tok[row_slots]
        forced = f >= 0
        fi = f.clamp(min=0)[:, None]
        keep = logits.gather(1, fi)
        logits.masked_fill_(forced[:, None], neg_inf)
        put(fi, torch.where(forced[:, None], torch.zeros_like(keep), keep))
    else:
        f = force_tok[row_slots[force_rows]]
        if force_rows.shape[0] == logits.shape[0]:  # every row: a plain fill is the cheapest write
            logits.fill_(neg_inf)
        elif keep_rows is not None:
            saved = logits.index_select(0, keep_rows)
            logits.fill_(neg_inf)
            logits.index_copy_(0, keep_rows, saved)
        else:
            logits.index_fill_(0, force_rows, neg_inf)
        if logits.is_contiguous():  # a scalar fill: no values tensor to allocate
            logits.view(-1).index_fill_(0, force_rows * logits.shape[1] + f, 0.0)
        else:
            put(f[:, None], torch.zeros(f.shape[0], 1, dtype=logits.dtype, device=logits.device), rows=force_rows)
    return logits


def few_other_rows(buffers: dict[str, torch.Tensor], forced: np.ndarray, device: torch.device, pin_memory: bool) -> torch.Tensor | None:
    """The unforced rows as a device tensor when they are fewer than a quarter of the batch, else None."""
    others = np.flatnonzero(~forced)
    if others.size == 0 or others.size * 4 >= forced.size:
        return None
    return upload_rows(buffers, others, device, pin_memory)


def upload_rows(buffers: dict[str, Any], rows: np.ndarray, device: torch.device, pin_memory: bool) -> torch.Tensor:
    """Row indices known on the host, as a device tensor, through the reused (pinned) staging of a
    :class:`~tts_plugins.slots.Workspace` kept in ``buffers``."""
    ws = buffers.get("ws")
    if ws is None:
        ws = buffers["ws"] = Workspace(device, pin_memory)
    return ws.upload("rows", rows.astype(np.int64, copy=False))


class ForcedTokens:
    """Per-slot "force this token next" state for ``max_slots + 1`` slots, and its ``apply``.

    Host writes (``set``) go to a :class:`~tts_plugins.slots.HostMirror` and
    reach the device at the next ``apply`` that needs them, only when something
    changed. ``apply``
    returns at once while no slot has a forced token, and touches only the
    forced rows when the adapter knows the rows on the host.
    """

    def __init__(self, max_slots: int, device: torch.device, pin_memory: bool) -> None:
        self.pin_memory = pin_memory and device.type != "cpu"
        self._tok = HostMirror(max_slots + 1, torch.int64, fill=-1, device=device, pin_memory=pin_memory)
        self.np = self._tok.np  # the token forced per slot, -1: none
        self.count = 0
        self._rows: dict[str, torch.Tensor] = {}
        self._keep: dict[str, torch.Tensor] = {}

    def set(self, slot: int, tok: int) -> None:
        """Force ``tok`` for ``slot`` from the next step on (-1: nothing)."""
        old = int(self.np[slot])
        if old != tok:
            self.count += int(tok >= 0) - int(old >= 0)
            self.np[slot] = tok
            self._tok.mark_dirty()

    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        if self.count == 0:
            return logits
        rows_dev = keep_dev = None
        if host_slots is not None:
            forced = self.np[host_slots] >= 0
            rows = np.flatnonzero(forced)
            if rows.size == 0:
                return logits
            rows_dev = upload_rows(self._rows, rows, logits.device, self.pin_memory)
            keep_dev = few_other_rows(self._keep, forced, logits.device, self.pin_memory)
        return force_kernel(logits, row_slots, self._tok.device_view(), rows_dev, keep_rows=keep_dev if rows_dev is not None else None)
