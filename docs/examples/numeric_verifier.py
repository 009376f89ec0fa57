"""tts_register_verifiers: a verifier that thought trimming may consult (``tts_trim_verifier: "numeric"``).

Two answers agree when both read as numbers within 1e-9 of each other (``0.50`` and ``.5``), else when their text is
equal. The check is cheap, so ``submit`` answers at once with a completed future; a verifier that asks a model would
submit to a thread pool or an HTTP client and return that future (the engine polls it and never waits).
"""

from __future__ import annotations

from concurrent.futures import Future

from tts_plugins import hookimpl


class NumericVerifier:
    def submit(self, previous_answer, answer, thought):
        done = Future()
        done.set_result(_same(previous_answer, answer))
        return done


def _same(a, b):
    try:
        return abs(float(a) - float(b)) <= 1e-9
    except ValueError:
        return a.strip() == b.strip()


@hookimpl
def tts_register_verifiers(register):
    register("numeric", NumericVerifier)  # the factory: called once per engine process
