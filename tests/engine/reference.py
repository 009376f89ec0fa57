"""Plain Hugging Face transformers greedy decoding: the oracle engines are compared with."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=4)
def _model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new: int, eos: int | None = None) -> list[int]:
    import torch

    model = _model(str(model_dir))
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def hf_moi_greedy(model_dir: Path, prompt_ids: list[int], max_new: int, beta: float, topk: int = 20, eos: int | None = None,
                  replain_at: int | None = None) -> list[int]:
    """Greedy decoding where every generated token's input embedding is the MoI mixture (a plain loop).

    Independent of the engine code path: it uses the full-vocabulary float64
    formula (``moi_reference``) and feeds ``inputs_embeds`` to transformers.
    ``replain_at=t``: after t generated tokens the request is preempted and
    re-prefilled, so those t tokens are fed as plain embeddings from then on.
    """
    import torch

    from tts_plugins.logits_processors.moi import moi_reference

    model = _model(str(model_dir))
    table = model.get_input_embeddings().weight.detach()
    embeds = table[torch.tensor(prompt_ids)].unsqueeze(0)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(inputs_embeds=embeds).logits[0, -1]
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt == eos:
                break
            if replain_at is not None and len(out) == replain_at:
                # re-prefill: the history, this token included, as plain embeddings; mixing resumes after
                embeds = table[torch.tensor(prompt_ids + out)].unsqueeze(0)
                continue
            mixed = moi_reference(table, logits, nxt, beta, topk).to(table.dtype)
            embeds = torch.cat([embeds, mixed.view(1, 1, -1)], dim=1)
    return out


def hf_logprobs(model_dir: Path, prompt_ids: list[int], continuation: list[int]) -> list[float]:
    """Log-probabilities of ``continuation`` after ``prompt_ids`` under plain decoding, in one forward."""
    import torch

    model = _model(str(model_dir))
    ids = torch.tensor([prompt_ids + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1 : -1].double(), -1)
    return [float(logp[i, t]) for i, t in enumerate(continuation)]
