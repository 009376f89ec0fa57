"""Client helpers: put ``tts_*`` parameters where each engine's OpenAI-compatible server reads them.

vLLM reads per-request extras from ``vllm_xargs`` (a flat dict); SGLang reads
``custom_params``. Both take the same flat ``tts_*`` keys::

    from openai import OpenAI
    from tts_plugins.client import extra_body

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(
        model=MODEL, messages=[...], max_tokens=512,
        extra_body=extra_body("vllm", tts_think_max=256),
    )
"""

from __future__ import annotations

from typing import Any

from tts_plugins.params import PREFIX

FIELD = {"vllm": "vllm_xargs", "sglang": "custom_params"}


def extra_body(engine: str, /, **params: Any) -> dict[str, Any]:
    """The ``extra_body`` for an OpenAI client request to ``engine`` ("vllm" or "sglang")."""
    if engine not in FIELD:
        raise ValueError(f"engine must be one of {sorted(FIELD)}, got {engine!r}")
    bad = [k for k in params if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"parameter names must start with {PREFIX!r}, got {bad[0]!r}")
    return {FIELD[engine]: dict(params)} if params else {}
