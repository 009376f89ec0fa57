"""Engine-neutral batch state: slots, the row-to-slot map, and the tokens each row produced.

Engines number their batch differently (vLLM V1: persistent batch indices that
requests move between; vLLM V2: stable request slots with rows reordered every
step; SGLang: request-pool indices). Techniques only ever see stable *slots*:

* :class:`SlotState` owns the technique instances, the parsed parameters of
  each slot, and token observation (``watch`` a live list the engine appends
  to, or ``feed`` tokens explicitly).
* :class:`RowMap` turns vLLM V1's add/remove/move/swap of batch indices into
  slot allocation plus a ``[max_rows]`` row-to-slot tensor, so moving a request
  never moves technique state.

Host work per step is proportional to the number of *opted-in* requests; a
batch where nobody opted in costs one length check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tts_plugins.manager import Registry
from tts_plugins.slots import HostMirror, SlotAllocator
from tts_plugins.technique import EngineInfo, LogitsTechnique, SlotRequest

log = logging.getLogger("tts_plugins")


class SlotState:
    """Per-slot parameters and technique state for ``info.max_slots`` slots."""

    def __init__(self, registry: Registry, info: EngineInfo) -> None:
        self.registry = registry
        self.info = info
        if "verifiers" not in info.extra:
            info.extra["verifiers"] = registry.verifiers()
        self.techniques: list[LogitsTechnique] = [cls(info) for cls in registry.techniques]
        self._by_name = {t.name: t for t in self.techniques}
        self.active: dict[int, list[LogitsTechnique]] = {}
        self._watch: dict[int, list[Any]] = {}  # slot -> [live token list, number seen]
        self.pending_placeholders = False
        self.failures: dict[str, int] = {}  # technique name -> times it raised (quarantined)
        self._users: dict[str, int] = {}  # technique name -> slots using it (a quarantined one is skipped at once)

    def admit(self, slot: int, parsed: Mapping[str, Any], request: SlotRequest, live_outputs: list[int] | None = None) -> bool:
        """Start ``slot`` with already-parsed parameters; True if any technique is on for it."""
        self.release(slot)
        if not parsed:
            return False
        techs = []
        for name, params in parsed.items():
            tech = self._by_name[name]
            try:
                tech.set_slot(slot, params, request)
            except Exception:  # the fault policy: this technique is off for this request, the others go on
                log.exception("tts_plugins: technique %r failed to start a request; the request goes on without it", name)
                self.failures[name] = self.failures.get(name, 0) + 1
                try:
                    tech.set_slot(slot, None, SlotRequest())
                except Exception:
                    log.exception("tts_plugins: technique %r also failed to clear slot %d", name, slot)
                continue
            techs.append(tech)
        if not techs:
            raise RuntimeError(f"no technique could start for slot {slot}")
        self.active[slot] = techs
        for tech in techs:
            self._users[tech.name] = self._users.get(tech.name, 0) + 1
        if live_outputs is not None:
            self._watch[slot] = [live_outputs, 0]
            if live_outputs:
                self.observe_slot(slot)
        return True

    def release(self, slot: int) -> None:
        techs = self.active.pop(slot, None)
        self._watch.pop(slot, None)
        for tech in techs or ():
            self._users[tech.name] -= 1
        for tech in techs or ():
            tech.set_slot(slot, None, SlotRequest())

    def feed(self, slot: int, token_ids: Sequence[int]) -> None:
        for tech in tuple(self.active.get(slot, ())):  # a snapshot: quarantine edits the list
            try:
                tech.on_tokens(slot, token_ids)
            except Exception:
                self.quarantine(tech, "on_tokens")  # the slot's other techniques still see these tokens

    def quarantine(self, tech: LogitsTechnique, where: str) -> list[int]:
        """``tech`` raised: switch it off for every slot that uses it; those requests go on without it.

        The fault policy: a failing technique never takes the engine down and never touches requests that
        do not use it; the requests that do continue with their other techniques (or plain), and the error
        is logged with the technique's name and the slots it affected. Returns those slots.
        """
        slots = [slot for slot, techs in self.active.items() if tech in techs]
        log.exception("tts_plugins: technique %r failed in %s; it is switched off for the %d request(s) using it, "
                      "which continue without it", tech.name, where, len(slots))
        self.failures[tech.name] = self.failures.get(tech.name, 0) + 1
        self._users[tech.name] = self._users.get(tech.name, 0) - len(slots)
        for slot in slots:
            self.active[slot] = [t for t in self.active[slot] if t is not tech]
            try:
                tech.set_slot(slot, None, SlotRequest())
            except Exception:
                log.exception("tts_plugins: technique %r also failed to clear slot %d", tech.name, slot)
        return slots

    def observe_slot(self, slot: int) -> None:
        entry = self._watch[slot]
        out, seen = entry
        n = len(out)
        if n == seen:
            return
        new = out[seen:n]
        if new and new[-1] < 0:  # async scheduling: the newest ids are placeholders until sampled
            k = next(i for i, t in enumerate(new) if t < 0)
            new = new[:k]
            self.pending_placeholders = True
        if new:
            entry[1] = seen + len(new)
            self.feed(slot, new)

    def observe(self) -> None:
        """Feed every watched slot the tokens appended to its live list since the last call."""
        self.pending_placeholders = False
        for slot in self._watch:
            self.observe_slot(slot)

    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        if not self.active:
            return logits
        for tech in self.techniques:
            try:
                if self._users.get(tech.name) and tech.num_active:
                    logits = tech.apply(logits, row_slots, host_slots)
            except Exception:
                self.quarantine(tech, "apply")
        return logits

    @property
    def num_active(self) -> int:
        return len(self.active)

    def reporting(self) -> list[LogitsTechnique]:
        """The techniques that report on requests and are on for one now (an O(techniques) host check)."""
        return [t for t in self.techniques if t.report_fields and t.num_active and self._users.get(t.name)]

    def report_tables(self, slots: np.ndarray, tokens: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{name: report_values(slots, tokens)}`` of the reporting techniques that are on (see :meth:`reporting`)."""
        out: dict[str, np.ndarray] = {}
        for tech in self.reporting():
            try:
                out[tech.name] = np.asarray(tech.report_values(slots, tokens), dtype=np.float64)
            except Exception:  # a report is never worth a request: log and leave it out
                log.exception("tts_plugins: technique %r failed to report", tech.name)
        return out

    def report(self, slot: int, tokens: int | None = None) -> dict[str, Any]:
        """The reports of ``slot``'s request (which produced ``tokens`` tokens, when known), by technique name (those
        that have one); ``{}`` when none has."""
        count = None if tokens is None else np.asarray([tokens], dtype=np.int64)
        return decode_reports(self.registry, self.report_tables(np.asarray([slot], dtype=np.int64), count), 0)

    def release_all(self) -> list[int]:
        """Drop every slot's state (after a technique failed: its requests go on without techniques)."""
        slots = list(self.active)
        for slot in slots:
            try:
                self.release(slot)
            except Exception:  # a broken technique must not keep the others from resetting
                self.active.pop(slot, None)
                self._watch.pop(slot, None)
        self._users.clear()
        return slots

    def debug_counts(self) -> dict[str, int]:
        """Live state: all zero (failures aside) once every request has left."""
        counts = {"slots": len(self.active), "watched": len(self._watch)}
        for tech in self.techniques:
            counts[f"{tech.name}.active"] = tech.num_active
            counts.update({f"{tech.name}.{k}": v for k, v in tech.debug_counts().items()})
        counts.update({f"{name}.failures": n for name, n in self.failures.items()})
        return counts


