"""Where the tests keep the tiny models they build (rebuilt when the recipe changes).

``dense``, ``multi``, ``moe``, ``eager``, ``wobbly``: random weights, built in a second (:mod:`tts_plugins.models.tiny`).
``reasoning``, ``reasoning-moe``: trained on multi-step arithmetic (:mod:`tts_plugins.models.trained`), only as long as
the engine tests need: they check what the engines and the techniques do with a model that has learned the task's
format (parity with transformers, a cap that leaves an answer, "Wait" re-checks), not how accurate it is; the
accuracy benchmark trains the full recipe into its own cache.

``python tests/models.py [random|trained|all]`` builds the variants (CI builds the random ones, then trains the two
reasoners in the background while the unit tests run, which need only the random ones).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MODELS_DIR = Path(os.environ.get("TTS_TINY_MODELS", Path(__file__).resolve().parent.parent / ".cache" / "tiny"))
TRAINED = {"reasoning": "dense", "reasoning-moe": "moe"}
RANDOM = ("dense", "multi", "moe", "eager", "wobbly")
# (steps, sequences per step): dense, enough for the format (thinking lines, "Wait" re-checks, an answer after a cut);
# the MoE only feeds the accuracy benchmark's end-to-end run, which checks plumbing (a greedy roster's members agree)
TEST_TRAINING = {"dense": (300, 32), "moe": (40, 32)}


def tiny_model(variant: str) -> Path:
    if variant in TRAINED:
        from tts_plugins.models.trained import build_reasoning_model

        # its own folder: the demo and the benchmark keep the full recipe under the plain name
        steps, batch = TEST_TRAINING[TRAINED[variant]]
        return build_reasoning_model(MODELS_DIR / f"{variant}-test", TRAINED[variant], steps=steps, batch=batch, target=None, evaluate_n=0)
    from tts_plugins.models.tiny import build_tiny_model

    return build_tiny_model(MODELS_DIR / variant, variant)


if __name__ == "__main__":
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    which = sys.argv[1] if len(sys.argv) > 1 else "all"  # random | trained | all
    if which in ("random", "all"):
        for name in RANDOM:
            print(f"{name}: {tiny_model(name)}", file=sys.stderr)
    if which in ("trained", "all"):
        # the trained models train on one thread each: both at once on two cores
        with ProcessPoolExecutor(len(TRAINED), mp_context=multiprocessing.get_context("spawn")) as pool:
            for name, path in zip(TRAINED, pool.map(tiny_model, TRAINED)):
                print(f"{name}: {path}", file=sys.stderr)
