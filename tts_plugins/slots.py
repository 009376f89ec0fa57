"""Building blocks for per-slot state: a slot allocator and a host buffer mirrored on the device.

Every technique and adapter that keeps per-request state needs the same two
things, and they are easy to get subtly wrong by hand:

* :class:`SlotAllocator` hands out the indices ``0 .. size - 1`` and takes them
  back; a slot is never handed out twice, freeing a slot that is not taken is
  an error (it would be handed out twice later), and running out raises
  :class:`SlotsExhausted` with a message that says whose slots ran out.
* :class:`HostMirror` is a host tensor (pinned when the device is not the CPU
  and the engine allows it) with a numpy view for cheap host writes, and its
  device copy. Host writes mark it dirty; :meth:`HostMirror.device_view` copies
  to the device (``non_blocking``) only when dirty, so a step where nothing
  changed costs one attribute check and allocates nothing. On a CPU engine the
  device tensor *is* the host tensor: no copy at all.

* :class:`Workspace` holds a hot path's scratch tensors and the staging of
  its small per-step index arrays: buffers grow to the largest batch seen and
  are reused, so a step allocates nothing once the batch size has been seen.

None of them ever syncs with the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["HostMirror", "SlotAllocator", "SlotsExhausted", "Workspace"]


class SlotsExhausted(RuntimeError):
    """Every slot is taken; the message names the owner and its capacity."""


class SlotAllocator:
    """Slots ``0 .. size - 1``; ``take`` returns the most recently freed one, else the lowest never used.

    O(1) per call. ``owner`` and ``what`` only make the exhaustion message
    readable: ``"{owner}: more than {size} {what} at once"``.
    """

    def __init__(self, size: int, *, what: str = "requests", owner: str = "tts_plugins") -> None:
        if size < 0:
            raise ValueError(f"a slot allocator needs size >= 0, got {size}")
        self.size, self.what, self.owner = size, what, owner
        self._free = list(range(size - 1, -1, -1))  # a stack: pop() gives slot 0 first
        self._taken = np.zeros(size, dtype=bool)

    def take(self) -> int:
        """A free slot, now taken; :class:`SlotsExhausted` when there is none."""
        if not self._free:
            raise SlotsExhausted(f"{self.owner}: more than {self.size} {self.what} at once")
        slot = self._free.pop()
        self._taken[slot] = True
        return slot

    def free(self, slot: int) -> None:
        """Give ``slot`` back; ``ValueError`` if it is not taken (a double free would hand it out twice)."""
        if not 0 <= slot < self.size or not self._taken[slot]:
            raise ValueError(f"{self.owner}: slot {slot} is not taken, so it cannot be freed (size {self.size})")
        self._taken[slot] = False
        self._free.append(slot)

    def free_all(self) -> None:
        """Every slot free again, in the initial order."""
        self._free = list(range(self.size - 1, -1, -1))
        self._taken[:] = False

    def __contains__(self, slot: object) -> bool:
        """Whether ``slot`` is taken."""
        return isinstance(slot, (int, np.integer)) and 0 <= slot < self.size and bool(self._taken[slot])

    @property
    def available(self) -> int:
        """How many slots are free."""
        return len(self._free)

    @property
    def in_use(self) -> int:
        """How many slots are taken."""
        return self.size - len(self._free)


class HostMirror:
    """A host tensor written through ``np`` (or ``host``) and copied to ``device`` only when it changed.

    Write the host side, call :meth:`mark_dirty`, and read the device side with
    :meth:`device_view` on the hot path. ``pin_memory`` is the engine's choice
    (``EngineInfo.pin_memory``); the host tensor is pinned only when it is set
    and the device is not the CPU, so the copy can overlap with compute.

    The device copy is enqueued on the current stream; the host buffer must not
    be rewritten before that copy ran. Engines sync with the host once a step
    (they read the sampled tokens), and host writes happen between steps, so
    writing between ``device_view`` calls is safe.
    """

    def __init__(self, shape: int | Sequence[int], dtype: torch.dtype, *, fill: Any = 0, device: torch.device | str = "cpu",
                 pin_memory: bool = False) -> None:
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.host = torch.full(shape, fill, dtype=dtype, pin_memory=bool(pin_memory) and not on_cpu)
        self.np = self.host.numpy()
        self._dev = self.host if on_cpu else self.host.to(self.device)
        self.dirty = False

    def mark_dirty(self) -> None:
        """The host side changed: the next :meth:`device_view` copies it."""
        self.dirty = True

    def device_view(self) -> torch.Tensor:
        """The device tensor, brought up to date if the host changed (one ``non_blocking`` copy); O(1) when clean."""
        if self.dirty:
            if self._dev is not self.host:
                self._dev.copy_(self.host, non_blocking=True)
            self.dirty = False
        return self._dev


class Workspace:
    """Scratch tensors reused from step to step, and pinned staging for small host arrays.

    ``get(name, rows, cols, dtype)`` is a ``[rows, cols]`` view of a buffer that grows (to twice the rows
    asked, at least) when a step needs more rows than any before, and is kept; ``upload(name, array)`` copies
    a small numpy array to the device through a reused (pinned, where the engine allows it) host buffer, with
    ``non_blocking``; on a CPU engine it is the array itself, no copy. As for :class:`HostMirror`, the host
    buffer is rewritten only at the next step, after the engine synced with the host.
    """

    def __init__(self, device: torch.device | str = "cpu", pin_memory: bool = False) -> None:
        self.device = torch.device(device)
        self.pin = bool(pin_memory) and self.device.type != "cpu"
        self._bufs: dict[str, torch.Tensor] = {}
        self._staged: dict[str, list] = {}  # name -> [host [2, n] (pinned), device [2, n], whose turn]
        self.grown = 0  # how many times a buffer was (re)allocated: flat once the batch sizes have been seen

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            keep = buf.shape[0] if buf is not None and buf.shape[1] == cols and buf.dtype == dtype else 0
            buf = self._bufs[name] = torch.empty(max(2 * rows, keep, 1), cols, dtype=dtype, device=self.device)
            self.grown += 1
        return buf[:rows]

    def download(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        """``tensor`` (1-D) on the host, through a reused (pinned, where the engine allows it) buffer: the copy
        waits for the device, so use it only where the host must read device values; the array is valid until
        the next download of ``name``. On a CPU engine it is the tensor's own memory, no copy."""
        if tensor.device.type == "cpu":
            return tensor.numpy()
        n = tensor.shape[0]
        buf = self._bufs.get("download:" + name)
        if buf is None or buf.shape[0] < n or buf.dtype != tensor.dtype:
            buf = self._bufs["download:" + name] = torch.empty(max(2 * n, 16), dtype=tensor.dtype, pin_memory=self.pin)
            self.grown += 1
        buf[:n].copy_(tensor)
        return buf[:n].numpy()

    def upload(self, name: str, array: np.ndarray) -> torch.Tensor:
        """``array`` on the device. Two host buffers per name take turns, so a scheduler that prepares the next
        step while the device still runs this one (overlap, async scheduling) never rewrites a buffer whose copy
        may not have run; upload each name once per step."""
        array = np.ascontiguousarray(array)
        if self.device.type == "cpu":
            return torch.from_numpy(array)
        n, dtype = array.size, torch.from_numpy(array[:0]).dtype
        entry = self._staged.get(name)
        if entry is None or entry[0].shape[1] < n or entry[0].dtype != dtype:
            size = max(2 * n, 16)
            entry = [torch.empty(2, size, dtype=dtype, pin_memory=self.pin), torch.empty(2, size, dtype=dtype, device=self.device), 0]
            self._staged[name] = entry
            self.grown += 1
        host, dev, turn = entry
        entry[2] = 1 - turn
        host[turn].numpy()[:n] = array.reshape(-1)
        out = dev[turn, :n]
        out.copy_(host[turn, :n], non_blocking=True)
        return out.view(array.shape)
