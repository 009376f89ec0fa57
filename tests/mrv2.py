"""A CPU driver of vLLM's Model Runner V2 (MRV2) logits-processor interface, for tests.

MRV2 needs CUDA and Triton, so it cannot run here. This driver calls our processor the way 0.34's
``vllm/v1/worker/gpu/model_runner.py``, ``states.py`` and ``sample/sampler.py`` do, with the installed vLLM's own
interface classes (``LogitsContext``, ``LogitsProcRequestState``), and logits from a plain transformers model:

* **Slots** come from a free list (``free_indices.pop()``, freed slots appended), and are reused without telling the
  processors, except through the runner's ``_remove_request``, which the driver routes through the core's patch
  (``vllm_plugin._wrap_remove_request``) exactly as the patched runner does.
* **Admission**: ``req_states.add_request`` writes the committed tokens (the prompt, plus the output so far when the
  request is resumed) and ``prompt_len``/``prefill_len``/``total_len``; then every processor's ``add_request(slot,
  params)`` (its result is the sampler's ``needs_logits_processing``); then ``req_states`` flushes, then the
  processors' ``apply_staged_writes()``, once per step that admitted requests.
* **Steps**: finished and preempted requests are removed first (``finish_requests``), then new and resumed ones added
  (``add_requests``), then the forward and the sampler. The batch order is shuffled every step. A prefill may be
  split in chunks (``chunk``): a chunk that is not the last yields a logits row whose sample is thrown away
  (``seq_len < prefill_len``), as in ``get_num_sampled_and_rejected``.
* **The sampler**: when no row of the step needs processing, ``apply()`` is not called (MRV2's early return);
  otherwise the logits are copied to float32, ``apply(logits, ctx)`` runs, then temperature, top-p and the sample:
  greedy (argmax) or seeded (Gumbel noise keyed on the seed and the position, as MRV2's ``gumbel_sample``, so a
  resumed request draws the same noise at the same position).
* **Preemption**: ``preempt_after={req_id: k}`` removes the request after its k-th output token and re-adds it in the
  next step with ``all_token_ids`` = prompt + output so far (``prefill_len > prompt_len``).

Simplifications: no KV cache (each row's logits come from a full forward over its tokens, which equals the cached
computation in float32 on this model); no speculative decoding (refused at admission with tts_* keys, so draft rows
never reach our processor); no grammar, bias or penalty stages before ``apply()`` and no thinking-budget stage after
it (the requests here use none); the thinking-budget and logprob states are not modelled; stop conditions are EOS
and ``max_tokens`` only; the scheduler always schedules every running request (no token budget).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch


class _Host:
    """``UvaBackedTensor``: a host array ``.np`` (and its device mirror ``.gpu``, here the same memory)."""

    def __init__(self, n: int) -> None:
        self.cpu = torch.zeros(n, dtype=torch.int32)
        self.np = self.cpu.numpy()
        self.gpu = self.cpu


class _Staged:
    """``StagedWriteTensor``: writes are staged on the host and land on the device at ``apply_write()``."""

    def __init__(self, *shape: int) -> None:
        self.gpu = torch.zeros(*shape, dtype=torch.int32)
        self._writes: list[tuple[int, int, list[int]]] = []

    def stage_write(self, row: int, start: int, values: list[int]) -> None:
        self._writes.append((row, start, list(values)))

    def apply_write(self) -> None:
        for row, start, values in self._writes:
            if self.gpu.dim() == 1:
                self.gpu[row] = values[0]
            else:
                self.gpu[row, start:start + len(values)] = torch.tensor(values, dtype=torch.int32)
        self._writes.clear()


class RequestStateCPU:
    """The fields of MRV2's ``RequestState`` the sampler and the processors read, on CPU."""

    def __init__(self, max_num_reqs: int, max_model_len: int, vocab_size: int) -> None:
        self.device = torch.device("cpu")
        self.max_num_reqs, self.max_model_len, self.vocab_size = max_num_reqs, max_model_len, vocab_size
        self.req_id_to_index: dict[str, int] = {}
        self.index_to_req_id: dict[int, str] = {}
        self.free_indices = list(range(max_num_reqs))
        self.all_token_ids = _Staged(max_num_reqs, max_model_len)
        self.prompt_len = _Host(max_num_reqs)
        self.prefill_len = _Host(max_num_reqs)
        self.total_len = _Staged(max_num_reqs)

    def add_request(self, req_id: str, prompt_len: int, all_token_ids: list[int]) -> int:
        assert self.free_indices, "No free indices"
        slot = self.free_indices.pop()
        self.req_id_to_index[req_id] = slot
        self.index_to_req_id[slot] = req_id
        self.prompt_len.np[slot] = prompt_len
        self.prefill_len.np[slot] = len(all_token_ids)
        self.total_len.stage_write(slot, 0, [len(all_token_ids)])
        self.all_token_ids.stage_write(slot, 0, all_token_ids)
        return slot

    def apply_staged_writes(self) -> None:
        self.total_len.apply_write()
        self.all_token_ids.apply_write()

    def remove_request(self, req_id: str) -> int | None:
        slot = self.req_id_to_index.pop(req_id, None)
        if slot is None:
            return None
        self.index_to_req_id.pop(slot, None)
        self.free_indices.append(slot)
        return slot


