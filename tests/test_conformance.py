"""The conformance suite itself: the built-in techniques pass it, and it catches each broken variant.

Every broken variant below is a small, otherwise sound technique (ban one token
for the requests that ask) with exactly one defect; the invariant that defect
violates must report it, with the technique's name and the invariant's name.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.params import get_int
from tts_plugins.technique import LogitsTechnique
from tts_plugins.testing.conformance import CHECKS, INVARIANTS, ConformanceError, tiny_info

# The built-ins, from the registry itself (no entry points: third-party plugins have their own runs).
BUILTIN = {t.name: t for t in build_registry(plugin_manager(load_entry_points=False)).techniques}
BUILTINS = sorted(BUILTIN)


def builtin(name: str) -> type:
    return BUILTIN[name]


@pytest.mark.parametrize("invariant", INVARIANTS)
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_techniques_pass_the_suite(name, invariant):
    CHECKS[invariant](builtin(name), tiny_info(), 30)


# --- a sound technique, and its broken variants ------------------------------------


class Ban(LogitsTechnique):
    """Bans one token id (``tts_ban``) for the requests that ask; argmax-invariant it is not."""

    name = "ban"
    keys = frozenset({"tts_ban"})

    @classmethod
    def conformance_params(cls):
        return [{"tts_ban": 0}, {"tts_ban": 7}, {"tts_ban": 100}]

    @classmethod
    def parse_params(cls, flat):
        return get_int(flat, "tts_ban", None, maximum=10_000)

    def __init__(self, info):
        super().__init__(info)
        self.ids = torch.full((info.max_slots + 1,), -1, dtype=torch.int64)
        self.active = 0

    def set_slot(self, slot, params, request):
        was = self.ids[slot] >= 0
        self.ids[slot] = -1 if params is None else params
        self.active += int(params is not None) - int(bool(was))

    @property
    def num_active(self):
        return self.active

    def apply(self, logits, row_slots, host_slots=None):
        if not self.active:
            return logits
        ids = self.ids[row_slots]
        hit = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids.clamp(min=0).unsqueeze(1), (ids >= 0).unsqueeze(1))
        return logits.masked_fill_(hit, float("-inf"))

    def reference_row(self, z, slot):
        z = z.clone()
        if self.ids[slot] >= 0:
            z[int(self.ids[slot])] = float("-inf")
        return z


class ParseLeaks(Ban):
    name = "parse_leaks"

    @classmethod
    def parse_params(cls, flat):
        return None if "tts_ban" not in flat else int(flat["tts_ban"])  # TypeError / ValueError without the key


class TouchesEveryRow(Ban):
    name = "touches_every_row"

    def apply(self, logits, row_slots, host_slots=None):
        out = super().apply(logits, row_slots, host_slots)
        return out.sub_(0.0 if not self.active else 1e-3)


class OrderDependent(Ban):
    name = "order_dependent"

    def apply(self, logits, row_slots, host_slots=None):
        out = super().apply(logits, row_slots, host_slots)
        if self.active and (row_slots[0] != self.info.neutral_slot):
            out[0, -1] = float("-inf")  # "the first row" instead of "this slot"
        return out


class ForgetsNothing(Ban):
    name = "forgets_nothing"

    def set_slot(self, slot, params, request):
        if params is not None:  # a release is ignored: state leaks into the next request of this slot
            super().set_slot(slot, params, request)


class ChangesDtype(Ban):
    name = "changes_dtype"

    def apply(self, logits, row_slots, host_slots=None):
        return super().apply(logits, row_slots, host_slots).float()


class ClaimsArgmaxInvariance(Ban):
    name = "claims_argmax_invariance"
    argmax_invariant = True


class BusyWhenUnused(Ban):
    name = "busy_when_unused"

    def apply(self, logits, row_slots, host_slots=None):
        logits = logits.clone()  # work (and an allocation) even when nobody opted in
        return super().apply(logits, row_slots, host_slots)


class WrongReference(Ban):
    name = "wrong_reference"

    def reference_row(self, z, slot):
        return z.clone()  # forgets the ban


BROKEN = {
    "parse_rejects_bad_input": ParseLeaks,
    "rows_not_opted_in_unchanged": TouchesEveryRow,
    "batch_order_equivariance": OrderDependent,
    "slot_lifecycle": ForgetsNothing,
    "shape_dtype_device": ChangesDtype,
    "argmax_claim": ClaimsArgmaxInvariance,
    "unused_path_does_nothing": BusyWhenUnused,
    "matches_reference": WrongReference,
}


def test_every_invariant_has_a_broken_variant():
    assert set(BROKEN) == set(INVARIANTS)


@pytest.mark.parametrize("invariant", INVARIANTS)
def test_the_sound_technique_passes(invariant):
    CHECKS[invariant](Ban, tiny_info(), 30)


@pytest.mark.parametrize("invariant", INVARIANTS)
def test_each_broken_variant_is_caught_by_its_invariant(invariant):
    broken = BROKEN[invariant]
    with pytest.raises(ConformanceError) as err:
        CHECKS[invariant](broken, tiny_info(), 60)
    message = str(err.value)
    assert f"[{broken.name}] invariant '{invariant}' broken" in message
    assert f"--tts-plugin {broken.name} -k {invariant}" in message, "the message says how to reproduce it"


def test_the_pytest_plugin_runs_the_suite_on_a_named_technique(tmp_path):
    """``pytest -p tts_plugins.testing --tts-plugin think -k slot_lifecycle``, as a plugin author runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tts_plugins.testing", "--tts-plugin", "think", "--tts-examples", "10",
                          "-k", "slot_lifecycle or unused", "-q", "-p", "no:cacheprovider"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "pytest", "-p", "tts_plugins.testing", "--tts-plugin", "no_such_technique", "-q"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "is not a registered technique" in bad.stdout + bad.stderr


def test_row_slots_helper_is_consistent():
    """The suite's batches map rows to distinct slots or the neutral one (a sanity check of the harness)."""
    from hypothesis import given, settings

    from tts_plugins.testing.conformance import MAX_SLOTS, batches

    @settings(max_examples=30, deadline=None)
    @given(batches(3, 50))
    def body(case):
        used = [s for s in case["host"] if s != MAX_SLOTS]
        assert len(used) == len(set(used)) == len(case["slots"])
        assert np.all((case["host"] >= 0) & (case["host"] <= MAX_SLOTS))

    body()


@pytest.mark.parametrize("invariant", INVARIANTS)
def test_the_example_third_party_plugin_passes_the_suite(invariant):
    """examples/ngram_ban, discovered the way engines discover it: the ``tts_plugins`` entry-point group."""
    from tts_plugins.manager import build_registry

    found = {t.name: t for t in build_registry().techniques}
    assert "ngram_ban" in found, "pip install examples/ngram_ban (./dev test does)"
    CHECKS[invariant](found["ngram_ban"], tiny_info(), 40)
