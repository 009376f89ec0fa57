"""vLLM general plugin (entry-point group ``vllm.general_plugins``).

vLLM runs ``register()`` in every process it starts (API server, engine core,
workers). It installs the model patches that registered techniques ask for
through ``tts_register_model_patches``; it is idempotent, so running twice in
one process changes nothing.
"""

from __future__ import annotations

import logging

log = logging.getLogger("vllm.tts_plugins")  # under vLLM's logger, so its handlers print it


def register() -> None:
    from tts_plugins.manager import default_registry, disabled
    from tts_plugins.patching import install_patches

    if not disabled():
        install_patches(default_registry(), engine="vllm")