def decode_reports(registry: Registry, tables: Mapping[str, np.ndarray], row: int) -> dict[str, Any]:
    """Row ``row`` of :meth:`SlotState.report_tables`, as the client sees it: ``{name: technique.report(...)}``
    for the techniques with numbers in that row. Needs only the registry (vLLM calls it in its scheduler)."""
    out: dict[str, Any] = {}
    by_name = {t.name: t for t in registry.techniques}
    for name, table in tables.items():
        tech = by_name.get(name)
        if tech is None or row >= len(table) or np.isnan(table[row]).all():
            continue
        try:
            r = tech.report(dict(zip(tech.report_fields, (float(v) for v in table[row]))))
        except Exception:
            log.exception("tts_plugins: technique %r failed to report", name)
            continue
        if r is not None:
            out[name] = r
    return out


class RowMap:
    """vLLM V1 persistent-batch rows to stable slots.

    ``row_slots`` is the device tensor handed to ``apply``; rows without an
    opted-in request map to the neutral slot. Only rows of opted-in requests
    take a slot, so ``max_slots`` bounds concurrent *opted-in* requests.
    """

    def __init__(self, max_rows: int, info: EngineInfo) -> None:
        self.neutral = info.neutral_slot
        self.max_slots = info.max_slots
        self._map = HostMirror(max_rows, torch.int64, fill=self.neutral, device=info.device, pin_memory=info.pin_memory)
        self._np = self._map.np
        self.slots = SlotAllocator(info.max_slots, what="opted-in requests")

    def slot_of(self, row: int) -> int:
        return int(self._np[row])

    def take(self, row: int) -> int:
        """Give ``row`` a fresh slot (the caller released any previous one); ``SlotsExhausted`` when none is free."""
        slot = self.slots.take()
        self._np[row] = slot
        self._map.mark_dirty()
        return slot

    def clear(self, row: int) -> int:
        """Unmap ``row``; returns the slot it held (or the neutral slot)."""
        slot = int(self._np[row])
        if slot != self.neutral:
            self.slots.free(slot)
            self._np[row] = self.neutral
            self._map.mark_dirty()
        return slot

    def move(self, src: int, dst: int, swap: bool) -> int:
        """Swap two rows, or move ``src`` onto ``dst`` (V1 condenses the batch this way: the request that
        was at ``dst`` has left, without a separate removal). Returns the slot that left (or the neutral
        slot), which the caller must release."""
        a, b = int(self._np[src]), int(self._np[dst])
        if a == self.neutral and b == self.neutral:
            return self.neutral
        self._np[dst] = a
        self._map.mark_dirty()
        if swap:
            self._np[src] = b
            return self.neutral
        self._np[src] = self.neutral
        if b != self.neutral:
            self.slots.free(b)
        return b

    def host_view(self, num_rows: int) -> np.ndarray:
        return self._np[:num_rows]

    def device_view(self, num_rows: int) -> torch.Tensor:
        return self._map.device_view()[:num_rows]

    def clear_all(self) -> None:
        for row in np.flatnonzero(self._np != self.neutral):
            self.clear(int(row))

    def mapped(self) -> dict[int, int]:
        """``{row: slot}`` for rows that hold a slot (for tests and debugging)."""
        return {int(r): int(s) for r, s in enumerate(self._np) if s != self.neutral}
