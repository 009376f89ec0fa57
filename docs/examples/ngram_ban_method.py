"""tts_register_bench_methods: a ``tts bench`` method for the example plugin, ``ngram-ban:<size>``.

``tts bench --method greedy --method ngram-ban:3`` then measures greedy decoding with no repeated 3-gram
(``tts_ngram_ban: 3``, the technique of ``examples/ngram_ban``) against its control, greedy, on the same problems.
Only the request keys travel: the technique itself must be installed in the server, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from tts_plugins import hookimpl
from tts_plugins.client.methods import OURS, Setting, StrategyMethod


@dataclass(frozen=True)
class NgramBanMethod(StrategyMethod):
    def rules(self, s):
        size = s["size"]
        return [(isinstance(size, int) and not isinstance(size, bool) and 2 <= size <= 16,
                 f"size must be an int in [2, 16], got {size!r}")]


NGRAM_BAN = NgramBanMethod(
    "ngram-ban", "greedy decoding that never repeats an n-gram (examples/ngram_ban)",
    {"n": Setting(1, OURS), "temperature": Setting(0.0, OURS), "size": Setting(3, OURS)}, "size",
    source="examples/ngram_ban; greedy and size 3 are ours", title="ngram-ban {size}", title_keys=("n", "size"),
    params=lambda s, ctx: {"tts_ngram_ban": s["size"]},
)


@hookimpl
def tts_register_bench_methods(register):
    register(NGRAM_BAN)
