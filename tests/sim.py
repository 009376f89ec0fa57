"""A minimal decode loop around the engine-neutral core, for tests without an engine.

It plays the engine's part exactly as the vLLM V1 adapter does (rows, slots,
live output lists, ``apply`` before sampling) with a synthetic "model" whose
logits depend only on (request, step), so any cross-row interference shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tts_plugins.batch import RowMap, SlotState
from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.technique import EngineInfo, SlotRequest

LogitsFn = Callable[[int, list[int]], torch.Tensor]  # (request id, its outputs so far) -> [V]


def random_model(vocab: int, seed: int = 0, banned: Sequence[int] = ()) -> LogitsFn:
    def fn(req: int, out: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + req * 10_007 + len(out))
        z = torch.randn(vocab, generator=g) * 3
        if banned:
            z[list(banned)] = float("-inf")
        return z

    return fn


def wants(vocab: int, favourite: Callable[[list[int]], int | None], seed: int = 0) -> LogitsFn:
    """A model whose argmax is ``favourite(outputs)`` whenever that is not None."""
    base = random_model(vocab, seed)

    def fn(req: int, out: list[int]) -> torch.Tensor:
        z = base(req, out)
        fav = favourite(out)
        if fav is not None:
            z[fav] = 50.0
        return z

    return fn


@dataclass
class Request:
    prompt: list[int]
    params: dict


class Sim:
    def __init__(self, tokenizer, *, max_slots: int = 8, registry=None, vocab: int | None = None, greedy: bool = True,
                 host_rows: bool = True) -> None:
        self.greedy = greedy
        self.host_rows = host_rows
        self.tok = tokenizer
        self.vocab = vocab or len(tokenizer)
        self.info = EngineInfo(
            vocab_size=self.vocab,
            max_slots=max_slots,
            device=torch.device("cpu"),
            tokenizer=tokenizer,
            eos_token_ids=(tokenizer.eos_token_id,),
        )
        self.registry = registry or build_registry(plugin_manager(load_entry_points=False))
        self.state = SlotState(self.registry, self.info)
        self.rows = RowMap(max_slots, self.info)

    def run(self, requests: Sequence[Request], model: LogitsFn, steps: int, *, stop_at_eos: bool = True) -> list[list[int]]:
        outs: list[list[int]] = [[] for _ in requests]
        done = [False] * len(requests)
        for row, req in enumerate(requests):
            parsed = self.registry.parse(req.params)
            if parsed:
                self.state.admit(self.rows.take(row), parsed, SlotRequest(req.prompt, greedy=self.greedy), outs[row])
        for _ in range(steps):
            self.state.observe()
            logits = torch.stack([model(r, outs[r]) for r in range(len(requests))])
            host = self.rows.host_view(len(requests)) if self.host_rows else None
            logits = self.state.apply(logits, self.rows.device_view(len(requests)), host)
            picks = logits.argmax(dim=1)
            for r in range(len(requests)):
                if not done[r]:
                    outs[r].append(int(picks[r]))
                    done[r] = stop_at_eos and outs[r][-1] == self.tok.eos_token_id
            if all(done):
                break
        for row in range(len(requests)):
            self.state.release(self.rows.clear(row))
        return outs