def processor_state(req_states: RequestStateCPU) -> Any:
    """The installed vLLM's ``LogitsProcRequestState`` over ``req_states`` (0.34), or ``req_states`` itself (older
    interfaces, whose processors were handed the runner's request state)."""
    from vllm.v1.worker.gpu.sample.logits_processor import interface

    cls = getattr(interface, "LogitsProcRequestState", None)
    if cls is None:
        return req_states
    fields = {f for f in getattr(cls, "__dataclass_fields__", {})}
    return cls(**{f: getattr(req_states, f) for f in fields})


@dataclass
class Req:
    req_id: str
    prompt: list[int]
    params: Any  # vllm.SamplingParams
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens of the current fill already run through the model (chunked prefill)
    finished: bool = False


class MRV2Driver:
    """Runs requests through processors built as MRV2's ``build_custom_logits_processors`` builds them."""

    def __init__(self, vllm_config: Any, model_dir: Path, processors: list[type], *, max_num_reqs: int = 8, max_model_len: int = 512,
                 eos: int | None = None, shuffle_seed: int | None = 0, chunk: int | None = None) -> None:
        from transformers import AutoModelForCausalLM

        from tts_plugins.adapters import vllm_plugin

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32").eval()
        vocab = vllm_config.model_config.get_vocab_size()
        self.req_states = RequestStateCPU(max_num_reqs, max_model_len, vocab)
        lp_state = processor_state(self.req_states)
        self.processors = [cls(vllm_config, lp_state) for cls in processors]
        self.sampler = SimpleNamespace(logits_processors=self.processors)  # the runner's sampler holds them
        self.needs_processing = np.zeros(max_num_reqs, dtype=bool)
        self.eos = eos
        self.rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
        self.chunk = chunk
        self.apply_calls = 0
        # the runner's _remove_request, through the core's patch as installed on the real runner
        self._remove_request = vllm_plugin._wrap_remove_request(type(self)._remove_request_plain).__get__(self)

    # --- the runner -------------------------------------------------------------------------------------------

    def _remove_request_plain(self, req_id: str) -> bool:
        return self.req_states.remove_request(req_id) is not None

    def _add(self, reqs: list[Req]) -> None:
        for r in reqs:
            slot = self.req_states.add_request(r.req_id, len(r.prompt), r.prompt + r.output)
            r.computed = 0
            self.needs_processing[slot] = any([p.add_request(slot, r.params) for p in self.processors])
        if reqs:
            self.req_states.apply_staged_writes()
            for p in self.processors:
                p.apply_staged_writes()

    def _logits(self, tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([tokens])).logits[0, -1].float()

    def _sample(self, logits: torch.Tensor, reqs: list[Req], pos: list[int]) -> list[int]:
        out = []
        for i, r in enumerate(reqs):
            row, t = logits[i], float(r.params.temperature)
            if t < 1e-5:
                out.append(int(row.argmax()))
                continue
            row = row / t
            if r.params.top_p < 1.0:
                probs = torch.softmax(row, -1)
                sp, idx = probs.sort(descending=True)
                cut = (sp.cumsum(-1) - sp) > r.params.top_p
                row = row.clone()
                row[idx[cut]] = float("-inf")
            gen = torch.Generator().manual_seed((int(r.params.seed or 0) * 1_000_003 + pos[i]) % (2**63))
            u = torch.rand(row.shape, generator=gen, dtype=torch.float64).clamp_min(1e-20)
            out.append(int((row.double() - torch.log(-torch.log(u))).argmax()))
        return out

    def run(self, requests: list[tuple[str, list[int], Any]], *, preempt_after: dict[str, int] | None = None,
            max_steps: int = 2000, on_step: Any = None) -> dict[str, list[int]]:
        """Run ``requests`` (id, prompt ids, SamplingParams) to the end; their output ids by id. ``on_step(req_ids,
        finished)`` is called after each step's sample with the step's rows in batch order (the order of the runner's
        ``ModelRunnerOutput.req_ids``) and the ids that finished in it, before their slots are freed."""
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

        for _, _, params in requests:
            for p in self.processors:  # admission: the front end's validator
                type(p).validate_params(params)
        waiting = [Req(rid, list(prompt), params) for rid, prompt, params in requests]
        running: list[Req] = []
        preempt = dict(preempt_after or {})
        done: dict[str, list[int]] = {}
        to_remove: list[str] = []
        for _ in range(max_steps):
            # finish_requests: the finished and the preempted leave (slots freed, processors not called back)
            for rid in to_remove:
                self._remove_request(rid)
            to_remove = []
            # add_requests: new and resumed requests, then the staged writes
            self._add(waiting)
            running += waiting
            waiting = []
            if not running:
                break
            batch = running[:]
            if self.rng is not None:
                self.rng.shuffle(batch)
            slots, pos, fed, seq_lens, rows = [], [], [], [], []
            for r in batch:
                tokens = r.prompt + r.output
                slot = self.req_states.req_id_to_index[r.req_id]
                fill = int(self.req_states.prefill_len.np[slot])
                if r.computed < fill:  # (a chunk of) the prefill
                    end = fill if self.chunk is None else min(fill, r.computed + self.chunk)
                else:
                    end = len(tokens)  # a decode step: the newest token is fed
                r.computed = end
                slots.append(slot)
                pos.append(end - 1)
                fed.append(tokens[end - 1])
                seq_lens.append(end)
                rows.append(self._logits(tokens[:end]))
            logits = torch.stack(rows)
            idx = torch.tensor(slots, dtype=torch.int32)
            idx_np = np.array(slots, dtype=np.int32)
            if np.any(self.needs_processing[idx_np]):
                logits = torch.empty_like(logits, dtype=torch.float32).copy_(logits)
                ctx = LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=idx_np,
                                    expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32), input_ids=torch.tensor(fed, dtype=torch.int32),
                                    pos=torch.tensor(pos, dtype=torch.int64), seq_lens_upper_bound_np=np.array(seq_lens, dtype=np.int32))
                for p in self.processors:
                    logits = p.apply(logits, ctx)
                self.apply_calls += 1
            sampled = self._sample(logits, batch, [q + 1 for q in pos])
            for r, slot, tok, n in zip(batch, slots, sampled, seq_lens):
                if n < int(self.req_states.prefill_len.np[slot]):
                    continue  # a prefill chunk that is not the last: its sample is thrown away
                r.output.append(tok)
                r.computed = len(r.prompt) + len(r.output) - 1  # the new token is fed next step
                self.req_states.all_token_ids.gpu[slot, len(r.prompt) + len(r.output) - 1] = tok
                self.req_states.total_len.gpu[slot] = len(r.prompt) + len(r.output)
                if tok == self.eos or len(r.output) >= r.params.max_tokens:
                    r.finished = True
                    done[r.req_id] = list(r.output)
                    to_remove.append(r.req_id)
                elif preempt.get(r.req_id) == len(r.output):
                    del preempt[r.req_id]
                    to_remove.append(r.req_id)
                    waiting.append(r)  # resumed at the next step: the prompt and its output so far as the prefill
            if on_step is not None:
                on_step([r.req_id for r in batch], [r.req_id for r in batch if r.finished])
            running = [r for r in running if r.req_id not in to_remove]
        for rid in to_remove:
            self._remove_request(rid)
        assert not running and not waiting, "the driver ran out of steps"
        return done
