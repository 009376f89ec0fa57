"""Think-token steering: cap, minimum and extension (s1 budget forcing), NoThinking.

Keys (see :class:`ThinkParams`): ``tts_think_max``,
``tts_think_min``, ``tts_think_extend``, ``tts_think_wait``,
``tts_think_conclusion``, ``tts_no_think``, ``tts_no_think_text``,
``tts_think_per_block``, and the graceful landing of the cap:
``tts_think_warn`` / ``tts_think_warn_at`` (a phrase spliced once a share of
the cap is reached) and ``tts_think_grace`` (up to N tokens past the cap to
end the sentence before the conclusion is forced). The warning and the grace
are our reading of what some serving stacks offer; no paper specifies them.

Mechanism: a per-row host state machine fed with the sampled tokens decides,
for the next step, one of three row modes, published to ``[max_slots + 1]``
device buffers:

* **force** token ``f``: every logit but ``f`` becomes ``-inf`` (``f`` gets 0).
  Forced sequences (the cap's conclusion plus the end string, the rest of a
  spliced "Wait", NoThinking's prefill) are a queue popped one token a step;
  the same queue serves thought trimming.
* **gate** ``j``: the tokens that would complete the end-of-thinking string
  (given a partial match of length ``j`` in the text so far) and EOS are set to
  ``-inf``, and "Wait" takes their place. s1 replaces the end with "Wait" when
  the model produces it; we do the same before sampling. Greedy rows splice
  exactly when a blocked token was the argmax (``z[w] = max(z) + 1``, as s1's
  greedy runs do). Sampled rows get the blocked probability mass added to the
  first token of the wait string, ``z[w] = logaddexp(z[w], logsumexp(z[blocked]))``,
  so the chance of splicing is exactly the chance the model had of ending.
  Once that first token is out, the rest of the wait string is forced and one
  ignored attempt is counted.
* **neutral**: untouched.

``apply`` costs nothing when no active slot is in force or gate mode (host
counters), one in-place pass over ``logits`` when a row is forced, and
``[R, K]`` gathers (K = size of the completion set, a handful) when gated, plus
one read of the gated rows for their maxima when one of them is greedy (a
sampled row's splice needs only its blocked tokens). Not argmax invariant.

Counting (s1): thinking tokens are the output tokens after the start string
(or from the first output token when the prompt already opened thinking),
spliced "Wait" tokens included, up to the token that completes the end string;
the cap's forced conclusion and end string are not counted. When the end string
is several tokens, its leading pieces count until the last one completes it
(text, not token ids, decides), so ``tts_think_min=m`` means the end string
cannot be completed by any of the first ``m`` thinking tokens. The budgets are the whole request's: a thinking
block the model opens again later goes on counting from where the last one stopped, and once the cap has ended
thinking the tokens that would complete the start string are blocked (no "Wait" takes their place), so a capped
request thinks at most ``tts_think_max`` tokens in all and its reasoning stays one block (``tts_think_per_block``:
each block counts from zero, and the model may open another). The cap forces
``conclusion + end`` once ``tts_think_max`` thinking tokens exist, so the count
is exact; then EOS is blocked for the first answer token so a capped request
never ends with an empty answer.

Our choices where s1 is silent: a "Wait" the model writes on its own while the
gate is closed is indistinguishable from a splice and also counts as an
ignored attempt; ``tts_no_think`` forces ``text + "\\n" + end`` at the first
step of every thinking block (and ``start + "\\n"`` before it when the prompt
did not open thinking). The user's ``max_tokens`` still ends a request inside
a forced sequence.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tts_plugins import envvars
from tts_plugins.forcing import few_other_rows, force_kernel, putter, upload_rows
from tts_plugins.params import Key, get_bool, get_float, get_int, get_text, show
from tts_plugins.reduce import row_max
from tts_plugins.slots import HostMirror, Workspace
from tts_plugins.technique import EngineInfo, LogitsTechnique, SlotRequest
from tts_plugins.text import StreamMatcher, cached_token_texts, completion_sets, encode, thinking_state

# --- parameters (parsed at admission, torch-free) --------------------------------

DEFAULT_WAIT = "Wait"
DEFAULT_CONCLUSION = "\n"
DEFAULT_NO_THINK_TEXT = "Okay, I think I have finished thinking."
DEFAULT_WARN = "\nI should wrap up soon.\n"
DEFAULT_WARN_AT = 0.8
MAX_GRACE = 1024
SENTENCE_ENDS = (".", "!", "?", "\n")

# Every key forces or forbids tokens inside the thinking block only, never in the answer (Key.forces).
THINK_KEY_SPECS = (
    Key("tts_think_max", "int >= 0", None,
        "Cap on the tokens inside the thinking block: at the cap, tts_think_conclusion and the end-of-thinking string "
        "are forced, and the next token cannot be EOS, so a capped request still answers.", forces="thinking"),
    Key("tts_think_min", "int >= 0", 0,
        "Until this many thinking tokens exist, the end-of-thinking string and EOS cannot be produced; where the model "
        "would end its thinking, tts_think_wait is spliced instead (s1 budget forcing).", forces="thinking"),
    Key("tts_think_extend", "int in [0, 10000]", 0,
        "Ignore the model's first N attempts to end thinking, splicing tts_think_wait each time (s1's num_ignore).",
        forces="thinking"),
    Key("tts_think_wait", "non-empty string", DEFAULT_WAIT,
        "The text spliced for tts_think_min and tts_think_extend (must not contain the end-of-thinking string).",
        forces="thinking"),
    Key("tts_think_conclusion", "string", DEFAULT_CONCLUSION,
        "What the cap forces before the end-of-thinking string.", forces="thinking"),
    Key("tts_no_think", "bool", False,
        "NoThinking: force tts_no_think_text and the end-of-thinking string at the first step of thinking (with the "
        "start string first if the prompt did not open a thinking block).", forces="thinking"),
    Key("tts_no_think_text", "string", DEFAULT_NO_THINK_TEXT,
        "The NoThinking prefill text (with tts_no_think).", forces="thinking"),
    Key("tts_think_per_block", "bool", False,
        "Give each thinking block its own count and let the model think again; by default the budgets are the whole "
        "request's, and once the cap has ended thinking the start string cannot be produced again.", forces="thinking"),
    Key("tts_think_warn", "bool or non-empty string", None,
        f"Splice a phrase once tts_think_warn_at of the cap is reached (true: {DEFAULT_WARN!r}); its tokens count as "
        "thinking. Needs tts_think_max.", forces="thinking"),
    Key("tts_think_warn_at", "number in (0, 1]", DEFAULT_WARN_AT,
        "The share of tts_think_max at which tts_think_warn's phrase is spliced.", forces="thinking"),
    Key("tts_think_grace", f"int in [0, {MAX_GRACE}]", 0,
        "At the cap, let the model end its sentence, up to this many tokens past the cap, before the conclusion and the "
        "end-of-thinking string are forced. Needs tts_think_max.", forces="thinking"),
)
THINK_KEYS = frozenset(k.name for k in THINK_KEY_SPECS)


@dataclass(frozen=True)
class ThinkParams:
    """Think-token steering options of one request.

    ``max_tokens`` caps model tokens inside a thinking block (None: no cap);
    ``min_tokens`` and ``extend`` keep it open (s1 budget forcing);
    ``no_think`` skips thinking (NoThinking). The budgets are the whole
    request's: a thinking block the model opens again later in the same
    completion goes on counting, and once the cap has ended thinking the start
    string cannot be produced again; ``per_block`` (``tts_think_per_block``)
    gives each thinking block its own count and lets the model think again.
    """

    max_tokens: int | None = None
    min_tokens: int = 0
    extend: int = 0
    wait: str = DEFAULT_WAIT
    conclusion: str = DEFAULT_CONCLUSION
    no_think: bool = False
    no_think_text: str = DEFAULT_NO_THINK_TEXT
    per_block: bool = False
    warn: str | None = None  # spliced once when warn_at of the cap is reached (None: no warning)
    warn_at: float = DEFAULT_WARN_AT
    grace: int = 0  # tokens past the cap the model may use to end its sentence

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> ThinkParams | None:
        """Parse the think keys of ``flat``; ``None`` when the request does not opt in."""
        if not any(k in flat for k in ("tts_think_max", "tts_think_min", "tts_think_extend", "tts_no_think")):
            for key in ("tts_think_wait", "tts_think_conclusion", "tts_no_think_text", "tts_think_per_block", "tts_think_warn",
                        "tts_think_warn_at", "tts_think_grace"):
                if key in flat:
                    raise ValueError(
                        f"{key} only takes effect with tts_think_max, tts_think_min, tts_think_extend "
                        f"or tts_no_think, got {key}={show(flat[key])} alone"
                    )
            return None
        params = cls(
            max_tokens=get_int(flat, "tts_think_max"),
            min_tokens=get_int(flat, "tts_think_min", 0),
            extend=get_int(flat, "tts_think_extend", 0, maximum=10_000),
            wait=get_text(flat, "tts_think_wait", DEFAULT_WAIT, allow_empty=False),
            conclusion=get_text(flat, "tts_think_conclusion", DEFAULT_CONCLUSION),
            no_think=get_bool(flat, "tts_no_think"),
            no_think_text=get_text(flat, "tts_no_think_text", DEFAULT_NO_THINK_TEXT),
            per_block=get_bool(flat, "tts_think_per_block"),
            warn=_warn_text(flat),
            warn_at=get_float(flat, "tts_think_warn_at", DEFAULT_WARN_AT, minimum=0.0, maximum=1.0, open_min=True),
            grace=get_int(flat, "tts_think_grace", 0, maximum=MAX_GRACE),
        )
        for key in ("tts_think_warn", "tts_think_grace"):
            if key in flat and params.max_tokens is None:
                raise ValueError(f"{key} needs tts_think_max (it acts relative to the cap), got {key}={show(flat[key])} without it")
        if "tts_think_warn_at" in flat and params.warn is None:
            raise ValueError(f"tts_think_warn_at needs tts_think_warn, got tts_think_warn_at={show(flat['tts_think_warn_at'])} without it")
        end = envvars.get("TTS_PLUGINS_THINK_END") or "</think>"
        if end in params.wait:
            raise ValueError(f"tts_think_wait must not contain the end-of-thinking string {end!r}, got {params.wait!r}")
        if params.max_tokens is not None and params.min_tokens > params.max_tokens:
            raise ValueError(
                f"tts_think_min must be <= tts_think_max, got tts_think_min={params.min_tokens} "
                f"and tts_think_max={params.max_tokens}"
            )
        if params.no_think and (params.min_tokens or params.extend):
            raise ValueError(
                "tts_no_think cannot be combined with tts_think_min or tts_think_extend, got "
                f"tts_think_min={params.min_tokens}, tts_think_extend={params.extend}"
            )
        if not params.no_think and "tts_no_think_text" in flat:
            raise ValueError(f"tts_no_think_text only takes effect with tts_no_think=true, got {show(flat['tts_no_think_text'])}")
        if params.max_tokens is None and params.min_tokens == 0 and params.extend == 0 and not params.no_think:
            return None  # e.g. tts_no_think=false alone: valid, and opts out
        return params


def _warn_text(flat: Mapping[str, Any]) -> str | None:
    """``tts_think_warn``: true (the default phrase), false (none) or the phrase itself."""
    if "tts_think_warn" not in flat:
        return None
    value = flat["tts_think_warn"]
    if isinstance(value, str) and value.lower() not in ("true", "false", "0", "1"):
        return get_text(flat, "tts_think_warn", DEFAULT_WARN, allow_empty=False)
    return DEFAULT_WARN if get_bool(flat, "tts_think_warn") else None


# --- kernel ---------------------------------------------------------------------

NONE, FORCE, GATE = 0, 1, 2


def think_kernel(
    logits: torch.Tensor,
    row_slots: torch.Tensor,
    force_tok: torch.Tensor,
    gate: torch.Tensor,
    wait_tok: torch.Tensor,
    greedy: torch.Tensor,
    block_ids: torch.Tensor,
    block_mass: torch.Tensor,
    *,
    do_force: bool,
    do_gate: bool,
    force_rows: torch.Tensor | None = None,
    keep_rows: torch.Tensor | None = None,
    gate_rows: torch.Tensor | None = None,
    scratch: Workspace | None = None,
    greedy_gated: bool = True,
) -> torch.Tensor:
    """Apply forcing and gating in place; see the module docstring.

    ``force_tok[S]``: token to force or -1. ``gate[S]``: row of ``block_ids``
    to block or -1. ``wait_tok[S]``: where the blocked mass goes, or -1.
    ``greedy[S]``: 1 for rows the engine decodes greedily (splice exactly when
    a blocked token was the argmax), 0 for sampled rows (move the mass).
    ``block_ids[G, K]``: token ids per gate row, padded by repeating a member;
    ``block_mass[G, K]``: False on the padding, so it is not counted twice
    (an empty row is all padding of token 0 and blocks nothing).
    ``force_rows``: the rows to force, when the caller knows them without a
    device sync; then only those rows are written. Otherwise every row is
    masked by ``force_tok[row_slots] >= 0``. ``gate_rows``: likewise, the rows
    whose gate may be closed (the others are not read: the row maximum a greedy
    splice needs is the one full read of a row); None: every row. ``scratch``:
    where a copy of a few gated rows is kept from step to step. ``greedy_gated``:
    False when the caller knows (on the host) that no gated row is greedy; then the
    row maxima, which only a greedy splice needs, are not read (sampled rows need
    only their blocked tokens).

    Single-element writes go through a flat ``index_put_`` (``scatter_`` on a
    CPU bf16 tensor rewrites the whole tensor: ~16x slower than a copy).
    """
    neg_inf = float("-inf")
    put = putter(logits)
    if do_gate:
        slots = row_slots if gate_rows is None else row_slots[gate_rows]

        def read(cols: torch.Tensor) -> torch.Tensor:
            return logits.gather(1, cols) if gate_rows is None else logits[gate_rows[:, None], cols]

        g = gate[slots]
        gi = g.clamp(min=0)
        ids = block_ids[gi]
        members = block_mass[gi]
        # a gate row with no members (an end string nothing completes, no EOS) blocks nothing
        gated = (g >= 0) & members[:, 0]
        vals = read(ids)
        in_set = vals.masked_fill(~(members & gated[:, None]), neg_inf)
        mass = torch.logsumexp(in_set, dim=1, keepdim=True)
        if not greedy_gated:  # sampled rows only: no row maximum is needed
            top = None
        elif gate_rows is None:
            top = row_max(logits)
        elif scratch is not None and 4 * gate_rows.shape[0] <= logits.shape[0]:  # few rows: copy them (into a reused buffer)
            part = scratch.get("gate_rows", gate_rows.shape[0], logits.shape[1], logits.dtype)
            top = row_max(torch.index_select(logits, 0, gate_rows, out=part))
        else:  # most rows: one read of them all is cheaper than copying those
            top = row_max(logits).index_select(0, gate_rows)
        hit = None if top is None else in_set.amax(dim=1, keepdim=True) >= top  # a blocked token was the argmax
        put(ids, vals.masked_fill(gated[:, None], neg_inf), rows=gate_rows)
        w = wait_tok[slots]
        redirect = (gated & (w >= 0))[:, None]
        wi = w.clamp(min=0)[:, None]
        cur = read(wi)
        moved = torch.logaddexp(cur, mass)
        spliced = moved if top is None else torch.where(greedy[slots][:, None] > 0, torch.where(hit, top + 1.0, cur), moved)
        put(wi, torch.where(redirect, spliced, cur), rows=gate_rows)
    if do_force:
        force_kernel(logits, row_slots, force_tok, force_rows, put, keep_rows)
    return logits


def think_reference_row(
    z: torch.Tensor, force: int, blocked: Sequence[int], gated: bool, wait: int, greedy: bool = False
) -> torch.Tensor:
    """One row, written plainly: the specification ``think_kernel`` must match."""
    z = z.clone()
    if gated:
        ids = sorted(set(blocked))
        mass = torch.logsumexp(z[ids], dim=0) if ids else torch.tensor(float("-inf"), dtype=z.dtype)
        top = z.max()
        ended = bool(ids) and bool(z[ids].max() >= top)
        z[ids] = float("-inf")
        if wait >= 0:
            if greedy:
                z[wait] = top + 1.0 if ended else z[wait]
            else:
                z[wait] = torch.logaddexp(z[wait], mass)
    if force >= 0:
        z[:] = float("-inf")
        z[force] = 0.0
    return z


@dataclass
class _Row:
    params: ThinkParams
    wait_ids: list[int]
    matcher: StreamMatcher
    thinking: bool = False
    count: int = 0
    ignored: int = 0
    forced: deque[int] = field(default_factory=deque)
    concluding: bool = False  # the queue holds the cap's conclusion + end
    eos_block: bool = False
    gated: bool = False  # published gate state for the step being sampled
    greedy: bool = False
    spent: bool = False  # the cap ended thinking: the start string is blocked from then on
    warned: bool = False  # the warning was spliced (once per request; per block with per_block)
    last: str = ""  # the text of the last token (the grace ends at a sentence end)


class ThinkSteering(LogitsTechnique):
    name = "think"
    keys = THINK_KEYS
    key_specs = THINK_KEY_SPECS
    effort_key = "tts_think_max"  # reasoning_effort caps the thinking
    effort_yields_to = frozenset({"tts_think_max", "tts_no_think"})  # a request that chose its own cap, or no thinking
    argmax_invariant = False

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        """Valid parameter sets covering this technique's modes, for the conformance suite."""
        return [
            {"tts_think_max": 0}, {"tts_think_max": 3, "tts_think_conclusion": " Time to answer.\n"}, {"tts_think_min": 5},
            {"tts_think_min": 2, "tts_think_extend": 1, "tts_think_wait": "Hmm"}, {"tts_no_think": True},
            {"tts_think_max": 6, "tts_think_warn": True, "tts_think_warn_at": 0.5, "tts_think_grace": 2},
        ]

    @classmethod
    def parse_params(cls, flat: Mapping[str, Any]) -> ThinkParams | None:
        return ThinkParams.parse(flat)

    def __init__(self, info: EngineInfo) -> None:
        super().__init__(info)
        n = info.max_slots + 1
        self.start, self.end = info.think_start, info.think_end
        if not self.end:
            raise ValueError("think end string must be non-empty")
        self.texts = cached_token_texts(info)
        self.end_ids = encode(info.tokenizer, self.end)
        self.eos = [i for i in info.eos_token_ids if 0 <= i < info.vocab_size]
        sets = completion_sets(self.texts, self.end)
        sets = [sorted(set(s) | set(self.eos)) for s in sets] + [sorted(set(self.eos))]
        self.eos_gate = len(sets) - 1
        # once a request's budget is spent, the tokens that would complete the start string (alone, and with EOS
        # for the first answer token after the cap)
        starts = completion_sets(self.texts, self.start) if self.start else []
        self.start_gate = len(sets)
        sets += [sorted(set(s)) for s in starts] + [sorted(set(s) | set(self.eos)) for s in starts]
        k = max(1, max(len(s) for s in sets))
        ids = np.zeros((len(sets), k), dtype=np.int64)
        mass = np.zeros((len(sets), k), dtype=bool)
        for r, s in enumerate(sets):
            if s:  # pad by repeating a member, so the duplicate writes agree
                ids[r, : len(s)] = s
                ids[r, len(s) :] = s[0]
                mass[r, : len(s)] = True
        self.block_ids = torch.from_numpy(ids).to(info.device)
        self.block_mass = torch.from_numpy(mass).to(info.device)
        self._empty_eos = not sets[-1]
        # rows: force token, gate row, wait token, greedy (one mirror: one copy when a slot changes)
        self._state = HostMirror((4, n), torch.int64, fill=-1, device=info.device, pin_memory=info.pin_memory)
        self._np = self._state.np
        self._mode = np.zeros(n, dtype=np.int8)
        self._published: dict[int, tuple[int, int, int, int]] = {}
        self._counts = [0, 0, 0]
        self._counts[NONE] = n
        self.rows: dict[int, _Row] = {}
        self._row_buffers: dict[str, torch.Tensor] = {}
        self._keep_buffers: dict[str, torch.Tensor] = {}
        self._gate_buffers: dict[str, torch.Tensor] = {}
        self._scratch = Workspace(info.device, info.pin_memory)  # a copy of a few gated rows, reused

    # --- host side --------------------------------------------------------

    @property
    def num_active(self) -> int:
        return len(self.rows)

    def set_slot(self, slot: int, params: ThinkParams | None, request: SlotRequest) -> None:
        self.rows.pop(slot, None)
        if params is not None:
            tok = self.info.tokenizer
            inside, tail = thinking_state(tok.decode(list(request.prompt_ids), skip_special_tokens=False), self.start, self.end)
            wait_ids = encode(tok, params.wait)
            if not wait_ids:
                raise ValueError(f"tts_think_wait must encode to at least one token, got {params.wait!r}")
            row = _Row(params=params, wait_ids=wait_ids, matcher=StreamMatcher(self.start, self.end, tail), thinking=inside, greedy=request.greedy)
            self.rows[slot] = row
            if inside:
                self._enter_thinking(row)
            elif params.no_think:
                row.forced.extend(encode(tok, self.start + "\n" + params.no_think_text + "\n" + self.end))
                row.concluding = True
            row.gated = not row.forced and self._gate_closed(row)
        self._publish(slot)

    def on_tokens(self, slot: int, token_ids: Sequence[int]) -> None:
        row = self.rows.get(slot)
        if row is None:
            return
        for t in token_ids:
            self._step(row, t)
        self._publish(slot)

    def _enter_thinking(self, row: _Row) -> None:
        row.thinking, row.concluding = True, False
        if row.params.per_block:  # each block its own budget; by default the whole request shares one
            row.count, row.ignored, row.warned = 0, 0, False
        if row.params.no_think:
            row.forced.extend(encode(self.info.tokenizer, row.params.no_think_text + "\n" + self.end))
            row.concluding = True
        else:
            self._check_cap(row)

    def _check_cap(self, row: _Row) -> None:
        p = row.params
        cap = p.max_tokens
        if not row.thinking or row.concluding or cap is None:
            return
        if p.warn is not None and not row.warned and not row.forced and cap > 0 and math.ceil(p.warn_at * cap) <= row.count < cap:
            row.warned = True  # the warning is spliced now (its tokens count as thinking, as s1's "Wait" does)
            row.forced.extend(encode(self.info.tokenizer, p.warn))
        if row.count >= cap:
            if p.grace and row.count < cap + p.grace and not row.last.rstrip(" ").endswith(SENTENCE_ENDS):
                return  # the grace: the model may end its sentence first
            row.forced.clear()
            row.forced.extend(encode(self.info.tokenizer, row.params.conclusion + self.end))
            row.concluding = True

    def _step(self, row: _Row, t: int) -> None:
        was_gated, row.gated = row.gated, False
        if row.forced:
            if row.forced[0] == t:
                row.forced.popleft()
            else:  # someone else decided this token (e.g. vLLM's own budget); our queue is stale
                row.forced.clear()
        elif was_gated and t == row.wait_ids[0]:
            row.ignored += 1
            row.forced.extend(row.wait_ids[1:])
        if row.eos_block and not row.thinking:
            row.eos_block = False
        counted = row.thinking and not row.concluding
        row.last = self.texts[t] if 0 <= t < len(self.texts) else ""
        for event in row.matcher.feed(row.last):
            if event == "end" and row.thinking:
                row.eos_block = row.concluding and row.params.max_tokens is not None and not row.params.no_think
                # the cap ended thinking: the request's budget is spent, it cannot open another block
                row.spent = row.spent or (row.eos_block and not row.params.per_block)
                row.thinking, row.concluding, counted = False, False, False
                row.forced.clear()
            elif event == "start" and not row.thinking:
                counted = False
                if row.concluding:  # our own NoThinking prefill opened the block
                    row.thinking = True
                else:
                    row.forced.clear()
                    self._enter_thinking(row)
        if counted:
            row.count += 1
            self._check_cap(row)
        # the gate as it stands for the next token; kept per token so that replaying a history
        # (a preempted request re-added with its outputs) counts ignored attempts exactly
        row.gated = not row.forced and self._gate_closed(row)

    def _gate_closed(self, row: _Row) -> bool:
        p = row.params
        return row.thinking and not row.concluding and (row.count < p.min_tokens or row.ignored < p.extend)

    def _publish(self, slot: int) -> None:
        row = self.rows.get(slot)
        force = gate = wait = -1
        greedy = int(row is not None and row.greedy)
        if row is not None:
            if row.forced:
                force = row.forced[0]
            elif self._gate_closed(row):
                gate, wait = row.matcher.end_partial(), row.wait_ids[0]
            elif row.spent and not row.thinking and self.start:
                j = row.matcher.start_partial()
                gate = self.start_gate + j + (len(self.start) if row.eos_block else 0)
            elif row.eos_block and not self._empty_eos:
                gate = self.eos_gate
        new = (force, gate, wait, greedy)
        if self._published.get(slot) == new:  # the common case: nothing changed (plain Python, no numpy)
            return
        self._published[slot] = new
        mode = FORCE if force >= 0 else GATE if gate >= 0 else NONE
        old = self._mode[slot]
        if old != mode:
            self._counts[old] -= 1
            self._counts[mode] += 1
            self._mode[slot] = mode
        self._np[:, slot] = new
        self._state.mark_dirty()

    def reference_row(self, z: torch.Tensor, slot: int) -> torch.Tensor:
        """The conformance suite's oracle: ``think_reference_row`` on this slot's published host state."""
        force, gate, wait, greedy = self._published.get(slot, (-1, -1, -1, 0))
        blocked = self.block_ids[gate][self.block_mass[gate]].tolist() if gate >= 0 else []
        return think_reference_row(z, force, blocked, gate >= 0, wait, bool(greedy))

    # --- hot path ---------------------------------------------------------

    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        do_force, do_gate = self._counts[FORCE] > 0, self._counts[GATE] > 0
        if not (do_force or do_gate):
            return logits
        force_rows = keep_rows = gate_rows = None
        if host_slots is not None:  # the adapter knows the rows: touch only those that need it
            modes = self._mode[host_slots]
            gates = np.flatnonzero(modes == GATE)
            do_gate = gates.size > 0
            rows = np.flatnonzero(modes == FORCE)
            do_force = rows.size > 0
            if not (do_force or do_gate):
                return logits
            if do_force:
                force_rows = upload_rows(self._row_buffers, rows, logits.device, self.info.pin_memory)
                keep_rows = few_other_rows(self._keep_buffers, modes == FORCE, logits.device, self.info.pin_memory)
            if do_gate and gates.size < modes.size:
                gate_rows = upload_rows(self._gate_buffers, gates, logits.device, self.info.pin_memory)
            # sampled rows (the usual case) need no row maximum: only a greedy gated row reads its whole row
            greedy_gated = do_gate and bool((self._np[3][host_slots[gates]] > 0).any())
        else:
            greedy_gated = True
        dev = self._state.device_view()
        return think_kernel(
            logits,
            row_slots,
            dev[0],
            dev[1],
            dev[2],
            dev[3],
            self.block_ids,
            self.block_mass,
            do_force=do_force,
            do_gate=do_gate,
            force_rows=force_rows,
            keep_rows=keep_rows,
            gate_rows=gate_rows,
            scratch=self._scratch,
            greedy_gated=greedy_gated,
        )
