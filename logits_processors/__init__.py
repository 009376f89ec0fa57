"""The techniques, one module each: parameters, kernel, per-slot state and the engine-neutral half of any model patch.

Installed as ``tts_plugins.logits_processors``. Registered by the core
(:mod:`tts_plugins.builtin`); this package imports nothing of the engine
adapters (``tts_plugins.adapters``), which import it.
"""
