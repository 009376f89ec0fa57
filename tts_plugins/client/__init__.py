"""User-side code: talk to a serving engine, run strategies, aggregate answers, fit calibration, the ``tts`` CLI.

Nothing here runs inside an engine. ``extra_body(engine, **params)`` builds the request field that carries
``tts_*`` parameters; :class:`Server` is a small client for one OpenAI-compatible server.
"""

from tts_plugins.client.server import (
    FIELD,
    Sample,
    Server,
    ServerError,
    extra_body,
    extract_auto,
    extract_full,
    extract_last_number,
    extractor,
    final_part,
)

__all__ = ["FIELD", "Sample", "Server", "ServerError", "extra_body", "extract_auto", "extract_full", "extract_last_number", "extractor", "final_part"]
