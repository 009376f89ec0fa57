"""tts-plugins: test-time-scaling techniques as plugins for vLLM and SGLang."""

from tts_plugins.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
__all__ = ["hookimpl", "hookspec", "__version__"]
