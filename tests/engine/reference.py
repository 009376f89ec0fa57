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


def _routed(model, tau, seed: int):
    """A context in which every MoE gate of ``model`` routes ``TopK(R + tau * G, k)`` with the draws of
    (seed, position, layer): the model's own gate on the masked logits (tau 0: the plain model). ``tau``: one
    float, or a list with one per MoE layer (every layer of the tiny Qwen3-MoE is one)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from tts_plugins.logits_processors.roe import gumbel, mask_router_logits

    stack = contextlib.ExitStack()
    gates = [layer.mlp.gate for layer in model.model.layers]
    taus = list(tau) if isinstance(tau, (list, tuple)) else [tau] * len(gates)
    assert len(taus) == len(gates)
    if not any(taus):
        return stack

    def routed(gate, layer_idx):
        def forward(hidden_states):
            hs = hidden_states.reshape(-1, gate.hidden_dim)
            logits = F.linear(hs, gate.weight)
            t = logits.shape[0]
            noise = gumbel(torch.full((t,), seed, dtype=torch.int64), torch.arange(t), layer_idx, gate.num_experts)
            logits = mask_router_logits(logits, gate.top_k, torch.full((t,), float(taus[layer_idx])), noise)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            top, idx = torch.topk(probs, gate.top_k, dim=-1)
            if gate.norm_topk_prob:
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), idx
        return forward

    for i, g in enumerate(gates):
        g.forward = routed(g, i)
        stack.callback(lambda g=g: g.__dict__.pop("forward", None))
    return stack


def hf_roe_greedy(model_dir: Path, prompt_ids: list[int], max_new: int, tau, seed: int, eos: int | None = None) -> list[int]:
    """Greedy decoding of a Qwen3-MoE where every token (prompt included) of the sequence is routed
    ``TopK(R + tau * G, k)`` with the draws of (seed, position, layer): the model's own gate on the masked logits.

    A plain transformers loop (the whole sequence recomputed each step); it shares only the noise function and
    the masking formula with the engines.
    """
    with _routed(_model(str(model_dir)), tau, seed):
        return hf_greedy(model_dir, prompt_ids, max_new, eos)


def hf_roster(model_dir: Path, prompt_ids: list[int], max_new: int, members: list[tuple[float, int]], temperature: float = 0.0,
              key: int | None = None, eos: int | None = None) -> list[int]:
    """A RoE roster in a plain transformers loop: each step, every member ``(tau, seed)`` computes the next-token
    distribution of the shared sequence under its own routing noise (the whole sequence recomputed), the roster's
    distribution is the mean of ``softmax(z / T)`` (T = 1 when greedy), and its token is the argmax (greedy) or the
    inverse-CDF draw with the uniform of (key, step) that the engines use. Shares only the noise functions."""
    import torch

    from tts_plugins.logits_processors.roe import uniform
    from tts_plugins.logits_processors.roster import _DRAW_STREAM

    model = _model(str(model_dir))
    ids, out = list(prompt_ids), []
    t = temperature if temperature > 0 else 1.0
    with torch.no_grad():
        for step in range(max_new):
            mean = 0
            for tau, seed in members:
                with _routed(model, tau, seed):
                    z = model(torch.tensor([ids])).logits[0, -1].double()
                mean = mean + torch.softmax(z / t, -1)
            mean = mean / len(members)
            if temperature > 0:
                u = float(uniform(torch.tensor([key]), torch.tensor([step]), _DRAW_STREAM, 1)[0, 0])
                cdf = torch.cumsum(mean, -1)
                nxt = min(int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True)), mean.shape[0] - 1)
            else:
                nxt = int(mean.argmax())
            out.append(nxt)
            if nxt == eos:
                break
            ids.append(nxt)
    return out
