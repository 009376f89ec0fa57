"""tts_register_aggregators: a vote and a reward for the client (``tts run --vote unanimous --reward brevity``).

``unanimous``: the answer when every chain that answered agrees, else no answer (a strict vote for spotting the
problems a model is unsure of). ``brevity``: a reward that prefers shorter chains, for Best-of-N style selection.
Both run on the client only; nothing of them travels to the server.
"""

from __future__ import annotations

from tts_plugins import hookimpl
from tts_plugins.client.aggregate import Vote, classes


def unanimous(answers):
    groups = classes(answers)  # equivalence classes by math-verify: "1/2" and "0.5" are one answer
    total = sum(len(members) for _, members in groups)
    if len(groups) == 1:
        return Vote(groups[0][0], float(total), float(total))
    return Vote(None, 0.0, float(total))


def brevity(prompt, completion):
    return -float(len(completion))


@hookimpl
def tts_register_aggregators(register_aggregator, register_reward):
    register_aggregator("unanimous", unanimous)
    register_reward("brevity", brevity)
