"""tts-plugins: test-time-scaling techniques as plugins for vLLM and SGLang."""

from pathlib import Path as _Path

from tts_plugins.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
__all__ = ["hookimpl", "hookspec", "__version__"]

# Installed, ``logits_processors/`` and ``adapters/`` live inside this package (pyproject maps
# them there). Imported straight from a source checkout (``python -m pytest`` in the repo root),
# they are this folder's siblings: let the package find them there too.
_root = _Path(__file__).resolve().parent.parent
if (_root / "adapters" / "vllm.py").is_file() and (_root / "logits_processors" / "think.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]  # noqa: F821
